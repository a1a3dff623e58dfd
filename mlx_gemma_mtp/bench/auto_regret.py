"""Regret of the "auto" draft length on simulated machines: `python -m mlx_gemma_mtp.bench.auto_regret`.

The real policy object (`draft_length.auto_draft_length`, what `bundle.state.draft_length("auto", ...)` returns)
is driven by `generate`, which runs the decoding loop of `speculative.mtp_generate_step` statement by statement
(the same calls to choose / accepted / timed in the same order, its own `Stopwatch` on a virtual clock;
tests/test_auto_regret.py checks the calls against the real loop's) on a synthetic pair:

- a `Landscape`: what a plain step, a verify of T rows and K draft steps cost on some machine (growing with the
  context, and on "busy" changing while the pair lives), the host's own work per call (building a graph, the host
  sync), the trace of the draft step's graph on the pair's first drafting round (host work; one graph serves
  every K), and noise (log-normal, and now
  and then a call taking 3x). Host and device are simulated apart: the host queues work and waits for it only where
  the loop reads a result, so a plain step overlaps the next one's graph building, and a compile the step before
  it, as in the real loop;
- a `Text`: which acceptance profile holds where (one, or passages alternating between two), and one draw per
  drafting round: the round accepts the drafts i with draw < s_i (s the profile's acceptance per position), so a
  K's acceptance per position is the profile's whatever K is, and the r-th drafting rounds of two policies draw
  alike.

Regret is tokens/s of `auto` over a generation against the best fixed K (K = 0, plain decoding, included) chosen in
hindsight for that landscape, profile and length, on the same texts: for a freshly loaded pair (compiles and
learning included; a fixed K pays the trace too) and for a warm one (after earlier generations on the same
pair). Seeded, so every table is reproducible; the whole table (54 cells, about 40,000 generations) runs in about a
minute. `--real demo|e2b` measures the same on the real loop instead (see `real_loop`).
"""

from __future__ import annotations

import argparse
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from itertools import pairwise, product

from ..draft_length import MAX_AUTO_K, AutoRecords, DraftLength, FixedDraftLength, auto_draft_length
from ..round_cost import CostModel
from ..sampling import SamplerConfig
from ..speculative import Stopwatch
from ..stats import DraftStats
from . import cost_model

MS = 1e-3
MAX_RUN = 16  # the longest run of correct drafts a text holds


# ---- machines -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Curve:
    """Device seconds of the calls of a round at context 0, and their growth with the context."""

    verify: tuple[float, ...]  # verify[T - 1]: a target forward of T = 1..9 rows with the acceptance rule
    draft: float  # one draft step
    verify_kv: float = 0.0  # extra seconds of any target forward per context token (its attention reads the K/V)
    draft_kv: float = 0.0  # the same for one draft step

    def verify_seconds(self, rows: int, context: int) -> float:
        return self.verify[rows - 1] + self.verify_kv * context

    def draft_seconds(self, k: int, context: int) -> float:
        return k * (self.draft + self.draft_kv * context)


@dataclass(frozen=True)
class Landscape:
    """A simulated machine and pair: device costs (`curve`, and `busy` while the machine is busy: from token
    `busy_after` of the pair's life on, for `busy_for` tokens, every `busy_every`), host costs and noise."""

    name: str
    curve: Curve
    model: CostModel  # what `round_cost.cost_model` would compute from the pair's bytes: auto's prior
    build: float  # host seconds to queue a target forward (its graph) ...
    queue_drafts: float  # ... to queue a drafting call (a compiled graph)
    sync: float  # ... for the host sync of a drafting round and its bookkeeping (reading n, trimming the cache)
    compile: float  # seconds of the pair's first drafting round's trace of the draft step's graph
    caller: float = 0.05 * MS  # the caller's work per yielded token (detokenizing): counted in tokens/s only
    noise: float = 0.04  # log-normal spread of every device call
    hiccup: float = 0.01  # probability that a device call takes 3x (another process, a page fault)
    busy: Curve | None = None
    busy_after: int = 0
    busy_for: int = 0
    busy_every: int = 1

    def curve_at(self, lifetime_tokens: int) -> Curve:
        if self.busy is None or lifetime_tokens < self.busy_after:
            return self.curve
        return self.busy if (lifetime_tokens - self.busy_after) % self.busy_every < self.busy_for else self.curve


