"""Side-by-side benchmark of plain decoding and MTP decoding in one run: `python -m mlx_gemma_mtp.bench`.

Prints plain tokens/s, MTP tokens/s per draft length K and "auto", their ratio to plain, acceptance per position,
the measured cost of drafting K tokens and of target verifies of T = 1..9 tokens, and the round overhead
T_round / (T_verify(K+1) + T_draft(K)) (1.0 = the loop adds nothing beyond the model work). T_draft(K) is the K
draft steps as the loop runs them (one compiled call), so T_draft(K)/K is the per-step cost K * T_draft stands
for; drafts and verifies are timed alternately, as in a round, because each evicts the other's weights from the
CPU caches.

"auto" is checked three ways: the "K=auto" row (what it learned over the earlier runs, as in a long-lived app),
"auto stale (...)" rows that start every run from a deliberately wrong prior (how fast it corrects itself), and the
wall time of a first generation on a freshly loaded pair against the best fixed K. `--calibrate` only measures the
costs and saves them as the prior of "auto" on this machine.

Random weights accept nothing, so `--force-acceptance R` substitutes, with probability R per draft, the target's own
greedy continuation for the drafter's token (the drafter still runs, so its cost is measured); such rows (every
MTP row then, "auto" included) are marked "forced". Without `--model`, a random Gemma 4 E2B-style pair of the
given `--random-hidden` size is built; `--shape e2b|e4b|26b-a4b|31b --bits 4|8|16|32` builds a random pair of a
released shape instead (shapes.py; `--layers`, `--vocab`, `--experts` cut it).

Plain decoding also runs through mlx-lm's own `gemma4_text` model and `generate_step` on the same weights
(greedy; its tokens must equal ours on float32 weights), and the measured costs feed the cost model
(cost_model.py): expected speedup per K under the published 31B acceptance profile (or `--profile`) and under this
run's own profile, next to the measured speedup.
"""

from __future__ import annotations

import argparse
import sysconfig
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import mlx.core as mx

from .. import load, stream_generate
from ..calibration import measure_costs, save_costs, saved_costs
from ..draft_length import MAX_AUTO_K, new_record
from ..load import Bundle
from ..round_cost import DraftCosts
from ..sampling import SamplerConfig
from ..speculative import drafter_proposer
from ..stats import DraftStats
from ..testing.presets import tiny_e2b_pair
from . import cost_model, shapes


def forced_proposer(bundle: Bundle, reference: list[int], rate: float, seed: int = 0):
    """Real drafter work, but each draft is replaced by the reference token with probability `rate`."""
    key = [mx.random.key(seed)]
    real = drafter_proposer(bundle.state.draft_step, SamplerConfig())

    def propose(last, hidden, kv, position, k):
        tokens, _ = real(last, hidden, kv, position, k)
        ref = mx.array((reference + [0] * (k + 1))[position + 1 : position + 1 + k], dtype=mx.int32)
        key[0], sub = mx.random.split(key[0])
        return mx.where(mx.random.uniform(shape=(k,), key=sub) < rate, ref, tokens), None

    return propose


LABEL = 30  # width of the table's first column


@dataclass
class Mode:
    """One row of the table: `measure()` -> (tokens/s, DraftStats or None, outputs) of one run over the prompts."""

    label: str
    k: int | str
    measure: Callable[[], tuple[float, DraftStats | None, list[list[int]]]]
    exact: bool = False  # ours at temperature 0: outputs must equal plain greedy decoding


