"""Draft length: fixed, or "auto" = the K that maximises expected tokens per second on this device.

Expected tokens of a round with K drafts: 1 + sum_{i<=K} prod_{j<=i} a_j, with a_j the acceptance of draft
position j given the earlier ones were accepted (tracked online, with a prior). Cost of that round:
T_draft(K) + T_verify(K+1) (drafting K tokens is one compiled call, so T_draft(K) can be below K * T_draft(1)),
measured once per model shape, dtype, device and greedy/sampled drafting (cached in memory and in
~/.cache/mlx_gemma_mtp/draft_costs.json, or $MLX_GEMMA_MTP_CACHE) because the curve differs a lot across devices
and dtypes. K = 0 (plain decoding) wins when speculation does not pay; such rounds
still probe a K > 0 now and then so that the acceptance estimates stay current.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from .cache import trim_cache
from .drafting import cache_windows, draft, draft_step
from .models.gemma4_assistant import Drafter
from .models.gemma4_text import Model
from .sampling import SamplerConfig
from .speculative import DraftStats, accept

_COSTS: dict[tuple, DraftCosts] = {}
PROBE_EVERY = 16  # at most this many plain rounds between probes when K = 0 is chosen
COSTS_VERSION = 4  # bump when the drafter step or the verify changes cost: cached measurements become stale


@dataclass
class DraftCosts:
    draft: list[float]  # draft[K] = seconds to draft K tokens (one call, as a round does); draft[0] = 0
    verify: list[float]  # verify[T] = seconds for a target forward of T tokens (index 0 unused)

    @property
    def draft_step(self) -> float:
        return self.draft[1]


def _timed_pair(first: Callable[[], mx.array], second: Callable[[], mx.array], reps: int = 5) -> tuple[float, float]:
    """Minimum times of `first` and `second`, run alternately as in a decoding round (each evicts the other's
    weights from the CPU caches; timing either alone in a tight loop would flatter it)."""
    mx.eval(first(), second())  # warm-up (kernel compilation, allocations)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        mx.eval(first())
        t1 = time.perf_counter()
        mx.eval(second())
        times.append((t1 - t0, time.perf_counter() - t1))
    # other processes only ever add time: the minimum is the machine's cost
    return min(t for t, _ in times), min(t for _, t in times)


def measure_costs(target: Model, drafter: Drafter, max_drafts: int, context: int = 128, greedy: bool = True,
                  refresh: bool = False) -> DraftCosts:
    """Time drafting K = 0..max_drafts tokens (greedy or sampled) and the verify of K + 1 tokens that follows it
    (forward and acceptance rule), after a `context`-token prefix. `refresh`: measure even if cached."""
    # costs depend on the shapes, dtypes and the device, not on the weights' values
    dtypes = (target.model.embed_tokens.weight.dtype, drafter.pre_projection.weight.dtype)
    key = (COSTS_VERSION, repr(target.args), repr(drafter.args), str(dtypes), max_drafts, context, greedy,
           str(mx.default_device()))
    if not refresh and key in _COSTS:
        return _COSTS[key]
    if not refresh and (saved := _read_disk_cache().get(_disk_key(key))) is not None:
        _COSTS[key] = DraftCosts(saved["draft"], saved["verify"])
        return _COSTS[key]
    ids = mx.arange(context + 1) % target.args.vocab_size
    cache = target.make_cache(max_rollback=max_drafts + 1)
    out = target.forward(ids[None], cache, return_hidden=True)
    mx.eval(out.hidden, [c.keys for c in cache])
    windows, step = cache_windows(target, cache), draft_step(target, drafter)
    sampler = SamplerConfig() if greedy else SamplerConfig(temperature=1.0, seed=0)

    V = target.args.vocab_size
    uniform_q = mx.full((max_drafts, V), -math.log(V))

    def verify(T):
        """The target's side of a round: forward and the acceptance rule (sampled acceptance is not free)."""
        out = target.forward(ids[None, :T], cache, rows=T, return_hidden=True)
        drafts, q = ids[: T - 1], None if greedy else uniform_q[: T - 1]
        n, tokens = accept(out, drafts, q, sampler)
        mx.eval(n, tokens)
        trim_cache(cache, T)  # keep the context fixed between timings
        return tokens

    def drafting(k):
        return draft(step, ids[-1:], out.hidden, windows, context, k, sampler)[0]

    costs = DraftCosts([0.0], [0.0])
    for k in range(max_drafts + 1):
        draft_time, verify_time = _timed_pair(lambda k=k: drafting(k), lambda k=k: verify(k + 1))
        costs.verify.append(verify_time)
        if k:
            costs.draft.append(draft_time)
    _COSTS[key] = costs
    _write_disk_cache(_disk_key(key), costs)
    return costs


