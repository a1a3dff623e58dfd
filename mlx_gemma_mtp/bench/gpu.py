"""The four released shapes at 4-bit and bfloat16 on a GPU, in one table: `python -m mlx_gemma_mtp.bench.gpu`.

For each shape a random pair is made once in bfloat16 (`presets.random_pair`, full layer counts, V = 262,144) and
its 4-bit copy from it (`shapes.converted`, the converter's mixed recipe: what `random_pair(bits=4)` makes,
without generating the values twice). Each runs the whole `bench` comparison (printed as it goes): our
plain decoding against mlx-lm's `gemma4_text` on the same weights, MTP per K and auto with acceptance forced to
0.8, T_verify(T) for T = 1..9 and T_draft(K), and the cost model under the published 31B profile. The summary
table at the end has one row per shape and weight format. It installs nothing: run it where MLX's CUDA build is
installed (README, "Real shapes"). A combination that fails (e.g. an op the backend lacks) gets its error in its
row and the run goes on. Greedy MTP differing from plain decoding does not stop it either: on a GPU the
verify's multi-row matmul kernels may round differently from the one-row kernel (MLX's qmv_wide on Apple M3+
does) and flip a near-tie, so each MTP column has a "div" twin: the index of the first token where that row's
output differs from plain decoding, or "=" when identical (`bench` run directly stays strict: it stops on
float32). On a CPU it refuses full shapes (hours); `--layers 2 --vocab 2048 --bits 32` is the dry run the tests
use (32 = float32, for CPUs).

Each combination then runs the batching benchmark (`bench.batching`, printed as it goes) on the same pair: for
`--streams` concurrent streams (default 1, 4, 8; different prompts of different lengths around
`--prompt-tokens`), serial batch-1 plain decoding against the `BatchGenerator`'s plain steps and MTP rounds
(`--batch-k` and auto, acceptance forced to `--force-acceptance` by the same oracle). A second table has one row
per shape, weight format and stream count: serial tokens/s, each batched mode's aggregate and per-stream tokens/s
over serial's, the worst time to first token, and the first divergence of any batched row from serial greedy
decoding ("=" when none; like the first table, it never stops on one). `--no-batching` skips it.
"""

from __future__ import annotations

import argparse
import gc
import time

import mlx.core as mx

from ..testing.presets import PRESETS, random_pair
from . import batching, cost_model, decoding, shapes

SHAPES = tuple(PRESETS)
FORMATS = (4, 16)  # bits; 16 = bfloat16, 4 = the mixed 4-bit recipe


def bench_argv(shape: str, bits: int, args: argparse.Namespace) -> list[str]:
    """`bench`'s options for one combination (the pair itself is passed in, already built)."""
    argv = ["--shape", shape, "--bits", str(bits), "--force-acceptance", str(args.force_acceptance),
            "--prompts", str(args.prompts), "--prompt-tokens", str(args.prompt_tokens),
            "--max-tokens", str(args.max_tokens), "--repeats", str(args.repeats), "--k", *map(str, args.k)]
    for name in ("layers", "vocab", "experts"):
        if getattr(args, name) is not None:
            argv += [f"--{name}", str(getattr(args, name))]
    return argv


def summary_row(shape: str, bits: int, build: float, summary: decoding.Summary, ks: list[int]) -> list[str]:
    """The table's cells for one finished combination."""
    results, costs = summary.results, summary.costs
    plain, theirs = results["plain"][0], results["mlx-lm plain"][0]
    rows = {m.k: m.label for m in summary.ours if m.label.startswith("K=") and m.label.endswith("forced")}
    speed = {k: f"{results[label][0] / plain:.2f}x" for k, label in rows.items()}
    div = {k: summary.divergence[label] for k, label in rows.items()}
    best = cost_model.best_k(costs, cost_model.PUBLISHED_31B)
    return [shape, shapes.dtype_name(bits).split(" ")[0], f"{build:.0f}", f"{plain:.1f}", f"{theirs:.1f}",
            f"{plain / theirs:.2f}x", "yes" if summary.mlx_lm_same else "NO",
            *(speed[k] for k in [*ks, "auto"]), *(div[k] for k in [*ks, "auto"]),
            f"{costs.verify[1] * 1e3:.1f}", f"{costs.verify[5] / costs.verify[1]:.2f}", f"{costs.draft[4] * 1e3:.1f}",
            f"K={best} {cost_model.expected_speedup(costs, cost_model.PUBLISHED_31B, best):.2f}x"]


