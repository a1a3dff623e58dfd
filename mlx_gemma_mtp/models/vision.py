"""Gemma 4 vision tower (`model.vision_tower`) in MLX: one image's patches to its soft tokens.

Reference: transformers `models/gemma4/modeling_gemma4.py` (Gemma4VisionModel and the classes it is built from;
Gemma4Model.get_image_features). Module attribute names equal the checkpoint's tensor names relative to
`model.vision_tower.`, so weights load with `load_weights(strict=True)` after `sanitize`.

One image at a time, unpadded: HF pads every image to `max_soft_tokens * k**2` patches (positions (-1, -1)) and
masks the padding out of attention, pooling and the output; without padding none of that is needed, and the valid
outputs are the same. Dtypes follow HF: the tower runs in its weights' dtype, pooling sums in float32 and casts
back, the sqrt(hidden) scale and the standardization run in float32, and the output is cast to the working dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import mlx.core as mx
from mlx import nn

from .config import BOOL, NON_NEGATIVE, OBJECT, POSITIVE, POSITIVE_INT, STRING, check_fields, optional
from .gemma4_text import RMSNorm

_ACTIVATIONS = {"gelu_pytorch_tanh": nn.gelu_approx, "gelu_new": nn.gelu_approx, "gelu": nn.gelu}
_CLIP_BOUNDS = ("input_min", "input_max", "output_min", "output_max")

VISION_FIELDS = {
    **dict.fromkeys(
        ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
         "pooling_kernel_size", "patch_size", "position_embedding_size", "max_position_embeddings"),
        POSITIVE_INT,
    ),
    "head_dim": optional(POSITIVE_INT),
    "default_output_length": optional(POSITIVE_INT),
    "hidden_activation": STRING,
    "rms_norm_eps": NON_NEGATIVE,
    "rope_parameters": optional(OBJECT),
    "rope_theta": POSITIVE,
    **dict.fromkeys(("use_clipped_linears", "standardize"), BOOL),
    "attention_bias": optional(BOOL),
    "attention_dropout": optional(NON_NEGATIVE),
    "initializer_range": NON_NEGATIVE,
}


@dataclass
class VisionConfig:
    """HF's `Gemma4VisionConfig` fields with its defaults (the E2B/E4B tower); unknown keys are ignored."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 16
    num_attention_heads: int = 12
    num_key_value_heads: int = 12
    head_dim: int = 64
    hidden_activation: str = "gelu_pytorch_tanh"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 131_072  # unused by the tower (HF keeps it for the config's sake)
    attention_bias: bool = False  # HF's vision linears never have a bias, whatever this says
    attention_dropout: float = 0.0  # training only
    rope_parameters: dict = field(default_factory=lambda: {"rope_type": "axial", "rope_theta": 100.0})
    pooling_kernel_size: int = 3
    patch_size: int = 16
    position_embedding_size: int = 10 * 1024
    use_clipped_linears: bool = False
    standardize: bool = False
    initializer_range: float = 0.02
    # Not an HF field, but in the released configs: the soft-token budget the checkpoint was released with.
    # The tower takes any number of patches; the image processor's max_soft_tokens decides how many.
    default_output_length: int | None = None

    @property
    def rope_theta(self) -> float:
        return float(self.rope_parameters.get("rope_theta", 100.0))

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "vision_config.") -> VisionConfig:
        """Build from a `vision_config` dict (HF spelling); errors name the field as the JSON does."""
        if not isinstance(d, dict):
            raise ValueError(f"{where.rstrip('.')} must be a JSON object, not {type(d).__name__}")  # noqa: TRY004
        check_fields(d, VISION_FIELDS, where)
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known and v is not None}
        rope = dict(d.get("rope_parameters") or {})
        # older configs spell the theta at the top level; HF's rope standardization moves it into rope_parameters
        rope.setdefault("rope_theta", d.get("rope_theta", 100.0))
        rope.setdefault("rope_type", "axial")
        kwargs["rope_parameters"] = rope
        if d.get("head_dim") is None:  # HF: head_dim falls back to hidden_size // num_attention_heads
            kwargs.pop("head_dim", None)
            heads = d.get("num_attention_heads", cls.num_attention_heads)
            kwargs["head_dim"] = d.get("hidden_size", cls.hidden_size) // heads
        config = cls(**kwargs)
        config.validate(where)
        return config

    def validate(self, where: str = "vision_config.") -> None:
        check_fields({f.name: getattr(self, f.name) for f in fields(self)}, VISION_FIELDS, where)
        rope = self.rope_parameters
        if rope.get("rope_type", "axial") != "axial":
            raise ValueError(f"{where}rope_parameters.rope_type={rope.get('rope_type')!r}: the Gemma 4 vision "
                             "tower supports only 'axial' rope")
        theta = rope.get("rope_theta")
        if not (isinstance(theta, (int, float)) and not isinstance(theta, bool) and theta > 0):
            raise ValueError(f"{where}rope_parameters.rope_theta={theta!r} must be a positive number")
        if self.hidden_activation not in _ACTIVATIONS:
            raise ValueError(f"{where}hidden_activation={self.hidden_activation!r} is not supported (expected "
                             f"one of {sorted(_ACTIVATIONS)})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"{where}num_key_value_heads={self.num_key_value_heads} must divide "
                             f"num_attention_heads={self.num_attention_heads}")
        if self.head_dim % 4:
            # axial rope: half the head rotates by x, half by y, each half in rotate-half pairs
            raise ValueError(f"{where}head_dim={self.head_dim} must be a multiple of 4 (2-D axial rope)")


