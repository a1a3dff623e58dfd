"""Gemma 4 text model (the MTP "target") in MLX: E2B, E4B, 26B-A4B (MoE) and 31B.

Reference: transformers `models/gemma4/modeling_gemma4.py` (Gemma4TextModel, Gemma4ForCausalLM); spec §2–3.
Module attribute names equal checkpoint tensor names, so weights load with `load_weights(strict=True)` after
`sanitize`. Besides logits, `forward` can export what the MTP drafter reads (spec §3): the post-final-norm hidden
states of the trailing rows and the K/V of each layer type's producer layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache, partial

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.rope_utils import initialize_rope
from mlx_lm.models.switch_layers import SwitchGLU

from ..cache import KVCache, SlidingKVCache
from .config import FULL, SLIDING, ModelArgs

KV = tuple[mx.array, mx.array]  # (keys, values), each (B, n_kv_heads, S, head_dim)


class RMSNorm(nn.Module):
    """Gemma 4 RMSNorm: scales by `weight` itself (not 1 + weight); computed in float32 (pitfall 1)."""

    def __init__(self, dims: int, eps: float = 1e-6, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        if with_scale:
            self.weight = mx.ones((dims,))

    def __call__(self, x: mx.array) -> mx.array:
        return rms_norm(x, self.get("weight"), self.eps)


def rms_norm(x: mx.array, weight: mx.array | None, eps: float) -> mx.array:
    """`mx.fast.rms_norm`, compiled on the CPU: its backend runs it as ~10 ops, GPUs as one kernel."""
    if mx.default_device() == mx.cpu:
        return _compiled_rms_norm(x.shape[-1], weight is None)(x, weight, eps)
    return mx.fast.rms_norm(x, weight, eps)


@cache
def _compiled_rms_norm(features: int, unscaled: bool):
    """A shapeless compiled rms_norm for one feature size, with or without a weight (any leading shape). One per
    kind, because MLX 0.32 reuses a shapeless trace first made inside a gradient transform (its inputs constant
    there, as the target's are under a drafter-training loss) for other sizes or the other kind: wrong norms.
    MLX keys its traces by the compiled Python function, so each kind needs a function of its own."""

    def norm(x: mx.array, weight: mx.array | None, eps: float) -> mx.array:
        return mx.fast.rms_norm(x, weight, eps)

    return mx.compile(norm, shapeless=True)


Blocks = tuple[tuple[int, int], ...]  # absolute [start, end) position ranges whose tokens see each other


def attention_mask(q_start: int, T: int, k_start: int, S: int, window: int | None, blocks: Blocks = ()
                   ) -> mx.array | str | None:
    """Boolean (T, S) mask for queries at q_start.. over keys at k_start..; "causal" when it is the plain causal
    mask ending at the last query; None when all keys are visible.

    A key is visible iff `q - window < k <= q` (sliding, pitfall 14) or `k <= q` (full). Within a block (an
    image's soft tokens, when the config says `use_bidirectional_attention: "vision"`) a query also sees the
    later keys of its block, still bounded by the window: HF's AND(window, OR(causal, same block)).
    """
    causal_free = k_start + S - 1 <= q_start
    window_free = window is None or k_start > q_start + T - 1 - window
    if causal_free and window_free:
        return None
    if window_free and k_start + S == q_start + T and not blocks:
        return "causal"  # SDPA's own causal mask (aligned to the last key): no mask array at all
    q = mx.arange(q_start, q_start + T)[:, None]
    k = mx.arange(k_start, k_start + S)[None]
    visible = k <= q
    for start, end in blocks:
        visible = visible | ((q >= start) & (q < end) & (k >= start) & (k < end))
    return visible & (k > q - window) if window is not None else visible


def shared_mask(masks: dict | None, *key) -> mx.array | str | None:
    """`attention_mask(*key)`, kept in `masks` (one forward's) for the other layers that need the same mask."""
    if masks is None:
        return attention_mask(*key)
    if key not in masks:
        masks[key] = attention_mask(*key)
    return masks[key]


def make_rope(args: ModelArgs, layer_type: str, head_dim: int) -> nn.Module:
    params = args.rope_parameters[layer_type]
    return initialize_rope(head_dim, params.get("rope_theta", 10_000.0), False, params)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.layer_type = args.layer_types[layer_idx]
        self.window = args.sliding_window if self.layer_type == SLIDING else None
        self.head_dim = d = args.layer_head_dims[layer_idx]
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.layer_kv_heads[layer_idx]
        self.is_kv_shared = layer_idx >= args.first_kv_shared_layer
        # tensor parallelism (distributed.py): the K/V heads of this rank's query heads when the K/V it attends
        # to hold more heads than those (replicated producers); None: all of them
        self.kv_slice: slice | None = None
        H = args.hidden_size
        self.q_proj = nn.Linear(H, self.n_heads * d, bias=False)
        self.q_norm = RMSNorm(d, args.rms_norm_eps)
        self.o_proj = nn.Linear(self.n_heads * d, H, bias=False)
        if not self.is_kv_shared:
            self.k_proj = nn.Linear(H, self.n_kv_heads * d, bias=False)
            if not (args.attention_k_eq_v and self.layer_type == FULL):
                self.v_proj = nn.Linear(H, self.n_kv_heads * d, bias=False)
            self.k_norm = RMSNorm(d, args.rms_norm_eps)
            self.v_norm = RMSNorm(d, args.rms_norm_eps, with_scale=False)
        self.rope = make_rope(args, self.layer_type, d)

    def project_kv(self, x: mx.array, offset: int) -> KV:
        B, T, _ = x.shape
        k_raw = self.k_proj(x).reshape(B, T, self.n_kv_heads, self.head_dim)
        # k_eq_v full layers: V is the raw K projection, before k_norm and RoPE (pitfall 4)
        v_raw = self.v_proj(x).reshape(B, T, self.n_kv_heads, -1) if "v_proj" in self else k_raw
        k = self.rope(self.k_norm(k_raw).transpose(0, 2, 1, 3), offset=offset)
        v = self.v_norm(v_raw).transpose(0, 2, 1, 3)
        return k, v

    def __call__(self, x, offset: int, cache: KVCache | None = None, shared: tuple | None = None,
                 explicit_mask: mx.array | None = None, masks: dict | None = None, blocks: Blocks = ()):
        """Returns (output, (keys, values, k_start)): what this layer attended to, for consumers/the drafter.

        `explicit_mask` (T, S) replaces the causal/window mask (drafter training attends per-row windows).
        `masks` holds the forward's masks so far, built once and shared by the layers that need the same one.
        `blocks`: bidirectional ranges (image soft tokens); HF applies them to sliding layers only.
        """
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).reshape(B, T, self.n_heads, self.head_dim))
        q = self.rope(q.transpose(0, 2, 1, 3), offset=offset)  # (B, n_heads, T, d)
        if shared is None:
            k, v = self.project_kv(x, offset)
            k_start = offset
            if cache is not None:
                k, v = cache.update(k, v)
                k_start = cache.start
            shared = (k, v, k_start)
        k, v, k_start = shared
        if self.kv_slice is not None:
            k, v = k[:, self.kv_slice], v[:, self.kv_slice]
        mask = explicit_mask
        if mask is None:
            blocks = blocks if self.window is not None else ()
            mask = shared_mask(masks, offset, T, k_start, k.shape[2], self.window, blocks)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=mask)  # scale 1.0: pitfall 2
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, T, -1)), shared


