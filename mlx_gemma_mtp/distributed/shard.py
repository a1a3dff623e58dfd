"""Tensor parallelism for the Gemma 4 target over MLX's distributed backend, and the lock-step of the MTP loop.

References: mlx-lm's `shard(group)` methods (`mlx_lm/models/llama.py`, `qwen3_moe.py`, `deepseek_v3.py`) and
`mlx/nn/layers/distributed.py` (Megatron-style column/row-parallel linears). `shard(model, group)` splits every
decoder layer across the ranks of `group`:

- attention: query heads split (q_proj column-parallel, o_proj row-parallel: one all-sum). K/V heads are split
  with them when their count divides; otherwise (E2B's single KV head, 2-4 global heads on more ranks) each rank
  projects the K/V heads its query heads read. The two KV *producer* layers (whose K/V the drafter and the
  KV-shared layers read) keep all their K/V heads on every rank, so the replicated drafter sees the full K/V;
  their attention uses only the local heads (`Attention.kv_slice`). K=V full layers have no v_proj: same rules.
- dense MLP: gate/up column-parallel, down row-parallel (one all-sum).
- MoE (26B-A4B): every expert's intermediate dimension is split (mlx-lm's choice), not the experts themselves:
  a token's top-8 experts then cost every rank the same, while whole experts per rank would leave the rank that
  holds more of them the slowest; one all-sum after the weighted sum. Router replicated.
- replicated: the token embedding, which is also the tied head (a vocabulary-split head would save V x H per rank,
  2.8 GB on 31B in bfloat16, but would all-gather K + 1 rows of V float32 logits a round, 1 MB a row), the PLE
  table and its projections, norms, `layer_scalar`.

Splits are as even as the quantization groups allow (26B-A4B's 704-wide experts at group 64 split 320/384).
`lockstep.Lockstep` keeps the ranks in step: token decisions (drafts, accepted counts, sampled tokens) are rank
0's, broadcast inside the graph the round already evaluates, and rank 0's round timings ride along for the auto
draft length, so there is still one host sync per round.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ..models.gemma4_text import Attention, Model

# parameter path -> (axis, start, stop) of the stored tensor this rank holds
Plan = dict[str, tuple[int, int, int]]


def split_points(n: int, parts: int, align: int = 1) -> list[int]:
    """`parts + 1` boundaries cutting `n` into `parts` ranges, multiples of `align`, as even as possible."""
    if n % align or n // align < parts:
        raise ValueError(f"cannot split {n} features into {parts} parts of whole {align}-wide groups")
    units = n // align
    return [units * r // parts * align for r in range(parts + 1)]


def group_size_of(layer: nn.Module) -> int:
    """The input alignment a slice of `layer`'s input features needs: its quantization group (1 if float)."""
    return getattr(layer, "group_size", 1) if "scales" in layer else 1


def _slice(layer: nn.Module, path: str, start: int, stop: int, inputs: bool, plan: Plan) -> None:
    """Keep output features [start, stop) of a (switch) linear, or input features when `inputs`, in place."""
    quantized = "scales" in layer
    update = {}
    for name, w in layer.parameters().items():
        if name == "bias":
            if inputs:
                continue
            axis, a, b = w.ndim - 1, start, stop
        elif not inputs:
            axis, a, b = w.ndim - 2, start, stop
        elif name == "weight" and quantized:  # packed: 32 / bits inputs per uint32
            axis, a, b = w.ndim - 1, start * layer.bits // 32, stop * layer.bits // 32
        elif quantized:  # scales / biases: one per group
            axis, a, b = w.ndim - 1, start // layer.group_size, stop // layer.group_size
        else:
            axis, a, b = w.ndim - 1, start, stop
        index = (slice(None),) * axis + (slice(a, b),)
        update[name] = mx.contiguous(w[index])
        plan[f"{path}.{name}"] = (axis, a, b)
    layer.update(update)