def our_modes(bundle: Bundle, prompts, reference, args, sampler: SamplerConfig, costs: DraftCosts) -> list[Mode]:
    """Plain decoding, then every MTP row: each K and auto (both acceptance rules at T > 0, unseeded: a seed makes
    auto's schedule count-based), auto from stale costs, and at T > 0 auto with a seed."""
    modes = [Mode("plain", 0, partial(run, bundle, prompts, args.max_tokens, 0, sampler))]
    rules = ["leviathan", "match"] if args.temp > 0 else ["greedy"]
    forced = args.force_acceptance is not None
    proposer = (lambda i: forced_proposer(bundle, prompts[i] + reference[i], args.force_acceptance)) if forced \
        else None
    for k in args.k + ["auto"]:
        for rule in rules:
            cfg = sampler if rule == "greedy" else SamplerConfig(temperature=args.temp, speculative_rule=rule)
            label = f"K={k}" + (" forced" if forced else "") + ("" if rule == "greedy" else f" {rule}")
            measure = partial(run, bundle, prompts, args.max_tokens, k, cfg, proposer)
            modes.append(Mode(label, k, measure, exact=cfg.greedy))
    live = live_sampler(args)
    for name, prior in stale_costs(costs).items():
        measure = partial(run_from, prior, bundle, prompts, args.max_tokens, live, proposer)
        modes.append(Mode(f"auto stale ({name})" + (" forced" if forced else ""), "auto", measure,
                          exact=live.greedy))
    if args.temp > 0:
        seeded = SamplerConfig(temperature=args.temp, seed=0)
        modes.append(Mode("K=auto seeded", "auto", partial(run, bundle, prompts, args.max_tokens, "auto", seeded)))
    return modes


def live_sampler(args) -> SamplerConfig:
    """The sampler of the unseeded rows (greedy, or the Leviathan rule at --temp)."""
    return SamplerConfig(temperature=args.temp)


def stale_costs(measured: DraftCosts) -> dict[str, DraftCosts]:
    """Deliberately wrong priors for "auto": drafting as costly as the target and a verify linear in T (MTP never
    pays: the stale curve of a slow machine), and MTP priced as free (every K costs one plain step)."""
    v, n = measured.verify[1], len(measured.verify)
    slow = DraftCosts([k * v for k in range(n - 1)], [0.0] + [t * v for t in range(1, n)], measured.context)
    free = DraftCosts([0.0] * (n - 1), [0.0] + [v] * (n - 1), measured.context)
    return {"slow MTP": slow, "free MTP": free}


def run_from(prior: DraftCosts, bundle: Bundle, prompts, max_tokens: int, sampler: SamplerConfig, proposer=None):
    """`run` of "auto" from a fresh record whose prior is `prior`; the "K=auto" row's record is put back after."""
    records = bundle.state.auto_records
    saved = records.swap(sampler, new_record(records.model, prior))
    try:
        return run(bundle, prompts, max_tokens, "auto", sampler, proposer)
    finally:
        records.swap(sampler, saved)


def first_generation(args, prompt: list[int], k, sampler: SamplerConfig) -> float:
    """Wall seconds of one `stream_generate` call, prefill included, on a freshly loaded pair: a user's first
    request, with its compiles and (for auto) its learning. Loads the pair again (the old one stays loaded)."""
    fresh, _ = load_bundle(args)
    tic = time.perf_counter()
    for _ in stream_generate(fresh, prompt, args.max_tokens, sampler, k):
        pass
    return time.perf_counter() - tic


def mlx_vlm_modes(bundle: Bundle, prompts, args) -> tuple[list[Mode], str]:
    """The same pair through mlx-vlm's MTP path, one mode per K, and a line saying what was compared (or why
    not). Greedy only: its T > 0 rule is the exact-match one, and sampled outputs differ token by token."""
    from . import mlx_vlm

    if (version := mlx_vlm.version()) is None:
        return [], "mlx-vlm: not installed, comparison skipped (pip install --no-deps mlx-vlm requests Pillow)"
    why = "temperature > 0" if args.temp > 0 else mlx_vlm.unsupported(bundle)
    if why:
        return [], f"mlx-vlm {version}: comparison skipped ({why})"
    pair = mlx_vlm.MlxVlmPair(bundle, max(args.k))
    modes = [Mode(f"mlx-vlm K={k}", k, partial(pair.run, prompts, args.max_tokens, k)) for k in args.k]
    return modes, f"mlx-vlm {version}, its MTP path on the same pair and prompts (drafter at the hidden state's position):"


def mlx_lm_modes(bundle: Bundle, prompts, args) -> tuple[list[Mode], str]:
    """Plain greedy decoding through mlx-lm's own `gemma4_text` on the same arrays, and a line saying what ran."""
    if args.temp > 0:
        return [], "mlx-lm: plain decoding compared at temperature 0 only"
    plain = shapes.MlxLmPlain(bundle)
    mode = Mode("mlx-lm plain", 0, partial(plain.run, prompts, args.max_tokens))
    return [mode], (f"mlx-lm {shapes.mlx_lm_version()}: its gemma4_text model, generate_step and cache on the "
                    "same weights and prompts (plain greedy decoding):")