class ClippableLinear(nn.Module):
    """A bias-free linear whose input and output are clamped to learned bounds when `use_clipped_linears`
    (the E2B/E4B towers). HF's Gemma4ClippableLinear: the bounds are scalar buffers, +-inf when unused."""

    def __init__(self, in_features: int, out_features: int, clipped: bool):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=False)
        if clipped:
            self.input_min = mx.array(-math.inf)  # () each
            self.input_max = mx.array(math.inf)
            self.output_min = mx.array(-math.inf)
            self.output_max = mx.array(math.inf)

    def __call__(self, x: mx.array) -> mx.array:
        clipped = "input_min" in self
        if clipped:  # bounds in x's dtype, as HF's buffers are: float32 bounds would promote bf16 activations
            x = mx.clip(x, self.input_min.astype(x.dtype), self.input_max.astype(x.dtype))
        y = self.linear(x)
        if clipped:
            y = mx.clip(y, self.output_min.astype(y.dtype), self.output_max.astype(y.dtype))
        return y


class PatchEmbedder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        D = config.hidden_size
        self.input_proj = nn.Linear(3 * config.patch_size**2, D, bias=False)
        # row 0 looks up a patch's x (column), row 1 its y (row); the two embeddings are summed
        self.position_embedding_table = mx.ones((2, config.position_embedding_size, D))  # (2, n_pos, D)

    def __call__(self, pixel_values: mx.array, position_ids: mx.array) -> mx.array:
        dtype = self.position_embedding_table.dtype  # the working dtype (input_proj may be quantized)
        # pixels arrive in [0, 1]: Gemma 4 normalizes to [-1, 1] here, not in the processor
        x = self.input_proj((2 * (pixel_values - 0.5)).astype(dtype))  # (1, P, D)
        table = self.position_embedding_table
        pos = table[0][position_ids[..., 0]] + table[1][position_ids[..., 1]]  # (1, P, D)
        return x + pos


def axial_rope_tables(position_ids: mx.array, head_dim: int, theta: float, dtype: mx.Dtype):
    """cos/sin (1, P, 1, head_dim) of HF's Gemma4VisionRotaryEmbedding: the first half of each head rotates by
    the patch's x, the second half by its y, each half in rotate-half pairs, frequencies over head_dim // 2."""
    spatial = head_dim // 2
    inv_freq = 1.0 / (theta ** (mx.arange(0, spatial, 2, dtype=mx.float32) / spatial))  # (head_dim // 4,)
    angles = position_ids.astype(mx.float32)[..., None] * inv_freq  # (1, P, 2, head_dim // 4)
    fx, fy = angles[:, :, 0], angles[:, :, 1]
    # HF recomposes as [x, x, y, y]: rotate-half pairs within the x half and within the y half
    freqs = mx.concatenate([fx, fx, fy, fy], axis=-1)[:, :, None]  # (1, P, 1, head_dim)
    return mx.cos(freqs).astype(dtype), mx.sin(freqs).astype(dtype)


