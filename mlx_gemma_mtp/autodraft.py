"""Draft length: fixed, or "auto" = the K that maximises expected tokens per second on this device.

Expected tokens of a round with K drafts: 1 + sum_{i<=K} prod_{j<=i} a_j, with a_j the acceptance of draft
position j given the earlier ones were accepted (tracked online, with a prior). Cost of that round:
T_verify(K+1) + K * T_draft, measured once per model shape, dtype and device (cached in memory) because the curve
differs a lot across devices and dtypes. K = 0 (plain decoding) wins when speculation does not pay; such rounds
still probe a K > 0 now and then so that the acceptance estimates stay current.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx

from .models.gemma4_assistant import Drafter
from .cache import trim_cache
from .models.gemma4_text import Model
from .sampling import SamplerConfig
from .speculative import DraftStats, draft, visible_kv

_COSTS: dict[tuple, DraftCosts] = {}
PROBE_EVERY = 16  # plain rounds between probes when K = 0 is chosen


@dataclass
class DraftCosts:
    draft_step: float  # seconds per drafter step
    verify: list[float]  # verify[T] = seconds for a target forward of T tokens (index 0 unused)


def _timed(fn: Callable[[], mx.array], reps: int = 5) -> float:
    mx.eval(fn())  # warm-up (kernel compilation, allocations)
    times = []
    for _ in range(reps):
        tic = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - tic)
    return sorted(times)[len(times) // 2]


def measure_costs(target: Model, drafter: Drafter, max_tokens: int, context: int = 128) -> DraftCosts:
    """Time a drafter step and target verifies of 1..max_tokens tokens after a `context`-token prefix."""
    # costs depend on the shapes, dtypes and the device, not on the weights' values
    dtypes = (target.model.embed_tokens.weight.dtype, drafter.pre_projection.weight.dtype)
    key = (repr(target.args), repr(drafter.args), str(dtypes), max_tokens, str(mx.default_device()))
    if key in _COSTS:
        return _COSTS[key]
    ids = mx.arange(context + 1) % target.args.vocab_size
    cache = target.make_cache(max_rollback=max_tokens)
    out = target.forward(ids[None], cache, return_hidden=True, return_shared_kv=True)
    mx.eval(out.hidden, out.shared_kv)
    kv = visible_kv(out.shared_kv, 0, target.args.sliding_window)

    def verify(T):
        logits = target.forward(ids[None, :T], cache, rows=T).logits
        mx.eval(logits)
        trim_cache(cache, T)  # keep the context fixed between timings
        return logits

    step = _timed(lambda: draft(target, drafter, ids[-1:], out.hidden, kv, context, 1, SamplerConfig())[0])
    costs = DraftCosts(step, [0.0] + [_timed(lambda T=T: verify(T)) for T in range(1, max_tokens + 1)])
    _COSTS[key] = costs
    return costs


class AutoDraftLength:
    """Callable: tokens still wanted -> K for the next round."""

    def __init__(self, costs: DraftCosts, stats: DraftStats, max_k: int, prior: float = 0.6, weight: float = 4.0):
        self.costs, self.stats, self.max_k = costs, stats, max_k
        self.prior, self.weight = prior, weight
        self.plain_rounds = 0

    def acceptance(self) -> list[float]:
        """Conditional acceptance per position, shrunk towards the prior while few rounds are seen."""
        s = self.stats
        out = []
        for i in range(self.max_k):
            drafted = s.drafted_per_position[i] if i < len(s.drafted_per_position) else 0
            accepted = s.accepted_per_position[i] if i < len(s.accepted_per_position) else 0
            out.append((accepted + self.prior * self.weight) / (drafted + self.weight))
        return out

    def expected_rate(self, k: int, acceptance: list[float]) -> float:
        tokens, survive = 1.0, 1.0
        for a in acceptance[:k]:
            survive *= a
            tokens += survive
        return tokens / (self.costs.verify[k + 1] + k * self.costs.draft_step)

    def best(self) -> int:
        acceptance = self.acceptance()
        return max(range(self.max_k + 1), key=lambda k: self.expected_rate(k, acceptance))

    def __call__(self, remaining: int) -> int:
        k = self.best()
        if k == 0:
            self.plain_rounds += 1
            if self.plain_rounds % PROBE_EVERY == 0:
                return 1
        return k


def draft_length_policy(num_draft_tokens, target: Model, drafter: Drafter, stats: DraftStats, max_k: int):
    """A fixed K for an int, an `AutoDraftLength` for "auto" or None."""
    if isinstance(num_draft_tokens, int):
        return lambda remaining: num_draft_tokens
    max_k = min(max_k, 8)
    return AutoDraftLength(measure_costs(target, drafter, max_k + 1), stats, max_k)