def interleaved_best(modes: list[Mode], repeats: int) -> dict[str, tuple]:
    """{label: (tokens/s, DraftStats, outputs)} of each mode's fastest run. The modes take turns in every
    repetition, so a slow spell of the machine (other processes only ever add time) hits all of them alike."""
    best = {}
    for _ in range(repeats):
        for mode in modes:
            result = mode.measure()
            if mode.label not in best or result[0] > best[mode.label][0]:
                best[mode.label] = result
    return best


def min_costs(a: DraftCosts, b: DraftCosts) -> DraftCosts:
    """Per entry the faster of two measurements."""
    return DraftCosts([min(x, y) for x, y in zip(a.draft, b.draft)], [min(x, y) for x, y in zip(a.verify, b.verify)])


def run(bundle: Bundle, prompts: list[list[int]], max_tokens: int, k, sampler: SamplerConfig, proposer=None):
    """(tokens/s over all prompts, merged DraftStats, outputs)."""
    tokens, seconds, stats, outputs = 0, 0.0, DraftStats(), []
    for i, prompt in enumerate(prompts):
        propose = proposer(i) if proposer else None
        responses = list(stream_generate(bundle, prompt, max_tokens, sampler, k, proposer=propose))
        last = responses[-1]
        tokens += last.generation_tokens
        seconds += last.generation_tokens / last.generation_tps
        stats.merge(last.draft)
        outputs.append([r.token for r in responses])
    return tokens / seconds, stats, outputs


def demo_prompts(bundle: Bundle, count: int, length: int) -> list[list[int]]:
    """Held-out stdlib files of the demo pair (never seen in training), cut to `length` tokens."""
    root = Path(sysconfig.get_paths()["stdlib"])
    names = (bundle.path / "held_out.txt").read_text().split()
    prompts = []
    for name in names:
        ids = bundle.tokenizer.encode((root / name).read_text(encoding="utf-8", errors="replace"))
        if len(ids) > 2 * length:
            prompts.append(ids[length : 2 * length])  # skip the licence/docstring header
        if len(prompts) == count:
            break
    return prompts


def load_bundle(args) -> tuple[Bundle, str]:
    if args.demo:
        from ..demo import demo_dtype, demo_path

        return load(demo_path(), dtype=demo_dtype()), "demo pair (held-out stdlib code)"
    if args.model:
        return load(args.model, draft=args.draft), args.model
    if args.shape:
        try:
            return shapes.shape_pair(args.shape, args.bits, args.layers, args.vocab, args.experts)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
    return tiny_e2b_pair(args.random_hidden), f"random E2B-style pair, hidden {args.random_hidden}"


def print_costs(costs) -> None:
    print(f"T_draft = {costs.draft_step * 1e3:.2f} ms per step; T_draft(K)/K for K=1..{len(costs.draft) - 1} (ms): "
          + " ".join(f"{t / k * 1e3:.2f}" for k, t in enumerate(costs.draft) if k))
    print(f"T_verify(T) for T=1..{len(costs.verify) - 1} (ms): " + " ".join(f"{t * 1e3:.2f}" for t in costs.verify[1:]))
    print("T_verify(T)/T_verify(1): " + " ".join(f"{t / costs.verify[1]:.2f}" for t in costs.verify[1:]))


def row(label, tps, plain_tps, stats, overhead="") -> str:
    acc = " ".join(f"{a:.2f}" for a in stats.acceptance_per_position) if stats and stats.rounds else ""
    mean = f"{stats.mean_accepted_length:.2f}" if stats and stats.rounds else ""
    return f"{label:<{LABEL}}{tps:>9.1f}{tps / plain_tps:>10.2f}{mean:>10}{overhead:>10}  {acc}".rstrip()


