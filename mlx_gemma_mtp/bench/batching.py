"""Batching benchmark: S concurrent streams served one after another (batch 1) or decoded together, side by side in
one run: `python -m mlx_gemma_mtp.bench.batching`.

For each stream count S (`--streams 1,2,4,8`) the first S prompts (different prompts of different lengths) all
arrive at once (t = 0) and are served by each mode in turn:

- `serial plain`: `stream_generate` on each prompt, one after another, plain decoding (the baseline);
- `serial K=k`: the same with MTP at K = k (batch 1, as before batching existed; `--no-serial-mtp` skips it);
  a serial mode runs once over all the prompts, and its S-stream numbers are those of its first S streams (a
  stream served one after another does not depend on the ones after it);
- `batched plain`: `BatchGenerator(bundle, S, num_draft_tokens=0)`, every stream decoding together;
- `batched K=k` and `batched auto`: the same with MTP rounds (K = k drafts per row, or "auto" for the batch);
- `mlx-lm batched plain` (`--mlx-lm`): mlx-lm's own `BatchGenerator` with its `gemma4_text` model on the same arrays
  (`shapes.mlx_lm_model`), plain greedy decoding.

Per mode: aggregate tokens/s (every stream's tokens over the wall time from t = 0 to the last token, prefill
included), per-stream tokens/s (each stream's tokens after its first over the time from its first token to its
last; the median over streams), time to first token from t = 0 (median and max over streams: a serial stream
waits for the ones before it), and each of those over `serial plain`'s. Greedy only: every stream's output of
every mode of ours must equal its `serial plain` output token for token (exactness is the product; the run
stops with an error otherwise, unless `strict=False`, which `bench.gpu` passes: there a GPU's multi-row kernels
may round differently and flip a near-tie, and the first divergence is reported instead). mlx-lm's tokens are
compared and reported, never required.

Random weights accept no drafts: `--forced-acceptance A` makes each draft its stream's `serial plain` token
with probability A, the drafter still running (`bench/batch_oracle.py`). Such rows are labelled "forced A".

Pairs: `--demo` (the shipped pair, held-out stdlib code as prompts), `--model DIR [--draft DIR]`, `--shape e2b|e4b|
26b-a4b|31b --bits 32 [--layers N --vocab V --experts E]` (a random pair of a released shape, shapes.py), or by
default a small random E2B-style pair (`--random-hidden`). Each mode's numbers are from its fastest of
`--repeats` runs (the modes take turns in every repetition).
"""

from __future__ import annotations

import argparse
import gc
import os
import queue
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .. import load, stream_generate
from ..batching import BatchGenerator
from ..load import Bundle
from ..sampling import SamplerConfig
from ..stats import DraftStats
from ..testing.presets import tiny_e2b_pair
from . import shapes
from .batch_oracle import Oracle

STREAMS = (1, 2, 4, 8)
# prompt j has round(--prompt-tokens * LENGTHS[j % 8]) tokens: different lengths, finishing prefill at
# different times
LENGTHS = (1.0, 0.5, 1.5, 0.75, 1.25, 0.625, 1.125, 0.875)
LABEL = 26  # width of the table's mode column


# --- measurements ---------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One mode serving S streams that all arrived at t = 0."""

    outputs: list[list[int]]
    first: list[float]  # seconds from t = 0 to each stream's first token
    last: list[float]  # ... to its last token
    drafts: list[DraftStats | None] | None = None  # each stream's draft counters (MTP modes)
    rounds: dict[tuple[int, int], float] | None = None  # batched: (K, rows) -> the fastest round's seconds
    chosen: dict[int, int] | None = None  # batched: K -> rounds run with it

    def prefix(self, streams: int) -> Run:
        """A serial run's first `streams` streams: the serial run of those alone (a stream served one after
        another does not depend on the ones after it)."""
        return Run(self.outputs[:streams], self.first[:streams], self.last[:streams],
                   self.drafts[:streams] if self.drafts is not None else None)

    @property
    def stats(self) -> DraftStats | None:
        """The draft counters merged over the streams."""
        if self.drafts is None:
            return None
        merged = DraftStats()
        for d in self.drafts:
            merged.merge(d)
        return merged

    @property
    def wall(self) -> float:
        return max(self.last)

    @property
    def aggregate(self) -> float:
        """Every stream's tokens over the wall time (prefill included)."""
        return sum(map(len, self.outputs)) / self.wall

    @property
    def per_stream(self) -> float:
        """The median over streams of its tokens after the first over the time from its first to its last."""
        return statistics.median((len(out) - 1) / (last - first) if len(out) > 1 and last > first else 0.0
                                 for out, first, last in zip(self.outputs, self.first, self.last))

    @property
    def ttft(self) -> tuple[float, float]:
        """Time to first token from t = 0: (median, max) over streams."""
        return statistics.median(self.first), max(self.first)