def _ratios(step: float, ratios: Sequence[float]) -> tuple[float, ...]:
    return tuple(step * r for r in ratios)


# the analytic priors: drafter bytes / target bytes and K/V reads, as `cost_model` computes them for such pairs
BIG_MODEL = CostModel(0.05, ((1024, 2e-6),) * 5 + ((None, 2e-6),), ((None, 2e-6),))
DEMO_MODEL = CostModel(0.25, ((128, 1e-5),) * 2 + ((None, 1e-5),), ((None, 1e-5),))
E2B_MODEL = CostModel(0.03, ((512, 1e-7),) * 3 + ((None, 1e-7),), ((None, 1e-7),))

FLAT = _ratios(20 * MS, [1.0 + 0.01 * t for t in range(9)])
METAL = _ratios(12 * MS, [1.0, 1.04, 1.17, 1.37, 1.87, 2.9, 3.2, 3.5, 3.8])
# this machine's demo pair (2 CPU cores, float32, OpenBLAS one thread), as the loop sees it: fitted to `bench --demo`'s
# K rows (plain 182.6, K=2 227.6, K=3 224.2, K=4 221.7, K=6 251.2 tokens/s; T_verify rising to 1.67x at T = 4, then
# flat to T = 8)
DEMO = tuple(t * MS for t in (5.3, 7.5, 8.9, 11.0, 12.8, 12.9, 13.0, 13.3, 13.6))
# the E2B-width cut (float32, 4 layers, 2 CPU cores), as `bench --shape e2b` measured it at T = 1..9: not monotone,
# a verify of 8 rows runs faster than one of 7 (and 4 than 3) on this CPU's BLAS, as the real loop's fixed-K rounds
# confirm (K = 6, 7, 8: ~650, ~545, ~650 ms)
E2B = tuple(t * MS for t in (430.5, 430.7, 481.9, 448.8, 498.8, 510.3, 573.2, 484.0, 583.8))

LANDSCAPES = {
    # memory-bound: a verify of 9 rows costs about what one row does (a big model on a GPU)
    "flat": Landscape("flat", Curve(FLAT, 1.0 * MS, 2e-6 * MS * 20, 1e-6 * MS * 20), BIG_MODEL,
                      build=0.6 * MS, queue_drafts=0.1 * MS, sync=0.3 * MS, compile=4 * MS),
    # Apple M3+ 4-bit: MLX's qmv_wide reads the weights once for 2-5 rows, twice from 6 on (M5 Max, 12B head)
    "metal-cliff": Landscape("metal-cliff", Curve(METAL, 0.6 * MS, 1e-6 * MS * 12, 5e-7 * MS * 12), BIG_MODEL,
                             build=0.5 * MS, queue_drafts=0.1 * MS, sync=0.3 * MS, compile=4 * MS),
    # this CPU, the demo pair: compute-bound at first, flat past T = 4
    "cpu-demo": Landscape("cpu-demo", Curve(DEMO, 1.25 * MS, 1e-4 * MS, 5e-5 * MS), DEMO_MODEL,
                          build=0.8 * MS, queue_drafts=0.15 * MS, sync=0.2 * MS, compile=6 * MS, noise=0.08,
                          hiccup=0.02),
    # this CPU, the E2B-width cut: the 262k-token head dominates, nearly flat
    "e2b-cut": Landscape("e2b-cut", Curve(E2B, 10 * MS), E2B_MODEL, build=1.0 * MS, queue_drafts=0.15 * MS,
                         sync=0.3 * MS, compile=10 * MS, noise=0.05),
    # compute-bound: every verified row costs a step, drafts are not cheap: MTP never pays
    "compute-bound": Landscape("compute-bound", Curve(_ratios(10 * MS, range(1, 10)), 3 * MS), BIG_MODEL,
                               build=0.5 * MS, queue_drafts=0.1 * MS, sync=0.2 * MS, compile=4 * MS),
    # the machine gets busy for 150 tokens in every 400 (other processes, thermal throttling): slower, and
    # compute-bound while it lasts
    "busy": Landscape("busy", Curve(FLAT, 1.0 * MS), BIG_MODEL, build=0.6 * MS, queue_drafts=0.1 * MS,
                      sync=0.3 * MS, compile=4 * MS,
                      busy=Curve(_ratios(30 * MS, [1 + 0.45 * t for t in range(9)]), 3 * MS),
                      busy_after=100, busy_for=150, busy_every=400),
}