def calibrate(bundle: Bundle, context: int, greedy: bool) -> None:
    """Measure the pair's costs on this machine and save them as the prior of "auto" (`--calibrate`)."""
    costs = measure_costs(bundle.target, bundle.drafter, MAX_AUTO_K, context, greedy)
    print_costs(costs)
    file = save_costs(bundle.target, bundle.drafter, greedy, costs)
    print(f"saved to {file} as the starting point of 'auto' for this pair's shapes ({'greedy' if greedy else 'sampled'}"
          f", MLX {mx.__version__}, {mx.default_device()}); generations still learn from their own rounds")


def best_fixed(ours: list[Mode], results: dict) -> Mode:
    """The fastest fixed-K row, plain decoding (K = 0) included, of the first acceptance rule (forced rows included
    when forcing)."""
    fixed = [m for m in ours if isinstance(m.k, int) and m.label.split(" ")[-1] != "match"]
    return max(fixed, key=lambda m: results[m.label][0])


def print_auto_summary(bundle: Bundle, ours: list[Mode], results: dict, args, prompt: list[int]) -> None:
    """Auto against the best fixed K: tokens/s of the auto rows, and a first generation on a fresh load."""
    best = best_fixed(ours, results)
    best_tps = results[best.label][0]
    autos = [m for m in ours if m.k == "auto" and "match" not in m.label]
    print(f"\nauto vs the best fixed K ({best.label}): "
          + ", ".join(f"{m.label} {results[m.label][0] / best_tps:.2f}x" for m in autos))
    if args.no_first_generation:
        return
    if args.force_acceptance is not None or args.shape:  # a fresh pair runs unforced; --shape: a second big pair
        why = "forced acceptance" if args.force_acceptance is not None else "--shape: it would build a second pair"
        print(f"first generation on a freshly loaded pair: not timed ({why})")
        return
    live, first = live_sampler(args), {}
    for _ in range(args.repeats):  # alternately, best of the repeats
        for k in ("auto", best.k):
            first[k] = min(first.get(k, float("inf")), first_generation(args, prompt, k, live))
    prior = "saved calibration" if saved_costs(bundle.target, bundle.drafter, live.greedy) else "analytic"
    print(f"first generation on a freshly loaded pair (prompt 1, {args.max_tokens} new tokens, prefill included, "
          f"best of {args.repeats}; auto's prior: {prior}): auto {first['auto']:.3f} s, K={best.k} "
          f"{first[best.k]:.3f} s: auto takes {first['auto'] / first[best.k]:.2f}x the time")


def float32(bundle: Bundle) -> bool:
    """Whether the target computes in float32 (where every output must match exactly)."""
    return bundle.target.model.embed_tokens.weight.dtype == mx.float32


def first_divergence(outputs: list[list[int]], reference: list[list[int]]) -> str:
    """Where a row's outputs first differ from plain decoding's: "=" when identical, else the index of the
    first differing token in the first prompt whose output differs ("prompt:index" when there are several)."""
    for p, (out, ref) in enumerate(zip(outputs, reference)):
        if out != ref:
            i = next((i for i, (a, b) in enumerate(zip(out, ref)) if a != b), min(len(out), len(ref)))
            return f"{p}:{i}" if len(reference) > 1 else str(i)
    return "="


def check_exact(bundle: Bundle, divergence: dict[str, str], args, strict: bool) -> None:
    """Stop the run (strict) when a greedy MTP row differs from plain decoding where exactness is guaranteed:
    float32 weights, or any pair but a random low-precision `--shape` one (whose near-ties may flip)."""
    differ = [label for label, at in divergence.items() if at != "="]
    if strict and differ and (float32(bundle) or not args.shape):
        raise SystemExit(f"error: {differ[0]} output differs from plain greedy decoding at token "
                         f"{divergence[differ[0]]} (an exactness bug)")


def print_mlx_lm(bundle: Bundle, theirs: list[Mode], results: dict, reference, line: str,
                 strict: bool) -> None:
    """mlx-lm's plain row, whether its tokens equal ours (required on float32 weights when `strict`), and
    ours / theirs."""
    print(f"\n{line}")
    plain_tps = results["plain"][0]
    for mode in theirs:
        tps, _, outputs = results[mode.label]
        same = outputs == reference
        print(row(mode.label, tps, plain_tps, None) + f"  (output {'identical to' if same else 'DIFFERS from'} ours)")
        if strict and not same and float32(bundle):
            raise SystemExit("error: mlx-lm's plain greedy output differs from ours on float32 weights")
        print(f"plain decoding, ours / mlx-lm: {plain_tps / tps:.2f}x")


