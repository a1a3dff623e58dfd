"""Quantization recipes and the per-tensor transform of the converter.

Reference: mlx-lm `utils.py: quantize_model` (per-path overrides in `config["quantization"]`), mlx-vlm's 8-bit
router, spec §6.3. A plan maps each module path to `(group_size, bits)`; only modules MLX can quantize
(`to_quantized`: Linear, Embedding, SwitchLinear) are candidates, so norms, `layer_scalar`, the router's
`scale` / `per_expert_scale` and `token_ordering` are never quantized. Those "protected" tensors are not
float-cast either unless the cast is lossless: their values reach the output bit-exact.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128)
RECIPES = ("uniform", "mixed")
DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}
HIGH_BITS = 8  # router and the mixed recipe's sensitive layers
PLE_MODULES = (
    "embed_tokens_per_layer",
    "per_layer_model_projection",
    "per_layer_input_gate",
    "per_layer_projection",
)
DRAFTER_KEEP_FLOAT = ("masked_embedding.centroids",)  # tiny, and cluster choice is sensitive

Plan = dict[str, tuple[int, int]]  # module path -> (group_size, bits)


def quantizable_modules(module: nn.Module) -> dict[str, nn.Module]:
    """Leaf modules MLX can quantize (Linear, Embedding, SwitchLinear), by path."""
    return {path: m for path, m in module.named_modules() if hasattr(m, "to_quantized")}


def check_options(q_bits: int, q_group_size: int, recipe: str, dtype: str, draft_q_bits: int | None) -> None:
    """Reject unsupported options before any work, naming the value and the choices."""
    for name, value in (("q_bits", q_bits), ("draft_q_bits", draft_q_bits)):
        if value is not None and value not in SUPPORTED_BITS:
            raise ValueError(f"{name}={value!r} is not supported; choose one of {SUPPORTED_BITS}")
    if q_group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(
            f"q_group_size={q_group_size!r} is not supported; choose one of {SUPPORTED_GROUP_SIZES}"
        )
    if recipe not in RECIPES:
        raise ValueError(f"recipe={recipe!r} is unknown; choose one of {RECIPES}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; choose one of {tuple(DTYPES)}")


def _mixed_high_precision(path: str, num_layers: int, has_v_proj: bool) -> bool:
    """The mixed recipe's 8-bit set: embedding/tied head, PLE, edge layers' V (or K=V) and down proj."""
    parts = path.split(".")
    if path == "model.embed_tokens" or parts[-1] in PLE_MODULES:
        return True
    if len(parts) < 4 or parts[1] != "layers" or int(parts[2]) not in (0, num_layers - 1):
        return False
    rest = ".".join(parts[3:])
    return rest in ("self_attn.v_proj", "mlp.down_proj") or (rest == "self_attn.k_proj" and not has_v_proj)


def target_plan(model: nn.Module, recipe: str, bits: int, group_size: int) -> Plan:
    """(group_size, bits) per quantized module of a Gemma 4 target.

    `uniform`: everything of the text model at `bits` (vision/audio towers are never quantized); `mixed`: the spec §6.3-sensitive layers at 8 bits. The router projection
    is 8-bit in both. Modules whose input dimension is not a multiple of `group_size` stay in float.
    """
    num_layers = model.args.num_hidden_layers
    modules = quantizable_modules(model)
    plan = {}
    for path, module in modules.items():
        if module.weight.shape[-1] % group_size or not path.startswith("model."):  # towers stay float
            continue
        if path.endswith("router.proj"):
            plan[path] = (group_size, HIGH_BITS)
        elif recipe == "mixed":
            has_v_proj = f"{path.rsplit('.', 1)[0]}.v_proj" in modules
            high = _mixed_high_precision(path, num_layers, has_v_proj)
            plan[path] = (group_size, max(bits, HIGH_BITS) if high else bits)
        else:
            plan[path] = (group_size, bits)
    return plan


def drafter_plan(drafter: nn.Module, bits: int, group_size: int) -> Plan:
    """Every drafter Linear/Embedding at `bits`, except the centroid scorer (and dims not divisible)."""
    return {
        path: (group_size, bits)
        for path, module in quantizable_modules(drafter).items()
        if path not in DRAFTER_KEEP_FLOAT and module.weight.shape[-1] % group_size == 0
    }


def quantization_config(plan: Plan, bits: int, group_size: int) -> dict:
    """mlx-lm's `config["quantization"]`: defaults plus an entry per module that differs from them."""
    config = {"group_size": group_size, "bits": bits, "mode": "affine"}
    for path, (g, b) in sorted(plan.items()):
        if (g, b) != (group_size, bits):
            config[path] = {"group_size": g, "bits": b}
    return config


def apply_plan(module: nn.Module, plan: Plan) -> None:
    """Turn the planned modules into their quantized forms (lazily: used to derive expected shapes)."""
    nn.quantize(
        module,
        class_predicate=lambda path, _m: (
            {"group_size": plan[path][0], "bits": plan[path][1], "mode": "affine"} if path in plan else False
        ),
    )


def transform(
    key: str, w: mx.array, plan: Plan, quantizable: set[str], dtype: mx.Dtype
) -> dict[str, mx.array]:
    """One sanitized tensor -> the output tensors (`weight`, `scales`, `biases` for a quantized layer).

    Weights of Linear/Embedding/SwitchLinear are cast to `dtype` (and quantized when planned); every other
    float tensor (norms, scalars, router scales) is cast only when that is lossless; integers are kept.
    """
    path, leaf = key.rsplit(".", 1)
    if leaf == "weight" and path in plan:
        group_size, bits = plan[path]
        wq, scales, biases = mx.quantize(w.astype(dtype), group_size, bits)
        return {key: wq, f"{path}.scales": scales, f"{path}.biases": biases}
    if not mx.issubdtype(w.dtype, mx.floating):
        return {key: w}
    if path in quantizable:
        return {key: w.astype(dtype)}
    cast = w.astype(dtype)
    return {key: cast if mx.array_equal(cast.astype(w.dtype), w).item() else w}
