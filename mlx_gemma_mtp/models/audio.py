"""Gemma 4's audio tower (E2B/E4B): log-mel frames -> audio soft tokens, in MLX.

Reference: transformers `models/gemma4/modeling_gemma4.py` (`Gemma4AudioModel` and its parts). A Universal Speech
Model conformer: two stride-2 3x3 convs (4x fewer frames, 10 ms -> 40 ms), then layers of
FFN/2 -> chunked local self-attention with a relative position bias -> causal depthwise conv -> FFN/2, then a
projection to `output_proj_dims`. `model.embed_audio` (not here) maps those to the text model's width.

Module attribute names equal checkpoint tensor names relative to `model.audio_tower.` (HF) / `audio_tower.`
(mlx-vlm conversions), so weights load with `load_weights(strict=True)` after `sanitize`.

Quirks of the reference, kept so the outputs match it:
* the local window: HF passes `(context_left - 1, context_right)` as window sizes that include the query, so
  a query sees itself, the `context_left - 2` frames before it and the `context_right - 1` after it (released:
  itself + 11 back, none ahead); slot 0 of each block's context (distance `context_left - 1`) is never attended;
* masked logits are set to `attention_invalid_logits_value` (-1e9) after the tanh soft cap, not -inf: a query
  with no visible key averages its whole context window (zero-padded keys included);
* the relative position table has `context_size // 2 + 1` rows (distances context_size//2 .. 0);
* only the light-conv block's norms use `rms_norm_eps`; the other RMSNorms use HF's default 1e-6, while the
  subsampling LayerNorms use `rms_norm_eps`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import mlx.core as mx
from mlx import nn

from .config import BOOL, COUNT, NON_NEGATIVE, POSITIVE, POSITIVE_INT, STRING, Rule, check_fields
from .gemma4_text import RMSNorm

ACTIVATIONS = {"silu": nn.silu, "swish": nn.silu, "gelu": nn.gelu, "gelu_pytorch_tanh": nn.gelu_approx,
               "relu": nn.relu}
NUMBER: Rule = (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
                "a finite number")
CHANNELS: Rule = (
    lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and all(POSITIVE_INT[0](c) for c in v),
    "a list of two positive integers",
)
AUDIO_FIELDS: dict[str, Rule] = {
    **dict.fromkeys(("hidden_size", "num_hidden_layers", "num_attention_heads", "conv_kernel_size",
                     "attention_chunk_size", "attention_context_left", "output_proj_dims"), POSITIVE_INT),
    "attention_context_right": COUNT,
    "hidden_act": STRING,
    "subsampling_conv_channels": CHANNELS,
    "residual_weight": NUMBER,
    "attention_logit_cap": POSITIVE,  # divides the logits
    "attention_invalid_logits_value": NUMBER,
    "use_clipped_linears": BOOL,
    "rms_norm_eps": NON_NEGATIVE,
    "gradient_clipping": POSITIVE,
}
SSCP_KERNEL = 3  # the subsampling convs: 3x3, stride 2, padding 1 (architectural constants, not in the config)


@dataclass
class AudioConfig:
    """`Gemma4AudioConfig` (`audio_config` in config.json) with HF's defaults, which are the released E2B/E4B
    values."""

    hidden_size: int = 1024
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    hidden_act: str = "silu"
    subsampling_conv_channels: tuple[int, int] = (128, 32)
    conv_kernel_size: int = 5
    residual_weight: float = 0.5
    attention_chunk_size: int = 12
    attention_context_left: int = 13
    attention_context_right: int = 0
    attention_logit_cap: float = 50.0
    attention_invalid_logits_value: float = -1.0e9
    use_clipped_linears: bool = True
    rms_norm_eps: float = 1e-6
    gradient_clipping: float = 1e10
    output_proj_dims: int = 1536

    @classmethod
    def from_dict(cls, d: dict) -> AudioConfig:
        """Read an `audio_config` dict; keys this model does not use (model_type, initializer_range...) are
        ignored."""
        if not isinstance(d, dict):
            raise ValueError(f"audio_config must be a JSON object, got {type(d).__name__}")  # noqa: TRY004
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def __post_init__(self):
        check_fields(vars(self), AUDIO_FIELDS, "audio_config.")
        self.subsampling_conv_channels = tuple(self.subsampling_conv_channels)

        def bad(name, why):
            raise ValueError(f"unsupported Gemma 4 audio config: audio_config.{name}={getattr(self, name)!r} ({why})")

        if self.hidden_act not in ACTIVATIONS:
            bad("hidden_act", f"supported: {sorted(ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads:
            bad("num_attention_heads", f"must divide hidden_size={self.hidden_size}")
        if self.hidden_size % 2:
            bad("hidden_size", "must be even: the sinusoidal position table is [sin, cos] halves")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def max_past(self) -> int:
        return self.attention_context_left - 1

    @property
    def context_size(self) -> int:
        """Keys each chunk of queries sees: its own chunk, `max_past` before it, `attention_context_right`
        after it."""
        return self.attention_chunk_size + self.max_past + self.attention_context_right


def clip_bound(limit: float, dtype: mx.Dtype) -> float:
    """HF clamps the residual stream at min(gradient_clipping, the dtype's max) (1e10 released: inactive), the
    min keeping the bound finite in float16."""
    return min(limit, mx.finfo(dtype).max)


class ClippableLinear(nn.Module):
    """A bias-free linear with the checkpoint's clamp bounds on its input and output (scalar tensors; +-inf
    until loaded). They come from the checkpoint, and a loader that skipped finite ones would change the outputs."""

    def __init__(self, in_features: int, out_features: int, clipped: bool):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=False)
        if clipped:
            self.input_min = mx.array(-math.inf)
            self.input_max = mx.array(math.inf)
            self.output_min = mx.array(-math.inf)
            self.output_max = mx.array(math.inf)

    def __call__(self, x: mx.array) -> mx.array:
        if "input_min" not in self:
            return self.linear(x)
        # bounds cast to x's dtype: a float32 bound must not promote bfloat16 activations (torch does not)
        x = mx.clip(x, self.input_min.astype(x.dtype), self.input_max.astype(x.dtype))
        y = self.linear(x)
        return mx.clip(y, self.output_min.astype(y.dtype), self.output_max.astype(y.dtype))


class SubSampleConvLayer(nn.Module):
    """3x3 stride-2 conv over (time, mel) -> LayerNorm over channels -> ReLU; channels-last (NHWC)."""

    def __init__(self, in_channels: int, out_channels: int, eps: float):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, SSCP_KERNEL, stride=2, padding=1, bias=False)
        self.norm = nn.LayerNorm(out_channels, eps=eps, bias=False)

    def __call__(self, x: mx.array, valid: mx.array) -> tuple[mx.array, mx.array]:
        # x (N, T, F, C_in), valid (N, T): padded frames are zeroed so they read as the conv's zero padding
        x = (x * valid[:, :, None, None]).astype(self.conv.weight.dtype)
        x = nn.relu(self.norm(self.conv(x)))  # (N, ceil(T/2), ceil(F/2), C_out)
        return x, valid[:, ::2]  # (N, ceil(T/2)): an output frame is valid iff its centre frame is


class SubSampleConvProjection(nn.Module):
    def __init__(self, cfg: AudioConfig):
        super().__init__()
        c0, c1 = cfg.subsampling_conv_channels
        self.layer0 = SubSampleConvLayer(1, c0, cfg.rms_norm_eps)
        self.layer1 = SubSampleConvLayer(c0, c1, cfg.rms_norm_eps)
        # HF sizes the projection as (c0 // 4) * c1: it assumes n_mels == c0 (128 released), so after two
        # halvings the mel axis has c0 // 4 bins
        self.input_proj_linear = nn.Linear((c0 // 4) * c1, cfg.hidden_size, bias=False)

    def __call__(self, features: mx.array, valid: mx.array) -> tuple[mx.array, mx.array]:
        x, valid = self.layer0(features[..., None], valid)  # (N, T/2, F/2, c0)
        x, valid = self.layer1(x, valid)  # (N, T/4, F/4, c1)
        N, T, F, C = x.shape
        if F * C != self.input_proj_linear.weight.shape[1]:
            raise ValueError(f"audio features have {features.shape[-1]} mel bins: the tower wants "
                             f"{4 * self.input_proj_linear.weight.shape[1] // C} (its subsampling channels[0])")
        return self.input_proj_linear(x.reshape(N, T, F * C)), valid  # (N, T/4, hidden): mel-major, channel-minor


class FeedForward(nn.Module):
    """Half-step (macaron) FFN: clamp -> norm -> up -> act -> down -> clamp -> norm, scaled into the residual."""

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        H = cfg.hidden_size
        self.ffw_layer_1 = ClippableLinear(H, 4 * H, cfg.use_clipped_linears)
        self.ffw_layer_2 = ClippableLinear(4 * H, H, cfg.use_clipped_linears)
        self.pre_layer_norm = RMSNorm(H)  # HF's default eps 1e-6 here, not rms_norm_eps
        self.post_layer_norm = RMSNorm(H)
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.gradient_clipping = cfg.gradient_clipping
        self.residual_weight = cfg.residual_weight

    def __call__(self, x: mx.array) -> mx.array:
        g = clip_bound(self.gradient_clipping, x.dtype)
        y = self.pre_layer_norm(mx.clip(x, -g, g))
        y = self.ffw_layer_2(self.act(self.ffw_layer_1(y)))
        y = self.post_layer_norm(mx.clip(y, -g, g))
        return y * self.residual_weight + x


def relative_position_table(hidden: int, context_size: int, dtype: mx.Dtype) -> mx.array:
    """Sinusoids [sin | cos] for distances context_size//2 .. 0 (descending), (context_size//2 + 1, hidden).
    Computed in float32 as HF's buffer is; derived, so not a checkpoint tensor."""
    n = hidden // 2
    inv_timescales = mx.exp(mx.arange(n, dtype=mx.float32) * -(math.log(10_000.0) / max(n - 1, 1)))  # (n,)
    distance = mx.arange(context_size // 2, -1, -1, dtype=mx.float32)[:, None]  # (R, 1)
    t = distance * inv_timescales  # (R, n)
    return mx.concatenate([mx.sin(t), mx.cos(t)], axis=-1).astype(dtype)  # (R, hidden)


def to_blocks(x: mx.array, chunk: int) -> mx.array:
    """(N, T, ...) -> (N, nb, chunk, ...): non-overlapping chunks, the last one zero-padded."""
    N, T = x.shape[:2]
    nb = -(-T // chunk)
    x = mx.pad(x, [(0, 0), (0, nb * chunk - T)] + [(0, 0)] * (x.ndim - 2))
    return x.reshape(N, nb, chunk, *x.shape[2:])


def block_context(x: mx.array, chunk: int, past: int, future: int) -> mx.array:
    """(N, T, ...) -> (N, nb, W, ...), W = past + chunk + future: the frames block u's queries may see, i.e.
    positions u*chunk - past .. u*chunk + chunk + future - 1, zero (False) outside [0, T)."""
    T = x.shape[1]
    nb = -(-T // chunk)
    W = chunk + past + future
    # right pad so the last block's window exists (HF pads future + chunk - 1, of which it reads future + pad)
    x = mx.pad(x, [(0, 0), (past, future + chunk - 1)] + [(0, 0)] * (x.ndim - 2))
    idx = mx.arange(nb)[:, None] * chunk + mx.arange(W)[None]  # (nb, W) indices into the padded axis
    return x[:, idx]


def local_window(chunk: int, past: int, future: int) -> mx.array:
    """(chunk, W) bool: query i of a block may see context slot c. The query-key distance is
    d = i + past - c; HF's sliding_window_mask_function((context_left - 1, context_right)) allows
    0 <= d < past (self and past - 1 earlier frames) and 0 < -d < future."""
    W = chunk + past + future
    d = mx.arange(chunk)[:, None] + past - mx.arange(W)[None]  # (chunk, W)
    return ((d >= 0) & (d < past)) | ((d < 0) & (-d < future))


def blocked_attention_mask(valid: mx.array, cfg: AudioConfig) -> mx.array:
    """(N, 1, nb, chunk, W) bool, True = attend: the key is a real frame (in range and valid) and inside the
    query's local window. HF's `_convert_4d_mask_to_blocked_5d` of its bidirectional+sliding 4D mask."""
    C, P, F = cfg.attention_chunk_size, cfg.max_past, cfg.attention_context_right
    key_valid = block_context(valid, C, P, F)  # (N, nb, W), False for positions outside [0, T)
    return (key_valid[:, :, None, :] & local_window(C, P, F))[:, None]


def rel_shift(x: mx.array, context_size: int) -> mx.array:
    """Transformer-XL shift (arXiv 1901.02860 app. B): (N, H, nb, C, R) scores per distance row ->
    (N, H, nb, C, W) scores per context slot, by padding to W + 1 and re-reading the flat buffer with stride W."""
    N, H, nb, C, R = x.shape
    W = context_size
    x = mx.pad(x, [(0, 0)] * 4 + [(0, W + 1 - R)])  # (N, H, nb, C, W + 1)
    return x.reshape(N, H, nb, C * (W + 1))[..., : C * W].reshape(N, H, nb, C, W)


class Attention(nn.Module):
    """Chunked local self-attention with a learned relative position bias, in float32."""

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.cfg = cfg
        H, D = cfg.hidden_size, cfg.head_dim
        self.n_heads = cfg.num_attention_heads
        # q is scaled by softplus(per_dim_scale) / (sqrt(D) ln 2), k by log2(1 + e) (the reference's constants)
        self.q_scale = D**-0.5 / math.log(2)
        self.k_scale = math.log(1 + math.e) / math.log(2)
        clipped = cfg.use_clipped_linears
        self.q_proj = ClippableLinear(H, H, clipped)
        self.k_proj = ClippableLinear(H, H, clipped)
        self.v_proj = ClippableLinear(H, H, clipped)
        self.post = ClippableLinear(H, H, clipped)
        self.relative_k_proj = nn.Linear(H, H, bias=False)
        self.per_dim_scale = mx.zeros((D,))

    def __call__(self, x: mx.array, positions: mx.array, mask: mx.array) -> mx.array:
        # x (N, T, H); positions (R, H); mask (N, 1, nb, C, W) bool
        cfg = self.cfg
        N, T, _ = x.shape
        nH, D, C, W = self.n_heads, cfg.head_dim, cfg.attention_chunk_size, cfg.context_size
        P, F = cfg.max_past, cfg.attention_context_right
        q = self.q_proj(x).astype(mx.float32).reshape(N, T, nH, D)
        k = self.k_proj(x).astype(mx.float32).reshape(N, T, nH, D)
        v = self.v_proj(x).astype(mx.float32).reshape(N, T, nH, D)
        q = q * self.q_scale * nn.softplus(self.per_dim_scale)
        k = k * self.k_scale

        q = to_blocks(q, C).transpose(0, 3, 1, 2, 4)  # (N, nH, nb, C, D)
        k = block_context(k, C, P, F).transpose(0, 3, 1, 4, 2)  # (N, nH, nb, D, W)
        v = block_context(v, C, P, F).transpose(0, 3, 1, 2, 4)  # (N, nH, nb, W, D)
        nb = q.shape[2]
        rel = self.relative_k_proj(positions).reshape(-1, nH, D).astype(mx.float32)  # (R, nH, D)

        content = q @ k  # (N, nH, nb, C, W)
        position = q.reshape(N, nH, nb * C, D) @ rel.transpose(1, 2, 0)  # (N, nH, nb*C, R)
        position = rel_shift(position.reshape(N, nH, nb, C, -1), W)  # (N, nH, nb, C, W)
        cap = cfg.attention_logit_cap
        logits = mx.tanh((content + position) / cap) * cap
        logits = mx.where(mask, logits, cfg.attention_invalid_logits_value)  # after the cap, as HF
        out = mx.softmax(logits, axis=-1) @ v  # (N, nH, nb, C, D)
        out = out.transpose(0, 2, 3, 1, 4).reshape(N, nb * C, nH * D)[:, :T]  # (N, T, H)
        return self.post(out.astype(x.dtype))


class LightConv1d(nn.Module):
    """norm -> linear to 2H -> GLU -> causal depthwise conv -> clamp -> norm -> act -> linear, + residual."""

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        H, k = cfg.hidden_size, cfg.conv_kernel_size
        self.linear_start = ClippableLinear(H, 2 * H, cfg.use_clipped_linears)
        self.linear_end = ClippableLinear(H, H, cfg.use_clipped_linears)
        self.depthwise_conv1d = nn.Conv1d(H, H, k, groups=H, bias=False)  # weight (H, k, 1)
        self.pre_layer_norm = RMSNorm(H, cfg.rms_norm_eps)
        self.conv_norm = RMSNorm(H, cfg.rms_norm_eps)
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.gradient_clipping = cfg.gradient_clipping
        self.left_pad = k - 1  # causal: frame t sees t-k+1 .. t only

    def __call__(self, x: mx.array) -> mx.array:
        y = nn.glu(self.linear_start(self.pre_layer_norm(x)), axis=-1)  # (N, T, H)
        y = self.depthwise_conv1d(mx.pad(y, [(0, 0), (self.left_pad, 0), (0, 0)]))  # (N, T, H)
        g = clip_bound(self.gradient_clipping, y.dtype)
        y = self.act(self.conv_norm(mx.clip(y, -g, g)))
        return self.linear_end(y) + x


class AudioLayer(nn.Module):
    def __init__(self, cfg: AudioConfig):
        super().__init__()
        H = cfg.hidden_size
        self.feed_forward1 = FeedForward(cfg)
        self.feed_forward2 = FeedForward(cfg)
        self.self_attn = Attention(cfg)
        self.lconv1d = LightConv1d(cfg)
        self.norm_pre_attn = RMSNorm(H)
        self.norm_post_attn = RMSNorm(H)
        self.norm_out = RMSNorm(H)
        self.gradient_clipping = cfg.gradient_clipping

    def __call__(self, x: mx.array, positions: mx.array, mask: mx.array) -> mx.array:
        g = clip_bound(self.gradient_clipping, self.norm_pre_attn.weight.dtype)  # HF reads the weight dtype
        x = self.feed_forward1(x)
        a = self.self_attn(self.norm_pre_attn(mx.clip(x, -g, g)), positions, mask)
        x = self.norm_post_attn(mx.clip(a, -g, g)) + x
        x = self.feed_forward2(self.lconv1d(x))
        return self.norm_out(mx.clip(x, -g, g))


class AudioModel(nn.Module):
    """`model.audio_tower`: log-mel features -> soft tokens before `embed_audio`."""

    def __init__(self, config: AudioConfig):
        super().__init__()
        self.config = config
        self.subsample_conv_projection = SubSampleConvProjection(config)
        self.layers = [AudioLayer(config) for _ in range(config.num_hidden_layers)]
        self.output_proj = nn.Linear(config.hidden_size, config.output_proj_dims, bias=True)

    def __call__(self, features: mx.array, mask: mx.array) -> tuple[mx.array, mx.array]:
        """features (N, T, n_mels), mask (N, T) bool, True = real frame ->
        (hidden (N, T', output_proj_dims), valid (N, T') bool), T' = ceil(ceil(T / 2) / 2).

        Rows where `valid` is False are padding (HF computes them too and drops them before the embedder)."""
        if features.ndim != 3 or mask.shape != features.shape[:2]:
            raise ValueError(f"want features (N, T, n_mels) and mask (N, T); got {features.shape} and {mask.shape}")
        if features.shape[1] == 0:
            raise ValueError("audio features have no frames")
        x, valid = self.subsample_conv_projection(features, mask.astype(mx.bool_))
        positions = relative_position_table(self.config.hidden_size, self.config.context_size, x.dtype)
        attn_mask = blocked_attention_mask(valid, self.config)  # one for all layers
        for layer in self.layers:
            x = layer(x, positions, attn_mask)
        return self.output_proj(x), valid


def _conv2d_to_mlx(key: str, w: mx.array) -> mx.array:
    """torch (O, I, 3, 3) -> MLX (O, 3, 3, I); an MLX-layout tensor (mlx-vlm conversions) is kept."""
    torch_layout = tuple(w.shape[2:]) == (SSCP_KERNEL, SSCP_KERNEL)
    mlx_layout = tuple(w.shape[1:3]) == (SSCP_KERNEL, SSCP_KERNEL)
    if torch_layout and mlx_layout:  # only when I == 3: no such checkpoint (I is 1 and 128 released)
        raise ValueError(f"{key}: shape {tuple(w.shape)} reads the same in torch and MLX layout")
    if mlx_layout:
        return w
    if torch_layout:
        return w.transpose(0, 2, 3, 1)
    raise ValueError(f"{key}: shape {tuple(w.shape)} is neither torch (O, I, 3, 3) nor MLX (O, 3, 3, I)")


def _depthwise_to_mlx(key: str, w: mx.array) -> mx.array:
    """torch (H, 1, k) -> MLX (H, k, 1); (H, k, 1) is kept (and (H, 1, 1) is the same either way)."""
    if w.shape[2] == 1:
        return w
    if w.shape[1] == 1:
        return w.transpose(0, 2, 1)
    raise ValueError(f"{key}: shape {tuple(w.shape)} is not a depthwise conv weight (H, 1, k) or (H, k, 1)")


def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Audio tower tensors (keys relative to the tower; a leftover `model.audio_tower.` / `audio_tower.` prefix is
    stripped too) in this module's layout. Idempotent: conv layouts are decided by shape. Derived buffers some
    exports carry (`rel_pos_enc.inv_timescales`, `self_attn.softcap`) are dropped."""
    out = {}
    for key, w in weights.items():
        for prefix in ("model.audio_tower.", "audio_tower."):
            key = key.removeprefix(prefix)
        if key.startswith("rel_pos_enc.") or key.endswith(".softcap"):
            continue
        if key.endswith(".conv.weight") and w.ndim == 4:
            w = _conv2d_to_mlx(key, w)
        elif key.endswith("depthwise_conv1d.weight") and w.ndim == 3:
            w = _depthwise_to_mlx(key, w)
        out[key] = w
    return out