@dataclass
class Mode:
    """One row of the table: `measure(streams, max_tokens)` -> a Run over the first `streams` prompts."""

    label: str
    measure: Callable[[int, int], Run]
    ours: bool = True  # ours: greedy outputs must equal serial plain's
    serial: bool = False  # run once over all streams; S streams are its first S


class Clock:
    """Seconds since it was made, and per stream its first and last token times."""

    def __init__(self, streams: int):
        self.t0 = time.perf_counter()
        self.first: list[float | None] = [None] * streams
        self.last = [0.0] * streams

    def tick(self, j: int) -> None:
        now = time.perf_counter() - self.t0
        if self.first[j] is None:
            self.first[j] = now
        self.last[j] = now

    def run(self, outputs: list[list[int]], drafts=None, rounds=None, chosen=None) -> Run:
        first = [f if f is not None else self.last[j] for j, f in enumerate(self.first)]
        return Run(outputs, first, self.last, drafts, rounds, chosen)


def serial(bundle: Bundle, prompts: list[list[int]], max_tokens: int, k: int, proposers=None) -> Run:
    """Each prompt through `stream_generate`, one after another (batch 1)."""
    clock, outputs, drafts = Clock(len(prompts)), [], []
    for j, prompt in enumerate(prompts):
        tokens, last = [], None
        for r in stream_generate(bundle, prompt, max_tokens, SamplerConfig(), k,
                                 proposer=proposers[j] if proposers else None):
            tokens.append(r.token)
            clock.tick(j)
            last = r
        outputs.append(tokens)
        drafts.append(last.draft if last is not None else None)
    return clock.run(outputs, drafts if k else None)


def batched(bundle: Bundle, prompts: list[list[int]], max_tokens: int, k: int | str, forced=None) -> Run:
    """Every prompt submitted at once to a `BatchGenerator` of len(prompts) rows, its scheduler driven here; each
    stream's new responses are read (and timed) after every scheduler step."""
    generator = BatchGenerator(bundle, len(prompts), k, propose=forced)
    if forced is not None:
        forced.generator = generator
    chosen: dict[int, int] = {}
    timed = generator.draft_length.timed

    def count(k, *rest):  # every round's K, for the table's notes
        chosen[k] = chosen.get(k, 0) + 1
        return timed(k, *rest)

    generator.draft_length.timed = count
    clock = Clock(len(prompts))
    streams = [generator.submit(p, max_tokens) for p in prompts]
    outputs, last = [[] for _ in prompts], [None] * len(prompts)
    with bundle.exclusive():
        while generator.busy:
            generator.step()
            for j, s in enumerate(streams):
                while True:
                    try:
                        item = s.request.responses.get_nowait()
                    except queue.Empty:
                        break
                    if isinstance(item, BaseException):
                        raise item
                    if hasattr(item, "token"):  # a GenerationResponse (the end marker has none)
                        outputs[j].append(item.token)
                        last[j] = item
                        clock.tick(j)
    drafts = [r.draft if r is not None else None for r in last] if k != 0 else None
    return clock.run(outputs, drafts, dict(generator.draft_length.times), chosen)


# --- mlx-lm ---------------------------------------------------------------------------------------------------


def mlx_lm_unsupported(bundle: Bundle) -> str | None:
    """Why mlx-lm's BatchGenerator cannot run this pair's target, or None."""
    try:
        from mlx_lm.generate import BatchGenerator as _  # noqa: F401
        from mlx_lm.models import gemma4_text  # noqa: F401
    except ImportError as e:
        return f"mlx-lm has no BatchGenerator / gemma4_text here ({e})"
    if bundle.target.args.layer_types is None:
        return "the target has no layer types"
    return None


