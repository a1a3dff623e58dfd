"""Draft length: fixed, or "auto" = before every round, the K (0 = a plain step) that maximises expected tokens per
second, learned online from the rounds that run anyway. Nothing is measured up front: a generation never stalls.

After Ollama's speculative-depth controller (per-depth cost and per-position acceptance averages, probes one depth
away, K = 0 allowed):

- Tokens of a round with K drafts: 1 + sum_{i<=K} prod_{j<=i} a_j, a_j the acceptance of draft position j given the
  earlier ones were accepted, from counts, each shrunk towards the position before it while few rounds reached it.
- Seconds of a round: level * shape_K * model(K, context). `model` is an analytic, device-independent curve in
  units of a one-token target forward: decoding is memory-bound, so a call costs the bytes it reads. Verifying T
  tokens costs 1 + VERIFY_SLOPE * (T - 1), a draft step (drafter bytes / target bytes), each plus the K/V bytes its
  attention reads at this context; a drafting round adds ROUND_OVERHEAD (its host sync; plain steps are
  pipelined). `level` (seconds per unit) and `shape_K` (what this device makes of K, relative to the model) are
  learned from the loop's own time for each round (the caller's time between tokens is not counted), with
  per-round changes clipped, so a hiccup moves them little and a wrong prior is corrected within a few dozen
  rounds. A surprise at a K seen many times moves the level, which re-prices every K at once (the machine got
  busier or quieter); at a new K it moves that K's shape. A K not measured yet keeps its prior shape, corrected as
  the nearest measured K's was. Only the shapes decide K.
- Context: the model prices the K/V each call reads at the current context length (full-attention layers grow
  with it, sliding layers stop at their window), so an estimate measured at 200 tokens is re-priced at 8k instead
  of going stale; the level follows what the model misses as the context grows, and the K being played and its
  probed neighbours keep being re-measured. (Chosen over refreshing every estimate by probing: probes cost rounds,
  the model costs nothing.)
- Timing: a round counts once the rounds on both sides of it ran the same K. Plain steps are pipelined and
  drafting rounds are not, so at a switch work moves between the rounds next to it (the first plain step after a
  drafting round carries most of a step more, the round before it less), and a K's first round compiles.
- Probes: PROBE_ROUNDS rounds at one K deeper or shallower than the best (the one resting on fewer rounds, deeper
  on ties) after PROBE_AFTER + (its rounds) rounds, at most every PROBE_EVERY: frequent while the estimates are
  thin, rare once they are well supported. K goes at most one position past those some round has reached.
- The first round at a K compiles its draft graph (tens of ms, not timed): the policy moves to a K this pair has
  never run only when the expected gain over the tokens still wanted pays for that (the compile cost is learned).

What was learned (acceptance counts, level and shapes, compile cost) stays with the loaded pair (`AutoRecords`, held
by `Bundle.state`), one record per sampling setting, for the next generations; older acceptance evidence weighs less as new comes in (the
counts are capped), and the round counts that space out the probes are halved at each generation start. A
sampler with a seed and T > 0 makes the schedule depend on counts only: the analytic costs, no timing, fresh
counts, nothing from earlier generations or the disk; the same call then gives the same tokens. A calibration
(`calibration.py`, `python -m mlx_gemma_mtp.bench --calibrate`) only gives a new record its prior shapes: a prior,
not a verdict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from mlx.utils import tree_flatten

from .models.config import SLIDING
from .models.gemma4_assistant import Drafter
from .models.gemma4_text import Model
from .sampling import SamplerConfig
from .stats import DraftStats

if TYPE_CHECKING:
    from .distributed.lockstep import Lockstep

MAX_AUTO_K = 8
PRIOR_ACCEPTANCE, PRIOR_WEIGHT = 0.7, 4.0  # acceptance of a first draft before any round, worth 4 rounds
VERIFY_SLOPE = 0.06  # extra cost per verified token, relative to a one-token forward
ROUND_OVERHEAD = 0.15  # a drafting round's host sync and bookkeeping, relative to a one-token forward
CLIP = 2.0  # one round moves a cost estimate by at most this factor
EMA = 0.1  # weight of a new round in a K's cost shape once it rests on 9 rounds (before: a running mean)
LEVEL_RATE = 0.5  # the level takes this much of a surprise at a well-known K per round
MAX_COUNT = 256.0  # acceptance counts are scaled down to this many rounds reaching the first position at most
DECAY = 0.5  # the round counts that space out probes are halved at each generation start
PROBE_AFTER = 4  # rounds between probes: this many plus the rounds the probed K has had ...
PROBE_EVERY = 32  # ... at most this many
PROBE_ROUNDS = 3  # a probe's length: its middle round is timed
COMPILE_COST = 1.0  # prior cost of compiling a K's draft graph, in plain steps per draft token (~1 on CPU)
PROBE_GAIN = 0.05  # a probe of a never-run K is worth a compile if a 5% gain on the tokens left would pay for it
MAX_SETTINGS = 8  # records kept per pair (an app whose temperature slider keeps moving)


class DraftLength(Protocol):
    """The draft-length policy of one generation, as the decoding loop sees it."""

    def choose(self, remaining: int, context: int) -> int:
        """K for the next round (0: a plain step), with `remaining` tokens still wanted and `context` tokens in the
        cache; asked once per round, before it is queued."""

    def accepted(self, k: int, n: int) -> None:
        """A round at K accepted n drafts (told right after its host sync)."""

    def timed(self, k: int, seconds: float) -> None:
        """A round at K took `seconds` of the loop's own time (told once its tokens are read)."""


