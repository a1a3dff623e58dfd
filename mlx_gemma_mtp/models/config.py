"""Gemma 4 text configuration (`gemma4_text`), read as the hub files and recent transformers spell it.

Reference: transformers `models/gemma4/configuration_gemma4.py` (`Gemma4TextConfig.__post_init__`); spec §1.
Released configs spell the full-attention overrides as `global_head_dim` / `num_global_key_value_heads`; recent
`save_pretrained` writes them as `per_layer_config` ({layer index: {head_dim, num_key_value_heads}}). Both are
turned into explicit per-layer lists here, so the model never guesses.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

SLIDING, FULL = "sliding_attention", "full_attention"
_ROPE_TYPES = ("default", "proportional")


@dataclass
class ModelArgs:
    vocab_size: int = 262144
    hidden_size: int = 1536
    intermediate_size: int = 6144
    num_hidden_layers: int = 35
    num_attention_heads: int = 8
    num_key_value_heads: int = 1
    head_dim: int = 256
    global_head_dim: int = 512
    num_global_key_value_heads: int | None = None
    hidden_activation: str = "gelu_pytorch_tanh"
    rms_norm_eps: float = 1e-6
    sliding_window: int = 512
    layer_types: list[str] | None = None
    rope_parameters: dict | None = None
    final_logit_softcapping: float | None = 30.0
    vocab_size_per_layer_input: int = 262144
    hidden_size_per_layer_input: int = 0
    attention_k_eq_v: bool = False
    num_kv_shared_layers: int = 0
    enable_moe_block: bool = False
    use_double_wide_mlp: bool = False
    num_experts: int | None = None
    top_k_experts: int | None = None
    moe_intermediate_size: int | None = None
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    use_bidirectional_attention: str | None = None
    per_layer_config: dict | None = None
    # derived in __post_init__
    layer_head_dims: list[int] = field(init=False)
    layer_kv_heads: list[int] = field(init=False)

    def __post_init__(self):
        L = self.num_hidden_layers
        if self.layer_types is None:  # HF default: 5 sliding, 1 full (mlx-lm's 4:1 default is wrong here)
            self.layer_types = [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(L)]
        self.layer_types = list(self.layer_types)
        if self.layer_types and self.layer_types[-1] != FULL:
            self.layer_types[-1] = FULL  # HF forces the last layer to full attention
        if self.rope_parameters is None:
            self.rope_parameters = {
                SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
                FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
            }
        self._derive_per_layer()
        self.validate()

    def _derive_per_layer(self) -> None:
        overrides = {int(k): v for k, v in (self.per_layer_config or {}).items()}
        if not overrides:  # hub spelling: full layers get the global values
            full = {"head_dim": self.global_head_dim}
            if self.attention_k_eq_v and self.num_global_key_value_heads is not None:
                full["num_key_value_heads"] = self.num_global_key_value_heads
            overrides = {i: full for i, t in enumerate(self.layer_types) if t == FULL}
        else:  # save_pretrained spelling: recover the hub fields for writing configs back
            full_ids = [i for i, t in enumerate(self.layer_types) if t == FULL]
            if full_ids and full_ids[0] in overrides:
                self.global_head_dim = overrides[full_ids[0]].get("head_dim", self.head_dim)
                self.num_global_key_value_heads = overrides[full_ids[0]].get("num_key_value_heads")
        self.layer_head_dims = [overrides.get(i, {}).get("head_dim", self.head_dim) for i in range(self.num_hidden_layers)]
        self.layer_kv_heads = [
            overrides.get(i, {}).get("num_key_value_heads", self.num_key_value_heads)
            for i in range(self.num_hidden_layers)
        ]
        self.per_layer_config = None

    def validate(self) -> None:
        """Reject configs this implementation cannot run, naming the field and the fix."""

        def bad(name, value, why):
            raise ValueError(f"unsupported Gemma 4 config: {name}={value!r} ({why})")

        if len(self.layer_types) != self.num_hidden_layers:
            bad("layer_types", self.layer_types, f"needs {self.num_hidden_layers} entries")
        if unknown := set(self.layer_types) - {SLIDING, FULL}:
            bad("layer_types", sorted(unknown), f"only {SLIDING!r} and {FULL!r} exist")
        if self.hidden_activation not in ("gelu_pytorch_tanh", "gelu_approx"):
            bad("hidden_activation", self.hidden_activation, "Gemma 4 uses gelu_pytorch_tanh")
        if self.use_bidirectional_attention == "all":
            bad("use_bidirectional_attention", "all", "not a causal language model")
        if not self.tie_word_embeddings:
            bad("tie_word_embeddings", False, "Gemma 4 ties the LM head to the embedding")
        if self.attention_bias:
            bad("attention_bias", True, "Gemma 4 attention has no biases")
        for t in set(self.layer_types):
            rope = self.rope_parameters.get(t)
            if rope is None or rope.get("rope_type", "default") not in _ROPE_TYPES:
                bad("rope_parameters", self.rope_parameters, f"need {t} with rope_type in {_ROPE_TYPES}")
        if self.num_attention_heads % max(self.layer_kv_heads) or any(
            self.num_attention_heads % h for h in self.layer_kv_heads
        ):
            bad("num_key_value_heads", self.layer_kv_heads, "must divide num_attention_heads")
        if self.enable_moe_block and not (self.num_experts and self.top_k_experts and self.moe_intermediate_size):
            bad("enable_moe_block", True, "needs num_experts, top_k_experts and moe_intermediate_size")
        if not 0 <= self.num_kv_shared_layers <= self.num_hidden_layers:
            bad("num_kv_shared_layers", self.num_kv_shared_layers, "must be within [0, num_hidden_layers]")
        first_shared = self.first_kv_shared_layer
        if first_shared < self.num_hidden_layers and first_shared > 0:
            if set(self.layer_types[first_shared:]) - set(self.layer_types[:first_shared]):
                bad("num_kv_shared_layers", self.num_kv_shared_layers, "a shared layer type has no producer")

    @property
    def first_kv_shared_layer(self) -> int:
        return self.num_hidden_layers - self.num_kv_shared_layers

    def kv_producer(self, layer_type: str) -> int:
        """Index of the last non-shared layer of `layer_type`: its K/V are shared with consumers and the drafter."""
        candidates = [i for i in range(self.first_kv_shared_layer) if self.layer_types[i] == layer_type]
        if not candidates:
            raise ValueError(f"no KV-producing layer of type {layer_type!r}")
        return candidates[-1]

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> ModelArgs:
        """Build from a `gemma4` (multimodal) or `gemma4_text` config dict; unknown keys are ignored."""
        model_type = config.get("model_type")
        if model_type == "gemma4":
            config = {**config["text_config"], "model_type": "gemma4_text"}
        elif model_type != "gemma4_text":
            raise ValueError(
                f"model_type {model_type!r} is not a Gemma 4 target (expected 'gemma4' or 'gemma4_text')"
            )
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        return cls(**{k: v for k, v in config.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        """Hub spelling (`global_head_dim`, `num_global_key_value_heads`), loadable by HF and by `from_dict`."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        out.pop("per_layer_config")
        return {"model_type": "gemma4_text", **out}