class MlxLmBatched:
    """mlx-lm's `BatchGenerator` over its `gemma4_text` holding the bundle's target arrays."""

    def __init__(self, bundle: Bundle, prefill_step_size: int):
        self.model = shapes.mlx_lm_model(bundle)
        self.eos = sorted(set(bundle.generation.eos_token_ids)
                          | set(getattr(bundle.tokenizer, "eos_token_ids", None) or []))
        self.prefill_step_size = prefill_step_size

    def run(self, prompts: list[list[int]], max_tokens: int) -> Run:
        from mlx_lm.generate import BatchGenerator as LmBatchGenerator

        clock = Clock(len(prompts))
        gen = LmBatchGenerator(self.model, stop_tokens=[[t] for t in self.eos], completion_batch_size=len(prompts),
                               prefill_batch_size=len(prompts), prefill_step_size=self.prefill_step_size)
        try:
            uids = gen.insert(prompts, [max_tokens] * len(prompts))
            stream_of = {uid: j for j, uid in enumerate(uids)}
            outputs = [[] for _ in prompts]
            while True:
                prompting, responses = gen.next()
                if not prompting and not responses:
                    break
                for r in responses:
                    j = stream_of[r.uid]
                    outputs[j].append(int(r.token))
                    clock.tick(j)
        finally:
            gen.close()
        return clock.run(outputs)


# --- the benchmark --------------------------------------------------------------------------------------------


def stream_prompts(bundle: Bundle, count: int, base: int, demo: bool) -> list[list[int]]:
    """`count` different prompts of different lengths (round(base * LENGTHS[j % 8]), at least 4 tokens): held-out
    stdlib code for the demo pair, else deterministic token ids."""
    lengths = [max(4, round(base * LENGTHS[j % len(LENGTHS)])) for j in range(count)]
    if demo:  # the same files and cuts whatever the count: stream j's prompt does not depend on --streams
        from .decoding import demo_prompts

        longest = round(base * max(LENGTHS))
        texts = demo_prompts(bundle, count, longest)
        if len(texts) < count:
            raise SystemExit(f"error: the demo pair holds {len(texts)} held-out files of {2 * longest} tokens; "
                             f"ask for fewer streams or a smaller --prompt-tokens")
        return [t[:n] for t, n in zip(texts, lengths)]
    vocab = bundle.target.args.vocab_size
    rng = np.random.default_rng(1234)
    return [[2] + rng.integers(3, vocab, size=n - 1).tolist() for n in lengths]


def first_divergence(outputs: list[list[int]], reference: list[list[int]]) -> str:
    """"=" when every stream's output equals its reference, else "stream:index" of the first difference."""
    for j, (out, ref) in enumerate(zip(outputs, reference)):
        if out != ref:
            i = next((i for i, (a, b) in enumerate(zip(out, ref)) if a != b), min(len(out), len(ref)))
            return f"{j}:{i}"
    return "="


def float32(bundle: Bundle) -> bool:
    return bundle.target.model.embed_tokens.weight.dtype == mx.float32


def modes(bundle: Bundle, prompts: list[list[int]], args, oracle: Oracle | None,
          lm: MlxLmBatched | None) -> list[Mode]:
    """The table's rows, each measuring a run over the first S prompts with N new tokens; serial plain first (its
    outputs are the forced rows' references)."""
    tag = f" forced {args.forced_acceptance:g}" if oracle is not None else ""

    def reference(s, n):
        run = serial(bundle, prompts[:s], n, 0)
        return oracle.record(run) if oracle is not None else run

    out = [Mode("serial plain", reference, serial=True)]
    if not args.no_serial_mtp:
        for k in args.k:
            out.append(Mode(f"serial K={k}{tag}", lambda s, n, k=k: serial(
                bundle, prompts[:s], n, k, [oracle.solo(bundle, j) for j in range(s)] if oracle else None),
                serial=True))
    out.append(Mode("batched plain", lambda s, n: batched(bundle, prompts[:s], n, 0)))
    for k in [*args.k, "auto"]:
        out.append(Mode(f"batched K={k}{tag}", lambda s, n, k=k: batched(
            bundle, prompts[:s], n, k, oracle.batch(s) if oracle else None)))
    if lm is not None:
        out.append(Mode("mlx-lm batched plain", lambda s, n: lm.run(prompts[:s], n), ours=False))
    return out