# ---- texts --------------------------------------------------------------------------------------------------------

CODE = (0.92, 0.82, 0.76, 0.71)  # acceptance per draft position (s_i, as bench prints it), extended geometrically
PROSE = (0.67, 0.47)  # prose, or sampling at T = 1
PROFILES: dict[str, tuple] = {"code": CODE, "prose": PROSE, "drift": (CODE, PROSE)}
PASSAGE = 96  # mean tokens of a passage in a drifting text


@dataclass
class Text:
    """What a drafter gets right along a text. `passage[p]`: which profile holds at text position p (one, or
    passages alternating between two); `u[r]`: the r-th round's draw, so that the round accepts the drafts i with
    u < s_i (s the profile's acceptance per position, extended geometrically): P(n >= i) = s_i whatever K is,
    and the r-th drafting rounds of two policies draw alike (their difference is their choices, not their
    luck)."""

    survival: list[tuple[float, ...]]
    passage: list[int]
    u: list[float]

    @staticmethod
    def draw(profile, length: int, rng: random.Random) -> Text:
        """A text of `length` positions; `profile` is one profile, or a pair to alternate between in passages."""
        profiles = [profile] if isinstance(profile[0], float) else list(profile)
        passage, which = [], rng.randrange(len(profiles))
        while len(passage) < length:
            span = max(1, round(rng.expovariate(1 / PASSAGE))) if len(profiles) > 1 else length
            passage += [which] * span
            which = (which + 1) % len(profiles)
        return Text([cost_model.extend(p, MAX_RUN) for p in profiles], passage[:length],
                    [rng.random() for _ in range(length)])

    def accepted(self, round: int, position: int, k: int) -> int:
        """Drafts accepted by the `round`-th round, at text position `position`, of K drafts."""
        u, survival = self.u[round], self.survival[self.passage[position]]
        return next((i for i in range(k) if u >= survival[i]), k)


# ---- the loop -----------------------------------------------------------------------------------------------------


@dataclass
class Pair:
    """A loaded pair on a simulated machine: what outlives a generation (the traced draft step, auto's records,
    the machine's state)."""

    landscape: Landscape
    rng: random.Random
    traced: bool = False
    records: AutoRecords | None = None
    lifetime: int = 0  # tokens generated so far (the machine's busy spells follow it)

    def __post_init__(self):
        if self.records is None:
            self.records = AutoRecords(self.landscape.model)

    def policy(self, k: int | str | tuple, sampler: SamplerConfig | None = None) -> DraftLength:
        """The policy of one generation, made as `bundle.state.draft_length` makes it (no saved calibration); a
        tuple (K..., K) plays its first K in turn, then its last one every round."""
        if isinstance(k, int):
            return FixedDraftLength(k)
        if isinstance(k, tuple):
            return Opening(list(k[:-1]), k[-1])
        return auto_draft_length(self.records, sampler or SamplerConfig(), MAX_AUTO_K, lambda: None)

    def jitter(self, seconds: float) -> float:
        ls = self.landscape
        seconds *= math.exp(self.rng.gauss(0.0, ls.noise))
        return seconds * 3 if self.rng.random() < ls.hiccup else seconds


class Opening(FixedDraftLength):
    """`head` in turn (auto's opening), then K every round: what an opening costs against K from the start."""

    def __init__(self, head: list[int], k: int):
        super().__init__(k)
        self.head = list(head)

    def choose(self, remaining: int, context: int) -> int:
        return self.head.pop(0) if self.head else self.k


class Machine:
    """The virtual clock: the host runs the loop and queues device work, which runs in order (one stream); reading
    a result waits for it."""

    def __init__(self):
        self.now, self.device_free = 0.0, 0.0

    def host(self, seconds: float) -> None:
        self.now += seconds

    def queue(self, seconds: float) -> float:
        """Queue device work; returns when it will be done."""
        self.device_free = max(self.now, self.device_free) + seconds
        return self.device_free

    def wait(self, done: float) -> None:
        self.now = max(self.now, done)