def print_cost_model(costs: DraftCosts, ours: list[Mode], results: dict, args) -> None:
    """Expected speedup per K from the measured costs under the published (or --profile) acceptance profile and
    under this run's own (that of its longest fixed-K row), next to the measured speedup of each K row."""
    fixed = [m for m in ours if isinstance(m.k, int) and m.k > 0 and m.label.split(" ")[-1] != "match"]
    plain_tps = results["plain"][0]
    measured = {m.k: results[m.label][0] / plain_tps for m in fixed}
    profiles = {"--profile" if args.profile else "published 31B": args.profile or cost_model.PUBLISHED_31B}
    if fixed and (stats := results[max(fixed, key=lambda m: m.k).label][1]).rounds:
        profiles[f"this run (K={max(measured)} row)"] = cost_model.monotone(stats.acceptance_per_position)
    print("\nexpected speedup from these costs (cost_model.py: E[tokens] = 1 + s_1 + ... + s_K per round, speedup = "
          "E[tokens] * T_verify(1) / (T_verify(K+1) + T_draft(K)); s_i = acceptance per position, extended "
          "geometrically past the profile; the loop's overhead is not modelled):")
    for name, profile in profiles.items():
        print(f"  {name}: " + " ".join(f"{p:.2f}" for p in profile))
    for line in cost_model.speedup_table(costs, profiles, measured):
        print(line)


