"""The released Gemma 4 shapes as presets: their configs, random-weight MLX pairs and HF checkpoints of them.

Reference: spec §7 (GEMMA4_MTP.md) and REAL_CHECKPOINTS.md. A preset is the `config.json` of a released
target (`model_type gemma4`, `Gemma4ForConditionalGeneration`, text part in `text_config`) and of its
assistant (`gemma4_assistant`). For tests a preset can be cut to fewer layers (the sliding/full pattern, the
KV-shared block and a full last layer kept), a smaller vocabulary and, for 26B-A4B, fewer experts.

Random weights are made tensor by tensor directly in bfloat16 (uniform values from a seeded per-tensor
stream, scaled after tests/hf_oracle.py's recipe so logits are finite and vary, std ~2.5) and quantized module
by module with the converter's recipes: a quantized pair never passes through a float copy of the whole model.
`write_hf_checkpoint` writes the same values in the released multimodal layout (`model.language_model.*`,
dummy vision/audio tensors, unused K/V of KV-shared layers), one chunk of one tensor in memory at a time:
`python -m mlx_gemma_mtp.testing.presets write --shape e2b --out DIR --layers 4 --vocab 4096`. With `towers=True`
(`--towers`) the vision (and audio) towers are written at their released shapes with random weights, with a
`processor_config.json` and a Gemma-4-like tokenizer (testing/tokenizer.py) whose small chat template writes the
image and audio placeholders as the released one does: the checkpoint then takes images and audio end to end.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import struct
import sys
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ..convert.quantize import (
    RECIPES,
    SUPPORTED_BITS,
    Plan,
    apply_plan,
    drafter_plan,
    quantizable_modules,
    quantization_config,
    target_plan,
    transform,
)
from ..load import Bundle, GenerationDefaults, materialize
from ..models.config import FULL, SLIDING, ModelArgs
from ..models.gemma4_assistant import Drafter, DrafterArgs
from ..models.gemma4_text import Model, canonical_key

VOCAB, GROUP_SIZE = 262144, 64
MIN_LAYERS = 2  # a sliding and a full layer: the drafter reads one producer of each
GENERATION_CONFIG = {"bos_token_id": 2, "pad_token_id": 0, "eos_token_id": [1, 106, 50], "do_sample": True,
                     "temperature": 1.0, "top_k": 64, "top_p": 0.95}
# Embedding entries ~ EMBED_SCALE / H: the scaled input embedding has RMS EMBED_SCALE / sqrt(H), so a token's
# own logit stays ~EMBED_SCALE / RMS(residual) logit stds at any width (hf_oracle's 0.15 / sqrt(H) is that at
# H = 64; at H = 5376 the model would repeat its input). The final norm's gain gives logits of std ~LOGIT_STD.
EMBED_SCALE, LOGIT_STD = 1.2, 2.5
CHUNK_ELEMENTS = 1 << 25  # values generated at a time when writing (64 MB of bf16)
DEFAULT_MAX_SHARD_BYTES = 2 * 10**9
ROPE = {SLIDING: {"rope_type": "default", "rope_theta": 10000.0},
        FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0}}

COMMON_TEXT = {
    "model_type": "gemma4_text", "vocab_size": VOCAB, "head_dim": 256, "global_head_dim": 512,
    "num_global_key_value_heads": None, "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6,
    "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2, "tie_word_embeddings": True,
    "rope_parameters": ROPE, "attention_bias": False, "attention_dropout": 0.0,
    "final_logit_softcapping": 30.0, "use_bidirectional_attention": None, "vocab_size_per_layer_input": VOCAB,
    "hidden_size_per_layer_input": 0, "attention_k_eq_v": False, "num_kv_shared_layers": 0,
    "enable_moe_block": False, "use_double_wide_mlp": False, "num_experts": None, "top_k_experts": None,
    "moe_intermediate_size": None, "dtype": "bfloat16",
}
MULTIMODAL_TOKENS = {"boi_token_id": 255999, "eoi_token_id": 258882, "image_token_id": 258880,
                     "video_token_id": 258884, "boa_token_id": 256000, "eoa_token_index": 258883,
                     "audio_token_id": 258881}
# The released vision towers by (hidden size, layers): HF's Gemma4VisionConfig fields (its defaults are E2B/E4B's;
# 26B/31B standardize their output and have no clipped linears). The audio tower (E2B/E4B) is HF's
# Gemma4AudioConfig defaults. The processor: 16-pixel patches pooled 3 x 3, at most 280 soft tokens per image.
_VISION_COMMON = {"model_type": "gemma4_vision", "patch_size": 16, "pooling_kernel_size": 3,
                  "position_embedding_size": 10240, "default_output_length": 280, "hidden_activation":
                  "gelu_pytorch_tanh", "rms_norm_eps": 1e-6, "rope_parameters": {"rope_type": "axial",
                                                                                  "rope_theta": 100.0}}
VISION_CONFIGS = {
    (768, 16): {**_VISION_COMMON, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 16,
                "num_attention_heads": 12, "num_key_value_heads": 12, "head_dim": 64, "use_clipped_linears": True,
                "standardize": False},
    (1152, 27): {**_VISION_COMMON, "hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                 "num_attention_heads": 16, "num_key_value_heads": 16, "head_dim": 72, "use_clipped_linears": False,
                 "standardize": True},
}
PROCESSOR_CONFIG = {"image_processor": {"patch_size": 16, "pooling_kernel_size": 3, "max_soft_tokens": 280}}
# The released chat template's layout of a user turn (`<|image|>` / `<|audio|>` per media part), without its
# system-prompt, tool and thinking handling: enough to prompt a random checkpoint with chat messages.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|turn>{{ 'model' if message['role'] == 'assistant' else "
    "message['role'] }}\n{% if message['content'] is string %}{{ message['content'] | trim }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] in ['image', 'image_url'] %}<|image|>"
    "{% elif part['type'] in ['audio', 'input_audio'] %}<|audio|>{% elif part['type'] == 'text' %}"
    "{{ part['text'] | trim }}{% endif %}{% endfor %}{% endif %}<turn|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|turn>model\n{% endif %}"
)


@dataclass(frozen=True)
class Preset:
    hub_name: str
    period: int  # the layer pattern: period - 1 sliding layers, then a full one
    text: dict  # text_config fields that differ from COMMON_TEXT (spec §7.1)
    drafter: tuple[int, int, int, bool]  # hidden, intermediate, query heads, clustered head (spec §7.2)
    vision: tuple[int, int]  # vision tower hidden size and layers (its weights are dummies here)
    audio: bool


_K_EQ_V = {"attention_k_eq_v": True, "sliding_window": 1024, "max_position_embeddings": 262144,
           "use_bidirectional_attention": "vision"}
PRESETS = {
    "e2b": Preset("gemma-4-E2B-it", 5, {
        "hidden_size": 1536, "num_hidden_layers": 35, "intermediate_size": 6144, "num_attention_heads": 8,
        "num_key_value_heads": 1, "sliding_window": 512, "max_position_embeddings": 131072,
        "num_kv_shared_layers": 20, "hidden_size_per_layer_input": 256, "use_double_wide_mlp": True,
    }, (256, 2048, 4, True), (768, 16), True),
    "e4b": Preset("gemma-4-E4B-it", 6, {
        "hidden_size": 2560, "num_hidden_layers": 42, "intermediate_size": 10240, "num_attention_heads": 8,
        "num_key_value_heads": 2, "sliding_window": 512, "max_position_embeddings": 131072,
        "num_kv_shared_layers": 18, "hidden_size_per_layer_input": 256,
    }, (256, 2048, 4, True), (768, 16), True),
    "26b-a4b": Preset("gemma-4-26B-A4B-it", 6, {
        "hidden_size": 2816, "num_hidden_layers": 30, "intermediate_size": 2112, "num_attention_heads": 16,
        "num_key_value_heads": 8, "num_global_key_value_heads": 2, "enable_moe_block": True,
        "num_experts": 128, "top_k_experts": 8, "moe_intermediate_size": 704, **_K_EQ_V,
    }, (1024, 8192, 16, False), (1152, 27), False),
    "31b": Preset("gemma-4-31B-it", 6, {
        "hidden_size": 5376, "num_hidden_layers": 60, "intermediate_size": 21504, "num_attention_heads": 32,
        "num_key_value_heads": 16, "num_global_key_value_heads": 4, **_K_EQ_V,
    }, (1024, 8192, 32, False), (1152, 27), False),
}


def tiny_e2b_pair(hidden: int, vocab: int = 8192, layers: int = 10, seed: int = 0) -> Bundle:
    """A small random E2B-style pair for the benchmark and tests: PLE, KV sharing (the last half), sliding +
    full layers (window 128), a clustered drafter head (64 x vocab/64, top 8); MLX's default init, float32."""
    mx.random.seed(seed)
    types = [FULL if (i + 1) % 5 == 0 else SLIDING for i in range(layers)]
    head = max(32, hidden // 8)
    target_args = ModelArgs(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=1, head_dim=head, global_head_dim=2 * head,
        sliding_window=128, layer_types=types, vocab_size_per_layer_input=vocab, hidden_size_per_layer_input=32,
        num_kv_shared_layers=layers // 2, use_double_wide_mlp=True,
    )
    text = ModelArgs(
        vocab_size=vocab, hidden_size=hidden // 4, intermediate_size=hidden, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=1, head_dim=head, global_head_dim=2 * head, sliding_window=128,
        layer_types=[SLIDING, SLIDING, SLIDING, FULL], num_kv_shared_layers=4, hidden_size_per_layer_input=0,
        final_logit_softcapping=None,
    )
    target = Model(target_args)
    drafter = Drafter(DrafterArgs(text, hidden, True, num_centroids=64, centroid_intermediate_top_k=8))
    drafter.masked_embedding.token_ordering = mx.random.permutation(vocab).astype(mx.int32)
    mx.eval(target.parameters(), drafter.parameters())
    return Bundle(target, drafter, None, {}, GenerationDefaults(), Path("."))


def _preset(shape: str) -> Preset:
    if shape not in PRESETS:
        raise ValueError(f"shape={shape!r} is not a preset; choose one of {tuple(PRESETS)}")
    return PRESETS[shape]


def _block(n: int, period: int) -> list[str]:
    """n layers of the released pattern (period - 1 sliding, then full), the last one full."""
    return [FULL if (i + 1) % period == 0 or i == n - 1 else SLIDING for i in range(n)]


def _cut(text: dict, period: int, layers: int | None, vocab: int | None, experts: int | None) -> None:
    """Released layer types (a pattern block of own-K/V layers, then one of KV-shared layers), cut if asked;
    the vocabulary and the experts as asked."""
    total, shared = text["num_hidden_layers"], text["num_kv_shared_layers"]
    layers = total if layers is None else layers
    if not (isinstance(layers, int) and MIN_LAYERS <= layers <= total):
        raise ValueError(f"layers={layers!r} must be an integer in [{MIN_LAYERS}, {total}]")
    shared = min(round(layers * shared / total), layers - MIN_LAYERS)  # the own block keeps both producers
    text.update(num_hidden_layers=layers, num_kv_shared_layers=shared,
                layer_types=_block(layers - shared, period) + _block(shared, period))
    if vocab is not None:
        if not (isinstance(vocab, int) and 256 <= vocab <= VOCAB and vocab % 256 == 0):
            raise ValueError(f"vocab={vocab!r} must be a multiple of 256 in [256, {VOCAB}]")
        text.update(vocab_size=vocab, vocab_size_per_layer_input=vocab)
    if experts is not None:
        if not text["enable_moe_block"]:
            raise ValueError("experts= applies to the MoE preset (26b-a4b) only")
        if not (isinstance(experts, int) and 1 <= experts <= text["num_experts"]):
            raise ValueError(f"experts={experts!r} must be an integer in [1, {text['num_experts']}]")
        text.update(num_experts=experts, top_k_experts=min(text["top_k_experts"], experts))


def preset_config(shape: str, layers: int | None = None, vocab: int | None = None,
                  experts: int | None = None) -> tuple[dict, dict]:
    """The released `config.json` of a target and of its assistant, as HF-style dicts, optionally cut.

    Args:
        shape: "e2b", "e4b", "26b-a4b" or "31b".
        layers: keep this many target layers (>= 2): the own-K/V and KV-shared blocks shrink in proportion,
            each keeps the sliding/full pattern and ends with a full layer. The assistant keeps its 4 layers.
        vocab: a smaller vocabulary (a multiple of 256); the clustered head then has clusters of 16 tokens.
        experts: keep this many of 26B-A4B's 128 experts (top-k min(8, experts)).

    Returns:
        (target config, model_type "gemma4"; assistant config, model_type "gemma4_assistant").
    """
    p = _preset(shape)
    text = copy.deepcopy({**COMMON_TEXT, **p.text})
    _cut(text, p.period, layers, vocab, experts)
    vision = copy.deepcopy(VISION_CONFIGS[p.vision])
    target = {"architectures": ["Gemma4ForConditionalGeneration"], "model_type": "gemma4",
              "text_config": text, "vision_config": vision,
              "audio_config": {"model_type": "gemma4_audio"} if p.audio else None,
              **MULTIMODAL_TOKENS, "eos_token_id": [1, 106], "tie_word_embeddings": True, "dtype": "bfloat16"}
    return target, _assistant_config(text, p.drafter)


def _assistant_config(target_text: dict, drafter: tuple[int, int, int, bool]) -> dict:
    hidden, intermediate, heads, ordered = drafter
    text = copy.deepcopy(COMMON_TEXT)
    shared = ("vocab_size", "head_dim", "global_head_dim", "num_key_value_heads",
              "num_global_key_value_heads", "attention_k_eq_v", "sliding_window", "max_position_embeddings",
              "rope_parameters")
    for key in shared:
        text[key] = copy.deepcopy(target_text[key])  # the drafter attends to the target's K/V (spec §1.3)
    text.update(hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=heads,
                num_hidden_layers=4, layer_types=[SLIDING, SLIDING, SLIDING, FULL], num_kv_shared_layers=4,
                vocab_size_per_layer_input=0, final_logit_softcapping=None, use_bidirectional_attention=None)
    centroids = math.gcd(2048, text["vocab_size"] // 16)  # 2048 at the released vocabulary
    return {"architectures": ["Gemma4AssistantForCausalLM"], "model_type": "gemma4_assistant",
            "backbone_hidden_size": target_text["hidden_size"], "use_ordered_embeddings": ordered,
            "num_centroids": centroids, "centroid_intermediate_top_k": min(32, max(1, centroids // 8)),
            "tie_word_embeddings": True, "dtype": "bfloat16", "text_config": text}


# --- Tensors ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    shape: tuple[int, ...]
    kind: str = "weight"  # "weight"; "ordering" (int64 token_ordering); "unused" (shared-layer K/V); "tower"


def target_tensors(config: dict, towers: bool = False) -> dict[str, Spec]:
    """Every tensor of the released multimodal target file for `config`, by name; shapes come from a lazily
    initialised MLX model (nothing is allocated). MoE experts are HF's fused `gate_up_proj` / `down_proj`.
    The towers are a few dummy tensors, or with `towers` every tensor of the released towers."""
    args = ModelArgs.from_dict(config)
    out = {}
    for key, p in tree_flatten(Model(args).parameters()):
        name, shape = "model.language_model." + key.removeprefix("model."), tuple(p.shape)
        if ".experts.switch_glu." in key:
            if "up_proj" in key:
                continue  # fused into gate_up_proj, (E, 2 * moe_intermediate, H): the gate is the first half
            shape = (shape[0], 2 * shape[1], shape[2]) if "gate_proj" in key else shape
            name = name.replace("switch_glu.gate_proj.weight", "gate_up_proj").replace("switch_glu.", "")
            name = name.removesuffix(".weight")
        out[name] = Spec(shape)
    for i in range(args.first_kv_shared_layer, args.num_hidden_layers):  # in the files, unused (pitfall 30)
        attn, d = f"model.language_model.layers.{i}.self_attn.", args.layer_head_dims[i]
        kv_out = (args.layer_kv_heads[i] * d, args.hidden_size)
        out[attn + "k_proj.weight"] = Spec(kv_out, "unused")
        if not (args.attention_k_eq_v and args.layer_types[i] == FULL):
            out[attn + "v_proj.weight"] = Spec(kv_out, "unused")
        out[attn + "k_norm.weight"] = Spec((d,), "unused")
    return out | (tower_tensors(config, args.hidden_size) if towers else _towers(config, args.hidden_size))


def _towers(config: dict, hidden: int) -> dict[str, Spec]:
    """A few small tensors under the released tower prefixes: the loader must skip them."""
    out = {"model.vision_tower.patch_embedder.input_proj.weight": Spec((16, 48), "tower"),
           "model.vision_tower.encoder.layers.0.self_attn.q_proj.linear.weight": Spec((16, 16), "tower"),
           "model.embed_vision.embedding_projection.weight": Spec((hidden, 16), "tower")}
    if config.get("audio_config"):
        out |= {"model.audio_tower.layers.0.self_attn.q_proj.linear.weight": Spec((16, 16), "tower"),
                "model.audio_tower.layers.0.self_attn.q_proj.input_max": Spec((), "tower"),
                "model.embed_audio.embedding_projection.weight": Spec((hidden, 16), "tower")}
    return out


def tower_tensors(config: dict, hidden: int) -> dict[str, Spec]:
    """Every tensor of the vision and audio towers and their embedders that `config` declares, by released name
    and in HF's layout (torch conv kernels), from lazily initialised `Towers` (nothing is allocated)."""
    from ..models.towers import Towers

    out = {}
    for key, p in tree_flatten(Towers(config, hidden).parameters()):
        shape = tuple(p.shape)
        if key.startswith("audio_tower.") and key.endswith(".conv.weight") and len(shape) == 4:
            shape = (shape[0], shape[3], shape[1], shape[2])  # MLX (O, kH, kW, I) -> torch (O, I, kH, kW)
        elif key.endswith("depthwise_conv1d.weight") and len(shape) == 3:
            shape = (shape[0], shape[2], shape[1])  # MLX (C, k, 1) -> torch (C, 1, k)
        out["model." + key] = Spec(shape, "tower")
    return out


def tower_parameters(config: dict, hidden: int) -> dict[str, int]:
    """Parameters of each tower root (vision_tower, embed_vision, audio_tower, embed_audio) `config` declares."""
    counts: dict[str, int] = {}
    for name, spec in tower_tensors(config, hidden).items():
        root = name.split(".")[1]
        counts[root] = counts.get(root, 0) + math.prod(spec.shape)
    return counts


def drafter_tensors(config: dict) -> dict[str, Spec]:
    """Every tensor of the released assistant file (the module's names; the tied lm_head is not stored)."""
    drafter = Drafter(DrafterArgs.from_dict(config))
    return {k: Spec(tuple(p.shape), "ordering" if k.endswith("token_ordering") else "weight")
            for k, p in tree_flatten(drafter.parameters())}


def parameter_count(tensors: dict[str, Spec], unused: bool = False) -> int:
    """Parameters of the text model or drafter the file holds (spec §7's counts); with `unused`, also the
    unused K/V of KV-shared layers in the file. Towers and the token_ordering buffer are not counted."""
    kinds = ("weight", "unused") if unused else ("weight",)
    return sum(math.prod(s.shape) for s in tensors.values() if s.kind in kinds)


def _final_gain(hidden: int) -> float:
    return LOGIT_STD * math.sqrt(hidden) / EMBED_SCALE


def _bounds(name: str, shape: tuple[int, ...]):
    """(low, high) of a tensor's uniform values (per column for pre_projection), after hf_oracle's recipe:
    norms ~U(0.5, 1.5), projections variance-preserving, embeddings and the final norm as EMBED_SCALE says."""
    key = canonical_key(name) or name
    if key.endswith(("input_min", "output_min")):  # a tower's clip bounds: wide, so that they rarely clip
        return -12.0, -8.0
    if key.endswith(("input_max", "output_max")):
        return 8.0, 12.0
    if key.endswith("model.norm.weight"):
        return 0.5 * _final_gain(shape[0]), 1.5 * _final_gain(shape[0])
    if key.endswith(("q_norm.weight", "k_norm.weight")):  # no 1/sqrt(d) in Gemma 4 attention
        return 0.5 * shape[0] ** -0.25, 1.5 * shape[0] ** -0.25
    if "norm" in key or key.endswith(("layer_scalar", "scale")):
        return 0.5, 1.5
    std = (shape[-1] if shape else 1) ** -0.5
    if key == "model.embed_tokens.weight":
        std = EMBED_SCALE / shape[-1]
    elif key == "pre_projection.weight":  # [target scaled embedding, target hidden] -> RMS ~1
        H = shape[-1] // 2
        std = std * np.repeat([math.sqrt(H) / EMBED_SCALE, 1 / _final_gain(H)], H)
    elif key == "post_projection.weight":  # next_hidden at the target hidden state's RMS
        std = std * _final_gain(shape[0]) / _final_gain(shape[1])
    return -math.sqrt(3) * std, math.sqrt(3) * std


def tensor_values(name: str, spec: Spec, seed: int = 0, start: int = 0, stop: int | None = None,
                  dtype: mx.Dtype = mx.bfloat16) -> mx.array:
    """Rows start..stop of a tensor's random values, made in `dtype` (the same values however it is chunked).

    The values are 256 evenly spaced levels, one byte each of a PCG64 stream seeded by (seed, name), turned
    into `dtype` by MLX (no float32 copy): ~10x faster than MLX's own normal on the CPU.
    """
    bits = np.random.PCG64([seed, zlib.crc32(name.encode())])
    if spec.kind == "ordering":
        return mx.array(np.random.Generator(bits).permutation(spec.shape[0]).astype(np.int64))
    rows, row = (spec.shape[0], math.prod(spec.shape[1:])) if spec.shape else (1, 1)
    stop = rows if stop is None else stop
    assert start * row % 8 == 0, "chunks start on a 64-bit word of the stream"
    bits.advance(start * row // 8)
    n = (stop - start) * row
    noise = mx.array(bits.random_raw(-(-n // 8)).view(np.uint8)[:n])
    noise = noise.reshape((stop - start, *spec.shape[1:]) if spec.shape else ())
    low, high = _bounds(name, spec.shape)
    step = mx.array((np.asarray(high) - np.asarray(low)) / 256, dtype)
    return noise.astype(dtype) * step + (mx.array(low, dtype) + step / 2)


# --- Random pairs -------------------------------------------------------------------------------------------


def _fill(module, tensors: dict[str, Spec], plan: Plan, seed: int) -> None:
    """Set every parameter of a lazily initialised module, one tensor at a time, quantized per `plan`."""
    quantizable = set(quantizable_modules(module))
    apply_plan(module, plan)  # lazy: the initial values are replaced before anything evaluates them
    expected = {k: tuple(v.shape) for k, v in tree_flatten(module.parameters())}
    filled = set()
    for name, spec in tensors.items():
        if spec.kind in ("weight", "ordering"):
            for key, w in module.sanitize({name: tensor_values(name, spec, seed)}).items():
                out = transform(key, w, plan, quantizable, mx.bfloat16)
                mx.eval(out)
                assert all(tuple(v.shape) == expected[k] for k, v in out.items()), f"{name}: shape mismatch"
                module.load_weights(list(out.items()), strict=False)
                filled.update(out)
    assert filled == expected.keys(), f"parameters left unset: {sorted(expected.keys() - filled)[:5]}"


def random_pair(shape: str, bits: int = 16, recipe: str = "mixed", layers: int | None = None,
                vocab: int | None = None, experts: int | None = None, draft_bits: int | None = None,
                seed: int = 0) -> Bundle:
    """A target and its drafter of a preset's shape with random weights (bfloat16, or quantized).

    Args:
        shape, layers, vocab, experts: as `preset_config`.
        bits: 16 (bfloat16) or the target's quantization bits (group size 64), per `recipe`: "mixed" (the
            converter's default: embedding, PLE, edge layers' V and down projections at 8 bits) or "uniform".
        draft_bits: quantize the drafter too (default: bfloat16, as released).
        seed: the same seed gives the same values as `write_hf_checkpoint` writes.

    Returns:
        A `Bundle` without tokenizer (prompt with token ids); `config` is the target's, with mlx-lm's
        `quantization` entry when quantized.
    """
    if bits != 16 and bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits!r}: choose 16 (bfloat16) or one of {SUPPORTED_BITS}")
    if draft_bits is not None and draft_bits != 16 and draft_bits not in SUPPORTED_BITS:
        raise ValueError(f"draft_bits={draft_bits!r}: choose None (bfloat16) or one of {SUPPORTED_BITS}")
    if recipe not in RECIPES:
        raise ValueError(f"recipe={recipe!r} is unknown; choose one of {RECIPES}")
    target_config, drafter_config = preset_config(shape, layers, vocab, experts)
    target = Model(ModelArgs.from_dict(target_config))
    plan = target_plan(target, recipe, bits, GROUP_SIZE) if bits != 16 else {}
    _fill(target, target_tensors(target_config), plan, seed)
    drafter = Drafter(DrafterArgs.from_dict(drafter_config))
    quantized_drafter = draft_bits not in (None, 16)
    _fill(drafter, drafter_tensors(drafter_config), drafter_plan(drafter, draft_bits, GROUP_SIZE)
          if quantized_drafter else {}, seed)
    materialize(target, drafter)
    if plan:
        target_config["quantization"] = quantization_config(plan, bits, GROUP_SIZE)
    gen = GENERATION_CONFIG
    defaults = GenerationDefaults(gen["eos_token_id"], gen["temperature"], gen["top_p"], gen["top_k"],
                                  gen["bos_token_id"])
    return Bundle(target, drafter, None, target_config, defaults, Path("."))


# --- HF checkpoints -----------------------------------------------------------------------------------------


def _write_safetensors(file: Path, tensors: dict[str, Spec], seed: int) -> None:
    """One safetensors file, the header first (shapes are known), then each tensor chunk by chunk."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, spec in tensors.items():
        size = math.prod(spec.shape) * (8 if spec.kind == "ordering" else 2)
        dtype = "I64" if spec.kind == "ordering" else "BF16"
        header[name] = {"dtype": dtype, "shape": list(spec.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, spec in tensors.items():
            rows = spec.shape[0] if spec.shape and spec.kind != "ordering" else 1
            step = max(8, CHUNK_ELEMENTS // max(1, math.prod(spec.shape[1:])) // 8 * 8)
            for start in range(0, rows, step):
                stop = min(start + step, rows) if spec.shape else None
                chunk = tensor_values(name, spec, seed, start, stop)
                f.write(memoryview(mx.contiguous(chunk)))


def _write_shards(folder: Path, tensors: dict[str, Spec], seed: int, max_shard_bytes: int) -> None:
    """`model-0000i-of-0000n.safetensors` of at most `max_shard_bytes` each, and their index."""
    shards, size = [[]], 0
    for name, spec in tensors.items():
        nbytes = math.prod(spec.shape) * 2
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    weight_map = {}
    for i, names in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors(folder / file, {n: tensors[n] for n in names}, seed)
        weight_map.update(dict.fromkeys(names, file))
    total = sum(math.prod(s.shape) * 2 for s in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _write_json(file: Path, value: dict) -> None:
    file.write_text(json.dumps(value, indent=2) + "\n")


def media_token_ids(vocab: int) -> dict[str, int]:
    """config.json's placeholder ids for a vocabulary of `vocab`: the released ones, or with a cut vocabulary
    too small for them, the last 7 ids in the released order."""
    if vocab > max(MULTIMODAL_TOKENS.values()):
        return dict(MULTIMODAL_TOKENS)
    released = sorted(MULTIMODAL_TOKENS, key=MULTIMODAL_TOKENS.get)
    return {key: vocab - len(released) + i for i, key in enumerate(released)}


def _write_media_files(folder: Path, config: dict) -> None:
    """processor_config.json and a Gemma-4-like tokenizer whose placeholders have `config`'s ids."""
    from .tokenizer import MEDIA_SPECIAL, write_gemma4_tokenizer

    media = {config[key]: MEDIA_SPECIAL[released] for key, released in MULTIMODAL_TOKENS.items()}
    write_gemma4_tokenizer(folder, config["text_config"]["vocab_size"], CHAT_TEMPLATE, media=media)
    _write_json(folder / "processor_config.json", PROCESSOR_CONFIG)


def write_hf_checkpoint(shape: str, out: str | Path, layers: int | None = None, vocab: int | None = None,
                        experts: int | None = None, seed: int = 0,
                        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                        force: bool = False, towers: bool = False) -> tuple[Path, Path]:
    """Write a preset as released: `OUT/<hub name>` (bf16 shards + index, config.json, generation_config.json)
    and `OUT/<hub name>-assistant` (one model.safetensors, config.json). No tokenizer: prompt with token ids.

    Args:
        shape, layers, vocab, experts: as `preset_config`; seed: as `random_pair` (same values).
        max_shard_bytes: shard size of the target. force: replace existing output folders.
        towers: write the vision (and audio) towers at their released shapes instead of dummy tensors, with
            `processor_config.json` and a Gemma-4-like tokenizer (`CHAT_TEMPLATE`): the target takes images
            (and audio) in chat messages. A cut vocabulary puts the placeholder ids at its end
            (`media_token_ids`).

    Returns:
        (target folder, assistant folder).
    """
    target_config, drafter_config = preset_config(shape, layers, vocab, experts)
    out = Path(out)
    name = _preset(shape).hub_name
    dirs = (out / name, out / f"{name}-assistant")
    for d in dirs:
        if d.exists() and not force:
            raise ValueError(f"{d} exists; choose another --out or pass force=True (--force) to replace it")
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
    try:
        target, drafter = tmp / "target", tmp / "assistant"
        target.mkdir(parents=True)
        drafter.mkdir()
        if towers:
            target_config.update(media_token_ids(target_config["text_config"]["vocab_size"]))
            _write_media_files(target, target_config)
        _write_shards(target, target_tensors(target_config, towers), seed, max_shard_bytes)
        _write_json(target / "config.json", target_config)
        _write_json(target / "generation_config.json", GENERATION_CONFIG)
        _write_safetensors(drafter / "model.safetensors", drafter_tensors(drafter_config), seed)
        _write_json(drafter / "config.json", drafter_config)
        for src, dst in zip((target, drafter), dirs):
            if dst.exists():
                shutil.rmtree(dst)
            src.rename(dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dirs


def main(argv: list[str] | None = None) -> int:
    """`python -m mlx_gemma_mtp.testing.presets write --shape e2b --out DIR [--layers N]` (write_hf_checkpoint's
    keyword arguments as options)."""
    parser = argparse.ArgumentParser(prog="python -m mlx_gemma_mtp.testing.presets",
                                     description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("write", help="write a preset as a released-layout HF checkpoint with random weights")
    p.add_argument("--shape", required=True, choices=tuple(PRESETS))
    p.add_argument("--out", required=True, help="folder that receives <hub name>/ and <hub name>-assistant/")
    p.add_argument("--layers", type=int, default=None, help=f"keep this many target layers (>= {MIN_LAYERS})")
    p.add_argument("--vocab", type=int, default=None, help="a smaller vocabulary (a multiple of 256)")
    p.add_argument("--experts", type=int, default=None, help="26b-a4b: keep this many experts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-shard-bytes", type=int, default=DEFAULT_MAX_SHARD_BYTES)
    p.add_argument("--force", action="store_true", help="replace existing output folders")
    p.add_argument("--towers", action="store_true",
                   help="the vision/audio towers at released shapes, a processor config and a tokenizer")
    args = vars(parser.parse_args(argv))
    args.pop("command")
    try:
        target, drafter = write_hf_checkpoint(**args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    how = "chat messages with images" if args["towers"] else "token ids"
    print(f"wrote {target}\n  and {drafter}\nload: mlx_gemma_mtp.load({str(target)!r}, "
          f"draft={str(drafter)!r}) (prompt with {how})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