def print_table(rows: list[list[str]], ks: list[int], rate: float) -> None:
    """The summary as a Markdown table (a failed combination's row: shape, weights, its error)."""
    head = ["shape", "weights", "build s", "plain tok/s", "mlx-lm tok/s", "ours/mlx-lm", "same",
            *(f"K={k}" for k in ks), "auto", *(f"div K={k}" for k in ks), "div auto",
            "T_v(1) ms", "T_v(5)/T_v(1)", "T_d(4) ms", "model (31B profile)"]
    done = [r for r in rows if len(r) == len(head)]
    widths = [max([len(h)] + [len(r[i]) for r in done]) for i, h in enumerate(head)]
    print(f"\nsummary (device {mx.default_device()}, MLX {mx.__version__}; K and auto columns: tokens/s vs our plain "
          f"decoding at forced acceptance {rate}; same: mlx-lm's tokens equal ours; div: the first token where "
          f"the row's greedy output differs from our plain decoding's, = when identical; model: the cost model's "
          f"best K "
          f"and expected speedup under the published 31B profile {'/'.join(map(str, cost_model.PUBLISHED_31B))}):")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")


def batch_argv(shape: str, bits: int, args: argparse.Namespace) -> list[str]:
    """`bench.batching`'s options for one combination (the pair itself is passed in, already built)."""
    argv = ["--shape", shape, "--bits", str(bits), "--streams", ",".join(map(str, args.streams)),
            "--prompt-tokens", str(args.prompt_tokens), "--max-tokens", str(args.max_tokens),
            "--k", *map(str, args.batch_k), "--forced-acceptance", str(args.force_acceptance), "--repeats", "1",
            "--no-serial-mtp"]
    for name in ("layers", "vocab", "experts"):
        if getattr(args, name) is not None:
            argv += [f"--{name}", str(getattr(args, name))]
    return argv


def batch_head(ks: list[int]) -> list[str]:
    modes = ["plain", *(f"K={k}" for k in ks), "auto"]
    return ["shape", "weights", "S", "serial tok/s", *(f"{m} agg" for m in modes), *(f"{m} stream" for m in modes),
            "TTFT max serial s", "TTFT max plain s", "div"]


def batch_rows(shape: str, bits: int, summary: batching.Summary, ks: list[int]) -> list[list[str]]:
    """The batching table's cells for one finished combination, one row per stream count."""
    out = []
    for s, runs in summary.runs.items():
        serial = runs["serial plain"]
        labels = ["batched plain", *(label for label in summary.labels if label.startswith("batched K="))]
        diffs = [f"{label.removeprefix('batched ').split(' forced')[0]} {summary.divergence[s][label]}"
                 for label in labels if summary.divergence[s][label] != "="]
        out.append([shape, shapes.dtype_name(bits).split(" ")[0], str(s), f"{serial.aggregate:.1f}",
                    *(f"{runs[label].aggregate / serial.aggregate:.2f}x" for label in labels),
                    *(f"{runs[label].per_stream / serial.per_stream:.2f}x" for label in labels),
                    f"{serial.ttft[1]:.2f}", f"{runs['batched plain'].ttft[1]:.2f}", ", ".join(diffs) or "="])
    return out


def print_batch_table(rows: list[list[str]], ks: list[int], rate: float) -> None:
    """The batching summary as a Markdown table (a failed combination's row: shape, weights, its error)."""
    head = batch_head(ks)
    done = [r for r in rows if len(r) == len(head)]
    widths = [max([len(h)] + [len(r[i]) for r in done]) for i, h in enumerate(head)]
    print(f"\nbatching (device {mx.default_device()}, MLX {mx.__version__}; S streams arriving at once; serial: "
          "batch-1 plain decoding one stream after another; agg: all streams' tokens/s over the wall time, prefill "
          "included, vs serial's; stream: the median stream's tokens/s after its first token vs serial's; K and "
          f"auto: batched MTP rounds at forced acceptance {rate}; div: batched rows whose greedy output differs "
          "from serial plain decoding, at stream:token, = when none):")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")


def run_batching(shape: str, bits: int, bundle, name: str, args: argparse.Namespace) -> list[list[str]]:
    """The batching benchmark on a built pair: its table rows, or one row with its error."""
    print(f"\n=== {shape}, {shapes.dtype_name(bits)}: batching ===", flush=True)
    try:
        # strict=False: divergences go in the table (module docstring)
        summary = batching.benchmark(bundle, name, batching.parse_args(batch_argv(shape, bits, args)), strict=False)
    except (ValueError, RuntimeError, SystemExit, MemoryError) as e:  # reported in its row; the next runs
        print(f"error: {e}", flush=True)
        return [[shape, shapes.dtype_name(bits).split(" ")[0], f"error: {e}"]]
    return batch_rows(shape, bits, summary, args.batch_k)


