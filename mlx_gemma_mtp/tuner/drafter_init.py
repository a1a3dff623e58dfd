"""New Gemma 4 MTP drafters for a given target: architecture, initial weights, clustered head, folder format.

Reference: spec §1.3 (what must match the target), §4.1/§7.2 (the released assistants' shapes) and §4.4 (the
clustered head: `token_ordering[c*n:(c+1)*n]` are the ids of cluster c). The architecture copies the attention
geometry of the target's producer layers, because the drafter attends to their K/V tensors directly. Written
folders use the released `gemma4_assistant` config.json format (HF `Gemma4AssistantForCausalLM` loads them).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ..models.config import FULL, SLIDING, ModelArgs
from ..models.gemma4_assistant import Drafter, DrafterArgs
from ..models.gemma4_text import Model
from ..models.masked_embedder import MaskedEmbedder

_DTYPE_NAMES = {mx.float32: "float32", mx.bfloat16: "bfloat16", mx.float16: "float16"}


def drafter_args(
    target: ModelArgs, hidden_size: int | None = None, intermediate_size: int | None = None,
    num_attention_heads: int | None = None, num_hidden_layers: int = 4,
) -> DrafterArgs:
    """A drafter matching `target` (layer types [S, ..., S, F]); sizes default to the released assistants'.

    Defaults: hidden 256 (E2B/E4B assistants) or 1024 (targets of hidden size >= 2816, as 26B/31B), MLP 8x
    hidden, query heads = the smallest multiple of the target's KV head counts that is >= 4.
    """
    types = [t for t in (SLIDING, FULL) if t in target.layer_types]
    n = num_hidden_layers
    if len(types) == 2 and n < 2:
        raise ValueError(f"num_hidden_layers={n}: the drafter needs >= 2 layers to read both K/V types")
    layer_types = [SLIDING] * (n - 1) + [FULL] if len(types) == 2 else [FULL] * n
    s, f = target.kv_producer(types[0]), target.kv_producer(FULL)
    kv_heads = {target.layer_kv_heads[s], target.layer_kv_heads[f]}
    hidden = hidden_size or (256 if target.hidden_size < 2816 else 1024)
    heads = num_attention_heads or next(h for h in range(4, 4096) if all(h % k == 0 for k in kv_heads))
    text = ModelArgs(
        vocab_size=target.vocab_size, hidden_size=hidden, intermediate_size=intermediate_size or 8 * hidden,
        num_hidden_layers=n, num_attention_heads=heads, num_key_value_heads=target.layer_kv_heads[s],
        head_dim=target.layer_head_dims[s], global_head_dim=target.layer_head_dims[f],
        num_global_key_value_heads=target.layer_kv_heads[f] if target.attention_k_eq_v else None,
        hidden_activation=target.hidden_activation, rms_norm_eps=target.rms_norm_eps,
        sliding_window=target.sliding_window, layer_types=layer_types,
        rope_parameters=json.loads(json.dumps(target.rope_parameters)), final_logit_softcapping=None,
        vocab_size_per_layer_input=0, hidden_size_per_layer_input=0, attention_k_eq_v=target.attention_k_eq_v,
        num_kv_shared_layers=n,
    )
    args = DrafterArgs(text, target.hidden_size)
    args.validate_against(target)
    return args


def projected_embeddings(target: Model, dims: int, chunk: int = 16384, sample: int = 65536) -> mx.array:
    """The target's token embeddings on their top `dims` principal directions, (V, dims) float32 at MLX's
    embedding init scale. A drafter LM head that starts here already scores similar tokens alike."""
    embed, V = target.model.embed_tokens, target.args.vocab_size

    def rows(ids: mx.array) -> mx.array:
        return embed(ids).astype(mx.float32)  # dequantizes quantized embeddings too

    ids = mx.array(np.random.default_rng(0).permutation(V)[:sample])
    moment = sum(r.T @ r for r in (rows(ids[i : i + chunk]) for i in range(0, ids.size, chunk)))
    _, vectors = mx.linalg.eigh(moment, stream=mx.cpu)  # ascending eigenvalues
    basis = vectors[:, ::-1][:, :dims]
    out = mx.concatenate([rows(mx.arange(i, min(i + chunk, V))) @ basis for i in range(0, V, chunk)])
    if out.shape[1] < dims:  # drafter wider than the target: the extra directions start small and random
        out = mx.concatenate([out, 1e-3 * mx.random.normal((V, dims - out.shape[1]))], axis=1)
    return out * (dims**-0.5 / mx.sqrt(mx.mean(out * out)))


def new_drafter(target: Model, args: DrafterArgs, seed: int = 0) -> Drafter:
    """Initial weights: MLX defaults, except q_norm = head_dim^-1/2 (Gemma 4 attention has no 1/sqrt(d) scale;
    this keeps the first attention logits O(1)) and the tied LM head = the target's projected embeddings."""
    mx.random.seed(seed)
    drafter = Drafter(args)
    for layer in drafter.model.layers:
        q_norm = layer.self_attn.q_norm
        q_norm.weight = mx.full(q_norm.weight.shape, q_norm.weight.shape[0] ** -0.5)
    drafter.model.embed_tokens.weight = projected_embeddings(target, args.text.hidden_size)
    mx.eval(drafter.parameters())
    return drafter