@dataclass
class Summary:
    """{streams: {label: Run}}, and per stream count each row's first divergence from serial plain."""

    runs: dict[int, dict[str, Run]]
    divergence: dict[int, dict[str, str]]
    labels: list[str]


def measure(rows: list[Mode], streams: list[int], max_tokens: int, repeats: int) -> dict[int, dict[str, Run]]:
    """{S: {label: the mode's fastest run (by wall time) of `repeats`}}. The modes take turns in every repetition;
    a serial mode runs once over all streams per repetition, its S-stream run being the first S streams."""
    best: dict[int, dict[str, Run]] = {s: {} for s in streams}
    for _ in range(repeats):
        for mode in rows:
            if mode.serial:
                whole = mode.measure(streams[-1], max_tokens)
                runs = {s: whole.prefix(s) for s in streams}
            else:
                runs = {s: mode.measure(s, max_tokens) for s in streams}
            for s, run in runs.items():
                if mode.label not in best[s] or run.wall < best[s][mode.label].wall:
                    best[s][mode.label] = run
            gc.collect()
    return best


def acceptance(stats: DraftStats | None) -> str:
    return f"{stats.mean_accepted_length:.2f}" if stats is not None and stats.rounds else ""


def print_table(summary: Summary, ours: set[str]) -> None:
    head = (f"{'S':>2}  {'mode':<{LABEL}}{'agg tok/s':>10}{'x serial':>9}{'stream tok/s':>13}{'x serial':>9}"
            f"{'TTFT med s':>11}{'TTFT max s':>11}{'acc/round':>10}  same")
    print(head)
    print("-" * len(head))
    for s, runs in summary.runs.items():
        base = runs["serial plain"]
        for label in summary.labels:
            run = runs[label]
            med, worst = run.ttft
            div = summary.divergence[s][label]
            same = "=" if div == "=" else f"DIFFERS at {div}"
            if label not in ours:
                same += " (mlx-lm)"
            print(f"{s:>2}  {label:<{LABEL}}{run.aggregate:>10.1f}{run.aggregate / base.aggregate:>8.2f}x"
                  f"{run.per_stream:>13.1f}{run.per_stream / base.per_stream:>8.2f}x{med:>11.3f}{worst:>11.3f}"
                  f"{acceptance(run.stats):>10}  {same}")
        print()