@dataclass
class FixedDraftLength:
    """The same K every round."""

    k: int

    def choose(self, remaining: int, context: int) -> int:
        return self.k

    def accepted(self, k: int, n: int) -> None:
        pass

    def timed(self, k: int, seconds: float) -> None:
        pass


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
        return verify + ROUND_OVERHEAD + k * (self.draft_step + _kv_read(self.drafter_kv, context))


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


@dataclass
class Learned:
    """What auto learned about one loaded pair under one sampling setting, kept across its generations."""

    accepted: list[float] = field(default_factory=lambda: [0.0] * MAX_AUTO_K)  # per draft position, past generations
    reached: list[float] = field(default_factory=lambda: [0.0] * MAX_AUTO_K)
    # seconds per model unit now, set by the first timed round: it follows the machine (other processes, clocks)
    level: float | None = None
    # per K: the cost of a round relative to level * model, measured (None: not yet), and its prior: 1 (the model as
    # it is) or the saved calibration's (`calibrated`). Only these decide K: the level scales every K alike.
    shape: list[float | None] = field(default_factory=lambda: [None] * (MAX_AUTO_K + 1))
    prior: list[float] = field(default_factory=lambda: [1.0] * (MAX_AUTO_K + 1))
    calibrated: bool = False
    rounds: list[float] = field(default_factory=lambda: [0.0] * (MAX_AUTO_K + 1))  # per K: rounds played (support)
    compiled: set[int] = field(default_factory=lambda: {0})  # the K this pair has run (their draft graphs exist)
    compile_cost: float = COMPILE_COST  # learned from the first rounds at each K
    previous: DraftStats | None = None  # the running generation's counters, folded in when the next one starts

    def start_generation(self, stats: DraftStats) -> None:
        """Fold the previous generation's counters in, weigh all evidence down, and follow `stats` from now on."""
        if (p := self.previous) is not None:
            for i in range(min(MAX_AUTO_K, len(p.reached_per_position))):
                self.accepted[i] += p.accepted_per_position[i]
                self.reached[i] += p.reached_per_position[i]
        weight = min(1.0, MAX_COUNT / max(self.reached[0], 1.0))  # older evidence weighs less as new comes in
        self.accepted = [a * weight for a in self.accepted]
        self.reached = [r * weight for r in self.reached]
        self.rounds = [r * DECAY for r in self.rounds]
        self.previous = stats

    def shape_of(self, k: int) -> float:
        """The measured shape of K; for a K not measured yet its prior, corrected as the nearest measured K's was
        (a stale prior is then fixed everywhere by the first rounds)."""
        if self.shape[k] is not None:
            return self.shape[k]
        measured = [j for j, s in enumerate(self.shape) if s is not None]
        if not measured:
            return self.prior[k]
        j = min(measured, key=lambda j: abs(j - k))
        return self.prior[k] * self.shape[j] / self.prior[j]

    def seconds_per_unit(self, k: int) -> float:
        """A round at K costs this times its model units (model units alone before any timed round)."""
        return (1.0 if self.level is None else self.level) * self.shape_of(k)

    def observe(self, k: int, seconds_per_unit: float) -> None:
        """One timed round at K. Its surprise (the ratio to the estimate, clipped) goes to K's shape at the rate of
        a running mean turning into an EMA, and the rest, at LEVEL_RATE, to the level: at a K seen many times it
        says the machine changed (every K's estimate follows), at a new K it says something about that K."""
        shape = self.shape_of(k)
        if self.level is None:
            self.level, self.shape[k] = seconds_per_unit / shape, shape  # the model's unit
            return
        surprise = math.log(min(CLIP, max(1.0 / CLIP, seconds_per_unit / (self.level * shape))))
        rate = 1.0 if self.shape[k] is None else max(EMA, 1.0 / (1.0 + self.rounds[k]))
        self.shape[k] = shape * math.exp(rate * surprise)
        self.level *= math.exp(LEVEL_RATE * (1.0 - rate) * surprise)
        if self.calibrated and self._model_fits_better():
            # the rounds contradict the saved curve (another load, a stale file): the unmeasured K take the
            # analytic shape from now on (corrected as the nearest measured K's)
            self.prior, self.calibrated = [1.0] * (MAX_AUTO_K + 1), False

    def _model_fits_better(self) -> bool:
        """Whether the measured shapes vary less around the analytic model (1) than around the saved curve, the
        overall scale aside: log-variances over the measured K."""
        measured = [(math.log(s), math.log(s / p)) for s, p in zip(self.shape, self.prior) if s is not None]
        if len(measured) < 2:
            return False

        def spread(values):
            mean = sum(values) / len(values)
            return sum((v - mean) ** 2 for v in values)

        return spread([m for m, _ in measured]) < spread([c for _, c in measured])