@partial(mx.compile, shapeless=True)
def geglu(gate: mx.array, up: mx.array) -> mx.array:
    return nn.gelu_approx(gate) * up


@partial(mx.compile, shapeless=True)
def logit_softcap(cap: float, x: mx.array) -> mx.array:
    """`cap * tanh(x / cap)` in x's dtype, returned as float32 (one fused pass over the vocabulary)."""
    return (mx.tanh(x / cap) * cap).astype(mx.float32)


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def __call__(self, x):
        return self.down_proj(geglu(self.gate_proj(x), self.up_proj(x)))


class Router(nn.Module):
    """Top-k expert choice from the un-normalised residual (pitfall 11)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.eps = args.rms_norm_eps
        self.top_k = args.top_k_experts
        self.proj = nn.Linear(args.hidden_size, args.num_experts, bias=False)
        self.scale = mx.ones((args.hidden_size,))
        self.per_expert_scale = mx.ones((args.num_experts,))

    def __call__(self, x: mx.array) -> tuple[mx.array, mx.array]:
        r = rms_norm(x, None, self.eps) * self.scale * (x.shape[-1] ** -0.5)
        scores = self.proj(r).astype(mx.float32)
        idx = mx.argpartition(-scores, self.top_k - 1, axis=-1)[..., : self.top_k]
        # softmax over the chosen k == renormalised top-k of the full softmax
        weights = mx.softmax(mx.take_along_axis(scores, idx, axis=-1), axis=-1)
        return idx, weights * self.per_expert_scale[idx]


class GeGLU(nn.Module):
    def __call__(self, up, gate):
        return geglu(gate, up)


class Experts(nn.Module):
    """The MoE experts; HF's fused `gate_up_proj` is split into `switch_glu` (mlx-lm's layout) by `sanitize`."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.switch_glu = SwitchGLU(args.hidden_size, args.moe_intermediate_size, args.num_experts, GeGLU())
        self.sharding_group = None  # set by distributed.shard.shard: each rank holds a slice of every expert

    def __call__(self, x, idx, weights):
        y = self.switch_glu(x, idx)  # (..., top_k, H)
        y = (y * weights[..., None].astype(y.dtype)).sum(axis=-2)
        return y if self.sharding_group is None else mx.distributed.all_sum(y, group=self.sharding_group)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        H, eps = args.hidden_size, args.rms_norm_eps
        self.self_attn = Attention(args, layer_idx)
        wide = args.use_double_wide_mlp and self.self_attn.is_kv_shared  # pitfall 10
        self.mlp = MLP(H, args.intermediate_size * (2 if wide else 1))
        self.input_layernorm = RMSNorm(H, eps)
        self.post_attention_layernorm = RMSNorm(H, eps)
        self.pre_feedforward_layernorm = RMSNorm(H, eps)
        self.post_feedforward_layernorm = RMSNorm(H, eps)
        self.layer_scalar = mx.ones((1,))
        if args.enable_moe_block:
            self.router = Router(args)
            self.experts = Experts(args)
            self.pre_feedforward_layernorm_2 = RMSNorm(H, eps)
            self.post_feedforward_layernorm_1 = RMSNorm(H, eps)
            self.post_feedforward_layernorm_2 = RMSNorm(H, eps)
        if args.hidden_size_per_layer_input:
            P = args.hidden_size_per_layer_input
            self.per_layer_input_gate = nn.Linear(H, P, bias=False)
            self.per_layer_projection = nn.Linear(P, H, bias=False)
            self.post_per_layer_input_norm = RMSNorm(H, eps)

    def feed_forward(self, x: mx.array) -> mx.array:
        y = self.mlp(self.pre_feedforward_layernorm(x))
        if "router" in self:  # dense MLP = always-on shared expert; router sees the raw residual
            idx, weights = self.router(x)
            moe = self.experts(self.pre_feedforward_layernorm_2(x), idx, weights)
            y = self.post_feedforward_layernorm_1(y) + self.post_feedforward_layernorm_2(moe)
        return self.post_feedforward_layernorm(y)

    def __call__(self, x, per_layer_input, offset, cache=None, shared=None, explicit_mask=None, masks=None,
                 blocks: Blocks = ()):
        a, shared = self.self_attn(self.input_layernorm(x), offset, cache, shared, explicit_mask, masks, blocks)
        x = x + self.post_attention_layernorm(a)
        x = x + self.feed_forward(x)
        if per_layer_input is not None:
            g = geglu(self.per_layer_input_gate(x), per_layer_input)
            x = x + self.post_per_layer_input_norm(self.per_layer_projection(g))
        return x * self.layer_scalar, shared  # layer_scalar scales the whole residual stream (pitfall 7)


