"""What a round costs, before anything is timed: the analytic model of a pair (`CostModel`, in units of a one-token
target forward: a call costs the bytes it reads, K/V at the current context included) and measured costs
(`DraftCosts`, e.g. the saved calibration). The "auto" draft length (`draft_length.py`) starts from them."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from mlx.utils import tree_flatten

from .models.config import SLIDING
from .models.gemma4_assistant import Drafter
from .models.gemma4_text import Model

if TYPE_CHECKING:
    from .distributed.lockstep import Lockstep

VERIFY_SLOPE = 0.06  # extra cost per verified token, relative to a one-token forward
ROUND_OVERHEAD = 0.15  # a drafting round's host sync and bookkeeping, relative to a one-token forward


@dataclass
class DraftCosts:
    """Measured seconds at a `context`-token prefix (`measure_costs`)."""

    draft: list[float]  # draft[K] = seconds to draft K tokens (one call, as a round does); draft[0] = 0
    verify: list[float]  # verify[T] = seconds for a target forward of T tokens and the acceptance rule (index 0 unused)
    context: int = 128

    @property
    def draft_step(self) -> float:
        return self.draft[1]


@dataclass(frozen=True)
class CostModel:
    """Relative cost of a round, in units of a one-token target forward at an empty context (device-independent)."""

    draft_step: float  # drafter bytes / target bytes
    target_kv: tuple  # per target layer: (sliding window or None, K/V bytes per context token / target bytes)
    drafter_kv: tuple  # the same for the drafter's layers, which read the target's K/V

    def round(self, k: int, context: int) -> float:
        verify = 1.0 + _kv_read(self.target_kv, context) + VERIFY_SLOPE * k
        if k == 0:
            return verify
        return verify + ROUND_OVERHEAD + self.drafting(k, context)

    def drafting(self, k: int, context: int) -> float:
        """The K draft steps of a round."""
        return k * (self.draft_step + _kv_read(self.drafter_kv, context))

    def rounds(self, max_k: int, context: int) -> tuple[float, ...]:
        """`round(k, context)` for k = 0..max_k (the policy asks for all of them before every round)."""
        return _rounds(self, max_k, context)


@lru_cache(maxsize=64)
def _rounds(model: CostModel, max_k: int, context: int) -> tuple[float, ...]:
    return tuple(model.round(k, context) for k in range(max_k + 1))


def _kv_read(layers: tuple, context: int) -> float:
    return sum(per_token * (context if window is None else min(context, window)) for window, per_token in layers)


def _read_bytes(module, experts_read: float = 1.0) -> float:
    """Parameter bytes a one-token forward reads: not the per-layer input table (a few rows are gathered), and of
    the MoE experts' weights the `experts_read` fraction (top-k of them)."""
    total = 0.0
    for name, value in tree_flatten(module.parameters()):
        if "embed_tokens_per_layer" not in name:
            total += value.nbytes * (experts_read if "switch_glu" in name else 1.0)
    return total


def cost_model(target: Model, drafter: Drafter, lockstep: Lockstep | None = None) -> CostModel:
    """The analytic curve of a pair from the bytes its calls read: parameters and K/V."""
    args = target.args
    weights = _read_bytes(target, args.top_k_experts / args.num_experts if args.enable_moe_block else 1.0)
    if lockstep is not None:
        weights = lockstep.same_float(weights)  # uneven shards: every rank must price K alike
    element = target.model.norm.weight.dtype.size  # K/V are kept in the activations' dtype

    def kv(args) -> tuple:
        return tuple((args.sliding_window if kind == SLIDING else None, 2 * heads * dim * element / weights)
                     for kind, heads, dim in zip(args.layer_types, args.layer_kv_heads, args.layer_head_dims))

    return CostModel(_read_bytes(drafter) / weights, kv(args), kv(drafter.args.text))