Trace = list[tuple]  # ("choose", remaining, context) / ("accepted", k, n) / ("timed", k): the calls, in order


def generate(pair: Pair, policy: DraftLength, text: Text, max_tokens: int, prompt: int = 512,
             trace: Trace | None = None) -> tuple[int, float]:
    """One generation of `max_tokens` tokens (>= 1) through `speculative.mtp_generate_step`'s loop, on the virtual
    clock: (tokens, seconds from the first token's round being queued to the last token handed out, the caller's
    time included). The first token is sampled after the prompt (`prompt` tokens in the cache)."""
    ls, machine = pair.landscape, Machine()
    curve = ls.curve_at(pair.lifetime)
    log = trace.append if trace is not None else (lambda call: None)
    emitted, rounds = 1, 0  # the first token; drafting rounds so far
    context = prompt  # the cache's offset: everything before the newest token

    def queue_round(k: int) -> float:
        """`_queue_round`: a plain step or the drafts, queued; when the device will be done with it."""
        if k == 0:
            machine.host(ls.build)
            return machine.queue(pair.jitter(curve.verify_seconds(1, context)))
        if not pair.traced:
            pair.traced = True
            machine.host(ls.compile)
        machine.host(ls.queue_drafts)
        return machine.queue(pair.jitter(curve.draft_seconds(k, context)))

    def choose(remaining: int) -> int:
        log(("choose", remaining, context))
        return max(0, min(policy.choose(remaining, context), remaining - 1))  # `_next_k`

    def hand_out(tokens: int) -> None:  # the generator yields: the stopwatch pauses while the caller works
        watch.pause()
        machine.host(ls.caller * tokens)
        watch.resume()

    watch, remaining = Stopwatch(lambda: machine.now), max_tokens - 1
    if remaining > 0:
        k = choose(remaining)
        queued = queue_round(k)
    hand_out(1)
    while remaining > 0:
        if k:  # `_verify`: one forward over the drafts, read once
            machine.host(ls.build)
            machine.wait(machine.queue(pair.jitter(curve.verify_seconds(k + 1, context))))
            machine.host(ls.sync)
            n = text.accepted(rounds, emitted, k)
            rounds += 1
            log(("timed", k))
            policy.timed(k, watch.lap())
            plain = False
        else:
            n, plain, done = 0, True, queued
        log(("accepted", k, n))
        policy.accepted(k, n)
        remaining -= n + 1
        emitted += n + 1
        context += n + 1
        pair.lifetime += n + 1
        curve = ls.curve_at(pair.lifetime)
        if remaining > 0:
            k_next = choose(remaining)
            queued = queue_round(k_next)
        if plain:  # the plain step's token is read once the next round is queued
            machine.wait(done)
            log(("timed", 0))
            policy.timed(0, watch.lap())
        hand_out(n + 1)
        if remaining > 0:
            k = k_next
    return emitted, machine.now


# ---- regret -------------------------------------------------------------------------------------------------------

LENGTHS = (64, 256, 1024)
WARMUP = (256, 256, 64)  # the generations a warm pair has run before the one measured
KS = tuple(range(MAX_AUTO_K + 1))


@dataclass
class Cell:
    """tokens/s of auto and of every fixed K over the same texts, fresh and warm."""

    fresh: dict = field(default_factory=dict)  # k -> [tokens, seconds]
    warm: dict = field(default_factory=dict)

    def ratio(self, warm: bool) -> tuple[float, int, float]:
        """(auto / best fixed K, that K, auto / plain)."""
        table = self.warm if warm else self.fresh
        tps = {k: t / s for k, (t, s) in table.items()}
        best = max(KS, key=tps.__getitem__)
        return tps["auto"] / tps[best], best, tps["auto"] / tps[0]


def _add(table: dict, k, result: tuple[int, float]) -> None:
    t, s = table.setdefault(k, [0, 0.0])
    table[k] = [t + result[0], s + result[1]]