@dataclass(frozen=True)
class MediaRows:
    """Soft tokens that replace placeholder rows of one forward's input (images, video frames, audio; spec: HF
    Gemma4Model).

    `rows[j]` = (first row within the forward's tokens, features (L, hidden)). Placeholders are looked up as the
    pad token in the per-layer embeddings, while the per-layer context projection sees the features (as HF
    does). `blocks`: absolute position ranges that attend bidirectionally in sliding layers."""

    rows: tuple[tuple[int, mx.array], ...]
    blocks: Blocks = ()


@dataclass
class TargetOutput:
    """What one target forward returns. Fields not asked for are None."""

    logits: mx.array | None  # (B, R, V) float32, softcapped, for the R trailing rows asked for
    hidden: mx.array | None  # (B, R, H) post-final-norm hidden states of those rows (spec §3.1)
    shared_kv: dict[str, KV] | None  # {layer type: producer (K, V)} incl. this forward's tokens (spec §3.2)


class Gemma4TextModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args, i) for i in range(args.num_hidden_layers)]
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        if P := args.hidden_size_per_layer_input:
            L = args.num_hidden_layers
            self.embed_tokens_per_layer = nn.Embedding(args.vocab_size_per_layer_input, L * P)
            self.per_layer_model_projection = nn.Linear(args.hidden_size, L * P, bias=False)
            self.per_layer_projection_norm = RMSNorm(P, args.rms_norm_eps)

    def embed(self, ids: mx.array) -> mx.array:
        """Scaled token embedding; the scale is rounded to the weight dtype as HF does (pitfall 8)."""
        e = self.embed_tokens(ids)
        return e * mx.array(math.sqrt(self.args.hidden_size), mx.float32).astype(e.dtype)

    def per_layer_inputs(self, ids: mx.array, e: mx.array) -> mx.array:
        """PLE (spec §2.2): (B, T, L, P), token part plus context projection of the scaled embedding."""
        a = self.args
        L, P = a.num_hidden_layers, a.hidden_size_per_layer_input
        t = self.embed_tokens_per_layer(ids)
        t = (t * mx.array(math.sqrt(P), mx.float32).astype(t.dtype)).reshape(*ids.shape, L, P)
        c = self.per_layer_model_projection(e) * (a.hidden_size**-0.5)
        c = self.per_layer_projection_norm(c.reshape(*ids.shape, L, P))
        return (c + t) * (2.0**-0.5)