def balanced_clusters(rows: np.ndarray, n_clusters: int, seed: int = 0) -> np.ndarray:
    """A token ordering, (V,) int32: `n_clusters` consecutive groups of exactly V / n_clusters similar rows, made
    by splitting each group at a quantile of its projection on its principal direction (power iteration)."""
    rng = np.random.default_rng(seed)
    size = len(rows) // n_clusters

    def split(ids: np.ndarray, n: int) -> list[np.ndarray]:
        if n == 1:
            return [ids]
        x = rows[ids] - rows[ids].mean(axis=0)
        v = rng.standard_normal(rows.shape[1])
        for _ in range(8):
            v = x.T @ (x @ v)
            v /= np.linalg.norm(v) + 1e-30
        order = ids[np.argsort(x @ v, kind="stable")]
        left = n // 2
        return split(order[: left * size], left) + split(order[left * size :], n - left)

    return np.concatenate(split(np.arange(len(rows)), n_clusters)).astype(np.int32)


def add_clusters(drafter: Drafter, num_centroids: int, top_k: int, seed: int = 0) -> None:
    """Give `drafter` a clustered head built from its LM-head rows: tokens with similar rows get similar logits
    for every state, so a cluster's mean row (its centroid) scores the whole cluster well."""
    a = drafter.args
    a.use_ordered_embeddings, a.num_centroids, a.centroid_intermediate_top_k = True, num_centroids, top_k
    head = MaskedEmbedder(a.text.hidden_size, a.text.vocab_size, num_centroids, top_k)
    rows = np.array(drafter.model.embed_tokens.weight.astype(mx.float32))
    ordering = balanced_clusters(rows, num_centroids, seed)
    head.token_ordering = mx.array(ordering)
    head.centroids.weight = mx.array(rows[ordering].reshape(num_centroids, -1, rows.shape[1]).mean(axis=1))
    drafter.masked_embedding = head


def drafter_config(args: DrafterArgs, dtype: mx.Dtype) -> dict:
    """The released assistants' config.json (model_type gemma4_assistant, spec §1.3, §7.2)."""
    text = args.text.to_dict()
    text.update(num_kv_shared_layers=args.text.num_hidden_layers, hidden_size_per_layer_input=0,
                vocab_size_per_layer_input=0, final_logit_softcapping=None, enable_moe_block=False,
                use_double_wide_mlp=False)
    return {
        "architectures": ["Gemma4AssistantForCausalLM"], "model_type": "gemma4_assistant",
        "backbone_hidden_size": args.backbone_hidden_size, "use_ordered_embeddings": args.use_ordered_embeddings,
        "num_centroids": args.num_centroids, "centroid_intermediate_top_k": args.centroid_intermediate_top_k,
        "tie_word_embeddings": True, "dtype": _DTYPE_NAMES[dtype], "text_config": text,
    }


def write_drafter(folder: Path, drafter: Drafter, dtype: mx.Dtype) -> None:
    """config.json + model.safetensors into a new `folder` (floating tensors cast to `dtype`; token_ordering
    stays int32; the tied lm_head is not stored, as in the released files)."""
    folder.mkdir(parents=True)
    weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v
               for k, v in tree_flatten(drafter.parameters())}
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(drafter_config(drafter.args, dtype), indent=2) + "\n")