class AutoDraftLength:
    """The "auto" `DraftLength`: before each round, the K with the most expected tokens per second.

    It counts this generation's acceptance itself (`stats`) and keeps what outlives it in `learned`. `timed=False`
    ignores the seconds: K then depends on the counts alone (reproducible sampling)."""

    def __init__(self, model: CostModel, max_k: int, learned: Learned | None = None, timed: bool = True):
        self.model, self.max_k, self.use_time = model, min(max_k, MAX_AUTO_K), timed
        self.stats = DraftStats()
        self.learned = Learned() if learned is None else learned
        self.learned.start_generation(self.stats)
        self._since_probe, self._probe_left, self._probe_k = 0, 0, 0
        self._recent: list[tuple[int, float, int]] = []  # (K, seconds, context) of the last rounds
        self._timings: list[tuple[int, float]] = []  # (K, seconds) told since the last choice

    def accepted(self, k: int, n: int) -> None:
        self.stats.record(k, n)

    def timed(self, k: int, seconds: float) -> None:
        self._timings.append((k, seconds))  # priced at the context of the next choice

    def choose(self, remaining: int, context: int) -> int:
        timings, self._timings = self._timings, []
        for k, seconds in timings:
            self._record(k, seconds, context)
        if self._probe_left:
            self._probe_left -= 1
            k = self._probe_k
        else:
            rates = self.rates(context)
            best = max(range(self._deepest() + 1), key=rates.__getitem__)
            k = self._probe(self._affordable(best, rates, remaining, context), rates, remaining, context)
        return max(0, min(k, remaining - 1))

    def _deepest(self) -> int:
        """The longest draft worth considering: one position past those some round has reached (the estimates of
        later ones are extrapolations, and a jump to them costs a compile), any K while no round has run."""
        reached = [r + (self.stats.reached_per_position[i] if i < len(self.stats.reached_per_position) else 0)
                   for i, r in enumerate(self.learned.reached[: self.max_k])]
        explored = sum(r >= 1 for r in reached)
        return min(self.max_k, explored + 1) if explored else self.max_k

    def _record(self, k: int, seconds: float, context: int) -> None:
        learned, timed = self.learned, self.use_time and seconds > 0  # a clock that did not move tells nothing
        if timed and k not in learned.compiled and learned.level is not None:
            # a first round at K: the compile is what it took beyond a round
            excess = max(0.0, seconds - self.seconds(k, context)) / (k * self.seconds(0, context))
            learned.compile_cost += max(EMA, 1.0 / len(learned.compiled)) * (excess - learned.compile_cost)
        learned.compiled.add(k)
        learned.rounds[k] += 1
        # A round is timed once the rounds on both sides of it ran the same K: at a switch between plain steps
        # (pipelined) and drafting rounds, work shifts between the rounds next to it (and a first round compiles).
        self._recent = [*self._recent[-2:], (k, seconds, context)] if timed else []
        if len(self._recent) == 3 and all(r[0] == k for r in self._recent):
            _, middle, at = self._recent[1]
            learned.observe(k, middle / self.model.round(k, at))

    def acceptance(self) -> list[float]:
        """Conditional acceptance per position, each shrunk towards the estimate of the position before it (the
        first towards PRIOR_ACCEPTANCE) while few rounds reached it. A fixed prior for every position would trap
        the policy at short drafts: positions it never drafts keep the prior, and a low prior never makes them
        worth drafting."""
        s, learned, out, prior = self.stats, self.learned, [], PRIOR_ACCEPTANCE
        for i in range(self.max_k):
            reached = learned.reached[i] + (s.reached_per_position[i] if i < len(s.reached_per_position) else 0)
            accepted = learned.accepted[i] + (s.accepted_per_position[i] if i < len(s.accepted_per_position) else 0)
            prior = (accepted + prior * PRIOR_WEIGHT) / (reached + PRIOR_WEIGHT)
            out.append(prior)
        return out

    def seconds(self, k: int, context: int) -> float:
        """Estimated seconds of a round at K (model units while nothing was measured)."""
        return self.learned.seconds_per_unit(k) * self.model.round(k, context)

    def rates(self, context: int) -> list[float]:
        """Expected tokens per second of a round at each K = 0..max_k."""
        out, tokens, survive = [], 1.0, 1.0
        for k, a in enumerate([1.0] + self.acceptance()):
            if k:
                survive *= a
                tokens += survive
            out.append(tokens / self.seconds(k, context))
        return out

    def _compile_seconds(self, k: int, context: int) -> float:
        if not self.use_time or k in self.learned.compiled:
            return 0.0
        return self.learned.compile_cost * k * self.seconds(0, context)

    def _affordable(self, best: int, rates: list[float], remaining: int, context: int) -> int:
        """`best`, or the best K already run when compiling `best` costs more than it would save."""
        known = max((k for k in self.learned.compiled if k <= self.max_k), key=rates.__getitem__)
        saved = remaining * (1 / rates[known] - 1 / rates[best])
        return best if saved >= self._compile_seconds(best, context) else known

    def _probe(self, best: int, rates: list[float], remaining: int, context: int) -> int:
        """Now and then a neighbour of `best` instead: its cost and, deeper, the acceptance of one more position."""
        rounds = self.learned.rounds
        neighbours = [k for k in (best + 1, best - 1) if 0 <= k <= self.max_k]
        if not neighbours:
            return best
        probe = min(neighbours, key=lambda k: rounds[k])  # deeper first on ties
        self._since_probe += 1
        if self._since_probe < min(PROBE_EVERY, PROBE_AFTER + rounds[probe]):
            return best
        if remaining * PROBE_GAIN / rates[best] < self._compile_seconds(probe, context):
            return best
        self._since_probe, self._probe_left, self._probe_k = 0, PROBE_ROUNDS - 1, probe
        return probe