class Model(nn.Module):
    """Gemma 4 causal LM with a tied, softcapped head."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Gemma4TextModel(args)
        self.producers = {t: args.kv_producer(t) for t in dict.fromkeys(args.layer_types)}
        # layers before the first KV-shared one own caches; later layers reuse their producer's (spec §2.9)
        self.n_caches = args.first_kv_shared_layer

    def make_cache(self, max_rollback: int = 16) -> list[KVCache]:
        """One cache per KV-producing layer; sliding layers keep `max_rollback` tokens of rollback slack."""
        a = self.args
        return [
            SlidingKVCache(a.sliding_window, max_rollback) if a.layer_types[i] == SLIDING else KVCache()
            for i in range(self.n_caches)
        ]

    def __call__(self, inputs: mx.array, cache: list[KVCache] | None = None) -> mx.array:
        """Logits for every row, (B, T, V)."""
        return self.forward(inputs, cache, rows=inputs.shape[1]).logits

    def forward(
        self,
        inputs: mx.array,
        cache: list[KVCache] | None = None,
        rows: int = 1,
        return_hidden: bool = False,
        return_shared_kv: bool = False,
        return_logits: bool = True,
        media: MediaRows | None = None,
        masks_by_type: dict[str, mx.array] | None = None,
    ) -> TargetOutput:
        """Run token ids `inputs` (B, T) through the model, appending to `cache`.

        Args:
            rows: how many trailing rows need logits/hidden (0: none, e.g. a non-final prefill chunk). Layers
                after the last KV producer only run those rows, as HF's `logits_to_keep` does.
            media: image/audio soft tokens replacing placeholder rows (a prompt's prefill; batch size 1).
            masks_by_type: {layer type: (B, 1, T, S) bool} masks replacing the causal/window ones (a batch whose
                rows sit at different positions, `batch_cache.BatchCache`; the cache's `offset` is then (B,)).
        """
        m, a = self.model, self.args
        T = inputs.shape[1]
        rows = min(rows, T)
        offset = cache[0].offset if cache else 0
        h, inputs = self._embed(inputs, media)
        ple = m.per_layer_inputs(inputs, h) if a.hidden_size_per_layer_input else None
        blocks = () if media is None else media.blocks
        shared_by_type: dict[str, tuple] = {}
        producer_kv: dict[str, KV] = {}
        masks: dict[tuple, mx.array | str | None] = {}  # layers of one type share their mask
        for i, layer in enumerate(m.layers):
            if i == a.first_kv_shared_layer and rows < T:  # consumers write no cache: drop unneeded rows
                if rows == 0:
                    break
                h, offset = h[:, T - rows :], offset + T - rows
                ple = None if ple is None else ple[:, T - rows :]
                if masks_by_type is not None:
                    masks_by_type = {t: m[:, :, T - rows :] for t, m in masks_by_type.items()}
            layer_type = a.layer_types[i]
            if i < a.first_kv_shared_layer:
                layer_cache, shared = (cache[i] if cache else None), None
            else:
                layer_cache, shared = None, shared_by_type[layer_type]
            explicit = None if masks_by_type is None else masks_by_type[layer_type]
            h, kv = layer(h, None if ple is None else ple[:, :, i], offset, layer_cache, shared, explicit, masks,
                          blocks)
            shared_by_type[layer_type] = kv
            if i == self.producers[layer_type]:
                producer_kv[layer_type] = kv[:2]
        if rows == 0:
            return TargetOutput(None, None, producer_kv if return_shared_kv else None)
        h = m.norm(h[:, -rows:])
        logits = self.logits(h) if return_logits else None
        return TargetOutput(logits, h if return_hidden else None, producer_kv if return_shared_kv else None)

    def _embed(self, inputs: mx.array, media: MediaRows | None) -> tuple[mx.array, mx.array]:
        """(embeddings with media features spliced in, the ids the per-layer embeddings look up)."""
        if media is None or not media.rows:
            return self.model.embed(inputs), inputs
        ids = mx.array(inputs)  # a copy: the caller's token array keeps its placeholders
        for row, features in media.rows:
            ids[:, row : row + features.shape[0]] = self.args.pad_token_id
        h = self.model.embed(ids)  # (1, T, H)
        for row, features in media.rows:
            h[:, row : row + features.shape[0]] = features.astype(h.dtype)
        return h, ids

    def logits(self, hidden: mx.array) -> mx.array:
        """Tied head on post-norm hidden states, softcapped, float32."""
        logits = self.model.embed_tokens.as_linear(hidden)
        cap = self.args.final_logit_softcapping
        return logit_softcap(cap, logits) if cap else logits.astype(mx.float32)

    @property
    def layers(self):
        return self.model.layers

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Map any supported key layout to this module tree; idempotent (converted keys pass through).

        Handles HF multimodal (`model.language_model.*`), HF text-only (`model.*`) and mlx-lm / mlx-vlm
        conversions (`language_model.model.*`), drops vision/audio towers, the tied `lm_head`, rotary buffers and
        the unused K/V weights of KV-shared layers (pitfall 30), and splits HF's fused expert tensors.
        """
        out = {}
        for key, value in weights.items():
            key = canonical_key(key)
            if key is None or self._unused(key):
                continue
            if key.endswith("experts.gate_up_proj"):  # (E, 2*mi, H): first half is the gate (pitfall 12)
                gate, up = mx.split(value, 2, axis=-2)
                out[key.replace("gate_up_proj", "switch_glu.gate_proj.weight")] = gate
                out[key.replace("gate_up_proj", "switch_glu.up_proj.weight")] = up
            elif key.endswith("experts.down_proj"):
                out[key.replace("down_proj", "switch_glu.down_proj.weight")] = value
            else:
                out[key] = value
        return out

    def _unused(self, key: str) -> bool:
        if "rotary_emb" in key or key.endswith(("input_min", "input_max", "output_min", "output_max")):
            return True
        parts = key.split(".")
        if len(parts) > 4 and parts[1] == "layers" and parts[3] == "self_attn":
            shared = int(parts[2]) >= self.args.first_kv_shared_layer
            return shared and parts[4] in ("k_proj", "v_proj", "k_norm", "v_norm")
        return False


_TEXT_ROOTS = (
    "embed_tokens", "layers", "norm", "embed_tokens_per_layer", "per_layer_model_projection",
    "per_layer_projection_norm",
)  # everything else under the model (vision/audio towers, their embedders) is multimodal
_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."), ("model.", "model."))


def canonical_key(key: str) -> str | None:
    """`model.`-rooted name of a text-model tensor, or None for anything else (towers, tied lm_head)."""
    for prefix, replacement in _PREFIXES:
        if key.startswith(prefix):
            rest = key[len(prefix) :]
            return replacement + rest if rest.split(".")[0] in _TEXT_ROOTS else None
    return None