def _as_sharded(layer: nn.Module, group, inputs: bool) -> nn.Module:
    """The same weights in mlx.nn's column- (AllToSharded) or row-parallel (ShardedToAll: the all-sum) layer."""
    N = group.size()
    out_dims = layer.weight.shape[0]
    in_dims = layer.weight.shape[1] * (32 // layer.bits if "scales" in layer else 1)
    dims = (in_dims * N, out_dims) if inputs else (in_dims, out_dims * N)  # the constructors take full sizes
    if "scales" in layer:
        cls = nn.QuantizedShardedToAllLinear if inputs else nn.QuantizedAllToShardedLinear
        new = cls(*dims, bias=False, group_size=layer.group_size, bits=layer.bits, mode=layer.mode, group=group)
    else:
        cls = nn.ShardedToAllLinear if inputs else nn.AllToShardedLinear
        new = cls(*dims, bias=False, group=group)
    new.update(layer.parameters())  # the constructors' random weights are lazy: never computed
    return new


def _split_linear(parent: nn.Module, name: str, path: str, points: list[int], rank: int, group, inputs: bool,
                  plan: Plan) -> None:
    layer = getattr(parent, name)
    _slice(layer, f"{path}.{name}", points[rank], points[rank + 1], inputs, plan)
    setattr(parent, name, _as_sharded(layer, group, inputs))


def kv_heads_for(q_start: int, q_stop: int, n_heads: int, n_kv: int) -> tuple[int, int]:
    """The K/V heads [lo, hi) that query heads [q_start, q_stop) read (grouped-query attention)."""
    per_kv = n_heads // n_kv
    lo, hi = q_start // per_kv, (q_stop - 1) // per_kv + 1
    # SDPA maps local query head j to local K/V head j // (local queries / local K/V): right for one K/V head,
    # or for whole groups of per_kv query heads
    if hi - lo > 1 and (q_start % per_kv or q_stop - q_start != (hi - lo) * per_kv):
        raise ValueError(f"query heads {q_start}..{q_stop - 1} of {n_heads} do not map evenly onto K/V heads "
                         f"{lo}..{hi - 1} of {n_kv}: use a number of ranks that divides both head counts")
    return lo, hi


def _shard_attention(attn: Attention, path: str, rank: int, N: int, group, full_kv: bool, plan: Plan) -> None:
    nh, d = attn.n_heads, attn.head_dim
    if nh % N:
        raise ValueError(f"{path}: {nh} attention heads cannot be split across {N} ranks")
    q0, q1 = rank * nh // N, (rank + 1) * nh // N
    points = [h * d for h in range(0, nh + 1, nh // N)]
    align = group_size_of(attn.o_proj)
    if any(p % align for p in points):
        raise ValueError(f"{path}.o_proj: head boundaries are not multiples of its quantization group {align}")
    _split_linear(attn, "q_proj", path, points, rank, group, False, plan)
    _split_linear(attn, "o_proj", path, points, rank, group, True, plan)
    attn.n_heads = nh // N
    # for KV-shared layers n_kv_heads is the producer's count (same layer type): the K/V they read hold them all
    nkv = attn.n_kv_heads
    lo, hi = kv_heads_for(q0, q1, nh, nkv)
    if attn.is_kv_shared or full_kv:  # the producer's K/V stay whole on every rank (the drafter reads them)
        attn.kv_slice = None if (lo, hi) == (0, nkv) else slice(lo, hi)
        return
    names = [n for n in ("k_proj", "v_proj") if n in attn]
    if nkv % N == 0:  # an even split of the K/V heads, with the query heads that read them
        for n in names:
            _split_linear(attn, n, path, [h * d for h in range(0, nkv + 1, nkv // N)], rank, group, False, plan)
    else:  # fewer K/V heads than ranks: each rank projects the ones its query heads read (replicated)
        for n in names:
            _slice(getattr(attn, n), f"{path}.{n}", lo * d, hi * d, False, plan)
    attn.n_kv_heads = hi - lo


def _shard_mlp(mlp: nn.Module, path: str, rank: int, N: int, group, plan: Plan) -> None:
    points = split_points(mlp.gate_proj.weight.shape[0], N, group_size_of(mlp.down_proj))
    for name in ("gate_proj", "up_proj"):
        _split_linear(mlp, name, path, points, rank, group, False, plan)
    _split_linear(mlp, "down_proj", path, points, rank, group, True, plan)


def _shard_experts(experts: nn.Module, path: str, rank: int, N: int, group, plan: Plan) -> None:
    glu, path = experts.switch_glu, f"{path}.switch_glu"
    points = split_points(glu.gate_proj.weight.shape[1], N, group_size_of(glu.down_proj))
    a, b = points[rank], points[rank + 1]
    _slice(glu.gate_proj, f"{path}.gate_proj", a, b, False, plan)
    _slice(glu.up_proj, f"{path}.up_proj", a, b, False, plan)
    _slice(glu.down_proj, f"{path}.down_proj", a, b, True, plan)
    experts.sharding_group = group


def shard(model: Model, group: mx.distributed.Group | None = None) -> Plan:
    """Split `model`'s decoder layers across the ranks of `group` in place (see the module docstring).

    Works on a loaded model (its weights are sliced) and on a freshly built one (`distributed_load` then reads
    only each rank's slices). Returns the plan: for each sliced parameter, the axis and range of the stored tensor
    this rank holds. The decoding loop keeps the ranks in step with a `lockstep.Lockstep` of the same group, which
    the loaded bundle holds (`Bundle.state.lockstep`).
    """
    group = group or mx.distributed.init()
    rank, N = group.rank(), group.size()
    plan: Plan = {}
    producers = set(model.producers.values())
    for i, layer in enumerate(model.layers):
        path = f"model.layers.{i}"
        _shard_attention(layer.self_attn, f"{path}.self_attn", rank, N, group, i in producers, plan)
        _shard_mlp(layer.mlp, f"{path}.mlp", rank, N, group, plan)
        if "experts" in layer:
            _shard_experts(layer.experts, f"{path}.experts", rank, N, group, plan)
    return plan


def weight_bytes(module: nn.Module) -> int:
    """Bytes of the parameters this process holds."""
    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))


def all_sum_count(model: Model) -> int:
    """All-sums of one target forward (each moves rows x hidden_size activations); 0 for a model not sharded."""
    count = 0
    for layer in model.layers:
        sharded = isinstance(layer.self_attn.o_proj, (nn.ShardedToAllLinear, nn.QuantizedShardedToAllLinear))
        count += sharded * (2 + ("experts" in layer and layer.experts.sharding_group is not None))
    return count
