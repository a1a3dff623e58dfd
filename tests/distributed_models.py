"""Tiny float32 Gemma 4 pairs for the tensor-parallel tests, written as checkpoints that `load` and
`load_sharded` read (shared by tests/test_distributed.py and the 2-rank worker it launches)."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.switch_layers import SwitchLinear

from mlx_gemma_mtp.models.config import FULL, SLIDING, ModelArgs
from mlx_gemma_mtp.models.gemma4_assistant import Drafter, DrafterArgs
from mlx_gemma_mtp.models.gemma4_text import Model

S, F = SLIDING, FULL
VOCAB = 512
_COMMON = {"model_type": "gemma4_text", "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 256,
           "num_attention_heads": 4, "head_dim": 16, "global_head_dim": 32, "sliding_window": 16,
           "layer_types": [S, S, F, S, S, F], "num_hidden_layers": 6, "max_position_embeddings": 4096,
           "hidden_size_per_layer_input": 0, "vocab_size_per_layer_input": VOCAB}
_K_EQ_V = {"num_key_value_heads": 4, "num_global_key_value_heads": 2, "attention_k_eq_v": True}
KINDS = {
    # E2B-like: one K/V head (replicated on every rank), PLE, the last two layers KV-shared with double-wide MLPs
    "e2b": {"num_key_value_heads": 1, "num_kv_shared_layers": 2, "use_double_wide_mlp": True,
            "hidden_size_per_layer_input": 16},
    # 31B-like: K=V full layers with 2 global K/V heads, 4 on sliding layers (both split across 2 ranks)
    "31b": _K_EQ_V,
    # 26B-A4B-like: the same plus a MoE block (8 experts, top 2) beside the dense MLP
    "moe": {**_K_EQ_V, "enable_moe_block": True, "num_experts": 8, "top_k_experts": 2,
            "moe_intermediate_size": 32},
}
PROMPT = [2, 17, 301, 45, 88, 9, 260, 133, 77, 411, 12, 5]


def target_config(kind: str) -> dict:
    return {**_COMMON, **KINDS[kind]}


def drafter_config(kind: str) -> dict:
    t = target_config(kind)
    text = {k: t[k] for k in ("vocab_size", "head_dim", "global_head_dim", "sliding_window", "num_key_value_heads")}
    text.update({k: t[k] for k in ("num_global_key_value_heads", "attention_k_eq_v") if k in t})
    text.update({"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 4,
                 "layer_types": [S, S, S, F], "num_kv_shared_layers": 4, "final_logit_softcapping": None})
    ordered = kind == "e2b"  # the clustered head of the E2B/E4B assistants
    return {"model_type": "gemma4_assistant", "text_config": text, "backbone_hidden_size": t["hidden_size"],
            "use_ordered_embeddings": ordered, "num_centroids": 16, "centroid_intermediate_top_k": 4}


def _redraw(module) -> None:
    """Weights drawn as tests/hf_oracle.py's `_perturb_weights` does, so that greedy text depends on the context
    (MLX's default init repeats one token)."""
    new = {}
    for name, t in tree_flatten(module.parameters()):
        if not mx.issubdtype(t.dtype, mx.floating):
            continue
        if name.endswith("model.norm.weight"):
            new[name] = 6.0 * mx.random.uniform(0.5, 1.5, t.shape)
        elif name.endswith(("q_norm.weight", "k_norm.weight")):
            new[name] = mx.random.uniform(0.5, 1.5, t.shape) * t.shape[0] ** -0.25
        elif "norm" in name or name.rsplit(".", 1)[-1] in ("layer_scalar", "scale", "per_expert_scale"):
            new[name] = mx.random.uniform(0.5, 1.5, t.shape)
        elif "embed_tokens" in name:
            new[name] = mx.random.normal(t.shape) * 0.15 * t.shape[-1] ** -0.5
        elif t.ndim in (2, 3):
            new[name] = mx.random.normal(t.shape) * t.shape[-1] ** -0.5
    module.load_weights(list(new.items()), strict=False)


def make_pair(kind: str, seed: int = 0) -> tuple[Model, Drafter]:
    """Random float32 target and drafter (the same on every rank for the same seed)."""
    mx.random.seed(seed)
    target = Model(ModelArgs.from_dict(target_config(kind)))
    drafter = Drafter(DrafterArgs.from_dict(drafter_config(kind)))
    _redraw(target)
    _redraw(drafter)
    if "masked_embedding" in drafter:
        drafter.masked_embedding.token_ordering = mx.random.permutation(VOCAB).astype(mx.int32)
    mx.eval(target.parameters(), drafter.parameters())
    return target, drafter


def write_pair(kind: str, folder: Path, seed: int = 0, bits: int | None = None) -> Path:
    """Save `make_pair(kind, seed)` as a bundle: target at the top (its linear layers quantized to `bits`, group
    size 32, when given), drafter in drafter/."""
    target, drafter = make_pair(kind, seed)
    config = target_config(kind)
    if bits:
        nn.quantize(target, 32, bits, class_predicate=lambda path, m: isinstance(m, (nn.Linear, SwitchLinear)))
        config["quantization"] = {"group_size": 32, "bits": bits}
    for module, config, where in ((target, config, folder), (drafter, drafter_config(kind), folder / "drafter")):
        where.mkdir(parents=True, exist_ok=True)
        mx.save_safetensors(str(where / "model.safetensors"), dict(tree_flatten(module.parameters())))
        (where / "config.json").write_text(json.dumps(config))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [1]}))
    return folder
