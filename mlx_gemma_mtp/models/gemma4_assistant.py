"""Gemma 4 MTP drafter (`gemma4_assistant`): a stateless 4-layer model over the target's K/V.

Reference: transformers `models/gemma4_assistant/modeling_gemma4_assistant.py: Gemma4AssistantForCausalLM`;
spec §4. One step: `x = pre_projection([target_scaled_embed(token), hidden])` (embedding first), four decoder
layers whose attention is query-only over the target's producer K/V of the same layer type, `y = norm(x)`,
logits from `y` through the drafter's own tied embedding (or the clustered head), and
`next_hidden = post_projection(y)` feeds the next step. The drafter writes no cache and keeps no state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .config import BOOL, OBJECT, POSITIVE_INT, ModelArgs, Rule, check_fields
from .gemma4_text import KV, Gemma4TextModel
from .masked_embedder import MaskedEmbedder

DRAFTER_FIELDS: dict[str, Rule] = {
    "text_config": OBJECT, "backbone_hidden_size": POSITIVE_INT, "use_ordered_embeddings": BOOL,
    "num_centroids": POSITIVE_INT, "centroid_intermediate_top_k": POSITIVE_INT,
}


@dataclass
class DrafterArgs:
    text: ModelArgs
    backbone_hidden_size: int
    use_ordered_embeddings: bool = False
    num_centroids: int = 2048
    centroid_intermediate_top_k: int = 32

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> DrafterArgs:
        """Build from a `gemma4_assistant` config dict; errors name the field (`text_config.head_dim`)."""
        if not isinstance(config, dict):
            raise ValueError(f"the config must be a JSON object, not {type(config).__name__}")
        if config.get("model_type") != "gemma4_assistant":
            raise ValueError(
                f"model_type {config.get('model_type')!r} is not a Gemma 4 drafter (expected 'gemma4_assistant')"
            )
        for name in ("text_config", "backbone_hidden_size"):
            if name not in config:
                raise ValueError(f"{name} is missing (a gemma4_assistant config needs text_config and "
                                 "backbone_hidden_size, the target's hidden_size)")
        check_fields(config, DRAFTER_FIELDS)
        text = dict(config["text_config"], model_type="gemma4_text")
        if not text.get("num_kv_shared_layers"):  # HF: every drafter layer reads the target's K/V
            text["num_kv_shared_layers"] = text.get("num_hidden_layers", ModelArgs.num_hidden_layers)
        text.setdefault("hidden_size_per_layer_input", 0)
        text.setdefault("final_logit_softcapping", None)
        args = cls(
            text=ModelArgs.from_dict(text, where="text_config."),
            backbone_hidden_size=config["backbone_hidden_size"],
            use_ordered_embeddings=config.get("use_ordered_embeddings", False),
            num_centroids=config.get("num_centroids", 2048),
            centroid_intermediate_top_k=config.get("centroid_intermediate_top_k", 32),
        )
        if args.use_ordered_embeddings and args.text.vocab_size % args.num_centroids:
            raise ValueError(f"num_centroids={args.num_centroids} must divide text_config.vocab_size="
                             f"{args.text.vocab_size} (clusters of equal size)")
        if args.use_ordered_embeddings and args.centroid_intermediate_top_k > args.num_centroids:
            raise ValueError(f"centroid_intermediate_top_k={args.centroid_intermediate_top_k} must be <= "
                             f"num_centroids={args.num_centroids}")
        return args

    def validate_against(self, target: ModelArgs) -> None:
        """The drafter attends to the target's tensors directly: their shapes must agree (spec §1.3)."""

        def check(name, drafter_value, target_value):
            if drafter_value != target_value:
                raise ValueError(
                    f"drafter does not match the target: drafter {name}={drafter_value!r} but target has "
                    f"{target_value!r}; use the assistant released for this target"
                )

        t = self.text
        check("backbone_hidden_size", self.backbone_hidden_size, target.hidden_size)
        check("vocab_size", t.vocab_size, target.vocab_size)
        check("attention_k_eq_v", t.attention_k_eq_v, target.attention_k_eq_v)
        if t.num_kv_shared_layers != t.num_hidden_layers or t.hidden_size_per_layer_input or t.enable_moe_block:
            raise ValueError("drafter config invalid: needs all layers KV-shared, no PLE and no MoE (spec §1.3)")
        for i, layer_type in enumerate(t.layer_types):
            if layer_type not in target.layer_types:
                check(f"layer_types[{i}]", layer_type, sorted(set(target.layer_types)))
            p = target.kv_producer(layer_type)
            check(f"head_dim of {layer_type} layers", t.layer_head_dims[i], target.layer_head_dims[p])
            check(f"key/value heads of {layer_type} layers", t.layer_kv_heads[i], target.layer_kv_heads[p])