def run_cell(landscape: Landscape, profile, length: int, seeds: int = 4,
             policies: Sequence = (*KS, "auto"), warm: bool = True, first_seed: int = 0) -> Cell:
    """Every policy on the same texts of `length` tokens (`seeds` of them, times 512 / length for short ones: a
    short generation's tokens/s rests on a few rounds' luck), fresh and (`warm`) warm, with the same noise seeds."""
    cell = Cell()
    for seed in range(first_seed, first_seed + seeds * max(1, 512 // length)):
        texts = random.Random(seed)
        warmup = [Text.draw(profile, n + MAX_RUN + 1, texts) for n in WARMUP]
        text = Text.draw(profile, length + MAX_RUN + 1, texts)
        for k in policies:
            pair = Pair(landscape, random.Random(1000 + seed))
            _add(cell.fresh, k, generate(pair, pair.policy(k), text, length))
            if not warm:
                continue
            pair = Pair(landscape, random.Random(1000 + seed))
            for w, n in zip(warmup, WARMUP):
                generate(pair, pair.policy(k), w, n)
            _add(cell.warm, k, generate(pair, pair.policy(k), text, length))
    return cell


def regret_table(landscapes: Sequence[str] = tuple(LANDSCAPES), profiles: Sequence[str] = tuple(PROFILES),
                 lengths: Sequence[int] = LENGTHS, seeds: int = 4, first_seed: int = 0) -> dict[tuple, Cell]:
    return {(ls, pr, n): run_cell(LANDSCAPES[ls], PROFILES[pr], n, seeds, first_seed=first_seed)
            for ls in landscapes for pr in profiles for n in lengths}


def opening_costs(landscapes: Sequence[str], profiles: Sequence[str], length: int = 64,
                  seeds: int = 4) -> list[str]:
    """What `auto`'s opening costs a fresh pair: the best fixed K in hindsight against the same K after the
    opening's plain step, and after its plain step and first drafting round (as a fresh `auto` plays them)."""
    lines = []
    for ls, pr in product(landscapes, profiles):
        landscape, profile = LANDSCAPES[ls], PROFILES[pr]
        fixed = run_cell(landscape, profile, length, seeds, KS, warm=False)
        tps = {k: t / s for k, (t, s) in fixed.fresh.items()}
        best = max(KS, key=tps.__getitem__)
        auto = Pair(landscape, random.Random(0)).policy("auto")
        head = (auto.choose(length - 1, 512), auto.choose(length - 2, 512))
        opened = run_cell(landscape, profile, length, seeds, ((head[0], best), (*head, best)), warm=False)
        ratios = [t / s / tps[best] for t, s in opened.fresh.values()]
        lines.append(f"{ls:<14}{pr:<8}{length:>5}  best K={best}   K={head[0]} then K={best}: {ratios[0]:.3f}x   "
                     f"K={head[0]},{head[1]} then K={best}: {ratios[1]:.3f}x")
    return lines


def format_table(cells: dict[tuple, Cell]) -> list[str]:
    lines = [(f"{'landscape':<14}{'profile':<8}{'tokens':>7}   {'fresh: auto/best':>17} {'(best K)':>8} "
              f"{'auto/plain':>10}   {'warm: auto/best':>16} {'(best K)':>8} {'auto/plain':>10}")]
    for (ls, pr, n), cell in cells.items():
        parts = []
        for warm in (False, True):
            r, best, plain = cell.ratio(warm)
            parts.append(f"{r:>16.3f}x {'K=' + str(best):>8} {plain:>9.2f}x")
        lines.append(f"{ls:<14}{pr:<8}{n:>7}   " + "   ".join(parts))
    worst = {}
    for (ls, pr, n), cell in cells.items():
        for warm in (False, True):
            key = (n, warm)
            worst[key] = min(worst.get(key, 9.0), cell.ratio(warm)[0])
    lines.append("worst auto/best: " + ", ".join(f"{'warm' if w else 'fresh'} {n}: {r:.3f}x"
                                                 for (n, w), r in sorted(worst.items())))
    return lines


# ---- the real loop -------------------------------------------------------------------------------------------


def profile_proposer(bundle, reference: list[int], profile, seed: int = 0):
    """The pair's real drafter (its cost is paid), each draft i replaced by the reference continuation's token with
    the profile's conditional probability s_i / s_(i-1): the acceptance per position is the profile's."""
    import mlx.core as mx

    from ..speculative import drafter_proposer

    survival = cost_model.extend(profile, MAX_AUTO_K + 8)
    conditional = mx.array([survival[0]] + [b / a if a else 0.0 for a, b in pairwise(survival)])
    key = [mx.random.key(seed)]

    def propose(last, hidden, kv, position, k):
        real = drafter_proposer(bundle.state.draft_step, SamplerConfig())  # the pair's current graphs
        tokens, _ = real(last, hidden, kv, position, k)
        ref = mx.array((reference + [0] * (k + 1))[position + 1 : position + 1 + k], dtype=mx.int32)
        key[0], sub = mx.random.split(key[0])
        return mx.where(mx.random.uniform(shape=(k,), key=sub) < conditional[:k], ref, tokens), None

    return propose


def _forget(bundle) -> None:
    """The pair as freshly loaded: nothing learned, no draft graph compiled (MLX's kernel cache stays warm)."""
    bundle.state.forget()
    bundle.state.__dict__.pop("draft_step", None)


def _decode_seconds(bundle, prompt, max_tokens, k, proposer=None) -> tuple[int, float, tuple[int, int]]:
    """(tokens, seconds of one generation after its prefill, (drafts, rounds)): wall time less that of the prefill
    and first token alone (a plain run of one token), so the first round's compile counts."""
    from .. import stream_generate

    def wall(n, k):
        tic, out = time.perf_counter(), None
        for out in stream_generate(bundle, prompt, n, SamplerConfig(), k, proposer=proposer if k else None):
            pass
        return out, time.perf_counter() - tic

    prefill = min(wall(1, 0)[1] for _ in range(2))
    last, seconds = wall(max_tokens, k)
    draft = last.draft or DraftStats()
    return last.generation_tokens, seconds - prefill, (draft.drafted, draft.rounds + draft.plain_rounds)


def real_loop(pair: str, profile: str | None, ks: Sequence[int], max_tokens: int, prompts: int, warmup: int,
              repeats: int = 2) -> tuple[dict, dict]:
    """tokens/s of fixed K and "auto" on a real pair through `stream_generate`: fresh (the pair as freshly loaded
    before every run: compiles and learning count) and, for auto, warm (after `warmup` earlier generations), each
    (mode, prompt) the fastest of `repeats` runs, the modes taking turns. ({mode: tokens/s}, {mode: mean K})."""
    from .. import load
    from . import shapes
    from .decoding import demo_prompts, run

    if pair == "demo":
        from ..demo import demo_dtype, demo_path

        bundle = load(demo_path(), dtype=demo_dtype())
        texts = demo_prompts(bundle, prompts + warmup, 256)
    else:
        bundle, _ = shapes.shape_pair("e2b", 32, 4)
        vocab = bundle.target.args.vocab_size
        texts = [[(i * 7919 + 13 * j) % vocab for i in range(128)] for j in range(prompts + warmup)]
    proposers = [lambda: None] * len(texts)  # a fresh one per generation: the same forced draws in every mode
    if profile is not None:  # random weights: the target's own continuation, accepted as the profile says
        plain, _, outputs = run(bundle, texts, max_tokens + MAX_AUTO_K + 1, 0, SamplerConfig())
        proposers = [partial(profile_proposer, bundle, t + o, PROFILES[profile], i)
                     for i, (t, o) in enumerate(zip(texts, outputs))]
    chosen, best = texts[:prompts], {}  # (mode, prompt) -> (tokens, seconds) of its fastest run

    def keep(mode, i, result):
        if (mode, i) not in best or result[0] / result[1] > best[mode, i][0] / best[mode, i][1]:
            best[mode, i] = result

    for _ in range(repeats):  # the modes take turns: a slow spell of the machine hits them alike
        for i, (prompt, proposer) in enumerate(zip(chosen, proposers)):
            for k in (*ks, "auto"):
                _forget(bundle)
                keep(k, i, _decode_seconds(bundle, prompt, max_tokens, k, proposer()))
    _forget(bundle)
    for prompt, proposer in zip(texts[prompts:], proposers[prompts:]):  # earlier generations on other prompts
        _decode_seconds(bundle, prompt, max_tokens, "auto", proposer())
    for _ in range(repeats):
        for i, (prompt, proposer) in enumerate(zip(chosen, proposers)):
            keep("auto warm", i, _decode_seconds(bundle, prompt, max_tokens, "auto", proposer()))
    modes = (*ks, "auto", "auto warm")
    rate = {m: sum(best[m, i][0] for i in range(prompts)) / sum(best[m, i][1] for i in range(prompts)) for m in modes}
    if profile is not None and 0 not in ks:  # the reference run (all prompts, tokens/s after the first token)
        rate = {"plain (reference run)": plain, **rate}
    mean_k = {m: sum(best[m, i][2][0] for i in range(prompts)) / max(1, sum(best[m, i][2][1] for i in range(prompts)))
              for m in modes}
    return rate, mean_k


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m mlx_gemma_mtp.bench.auto_regret", description=__doc__.split("\n\n")[0])
    p.add_argument("--landscapes", nargs="+", default=list(LANDSCAPES), choices=list(LANDSCAPES))
    p.add_argument("--profiles", nargs="+", default=list(PROFILES), choices=list(PROFILES))
    p.add_argument("--tokens", nargs="+", type=int, default=list(LENGTHS))
    p.add_argument("--seeds", type=int, default=4, help="texts per cell (every policy runs on the same ones)")
    p.add_argument("--first-seed", type=int, default=0, help="draw other texts than the table's (e.g. 100)")
    p.add_argument("--opening", action="store_true",
                   help="what auto's opening (a plain step, a first drafting round) costs a fresh pair, per cell")
    p.add_argument("--real", choices=["demo", "e2b"], default=None,
                   help="measure the real loop instead: the demo pair (its own drafter) or the E2B-width cut (float32, 4 "
                        "layers, acceptance forced to --real-profile)")
    p.add_argument("--real-profile", choices=["code", "prose"], default=None)
    p.add_argument("--k", type=int, nargs="+", default=list(KS), help="--real: the fixed K to compare with")
    p.add_argument("--prompts", type=int, default=2, help="--real: prompts per mode")
    p.add_argument("--warmup", type=int, default=2, help="--real: auto's earlier generations before the warm run")
    p.add_argument("--repeats", type=int, default=2, help="--real: each run the fastest of this many")
    args = p.parse_args(argv)
    tic = time.perf_counter()
    if args.real:
        if args.real == "e2b" and args.real_profile is None:
            p.error("--real e2b needs --real-profile (random weights accept nothing)")
        tokens = args.tokens[0]
        measured, mean_k = real_loop(args.real, args.real_profile, args.k, tokens, args.prompts, args.warmup,
                                     args.repeats)
        best = max(args.k, key=measured.__getitem__)  # (plain's reference run aside)
        print(f"real loop: {args.real}" + (f", acceptance forced to the {args.real_profile} profile"
                                           if args.real_profile else "") + f", {tokens} new tokens, "
              f"{args.prompts} prompts, tokens/s after the prefill (compiles included), each the best of "
              f"{args.repeats}, modes interleaved; fresh = the pair as freshly loaded before every generation, warm = "
              f"after {args.warmup} earlier auto generations")
        plain = measured.get(0, measured.get("plain (reference run)"))
        for mode, tps in measured.items():
            label = f"K={mode}" if isinstance(mode, int) else mode + (" fresh" if mode == "auto" else "")
            if mode not in mean_k:
                print(f"{label:<12}{tps:>9.1f} tok/s")
                continue
            vs_plain = f"{tps / plain:>7.2f}x" if plain else ""
            print(f"{label:<12}{tps:>9.1f} tok/s {vs_plain}   vs best fixed K (K={best}): {tps / measured[best]:.3f}x"
                  f"   mean K {mean_k[mode]:.2f}")
        print(f"({time.perf_counter() - tic:.0f} s)")
        return measured
    if args.opening:
        print(f"auto's opening on a fresh pair: the best fixed K's tokens/s after the opening over its tokens/s from "
              f"the first round, {args.seeds} texts per cell")
        for line in opening_costs(args.landscapes, args.profiles, args.tokens[0], args.seeds):
            print(line)
        return {}
    cells = regret_table(args.landscapes, args.profiles, args.tokens, args.seeds, args.first_seed)
    print(f"auto vs the best fixed K (K = 0..{MAX_AUTO_K}) in hindsight, tokens/s over {args.seeds} texts per cell; "
          f"fresh: a freshly loaded pair; warm: after generations of {', '.join(map(str, WARMUP))} tokens")
    for line in format_table(cells):
        print(line)
    print(f"({time.perf_counter() - tic:.1f} s)")
    return cells


if __name__ == "__main__":
    main()