def run_shape(shape: str, args: argparse.Namespace) -> tuple[list[list[str]], list[list[str]]]:
    """Both formats of one shape: the bfloat16 pair, then its quantized copies. Returns the rows of the summary
    table and of the batching table."""
    tic = time.perf_counter()
    base = random_pair(shape, bits=16, layers=args.layers, vocab=args.vocab,
                       experts=args.experts if PRESETS[shape].text.get("enable_moe_block") else None)
    built, rows, batched = time.perf_counter() - tic, [], []
    for bits in args.bits:
        print(f"\n=== {shape}, {shapes.dtype_name(bits)} ===", flush=True)
        try:
            shapes.check_shape_args(shape, bits)
            tic = time.perf_counter()
            bundle = shapes.converted(base, bits)
            build = built + time.perf_counter() - tic
            bench_args = decoding.parse_args(bench_argv(shape, bits, args))
            name = f"random {shape} pair ({shapes.dtype_name(bits)})"
            # strict=False: divergences go in the table (module docstring)
            summary = decoding.benchmark(bundle, name, bench_args, strict=False)
            rows.append(summary_row(shape, bits, build, summary, args.k))
        except (ValueError, RuntimeError, SystemExit, MemoryError) as e:  # reported in its row; the next runs
            print(f"error: {e}", flush=True)
            rows.append([shape, shapes.dtype_name(bits).split(" ")[0], f"error: {e}"])
            batched.append(rows[-1])
            bundle = None
        summary = None
        gc.collect()
        mx.clear_cache()
        if bundle is not None and not args.no_batching:
            batched += run_batching(shape, bits, bundle, name, args)
        bundle = None
        gc.collect()
        mx.clear_cache()
    return rows, batched


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m mlx_gemma_mtp.bench.gpu",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=SHAPES)
    p.add_argument("--bits", type=int, nargs="+", default=list(FORMATS), choices=shapes.BITS,
                   help="4 / 8: quantized (mixed recipe); 16: bfloat16; 32: float32 (CPU dry runs)")
    p.add_argument("--force-acceptance", type=float, default=0.8, metavar="R")
    p.add_argument("--prompts", type=int, default=1)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--k", type=int, nargs="+", default=[2, 3, 4, 6])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--layers", type=int, default=None, help="cut every shape (a dry run; default: full)")
    p.add_argument("--vocab", type=int, default=None, help="a smaller vocabulary (a dry run)")
    p.add_argument("--experts", type=int, default=None, help="26b-a4b: keep this many experts (a dry run)")
    p.add_argument("--streams", type=batching.streams_arg, default=[1, 4, 8], metavar="1,4,8",
                   help="the batching table's stream counts")
    p.add_argument("--batch-k", type=int, nargs="+", default=[2, 4], help="the batching table's fixed K (and auto)")
    p.add_argument("--no-batching", action="store_true", help="skip the batching benchmark and its table")
    args = p.parse_args(argv)
    if not set(args.k) <= set(range(1, 9)):
        p.error("--k values must be in 1..8 (the costs are measured up to K = 8)")
    if not set(args.batch_k) <= set(range(1, 9)):
        p.error("--batch-k values must be in 1..8")
    if 4 not in args.k:
        p.error("--k must include 4 (the table's T_draft(4) and the 31B profile are at K = 4)")
    if mx.default_device() == mx.cpu and args.layers is None:
        p.error("the device is the CPU: full shapes would take hours; install MLX's CUDA build (README, 'Real "
                "shapes'), or pass --layers 2 --vocab 2048 --experts 4 for a dry run")
    tic, rows, batched = time.perf_counter(), [], []
    for shape in args.shapes:
        shape_rows, shape_batched = run_shape(shape, args)
        rows += shape_rows
        batched += shape_batched
        mx.clear_cache()
    print_table(rows, args.k, args.force_acceptance)
    if not args.no_batching:
        print_batch_table(batched, args.batch_k, args.force_acceptance)
    print(f"total {time.perf_counter() - tic:.0f} s; peak memory {mx.get_peak_memory() / 1e9:.1f} GB")


if __name__ == "__main__":
    main()