def _cache_file() -> Path:
    root = os.environ.get("MLX_GEMMA_MTP_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return Path(root) / "mlx_gemma_mtp" / "draft_costs.json"


def _disk_key(key: tuple) -> str:
    return hashlib.sha256(repr(key).encode()).hexdigest()


def _read_disk_cache() -> dict:
    """Costs measured by earlier runs on this machine; a missing or unreadable file is an empty cache."""
    try:
        return json.loads(_cache_file().read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        warnings.warn(f"ignoring unreadable draft-cost cache {_cache_file()}: {e}", stacklevel=2)
        return {}


def _write_disk_cache(key: str, costs: DraftCosts) -> None:
    file = _cache_file()
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        entries = {**_read_disk_cache(), key: dataclasses.asdict(costs)}
        tmp = file.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(entries))
        tmp.replace(file)  # atomic: concurrent runs never see half a file
    except OSError as e:  # a read-only home must not break generation; the costs stay cached in memory
        warnings.warn(f"could not save draft costs to {file}: {e}", stacklevel=2)


class AutoDraftLength:
    """Callable: tokens still wanted -> K for the next round."""

    def __init__(self, costs: DraftCosts, stats: DraftStats, max_k: int, prior: float = 0.6, weight: float = 4.0):
        self.costs, self.stats, self.max_k = costs, stats, max_k
        self.prior, self.weight = prior, weight
        self.plain_rounds = 0
        # per-round time beyond the model work (host sync, slicing, the caller's per-token work), learned online
        # from the wall time between calls; it favours longer drafts when rounds are cheap to verify
        self.overhead, self._last_call, self._last_k = 0.0, None, 0

    def acceptance(self) -> list[float]:
        """Conditional acceptance per position (given the earlier drafts were accepted), each shrunk towards the
        estimate of the position before it (the first towards `prior`) while few rounds reached it. A fixed prior
        for every position would trap the policy at short drafts: positions it never drafts keep the prior, and
        a low prior never makes them worth drafting."""
        s, out, prior = self.stats, [], self.prior
        for i in range(self.max_k):
            reached = s.reached_per_position[i] if i < len(s.reached_per_position) else 0
            accepted = s.accepted_per_position[i] if i < len(s.accepted_per_position) else 0
            prior = (accepted + prior * self.weight) / (reached + self.weight)
            out.append(prior)
        return out

    def expected_rate(self, k: int, acceptance: list[float]) -> float:
        tokens, survive = 1.0, 1.0
        for a in acceptance[:k]:
            survive *= a
            tokens += survive
        return tokens / (self.model_cost(k) + self.overhead)

    def model_cost(self, k: int) -> float:
        return self.costs.verify[k + 1] + self.costs.draft[k]

    def _observe_round(self) -> None:
        now = time.perf_counter()
        if self._last_call is not None:
            excess = now - self._last_call - self.model_cost(self._last_k)
            self.overhead = 0.8 * self.overhead + 0.2 * max(0.0, excess)
        self._last_call = now

    def best(self) -> int:
        acceptance = self.acceptance()
        return max(range(self.max_k + 1), key=lambda k: self.expected_rate(k, acceptance))

    def probe_interval(self) -> int:
        """Plain rounds between probes: short while the estimate rests on a few rounds (two early rejections
        must not switch drafting off for long), up to PROBE_EVERY once it is well supported."""
        reached = self.stats.reached_per_position[0] if self.stats.reached_per_position else 0
        return min(PROBE_EVERY, 2 + reached // 2)

    def __call__(self, remaining: int) -> int:
        self._observe_round()
        k = self.best()
        if k == 0:
            self.plain_rounds += 1
            if self.plain_rounds >= self.probe_interval():
                k, self.plain_rounds = 1, 0
        else:
            self.plain_rounds = 0
        self._last_k = k
        return k


def draft_length_policy(num_draft_tokens, target: Model, drafter: Drafter, stats: DraftStats, max_k: int,
                        greedy: bool = True):
    """A fixed K for an int, an `AutoDraftLength` for "auto" or None."""
    if isinstance(num_draft_tokens, int):
        return lambda remaining: num_draft_tokens
    max_k = min(max_k, 8)
    return AutoDraftLength(measure_costs(target, drafter, max_k, greedy=greedy), stats, max_k)