def profile_arg(text: str) -> tuple[float, ...]:
    try:
        return cost_model.parse_profile(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mlx_gemma_mtp.bench", description=__doc__.split("\n\n")[0])
    shapes.add_pair_arguments(p, 4, "--shape weights: 4/8 quantized (mixed recipe), 16 bfloat16, 32 float32 "
                                    "(default 4)")
    p.add_argument("--profile", type=profile_arg, default=None, metavar="S1,S2,...",
                   help="acceptance per draft position for the cost model (default: published 31B, "
                        + ",".join(map(str, cost_model.PUBLISHED_31B)) + ")")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--k", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8])
    p.add_argument("--temp", type=float, default=0.0, help="> 0: also compares the 'match' acceptance rule")
    p.add_argument("--force-acceptance", type=float, default=None, metavar="R")
    p.add_argument("--repeats", type=int, default=3, help="tokens/s of each mode is the best of this many runs")
    p.add_argument("--no-first-generation", action="store_true",
                   help="skip the first-generation timing (it loads the pair again, while the first stays loaded)")
    p.add_argument("--calibrate", action="store_true",
                   help="only measure this pair's costs and save them as the prior of 'auto' on this machine")
    args = p.parse_args(argv)
    cut = [f"--{k}" for k in ("layers", "vocab", "experts") if getattr(args, k) is not None]
    if cut and not args.shape:
        p.error(f"{', '.join(cut)} need --shape")
    if args.shape and (args.model or args.demo):
        p.error("--shape builds a random pair: drop --model/--demo")
    return args


@dataclass
class Summary:
    """What a benchmark run measured: {label: (tokens/s, DraftStats, outputs)} of every row, the costs, the rows."""

    results: dict
    costs: DraftCosts
    ours: list[Mode]
    mtp_same: bool  # every greedy MTP row's output equals plain decoding's
    divergence: dict[str, str]  # greedy MTP row label -> its first divergence from plain decoding ("=": none)
    mlx_lm_same: bool | None  # mlx-lm's plain output equals ours (None: not compared)


def main(argv: list[str] | None = None) -> Summary | None:
    args = parse_args(argv)
    bundle, name = load_bundle(args)
    if bundle.drafter is None:
        raise SystemExit("error: the benchmark needs a drafter (--draft, or a bundle with drafter/)")
    return benchmark(bundle, name, args)


def benchmark(bundle: Bundle, name: str, args: argparse.Namespace, strict: bool = True) -> Summary | None:
    """Run and print the whole comparison for a loaded pair (`parse_args` gives `args`); None with
    --calibrate.

    `strict` stops the run when greedy MTP (or mlx-lm's plain decoding) differs from ours where exactness is
    guaranteed (`check_exact`). A GPU table passes False: there the verify's multi-row matmul kernels may
    round differently from the one-row kernel (MLX's qmv_wide on Apple M3+ does) and flip a near-tie, so each
    row's first divergence is reported (`Summary.divergence`) and the run goes on.
    """
    vocab = bundle.target.args.vocab_size
    if args.demo:
        prompts = demo_prompts(bundle, args.prompts, args.prompt_tokens)
    else:
        prompts = [[(i * 7919 + 13 * j) % vocab for i in range(args.prompt_tokens)] for j in range(args.prompts)]
    greedy = SamplerConfig()
    sampler = SamplerConfig(temperature=args.temp, seed=0) if args.temp > 0 else greedy
    context = len(prompts[0]) + args.max_tokens // 2  # the run's typical context length
    if args.calibrate:
        return calibrate(bundle, context, sampler.greedy)
    for k in (0, *args.k, "auto"):  # warm-up: compilation, and the first rounds of "auto"
        run(bundle, prompts[:1], 8, k, live_sampler(args))
    _, _, reference = run(bundle, prompts, args.max_tokens, 0, sampler)
    # costs measured around the timed runs (the saved calibration is not read)
    before = measure_costs(bundle.target, bundle.drafter, 8, context, sampler.greedy)
    ours = our_modes(bundle, prompts, reference, args, sampler, before)
    theirs, theirs_line = mlx_vlm_modes(bundle, prompts, args) if not args.shape else \
        ([], "mlx-vlm: comparison skipped (--shape: its export would hold a second copy of the pair)")
    lm, lm_line = mlx_lm_modes(bundle, prompts, args)
    results = interleaved_best(ours + lm + theirs, args.repeats)
    costs = min_costs(before, measure_costs(bundle.target, bundle.drafter, 8, context, sampler.greedy))

    print(f"model: {name} | {len(prompts)} prompts x {len(prompts[0])} tokens | {args.max_tokens} new tokens | "
          f"temperature {args.temp} | device {mx.default_device()} | each mode the best of {args.repeats} runs")
    print_costs(costs)
    print(f"\n{'mode':<{LABEL}}{'tok/s':>9}{'vs plain':>10}{'mean acc':>10}{'overhead':>10}  acceptance per position")
    plain_tps = results["plain"][0]
    divergence = {m.label: first_divergence(results[m.label][2], reference) for m in ours if m.exact}
    check_exact(bundle, divergence, args, strict)
    differ = [label for label, at in divergence.items() if at != "="]
    for mode in ours:
        tps, stats, outputs = results[mode.label]
        overhead = ""
        if isinstance(mode.k, int) and mode.k > 0 and stats.rounds:
            per_round = (sum(map(len, outputs)) / tps) / (stats.rounds + stats.plain_rounds)
            overhead = f"{per_round / (costs.verify[mode.k + 1] + costs.draft[mode.k]):.2f}"
        print(row(mode.label, tps, plain_tps, stats, overhead))
    if sampler.greedy and differ:
        print("\nDIFFER from plain greedy decoding (first differing token): "
              + ", ".join(f"{label} at {divergence[label]}" for label in differ)
              + " (a K+1-token verify may round differently from one-token steps and flip a near-tie: random "
              "weights in low precision, or a GPU's multi-row kernels; float32 on a CPU must match exactly)")
    elif sampler.greedy:
        print("\nall MTP outputs are identical to plain greedy decoding")
    print_auto_summary(bundle, ours, results, args, prompts[0])
    print_mlx_lm(bundle, lm, results, reference, lm_line, strict)
    print_cost_model(costs, ours, results, args)
    print(f"\n{theirs_line}")
    for mode in theirs:
        tps, stats, outputs = results[mode.label]
        same = all(out[: len(ref)] == ref for out, ref in zip(outputs, reference))
        print(row(mode.label, tps, plain_tps, stats) + f"  (output {'identical to' if same else 'DIFFERS from'} plain)")
    return Summary(results, costs, ours, not differ, divergence,
                   results["mlx-lm plain"][2] == reference if lm else None)


if __name__ == "__main__":
    main()
