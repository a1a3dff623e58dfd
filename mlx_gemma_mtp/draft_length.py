"""Draft length: fixed, or "auto" = before every round, the K (0 = a plain step) that maximises expected tokens per
second, learned online from the rounds that run anyway. Nothing is measured up front: a generation never stalls.

A bandit over K whose arms share what they can (docs/auto-draft-length.md has the why and the simulator's table):

- Tokens of a round with K drafts: 1 + sum_{i<=K} prod_{j<=i} a_j, a_j the acceptance of draft position j given the
  earlier ones were accepted, from counts (any round teaches every position it reached), the first shrunk towards
  PRIOR_ACCEPTANCE, each later one towards the position before it (acceptance varies slowly along the draft).
- Seconds of a round, per K: its own measurement where it has one, timed from the loop's own time (the caller's
  time between tokens is not counted) with a running mean turning into an EMA, a lone slow round clipped (other
  processes only ever add time) and two rounds in a row off by OUTLIER the same way believed (the machine changed:
  busier, or free again). A K not measured is priced from the measured ones through the analytic model
  (`CostModel`, in units of a one-token target forward: a call costs the bytes it reads, K/V at the current context
  included): between two measured K on the straight line through them, past them on the line through the last two
  and UNSEEN dearer per K of distance. A `level` (seconds per model unit) follows a settled K's estimate, so a
  machine that gets slower (or faster) re-prices every K; once it moved by STALE since a K was timed, that K's
  estimate is stale (a busy machine may also be compute-bound) and is priced as unmeasured.
- Choice: the K of the highest upper estimate, its rate raised by EXPLORE / sqrt(1 + its timed rounds), where a K
  not measured is hoped to cost what the analytic model says beyond the deepest measured one (a verify of more rows
  no dearer, the drafts their bytes). Such a K is tried only when the hoped gain over the tokens still wanted is
  WORTH the likely cost of finding out (the rounds at the pessimistic estimate, and on a pair that never drafted
  the draft step's trace); a close contender not timed for PROBE_EVERY rounds is timed again, a never-timed
  neighbour of the best once (costs need not be monotone in K). Plain steps chosen while fewer than EVIDENCE
  rounds reached the first draft are not final: drafting gets a round every RETRY_EVERY of them.
- Timing: what a lap holds depends on its neighbours. A drafting round holds its own work, and the trace of the
  draft step's graph when it is the pair's first drafting round and no plain step hid it (then it is a provisional
  estimate, less the trace as priced so far, or no sample before any trace was priced). A plain step is
  pipelined: it also holds the queueing of the next round, and after a drafting round (or first in a generation)
  its own graph building, so only a plain step after a plain step, not followed by a trace, is a clean sample;
  others are upper bounds.
- Start: a fresh record plays a plain step (an upper bound on its cost, holding the next round's trace mostly
  hidden behind it) and then the analytic model's best K, at most START_K: the first two rounds price plain decoding
  and drafting. Plain steps known only as an upper bound are timed cleanly (two in a row) while within PLAIN_SLACK
  of the best; a stale plain estimate is re-timed at once (every K is judged against it).
- Compiles: the pair's first drafting round traces the draft step's graph, one for every K (host work, ~5 ms here).

What was learned (acceptance counts, estimates, compile cost) stays with the loaded pair (`AutoRecords`, held by
`Bundle.state`), one record per sampling setting, for the next generations; older acceptance evidence weighs less as
new comes in (the counts are capped), and the timed-round counts behind the exploration bonus are halved at each
generation start. A sampler with a seed and T > 0 makes the schedule depend on counts only: the analytic costs, no
timing, fresh counts, nothing from earlier generations or the disk, neighbours probed now and then for the acceptance
of one more position; the same call then gives the same tokens. A calibration (`calibration.py`, `python -m
mlx_gemma_mtp.bench --calibrate`) only gives a new record its prior shapes: a prior, not a verdict.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from statistics import pvariance
from typing import TYPE_CHECKING, Protocol

from .round_cost import ROUND_OVERHEAD, VERIFY_SLOPE, CostModel, DraftCosts
from .sampling import SamplerConfig
from .stats import DraftStats

if TYPE_CHECKING:
    from .distributed.lockstep import Lockstep

MAX_AUTO_K = 8
PRIOR_ACCEPTANCE, PRIOR_WEIGHT = 0.7, 4.0  # acceptance of a first draft before any round, worth 4 rounds
CHAIN_WEIGHT = 12.0  # a later position's prior (the position before it: acceptance varies slowly), in rounds
CLIP = 2.0  # a timed round moves an estimate by at most this factor (a first one: any)
OUTLIER = 1.35  # ... and a lone round slower than a K's estimate counts as at most this much slower
EMA = 0.1  # weight of a new round in a K's estimate once it rests on 10 rounds (before: a running mean)
SETTLED = 8  # timed rounds after which a K's estimate moves the level (the machine changed)
STALE = 1.25  # a K's estimate is stale once the level moved this much since it was timed
UNSEEN = 0.05  # a K not measured is priced this much dearer per K of distance from the nearest measured one
HOPE_BETWEEN = 0.25  # a K between two measured ones is hoped to cost the line through them, pulled this far
# (in logs) towards the lowest cost they allow: a verify that is flat past some T (a CPU) makes the line pessimistic
NEIGHBOUR_AFTER = 64  # a K next to the best, never timed, is tried once with this many tokens left (not monotone)
EXPLORE = 0.25  # a K's rate is raised by this / sqrt(1 + its timed rounds) when choosing
WORTH = 1.0  # a K not measured is tried when the hoped gain is this many times the likely cost of trying
RECHECK = 0.9  # a K within this of the best's rate and not timed for PROBE_EVERY rounds is timed again
PROBE_EVERY = 32  # ... (and, counts only, the longest gap between probes)
PROBE_AFTER = 4  # counts only: rounds between probes, this many plus the rounds the probed K has had
START_K = 3  # a fresh record's first drafting rounds draft at most this many tokens
EVIDENCE = 4  # plain steps chosen before this many rounds reached the first draft ...
RETRY_EVERY = 16  # ... give drafting another round every this many of them (a generation may open on a passage
RETRY_WITHIN = 0.65  # the drafter cannot guess), while the best drafting K's rate is within this of plain's
PLAIN_SLACK = 1.3  # a plain step known only as an upper bound is timed cleanly while within this of the best
COMPILE_COST = 0.005  # prior seconds of tracing the draft step's graph (host work: ~4 ms on this CPU)
MAX_COUNT = 256.0  # acceptance counts are scaled down to this many rounds reaching the first position at most
DECAY = 0.5  # the round counts behind probes and the exploration bonus are halved at each generation start
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
    rounds: list[float] = field(default_factory=lambda: [0.0] * (MAX_AUTO_K + 1))  # per K: rounds played
    samples: list[float] = field(default_factory=lambda: [0.0] * (MAX_AUTO_K + 1))  # per K: rounds timed (support)
    timed_at: list[float | None] = field(default_factory=lambda: [None] * (MAX_AUTO_K + 1))  # the level then
    outlier: list[int] = field(default_factory=lambda: [0] * (MAX_AUTO_K + 1))  # last round at K: slow 1, fast -1
    changes: dict[int, tuple[float, float]] = field(default_factory=dict)  # K's last believed change: level, K's
    compiled: set[int] = field(default_factory=lambda: {0})  # the K this pair has run
    compile_cost: float = COMPILE_COST  # seconds of that trace, learned from a round that carried it
    compiles_seen: int = 0
    plain_clean: bool = False  # K = 0's cost comes from a plain step between plain steps (not only an upper bound)
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
        self.samples = [r * DECAY for r in self.samples]
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
        """One timed round at K. A first one (or the first since K's estimate went stale) is K's estimate. Later
        ones move it by their surprise (the ratio to the estimate, clipped: at most 2x, at most OUTLIER slower for a
        lone slow round, another process's doing) at the rate of a running mean turning into an EMA, and half the
        surprise for a second round in a row off by OUTLIER the same way (the machine changed: busy, or free again;
        without the faster side a K first timed on a free machine took the change as its own, and the K timed
        while busy kept busy prices). A change the next round at K contradicts is undone: two hiccups in a row
        (each such jump priced plain steps 40% too dear for long: 7% below plain over 1024 tokens where drafting
        never pays). The level follows a settled K's estimate (every K is re-priced alike)."""
        shape = self.shape_of(k)
        if self.level is None:
            self.level, self.shape[k], self.samples[k] = seconds_per_unit / shape, shape, 1.0  # the model's unit
            self.timed_at[k] = self.level
            return
        ratio = seconds_per_unit / (self.level * shape)
        if not self.fresh(k):
            self.samples[k], self.outlier[k] = 1.0, 0
            self.changes.pop(k, None)  # a change believed before the estimate went stale is not to be undone
            self.shape[k], self.timed_at[k] = shape * ratio, self.level
            return
        side = (ratio > OUTLIER) - (ratio < 1.0 / OUTLIER)
        undo = self.changes.pop(k, None)
        if undo is not None and side == -self.outlier[k]:
            # the round right after a believed change says otherwise: two flukes in a row, not the machine
            self.level /= undo[0]
            self.shape[k] /= undo[1] / undo[0]
            self.outlier[k], self.timed_at[k] = 0, self.level
            return
        self.samples[k] += 1
        rate = max(EMA, 1.0 / self.samples[k])
        changed, self.outlier[k] = side != 0 and self.outlier[k] == side, side
        if changed:
            rate = max(rate, 0.5)
        surprise = math.log(min(CLIP if changed else OUTLIER, max(1.0 / CLIP, ratio)))
        old_level = self.level
        if self.samples[k] > SETTLED:  # a K still settling moves only itself
            self.level *= math.exp((1.0 - rate) * rate * surprise)
        self.shape[k] = shape * math.exp(rate * surprise) * old_level / self.level
        if changed:
            self.changes[k] = (self.level / old_level, math.exp(rate * surprise))
        self.timed_at[k] = self.level
        if self.calibrated and self._model_fits_better():
            # the rounds contradict the saved curve (another load, a stale file): the unmeasured K take the
            # analytic shape from now on (corrected as the nearest measured K's)
            self.prior, self.calibrated = [1.0] * (MAX_AUTO_K + 1), False

    def fresh(self, k: int) -> bool:
        """Whether K was timed since the level last moved by STALE (after that, the machine may have changed
        in ways that do not scale every K alike: a busy machine is compute-bound)."""
        return (self.shape[k] is not None and self.level is not None and self.timed_at[k] is not None
                and abs(math.log(self.level / self.timed_at[k])) < math.log(STALE))

    def _model_fits_better(self) -> bool:
        """Whether the measured shapes vary less around the analytic model (1) than around the saved curve, the
        overall scale aside: log-variances over the measured K."""
        measured = [(math.log(s), math.log(s / p)) for s, p in zip(self.shape, self.prior) if s is not None]
        return len(measured) >= 2 and pvariance([m for m, _ in measured]) < pvariance([c for _, c in measured])

    @property
    def traced(self) -> bool:
        """The pair has drafted: the draft step's graph exists (one for every K)."""
        return any(self.compiled - {0})

    def compile_seen(self, excess: float) -> None:
        """A trace took `excess` seconds: a running mean turning into an EMA."""
        self.compiles_seen += 1
        self.compile_cost += max(EMA, 1.0 / self.compiles_seen) * (max(0.0, excess) - self.compile_cost)


@dataclass
class _Round:
    """A round the policy chose, until its time is told."""

    k: int
    context: int
    compiles: bool  # the draft step's graph was traced when it was queued (the pair's first drafting round)
    after: int | None  # the K of the round before it (None: the generation's first round)


class AutoDraftLength:
    """The "auto" `DraftLength`: before each round, the K with the most expected tokens per second.

    It counts this generation's acceptance itself (`stats`) and keeps what outlives it in `learned`. `timed=False`
    ignores the seconds: K then depends on the counts alone (reproducible sampling)."""

    def __init__(self, model: CostModel, max_k: int, learned: Learned | None = None, timed: bool = True):
        self.model, self.max_k, self.use_time = model, min(max_k, MAX_AUTO_K), timed
        self.stats = DraftStats()
        self.learned = Learned() if learned is None else learned
        self.learned.start_generation(self.stats)
        self._since_probe, self._plan = 0, []
        self._pending: list[_Round] = []  # rounds chosen whose time has not been told yet, oldest first
        self._last: int | None = None  # the K of the last round chosen
        self._round, self._timed = 0, {}  # rounds chosen; the round each K was last timed at (this generation)
        self._since_draft = 0  # plain steps chosen on doubtful acceptance since the last retry
        self._compiles: list[tuple[int, float, int]] = []  # (K, seconds, context) of a round that traced

    def accepted(self, k: int, n: int) -> None:
        self.stats.record(k, n)

    def timed(self, k: int, seconds: float) -> None:
        self._record(k, seconds)

    def choose(self, remaining: int, context: int) -> int:
        if self._plan:
            k = self._plan.pop(0)
        elif not self.use_time:
            rates = self.rates(context)
            best = max(range(self._deepest() + 1), key=rates.__getitem__)
            k = self._probe(self._affordable(best, rates, remaining, context), rates, remaining, context)
        else:
            k = self._pick(self.rates(context), remaining, context)
        k = max(0, min(k, remaining - 1))
        learned = self.learned
        self._pending.append(_Round(k, context, k > 0 and not learned.traced, self._last))
        learned.compiled.add(k)
        learned.rounds[k] += 1
        self._last, self._round = k, self._round + 1
        return k

    def _reached(self, i: int) -> float:
        """Rounds that reached draft position i (its drafts before it accepted): past generations' and this one's."""
        s = self.stats.reached_per_position
        return self.learned.reached[i] + (s[i] if i < len(s) else 0)

    def _deepest(self) -> int:
        """Counts only: the longest draft worth considering, one position past those some round has reached (the
        estimates of later ones are extrapolations), any K while no round has run."""
        explored = sum(self._reached(i) >= 1 for i in range(self.max_k))
        return min(self.max_k, explored + 1) if explored else self.max_k

    # ---- timing --------------------------------------------------------------------------------------------------

    def _record(self, k: int, seconds: float) -> None:
        """A round's time, matched to the round (they are told in the order they ran). What a lap holds depends
        on its neighbours:

        - a drafting round holds its own work, and the trace of the draft step's graph when it is the pair's first
          drafting round, not after a plain step (which hides it): then, once a trace was priced, it gives K a
          provisional estimate (less the trace; the next round at K replaces it), and the trace is priced once K
          has an estimate of its own;
        - a plain step is pipelined: it holds the queueing of the next round (and that round's compile, if any,
          mostly hidden behind its own step), and after a drafting round (or first in the generation) also its own
          graph building, which plain steps in a row overlap with the step before: only a plain step after a plain
          step, the next round not compiling, is a clean sample; the others are upper bounds, kept while no clean
          sample is."""
        while self._pending and self._pending[0].k != k:  # out of step (should not happen): resynchronise
            self._pending.pop(0)
        if not self._pending:
            return
        r = self._pending.pop(0)
        if not self.use_time or seconds <= 0:  # a clock that did not move tells nothing
            return
        learned = self.learned
        if k:
            if r.compiles and r.after != 0:
                if learned.compiles_seen and learned.level is not None and not learned.fresh(k):
                    # K's first estimate: its round less the trace as priced so far (provisional: the next
                    # round at K replaces it)
                    rest = seconds - learned.compile_cost
                    learned.observe(k, max(rest, 0.2 * seconds) / self.model.round(k, r.context))
                    learned.samples[k] = 0.0
                else:
                    self._compiles.append((k, seconds, r.context))
            else:
                learned.observe(k, seconds / self.model.round(k, r.context))
                self._timed[k] = self._round
        else:
            following = self._pending[0] if self._pending else None
            if r.after == 0 and not (following is not None and following.compiles):
                if not learned.plain_clean:  # the first clean one replaces the upper bounds
                    learned.timed_at[0] = None
                learned.observe(0, seconds / self.model.round(0, r.context))
                learned.plain_clean, self._timed[0] = True, self._round
            elif not learned.fresh(0) or (not learned.plain_clean and seconds < self.seconds(0, r.context)):
                # an upper bound (its own graph building, maybe part of a compile): the lowest one, until a clean one
                learned.timed_at[0] = None
                learned.observe(0, seconds / self.model.round(0, r.context))
                learned.plain_clean = False
        self._resolve_compiles()

    def _resolve_compiles(self) -> None:
        """Price a trace seen, once its K has a timed round of its own (the seconds beyond it)."""
        learned, left = self.learned, []
        for k, seconds, context in self._compiles:
            if learned.level is not None and learned.fresh(k) and learned.samples[k] >= 1:
                learned.compile_seen(seconds - self.seconds(k, context))
            else:
                left.append((k, seconds, context))
        self._compiles = left

    # ---- estimates -----------------------------------------------------------------------------------------------

    def acceptance(self) -> list[float]:
        """Conditional acceptance per position, each shrunk towards the estimate of the position before it (the
        first towards PRIOR_ACCEPTANCE) while few rounds reached it: CHAIN_WEIGHT rounds' worth, as acceptance
        varies slowly along a draft. A fixed prior for every position would trap the policy at short drafts:
        positions it never drafts keep the prior, and a low prior never makes them worth drafting."""
        s, learned, out, prior = self.stats, self.learned, [], PRIOR_ACCEPTANCE
        for i in range(self.max_k):
            accepted = learned.accepted[i] + (s.accepted_per_position[i] if i < len(s.accepted_per_position) else 0)
            weight = PRIOR_WEIGHT if i == 0 else CHAIN_WEIGHT
            prior = (accepted + prior * weight) / (self._reached(i) + weight)
            out.append(prior)
        return out

    def costs(self, context: int, hopeful: bool = False) -> list[float]:
        """Estimated seconds of a round at each K = 0..max_k at this context (model units while nothing was
        measured). A K measured since the level last moved by STALE: its estimate. Otherwise (with a calibration:
        its curve through the nearest measured K): between two measured K the straight line through them, per
        model unit; past the measured ones the line through the last two (never cheaper per unit than the last),
        UNSEEN dearer per K of distance. `hopeful`: what the choice hopes for a K past the deepest measured one,
        the verify of more rows no dearer and each extra draft step a small forward (drafter bytes) at the cheapest
        cost per model unit measured."""
        learned, units = self.learned, self.model.rounds(self.max_k, context)
        level = 1.0 if learned.level is None else learned.level
        measured = [k for k in range(self.max_k + 1) if learned.shape[k] is not None and learned.fresh(k)]
        if (learned.calibrated and not hopeful) or not measured:
            return [level * learned.shape_of(k) * units[k] for k in range(self.max_k + 1)]
        per_unit = {k: level * learned.shape[k] for k in measured}
        step = units[1] - units[0] - VERIFY_SLOPE - ROUND_OVERHEAD if self.max_k else 0.0  # one draft step
        draft_unit = min(per_unit.values())  # hoped: a draft step is a small forward, at the cheapest unit measured
        out = []
        for k in range(self.max_k + 1):
            below, above = [j for j in measured if j < k], [j for j in measured if j > k]
            if k in per_unit:
                u = per_unit[k]
            elif hopeful and below and above:  # between the straight line and the lowest cost consistent with
                # what was measured: the K below it and its extra drafts (a verify of more rows never costs less),
                # a draft step a small plain step (drafter bytes)
                a, b = below[-1], above[0]
                low = (per_unit[a] * units[a] + draft_unit * (k - a) * step) / units[k]
                line = per_unit[a] + (per_unit[b] - per_unit[a]) * (k - a) / (b - a)
                u = low ** HOPE_BETWEEN * line ** (1 - HOPE_BETWEEN) if low < line else line
            elif below and above:
                a, b = below[-1], above[0]
                u = per_unit[a] + (per_unit[b] - per_unit[a]) * (k - a) / (b - a)
            else:
                side = below[::-1] if below else above  # nearest first
                a = side[0]
                slope = 0.0 if len(side) < 2 else (per_unit[a] - per_unit[side[1]]) / (a - side[1])
                if hopeful and below:  # a verify of more rows costing no more, the drafts their bytes
                    u = (per_unit[a] * units[a] + draft_unit * (k - a) * step) / units[k]
                elif hopeful:  # as cheap as the analytic model says (per unit as the nearest measured K)
                    u = per_unit[a]
                else:
                    u = max(per_unit[a], per_unit[a] + slope * (k - a)) * (1.0 + UNSEEN * abs(k - a))
            out.append(u * units[k])
        return out

    def seconds(self, k: int, context: int) -> float:
        """Estimated seconds of a round at K (model units while nothing was measured)."""
        return self.costs(context)[k]

    def rates(self, context: int, hopeful: bool = False) -> list[float]:
        """Expected tokens per second of a round at each K = 0..max_k (`hopeful`: as `costs` hopes)."""
        out, tokens, survive = [], 1.0, 1.0
        for k, (a, seconds) in enumerate(zip([1.0] + self.acceptance(), self.costs(context, hopeful))):
            if k:
                survive *= a
                tokens += survive
            out.append(tokens / seconds)
        return out

    # ---- choices -------------------------------------------------------------------------------------------------

    def _compile_seconds(self, k: int, context: int) -> float:
        if not self.use_time or k == 0 or self.learned.traced:
            return 0.0
        return self.learned.compile_cost

    def _affordable(self, best: int, rates: list[float], remaining: int, context: int) -> int:
        """`best`, or the best K already run when compiling `best` costs more than it would save."""
        known = max((k for k in self.learned.compiled if k <= self.max_k), key=rates.__getitem__)
        saved = remaining * (1 / rates[known] - 1 / rates[best])
        return best if saved >= self._compile_seconds(best, context) else known

    def _pick(self, rates: list[float], remaining: int, context: int) -> int:
        """The K of the best upper estimate (a bandit's choice): each K's hoped rate raised by EXPLORE /
        sqrt(1 + its timed rounds), so a K whose estimate rests on few rounds is tried again while it might be
        the best, and one clearly worse soon is not. A K without a fresh estimate is tried only when the hoped
        gain over the tokens left is WORTH its likely cost (its compile, and its rounds at the estimate); a
        never-timed neighbour of the best is tried once in a long generation. Plain steps are timed first thing
        (every K is judged against them), and while they compete and their time is only an upper bound, twice in
        a row (the second is a clean sample); a close contender not timed for PROBE_EVERY rounds is timed again."""
        learned = self.learned
        if learned.level is None:  # nothing timed yet: a plain step (holding the next round's compile, mostly
            # hidden behind its own work), then the model's best K, moderately
            if self._last is None:
                self._plan = [min(max(range(self.max_k + 1), key=rates.__getitem__), START_K)]
                return 0
            return max(learned.compiled, key=rates.__getitem__)
        compiled = [k for k in learned.compiled if k <= self.max_k]
        if not learned.fresh(0):  # one plain step after a drafting round (its time arrives a round late)
            if remaining > 2 and all(r.k for r in self._pending):
                return 0
            return max(compiled, key=rates.__getitem__)
        if not learned.plain_clean and remaining > 3 and PLAIN_SLACK * rates[0] > max(rates):
            self._plan = [0]  # plain steps may be the best: time one cleanly (the second of two)
            return 0
        hopes, known = self.rates(context, hopeful=True), [k for k in range(self.max_k + 1) if learned.fresh(k)]
        support = [n if k in known else 0.0 for k, n in enumerate(learned.samples)]
        upper = [r * (1.0 + EXPLORE / math.sqrt(1.0 + n)) for r, n in zip(hopes, support)]
        best = max(range(self.max_k + 1), key=upper.__getitem__)
        if best not in known:  # worth finding out: the hoped gain pays for the likely cost
            exploit = max(known, key=rates.__getitem__)
            costs = self.costs(context)
            first = best and not learned.traced and self._last  # its first round holds the trace: 2 rounds
            loss = (1 + bool(first)) * max(0.0, costs[best] - costs[best] * rates[best] / rates[exploit])
            gain = remaining * (1 / rates[exploit] - 1 / hopes[best])
            if gain < WORTH * (loss + self._compile_seconds(best, context)):
                best = max(known, key=upper.__getitem__)
        if best and not learned.traced and self._last and remaining > 3 and not learned.compiles_seen:
            self._plan = [best]  # its first round holds the trace: the second one is timed
        measured = [j for j, shape in enumerate(learned.shape) if shape is not None]  # ever, stale or not
        untried = [j for j in (best - 1, best + 1) if measured[0] < j < measured[-1] and learned.shape[j] is None]
        if untried and best and remaining >= NEIGHBOUR_AFTER and learned.samples[best] >= 2:
            return untried[0]  # once (it is timed then): a dip the line through the timed K around it would hide
        # a close contender not timed for a while is timed again (its estimate may rest on a slow spell)
        close = [k for k in known if k != best and k in learned.compiled
                 and rates[k] > RECHECK * rates[best] and self._round - self._timed.get(k, 0) > PROBE_EVERY]
        if close and remaining > 3:
            k = min(close, key=lambda k: self._timed.get(k, 0))
            self._timed[k] = self._round  # once per PROBE_EVERY rounds, whatever the round tells
            if k == 0 and self._last:
                self._plan = [0]  # the second plain step is the clean sample
            return k
        if best == 0 and self.max_k and remaining > 3:
            drafting = max(range(1, self.max_k + 1), key=rates.__getitem__)
            if rates[drafting] >= RETRY_WITHIN * rates[0] and self._doubtful_acceptance():
                self._since_draft = 0
                return drafting
        return best

    def _doubtful_acceptance(self) -> bool:
        """Plain steps won on little drafting evidence: draft once more every RETRY_EVERY plain steps until
        EVIDENCE rounds reached the first draft (a generation may open on a passage the drafter cannot guess)."""
        reached = self._reached(0)
        if reached >= EVIDENCE or not reached:
            return False
        self._since_draft += 1
        return self._since_draft > RETRY_EVERY

    def _probe(self, best: int, rates: list[float], remaining: int, context: int) -> int:
        """Counts only: now and then a neighbour of `best` instead (deeper, the acceptance of one more position)."""
        rounds = self.learned.rounds
        neighbours = [k for k in (best + 1, best - 1) if 0 <= k <= self.max_k]
        if not neighbours:
            return best
        probe = min(neighbours, key=lambda k: rounds[k])  # deeper first on ties
        self._since_probe += 1
        if self._since_probe < min(PROBE_EVERY, PROBE_AFTER + rounds[probe]):
            return best
        self._since_probe = 0
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


def auto_draft_length(records: AutoRecords, sampler: SamplerConfig, max_k: int,
                      prior: Callable[[], DraftCosts | None]) -> AutoDraftLength:
    """The "auto" policy of one generation on a pair whose records are `records`: it learns (this pair's record for
    the sampling setting, made from `prior()`, e.g. the saved calibration, when there is none yet), or with a seed
    at T > 0 one whose schedule depends on counts only (a fresh record, no timing)."""
    if sampler.seed is not None and not sampler.greedy:
        return AutoDraftLength(records.model, max_k, Learned(), timed=False)
    learned = records.get(sampler)
    if learned is None:
        learned = new_record(records.model, prior())
        records.swap(sampler, learned)
    return AutoDraftLength(records.model, max_k, learned)


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