def benchmark(bundle: Bundle, name: str, args: argparse.Namespace, strict: bool = True) -> Summary:
    """Run and print the whole comparison for a loaded pair (`parse_args` gives `args`).

    `strict` stops the run when one of our batched or MTP modes gives a stream an output different from its
    serial plain output where exactness is guaranteed (float32 weights, or a trained pair). `bench.gpu` passes
    False: each row's first divergence is then reported in its `same` cell.
    """
    streams = sorted(set(args.streams))
    prompts = stream_prompts(bundle, max(streams), args.prompt_tokens, args.demo)
    if bundle.drafter is None:
        raise SystemExit("error: the MTP rows need a drafter (--draft, or a bundle with drafter/)")
    forced = args.forced_acceptance is not None
    oracle = Oracle(prompts, args.forced_acceptance, args.max_tokens) if forced else None
    lm, lm_line = None, ""
    if args.mlx_lm:
        why = mlx_lm_unsupported(bundle)
        if why is None:
            try:
                lm = MlxLmBatched(bundle, args.prefill_step_size)
                lm.run(prompts[:2], 4)  # warm-up, and a check that it runs this checkpoint at all
            except Exception as e:  # noqa: BLE001  reported, never faked
                lm, why = None, f"{type(e).__name__}: {e}"
        lm_line = (f"mlx-lm {shapes.mlx_lm_version()}: its BatchGenerator (gemma4_text model, its batch caches, "
                   "greedy) on the same arrays and prompts" if lm else f"mlx-lm batched: skipped: {why}")
    rows = modes(bundle, prompts, args, oracle, lm)
    for mode in rows:  # warm-up (one short stream): the drafter's compiled steps; serial plain first, as a reference
        mode.measure(1, min(args.max_tokens, 2 + max(args.k, default=2)))
    cpu, wall = time.process_time(), time.perf_counter()
    runs = measure(rows, streams, args.max_tokens, args.repeats)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    divergence = {}
    for s in streams:
        reference = runs[s]["serial plain"].outputs
        divergence[s] = {m.label: first_divergence(runs[s][m.label].outputs, reference) for m in rows}
        for m in rows:
            at = divergence[s][m.label]
            if m.ours and at != "=" and strict and (float32(bundle) or not args.shape):
                j, i = at.split(":")
                raise SystemExit(f"error: {m.label} with {s} streams: stream {j}'s output differs from its serial "
                                 f"plain decoding at token {i} (an exactness bug)")

    lengths = [len(p) for p in prompts]
    loadavg = "/".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    print(f"model: {name} | streams {','.join(map(str, streams))} | prompts of {lengths} tokens (stream j has "
          f"prompt j) | {args.max_tokens} new tokens per stream | greedy | device {mx.default_device()} | MLX "
          f"{mx.__version__} | each mode the fastest of {args.repeats} run(s) | load average {loadavg} at the end "
          f"({os.cpu_count()} CPUs); this process's CPU time over the runs' wall time: {cpu / wall:.2f} (other "
          "processes competing for the cores push it down)")
    if forced:
        print(f"forced acceptance {args.forced_acceptance:g}: the drafter runs, then each draft is replaced by the "
              "stream's serial plain token with that probability (the same coins for serial and batched rows)")
    print("agg: all streams' tokens over the wall time from their common arrival to the last token (prefill "
          "included); stream: the median stream's tokens/s after its first token; TTFT from the common arrival "
          "(a serial stream waits for the ones before it); x serial: over `serial plain` at the same S; "
          "acc/round: accepted drafts per drafting round; same: every stream's output equals its serial plain "
          "output (=)\n")
    summary = Summary(runs, divergence, [m.label for m in rows])
    print_table(summary, {m.label for m in rows if m.ours})
    print_round_times(summary)
    if args.forward_costs:
        print_forward_costs(forward_costs(bundle, streams, sorted({1, *(k + 1 for k in args.k)})))
    if args.mlx_lm:
        print(lm_line)
        if lm is not None:
            for s in streams:
                ours, theirs = runs[s]["batched plain"], runs[s]["mlx-lm batched plain"]
                print(f"  S={s}: batched plain, ours / mlx-lm: aggregate {ours.aggregate / theirs.aggregate:.2f}x, "
                      f"per stream {ours.per_stream / theirs.per_stream:.2f}x, TTFT max "
                      f"{ours.ttft[1]:.3f} s vs {theirs.ttft[1]:.3f} s; mlx-lm's tokens "
                      + ("equal ours" if divergence[s]["mlx-lm batched plain"] == "=" else
                         f"DIFFER from ours at stream:token {divergence[s]['mlx-lm batched plain']}"))
    return summary


def forward_costs(bundle: Bundle, rows: list[int], tokens: list[int], repeats: int = 3) -> dict[tuple[int, int], float]:
    """Seconds of one target forward of B rows x T tokens (no cache: the weights' cost, not the context's), the
    fastest of `repeats` calls after a warm-up, for B in `rows` and T in `tokens`."""
    rng, vocab, out = np.random.default_rng(0), bundle.target.args.vocab_size, {}
    for b in rows:
        for t in tokens:
            x = mx.array(rng.integers(3, vocab, size=(b, t)), dtype=mx.int32)
            mx.eval(bundle.target(x))
            times = []
            for _ in range(repeats):
                tic = time.perf_counter()
                mx.eval(bundle.target(x))
                times.append(time.perf_counter() - tic)
            out[b, t] = min(times)
    return out


def print_forward_costs(costs: dict[tuple[int, int], float]) -> None:
    rows, tokens = sorted({b for b, _ in costs}), sorted({t for _, t in costs})
    print("one target forward of B rows x T tokens (no cache; fastest of 3 calls): ms, and in brackets over "
          "B x T one-token forwards (1.00: no saving from sharing the weights' reads)")
    print(f"{'B':>3}" + "".join(f"{f'T={t}':>20}" for t in tokens))
    one = costs[rows[0], tokens[0]] / (rows[0] * tokens[0])
    for b in rows:
        print(f"{b:>3}" + "".join(f"{costs[b, t] * 1e3:>12.1f} ({costs[b, t] / (b * t * one):.2f})" for t in tokens))
    print()