class AutoRecords:
    """What "auto" keeps about one loaded pair across generations (held by `Bundle.state`): its cost model and a
    `Learned` per sampling setting (`MAX_SETTINGS` at most, oldest dropped first)."""

    def __init__(self, model: CostModel):
        self.model, self.settings = model, {}

    def get(self, sampler: SamplerConfig) -> Learned | None:
        return self.settings.get(_setting(sampler))

    def swap(self, sampler: SamplerConfig, learned: Learned | None) -> Learned | None:
        """Make `learned` the record for this sampling setting (None: forget it); returns the one it replaces."""
        old = self.settings.pop(_setting(sampler), None)
        if learned is not None:
            if len(self.settings) >= MAX_SETTINGS:
                del self.settings[next(iter(self.settings))]
            self.settings[_setting(sampler)] = learned
        return old


def _setting(sampler: SamplerConfig) -> tuple:
    """What acceptance and costs depend on (not the seed)."""
    if sampler.greedy:
        return ("greedy",)
    return sampler.temperature, sampler.top_p, sampler.top_k, sampler.min_p, sampler.speculative_rule


def new_record(model: CostModel, prior: DraftCosts | None = None) -> Learned:
    """A fresh record, its prior shapes taken from measured costs (e.g. the saved calibration) when given, the
    analytic model's otherwise."""
    learned = Learned()
    if prior is not None:
        measured = min(MAX_AUTO_K + 1, len(prior.draft), len(prior.verify) - 1)
        per_unit = [(prior.verify[k + 1] + prior.draft[k]) / model.round(k, prior.context) for k in range(measured)]
        # K beyond the measured ones: the last one's factor; relative to K = 0 (the first round sets the level)
        learned.prior = [per_unit[min(k, measured - 1)] / per_unit[0] for k in range(MAX_AUTO_K + 1)]
        learned.calibrated = True
    return learned


class LockstepDraftLength:
    """A `DraftLength` for a target sharded over processes: `policy` decides on rank 0's round timings on every
    rank (they arrive through the lock-step's all-sums, one or two rounds late); counts and context are equal
    everywhere, so every rank chooses the same K."""

    def __init__(self, lockstep: Lockstep, policy: DraftLength):
        self.lockstep, self.policy = lockstep, policy
        lockstep.start_generation()  # nothing in flight is this generation's

    def choose(self, remaining: int, context: int) -> int:
        for k, seconds in self.lockstep.received():
            self.policy.timed(k, seconds)
        return self.policy.choose(remaining, context)

    def accepted(self, k: int, n: int) -> None:
        self.policy.accepted(k, n)

    def timed(self, k: int, seconds: float) -> None:
        self.lockstep.send(k, seconds)