def apply_axial_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """HF's apply_multidimensional_rope with 2 axes: rotate_half applied to each half of the head separately."""
    q = x.shape[-1] // 4
    x0, x1, x2, x3 = x[..., :q], x[..., q : 2 * q], x[..., 2 * q : 3 * q], x[..., 3 * q :]
    rotated = mx.concatenate([-x1, x0, -x3, x2], axis=-1)  # (1, P, heads, head_dim)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        D, d = config.hidden_size, config.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, d
        clipped = config.use_clipped_linears
        self.q_proj = ClippableLinear(D, self.n_heads * d, clipped)
        self.k_proj = ClippableLinear(D, self.n_kv_heads * d, clipped)
        self.v_proj = ClippableLinear(D, self.n_kv_heads * d, clipped)
        self.o_proj = ClippableLinear(self.n_heads * d, D, clipped)
        self.q_norm = RMSNorm(d, config.rms_norm_eps)
        self.k_norm = RMSNorm(d, config.rms_norm_eps)
        self.v_norm = RMSNorm(d, config.rms_norm_eps, with_scale=False)

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
        B, P, _ = x.shape
        q = apply_axial_rope(self.q_norm(self.q_proj(x).reshape(B, P, self.n_heads, -1)), cos, sin)
        k = apply_axial_rope(self.k_norm(self.k_proj(x).reshape(B, P, self.n_kv_heads, -1)), cos, sin)
        v = self.v_norm(self.v_proj(x).reshape(B, P, self.n_kv_heads, -1))
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))  # (1, heads, P, head_dim)
        # bidirectional, no mask (no padding); scale 1.0 because q_norm/k_norm already set the logits' scale
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, P, -1))


class MLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        D, F, clipped = config.hidden_size, config.intermediate_size, config.use_clipped_linears
        self.gate_proj = ClippableLinear(D, F, clipped)
        self.up_proj = ClippableLinear(D, F, clipped)
        self.down_proj = ClippableLinear(F, D, clipped)
        self.act = _ACTIVATIONS[config.hidden_activation]

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class EncoderLayer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        D, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(D, eps)
        self.post_attention_layernorm = RMSNorm(D, eps)
        self.pre_feedforward_layernorm = RMSNorm(D, eps)
        self.post_feedforward_layernorm = RMSNorm(D, eps)

    def __call__(self, h: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
        h = h + self.post_attention_layernorm(self.self_attn(self.input_layernorm(h), cos, sin))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class Encoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layers = [EncoderLayer(config) for _ in range(config.num_hidden_layers)]


class VisionModel(nn.Module):
    """Patches of one image, (1, P, 3 * patch_size**2) in [0, 1] with their (x, y) patch positions (1, P, 2),
    to its soft tokens (P // pooling_kernel_size**2, hidden_size), as HF's `last_hidden_state`."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.patch_embedder = PatchEmbedder(config)
        self.encoder = Encoder(config)
        if config.standardize:
            self.std_bias = mx.zeros((config.hidden_size,))  # (D,)
            self.std_scale = mx.ones((config.hidden_size,))  # (D,)

    def __call__(self, pixel_values: mx.array, position_ids: mx.array) -> mx.array:
        c = self.config
        k = c.pooling_kernel_size
        if pixel_values.ndim != 3 or pixel_values.shape[0] != 1 or pixel_values.shape[2] != 3 * c.patch_size**2:
            raise ValueError(f"pixel_values must be (1, num_patches, {3 * c.patch_size**2}) (one image, "
                             f"patch_size {c.patch_size}), got {tuple(pixel_values.shape)}")
        P = pixel_values.shape[1]
        if tuple(position_ids.shape) != (1, P, 2):
            raise ValueError(f"position_ids must be (1, {P}, 2) (x, y per patch), got {tuple(position_ids.shape)}")
        if P == 0 or P % (k * k):
            raise ValueError(f"{P} patches cannot pool into {k}x{k} soft tokens: the patch grid's sides must be "
                             f"multiples of pooling_kernel_size={k} (use the image processor)")
        position_ids = position_ids.astype(mx.int32)
        h = self.patch_embedder(pixel_values, position_ids)  # (1, P, D)
        cos, sin = axial_rope_tables(position_ids, c.head_dim, c.rope_theta, h.dtype)
        for layer in self.encoder.layers:
            h = layer(h, cos, sin)
        return self._pool(h, position_ids)

    def _pool(self, h: mx.array, position_ids: mx.array) -> mx.array:
        """HF's Gemma4VisionPooler and the standardization after it: average each k x k block of patches (found
        from the positions, so patch order does not matter), scale by sqrt(hidden) and standardize, in float32."""
        k = self.config.pooling_kernel_size
        n_out = h.shape[1] // (k * k)
        if k > 1:
            # block index of each patch, row-major over the block grid: x // k + (width // k) * (y // k)
            width = position_ids[..., 0].max(axis=-1, keepdims=True) + 1  # (1, 1)
            block = position_ids // k  # (1, P, 2)
            block = block[..., 0] + (width // k) * block[..., 1]  # (1, P)
            weights = (block[:, None, :] == mx.arange(n_out)[None, :, None]).astype(mx.float32) / (k * k)
            # (1, n_out, P) @ (1, P, D): summed in float32, cast back to the working dtype as HF does
            h = (weights @ h.astype(mx.float32)).astype(h.dtype)  # (1, n_out, D)
        # sqrt(hidden) can push activations past float16's range, so HF scales and standardizes in float32
        out = h[0].astype(mx.float32) * (self.config.hidden_size**0.5)  # (n_out, D)
        if self.config.standardize:
            out = (out - self.std_bias.astype(mx.float32)) * self.std_scale.astype(mx.float32)
        return out.astype(h.dtype)


def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Tensors keyed relative to the vision tower (HF `model.vision_tower.*` or mlx-vlm `vision_tower.*` with the
    prefix stripped by the caller) in this module tree's layout. Idempotent: sanitized keys pass through.

    HF and mlx-vlm/mlx-community conversions share one key layout (`patch_embedder.*`, `encoder.layers.N.*`,
    `*.linear.weight` plus the clip bounds, `std_bias`, `std_scale`), so this mostly passes tensors through:
    - drops `encoder.rotary_emb.*` (recomputed; HF never saves it, some conversions might);
    - turns a 4-D patch projection (a conv-style export) into HF's Linear layout, whose input features are
      ordered (row, column, channel) within the patch, like the processor's patches;
    - stores single-element clip bounds as scalars (HF's buffers are 0-d; strict loading checks shapes).
    Quantized linears' `scales`/`biases` pass through for the loader's `nn.quantize`.
    """
    out = {}
    for key, value in weights.items():
        if "rotary_emb." in key:
            continue
        if key == "patch_embedder.input_proj.weight" and value.ndim == 4:
            out_features, a, _, c = value.shape
            if a == 3 and c != 3:  # torch Conv2d (out, channels, rows, cols)
                value = value.transpose(0, 2, 3, 1)
            elif not (c == 3 and a != 3):  # MLX Conv2d is (out, rows, cols, channels); anything else is unknown
                raise ValueError(f"patch_embedder.input_proj.weight has shape {tuple(value.shape)}: cannot tell "
                                 "the channel axis of this 4-D patch projection")
            value = value.reshape(out_features, -1)
        elif key.rsplit(".", 1)[-1] in _CLIP_BOUNDS and value.ndim > 0 and value.size == 1:
            value = value.reshape(())
        out[key] = value
    return out