def print_round_times(summary: Summary) -> None:
    """The engine's own fastest round per K at S rows (`BatchDraftLength` times every round; a fixed-K run also
    has shorter rounds where a stream's budget leaves less room to draft), and how many rounds ran with each K."""
    print("batched rounds: the fastest per K with all S rows running (the engine's own timing, ms) | rounds run "
          "per K (all row counts, joining and leaving included)")
    for s, runs in summary.runs.items():
        cells = []
        for label in summary.labels:
            run = runs[label]
            if run.rounds is not None:
                mine = sorted((k, t) for (k, rows), t in run.rounds.items() if rows == s)
                name = label.removeprefix("batched ").split(" forced")[0]
                cells.append(f"{name}: " + (" ".join(f"K={k} {t * 1e3:.0f}" for k, t in mine) or "-") + " | "
                             + " ".join(f"K={k} x{n}" for k, n in sorted(run.chosen.items())))
        print(f"  S={s}: " + "; ".join(cells))
    print()


def streams_arg(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated stream counts, e.g. 1,2,4,8") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: stream counts must be positive integers")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mlx_gemma_mtp.bench.batching", description=__doc__.split("\n\n")[0])
    shapes.add_pair_arguments(p, 32, "--shape weights: 4/8 quantized, 16 bfloat16, 32 float32 (default 32: exact "
                                     "on a CPU)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="--model: cast the weights (default: the checkpoint's)")
    p.add_argument("--streams", type=streams_arg, default=list(STREAMS), metavar="1,2,4,8")
    p.add_argument("--prompt-tokens", type=int, default=128,
                   help=f"prompt j has round(N * {LENGTHS}[j %% 8]) tokens")
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens per stream")
    p.add_argument("--k", type=int, nargs="*", default=[3], help="fixed draft lengths of the MTP rows (and auto)")
    p.add_argument("--forced-acceptance", type=float, default=None, metavar="A",
                   help="force each draft to the reference token with probability A (random weights)")
    p.add_argument("--repeats", type=int, default=1, help="each mode's numbers are its fastest of this many runs")
    p.add_argument("--prefill-step-size", type=int, default=512)
    p.add_argument("--no-serial-mtp", action="store_true", help="skip the serial MTP rows")
    p.add_argument("--mlx-lm", action="store_true", help="also mlx-lm's BatchGenerator on the same weights")
    p.add_argument("--forward-costs", action="store_true",
                   help="also time one target forward of B rows x T tokens (B: the stream counts; T: 1 and K + 1)")
    args = p.parse_args(argv)
    cut = [f"--{k}" for k in ("layers", "vocab", "experts") if getattr(args, k) is not None]
    if cut and not args.shape:
        p.error(f"{', '.join(cut)} need --shape")
    if sum(map(bool, (args.shape, args.model, args.demo))) > 1:
        p.error("choose one of --shape, --model, --demo")
    if not all(1 <= k <= 8 for k in args.k):
        p.error("--k values must be in 1..8")
    if args.forced_acceptance is not None and not 0.0 <= args.forced_acceptance <= 1.0:
        p.error("--forced-acceptance must be in [0, 1]")
    if args.max_tokens < 2 or args.prompt_tokens < 4 or args.repeats < 1:
        p.error("--max-tokens >= 2, --prompt-tokens >= 4 and --repeats >= 1")
    return args


def load_bundle(args) -> tuple[Bundle, str]:
    if args.demo:
        from ..demo import demo_dtype, demo_path

        return load(demo_path(), dtype=demo_dtype()), "demo pair (held-out stdlib code)"
    if args.model:
        return load(args.model, draft=args.draft, dtype=getattr(mx, args.dtype) if args.dtype else None), args.model
    if args.shape:
        try:
            return shapes.shape_pair(args.shape, args.bits, args.layers, args.vocab, args.experts)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
    return tiny_e2b_pair(args.random_hidden), f"random E2B-style pair, hidden {args.random_hidden}"


def main(argv: list[str] | None = None) -> Summary:
    args = parse_args(argv)
    bundle, name = load_bundle(args)
    tic = time.perf_counter()
    summary = benchmark(bundle, name, args)
    print(f"total {time.perf_counter() - tic:.0f} s; peak memory {mx.get_peak_memory() / 1e9:.1f} GB")
    return summary


if __name__ == "__main__":
    main()