class Drafter(nn.Module):
    def __init__(self, args: DrafterArgs):
        super().__init__()
        self.args = args
        Hd, H = args.text.hidden_size, args.backbone_hidden_size
        self.model = Gemma4TextModel(args.text)
        for layer in self.model.layers:
            # the caller passes only the K/V the drafter may see (spec §4.3): no window mask here
            layer.self_attn.window = None
        self.pre_projection = nn.Linear(2 * H, Hd, bias=False)
        self.post_projection = nn.Linear(Hd, H, bias=False)
        if args.use_ordered_embeddings:
            self.masked_embedding = MaskedEmbedder(
                Hd, args.text.vocab_size, args.num_centroids, args.centroid_intermediate_top_k
            )

    def __call__(
        self, embeds: mx.array, hidden: mx.array, shared_kv: dict[str, KV], position: int,
        masks: dict[str, mx.array] | None = None,
    ) -> tuple[mx.array, mx.array]:
        """One draft step.

        Args:
            embeds: the target's scaled embedding of the input token, (B, 1, H).
            hidden: target post-norm hidden (first step) or the previous step's `next_hidden`, (B, 1, H).
            shared_kv: {layer type: (K, V)} of the target's producer layers, only the visible entries, all at
                positions <= `position`.
            position: the round's constant RoPE position of the query (of the first row when T > 1).
            masks: {layer type: (T, S) bool} for T > 1 query rows at positions position.. (drafter training:
                every row sees its own window); decoding passes None.

        Returns:
            (next_hidden (B, 1, H), y (B, 1, Hd)); pass `y` to `top_token`, `logits` or `candidates`.
        """
        x = self.pre_projection(mx.concatenate([embeds, hidden], axis=-1))  # embedding first (pitfall 17)
        for layer, layer_type in zip(self.model.layers, self.args.text.layer_types):
            k, v = shared_kv[layer_type]
            mask = None if masks is None else masks[layer_type]
            x, _ = layer(x, None, position, None, (k, v, 0), mask)  # decoding: all keys precede the query
        y = self.model.norm(x)
        return self.post_projection(y), y

    def top_token(self, y: mx.array) -> mx.array:
        """Greedy draft token (B, T) without vocabulary-wide logits when the clustered head exists."""
        if "masked_embedding" in self:
            return self.masked_embedding.argmax(y, self.model.embed_tokens)
        return mx.argmax(self.model.embed_tokens.as_linear(y), axis=-1)

    def candidates(self, y: mx.array) -> tuple[mx.array | None, mx.array]:
        """(candidate ids or None for the whole vocabulary, their logits float32): the draft's support."""
        if "masked_embedding" in self:
            ids, logits = self.masked_embedding.candidates(y, self.model.embed_tokens)
            return ids, logits.astype(mx.float32)
        return None, self.model.embed_tokens.as_linear(y).astype(mx.float32)

    def logits(self, y: mx.array) -> mx.array:
        """Vocabulary-wide logits as HF returns them (clustered head: fill rule of spec §4.4). No softcap."""
        if "masked_embedding" in self:
            return self.masked_embedding.full_logits(y, self.model.embed_tokens, self.args.text.vocab_size)
        return self.model.embed_tokens.as_linear(y)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Drop the tied `lm_head`; keep `token_ordering` integer (int32). Idempotent."""
        out = {k: v for k, v in weights.items() if not k.startswith("lm_head.") and "rotary_emb" not in k}
        key = "masked_embedding.token_ordering"
        if key in out:
            out[key] = out[key].astype(mx.int32)
        return out
