"""Image prompts, side by side in one run: `python -m mlx_gemma_mtp.bench.multimodal`.

For one chat prompt with one image (a generated test image unless `--image` names one) it measures time to first
token (TTFT: image decoding and processing, the vision tower and the prefill, from the call to the first token)
and tokens/s on the answer (tokens after the first over the seconds after the first, as `bench` counts them) of:

- ours: plain decoding, MTP at each `--k` and "auto" (with `--force-acceptance R`: the target's own greedy
  continuation replaces each draft with probability R, the drafter still running: random weights accept
  nothing), each row a whole request through `stream_generate`;
- with `--mlx-vlm`: mlx-vlm's Gemma 4 model on the same weights (text model and vision tower exported to its
  layout, `bench/mlx_vlm.py` and `bench/mlx_vlm_image.py`), fed the same prompt ids and the same image bytes
  through its own `Gemma4ImageProcessor` and its `generate_step`, plainly and through its MTP path
  (`draft_kind="mtp"`, the drafter's `block_size` set to K + 1 so that it drafts K tokens every round; forced
  alike when forcing, by wrapping its drafter's `draft_block`). If its image path cannot run here the run says
  why and goes on alone.

Each row runs once to warm up, then `--repeats` times (the rows take turns in every repetition); TTFT and tokens/s
are the medians. `--soft-tokens 70 280` measures TTFT at several image budgets (HF's `max_soft_tokens`): the
first budget gets every row, the others a plain request of one token per implementation; `--ttft-only` gives
every budget only those (each warmed up with a request at the smallest budget, 70: at 280 soft tokens a CPU
request takes about a minute). Greedy MTP output must equal plain decoding's: the run stops with an error where
it does not (`--report-divergence` prints the first differing token instead, for GPUs whose multi-row kernels
may flip a near-tie). mlx-vlm's outputs are compared, not required to match.

Without `--model`, a random pair of a released shape (`--shape`, default e2b cut to `--layers 4`) is written with
its real towers (`presets.write_hf_checkpoint(towers=True)`: E2B's vision tower is 768-d x 16 layers, 16-pixel
patches pooled 3 x 3) and loaded in float32 (MLX's CPU bfloat16 matmuls are slow). `--tower-memory` prints the
towers' parameters and bf16 bytes at every released size and exits.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from .. import load, stream_generate
from ..decode import encode_prompt
from ..load import Bundle
from ..media.image import SUPPORTED_SOFT_TOKENS
from ..sampling import SamplerConfig
from ..testing.presets import PRESETS, preset_config, tower_parameters, write_hf_checkpoint
from .decoding import forced_proposer
from .mlx_vlm_image import MlxVlmImagePair, Run, mlx_vlm_blocker

PROMPT = "Describe this image in detail."
LABEL = 26  # width of the table's first column


# --- the image and the prompt -------------------------------------------------------------------------------


def sample_image(width: int = 640, height: int = 480, seed: int = 0) -> bytes:
    """A PNG with smooth gradients, a few discs and some noise (what a photo's pixels roughly look like)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    pixels = np.stack([0.5 + 0.4 * np.sin(6 * x + 1), 0.5 + 0.4 * np.cos(5 * y), 0.3 + 0.5 * x * y], axis=-1)
    for _ in range(6):
        cx, cy, r = rng.uniform(0, width / max(width, height)), rng.uniform(0, height / max(width, height)), \
            rng.uniform(0.03, 0.15)
        pixels[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.uniform(0, 1, 3)
    pixels = np.clip(pixels + rng.normal(0, 0.03, pixels.shape), 0, 1)
    buffer = io.BytesIO()
    Image.fromarray((pixels * 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def chat(image: bytes) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": PROMPT}]}]


@contextlib.contextmanager
def soft_tokens(bundle: Bundle, budget: int):
    """The bundle's image processor with HF's `max_soft_tokens` set to `budget` for the block."""
    saved = bundle.media.image_processor
    bundle.media.image_processor = dataclasses.replace(saved, max_soft_tokens=budget)
    try:
        yield
    finally:
        bundle.media.image_processor = saved


# --- timed runs ---------------------------------------------------------------------------------------------


@dataclass
class Row:
    """A table row: `measure()` runs one request; its runs are kept for the medians."""

    impl: str  # "ours" or "mlx-vlm"
    label: str
    k: int | str  # 0 = plain
    budget: int
    measure: Callable[[], Run]
    warm: Callable[[], object] | None = None  # the warm-up (default: `measure`)
    runs: list[Run] = field(default_factory=list)

    @property
    def ttft(self) -> float:
        return statistics.median(r.ttft for r in self.runs)

    @property
    def tps(self) -> float:
        return statistics.median(r.tps for r in self.runs)

    @property
    def timed_answer(self) -> bool:
        return len(self.runs[0].tokens) > 1


def our_run(bundle: Bundle, image: bytes, budget: int, max_tokens: int, k, proposer=None) -> Run:
    """One request through `stream_generate`, timed from the call (the image is decoded and processed inside)."""
    tokens, ttft, last = [], None, None
    with soft_tokens(bundle, budget):
        tic = time.perf_counter()
        for last in stream_generate(bundle, chat(image), max_tokens, SamplerConfig(), k, proposer=proposer):
            ttft = ttft if ttft is not None else time.perf_counter() - tic
            tokens.append(last.token)
    return Run(ttft, last.generation_tps, tokens, last.draft)


def first_divergence(out: list[int], ref: list[int]) -> int | None:
    """Index of the first token where `out` differs from `ref` (over `ref`'s length), or None."""
    if out[: len(ref)] == ref:
        return None
    return next((i for i, (a, b) in enumerate(zip(out, ref)) if a != b), min(len(out), len(ref)))


# --- the pair -----------------------------------------------------------------------------------------------


def load_pair(args) -> tuple[Bundle, str]:
    """The bundle to benchmark, towers loaded, and a line naming it."""
    if args.model:
        bundle = load(args.model, draft=args.draft, dtype=mx.float32 if args.float32 else None)
        name = args.model
    else:
        with tempfile.TemporaryDirectory(prefix="mm_bench_pair_") as tmp:
            target, drafter = write_hf_checkpoint(args.shape, tmp, layers=args.layers, vocab=args.vocab,
                                                  towers=True)
            bundle = load(target, draft=drafter, dtype=mx.float32)
            bundle.media.towers  # noqa: B018 (loads them while the folder exists)
        v = bundle.config["vision_config"]
        cut = f", {args.layers} layers" if args.layers else ""
        name = (f"random {args.shape} pair (float32{cut}; V = {bundle.target.args.vocab_size}) with its "
                f"vision tower ({v['hidden_size']} x {v['num_hidden_layers']} layers, patch {v['patch_size']}, "
                f"pooling {v['pooling_kernel_size']})")
    if bundle.media is None:
        raise SystemExit(f"error: {name} takes no images (its config.json has no vision_config)")
    if bundle.drafter is None:
        raise SystemExit("error: the benchmark needs a drafter (--draft, or a bundle with drafter/)")
    bundle.media.towers  # noqa: B018 (loaded before anything is timed)
    return bundle, name


# --- the run ------------------------------------------------------------------------------------------------


@dataclass
class Result:
    """What a run measured: its rows, the prompt ids per budget, the reference outputs, and mlx-vlm's status."""

    rows: list[Row]
    prompt_tokens: dict[int, int]
    soft_tokens: dict[int, int]
    reference: list[int]
    mlx_vlm: str  # its version and what ran, or why it did not


def check_exact(rows: list[Row], reference: list[int], strict: bool) -> dict[str, int | None]:
    """Each of our MTP rows' first divergence from plain greedy decoding over all its runs (None: identical);
    stops the run at the first one when `strict`."""
    found = {}
    for row in rows:
        if row.impl != "ours" or row.k == 0 or not row.timed_answer:
            continue
        found[row.label] = next((d for r in row.runs if (d := first_divergence(r.tokens, reference)) is not None),
                                None)
        if strict and found[row.label] is not None:
            raise SystemExit(f"error: {row.label} output differs from plain greedy decoding at token "
                             f"{found[row.label]} of the answer (an exactness bug): MTP must give the target's "
                             "own tokens")
    return found


WARM_BUDGET = SUPPORTED_SOFT_TOKENS[0]  # TTFT-only rows warm up with an image of the smallest budget


def benchmark(bundle: Bundle, name: str, args) -> Result:
    image = Path(args.image).read_bytes() if args.image else sample_image(*args.image_size)
    budgets, main = args.soft_tokens, args.soft_tokens[0]
    if not args.model:
        bundle.generation.eos_token_ids = []  # random weights: answers of --max-tokens (the tokenizer's <eos> stops)
    encoded = {}
    for b in {*budgets, WARM_BUDGET}:
        with soft_tokens(bundle, b):
            encoded[b] = encode_prompt(bundle, chat(image))
    rate = args.force_acceptance
    forced = " forced" if rate is not None else ""
    rows, reference, n = [], [], 1
    if not args.ttft_only:
        plain = our_run(bundle, image, main, args.max_tokens, 0)  # the reference answer (and plain's warm-up)
        reference, n = plain.tokens, len(plain.tokens)
        full = encoded[main].ids + reference

        def proposer():
            return forced_proposer(bundle, full, rate) if rate is not None else None

        rows.append(Row("ours", "ours plain", 0, main, lambda: our_run(bundle, image, main, n, 0), lambda: None))
        for k in [*args.k, "auto"]:
            rows.append(Row("ours", f"ours K={k}{forced}", k, main,
                            lambda k=k: our_run(bundle, image, main, n, k, proposer()),
                            lambda k=k: our_run(bundle, image, main, min(8, n), k, proposer())))
    for b in budgets if args.ttft_only else budgets[1:]:
        rows.append(Row("ours", "ours plain", 0, b, lambda b=b: our_run(bundle, image, b, 1, 0),
                        lambda: our_run(bundle, image, WARM_BUDGET, 1, 0)))

    theirs_line = mlx_vlm_rows(bundle, args, image, encoded, n, rows, rate)
    for row in rows:  # warm-up: compiles, first allocations, auto's first rounds
        (row.warm or row.measure)()
    for _ in range(args.repeats):
        for row in rows:
            row.runs.append(row.measure())
    found = check_exact(rows, reference, not args.report_divergence)
    result = Result(rows, {b: len(e.ids) for b, e in encoded.items()},
                    {b: e.spans[0].length for b, e in encoded.items()}, reference, theirs_line)
    print_table(result, name, args, found)
    return result


def mlx_vlm_rows(bundle: Bundle, args, image: bytes, encoded: dict, n: int, rows: list[Row], rate):
    """Append mlx-vlm's rows (its plain decoding is run once here: the reference its forced drafts follow);
    returns the line saying what ran, or why it did not."""
    if not args.mlx_vlm:
        return "mlx-vlm: not compared (pass --mlx-vlm)"
    from . import mlx_vlm

    if why := mlx_vlm_blocker(bundle):
        print(f"{why}: its rows are skipped, ours run alone", file=sys.stderr)
        return why + "; ours ran alone"
    version, main = mlx_vlm.version(), args.soft_tokens[0]
    try:
        pair = MlxVlmImagePair(bundle, max(args.k))
        first = WARM_BUDGET if args.ttft_only else main  # the first request: also a check that it runs
        plain = pair.run(image, encoded[first], first, n, 0)
    except ImportError as e:  # a dependency of its image path that only shows when it runs
        why = f"mlx-vlm {version}: its image path failed: {e!r} (missing module {getattr(e, 'name', None)!r})"
        print(f"{why}: its rows are skipped, ours run alone", file=sys.stderr)
        return why + "; ours ran alone"
    line = (f"mlx-vlm {version}: its gemma4 model (text model + vision tower) and MTP drafter on the same weights,"
            " the same prompt ids and image bytes, its Gemma4ImageProcessor and generate_step")
    if pair.last_count != encoded[first].spans[0].length:
        line += f" (NOTE: its processor made {pair.last_count} soft tokens, ours {encoded[first].spans[0].length})"
    if not args.ttft_only:
        forced = " forced" if rate is not None else ""
        reference = pair.last_ids + plain.tokens  # its own greedy continuation, as ours follows our plain output

        def mtp(k, tokens):
            pair.force(reference, rate)
            try:
                return pair.run(image, encoded[main], main, tokens, k)
            finally:
                pair.force(None, None)

        rows.append(Row("mlx-vlm", "mlx-vlm plain", 0, main, lambda: pair.run(image, encoded[main], main, n, 0),
                        lambda: None))  # warmed up above
        for k in args.k:
            rows.append(Row("mlx-vlm", f"mlx-vlm K={k}{forced}", k, main, lambda k=k: mtp(k, n),
                            lambda k=k: mtp(k, min(8, n))))
    for b in args.soft_tokens if args.ttft_only else args.soft_tokens[1:]:
        rows.append(Row("mlx-vlm", "mlx-vlm plain", 0, b, lambda b=b: pair.run(image, encoded[b], b, 1, 0),
                        lambda: pair.run(image, encoded[WARM_BUDGET], WARM_BUDGET, 1, 0)))
    return line


# --- output -------------------------------------------------------------------------------------------------


def output_note(row: Row, rows: list[Row], reference: list[int], found: dict) -> str:
    if not row.timed_answer:
        return ""
    if row.impl == "ours":
        if row.k == 0:
            return "(reference)"
        return "= plain" if found.get(row.label) is None else f"DIFFERS from plain at {found[row.label]}"
    ours = first_divergence(row.runs[0].tokens, reference)
    if row.k == 0:
        return "= ours" if ours is None else f"differs from ours at {ours}"
    plain = next(r for r in rows if r.impl == "mlx-vlm" and r.k == 0 and r.timed_answer)
    own = first_divergence(row.runs[0].tokens, plain.runs[0].tokens)
    return "= its plain" if own is None else f"differs from its plain at {own}"


def table_rows(result: Result, found: dict) -> list[dict]:
    """Every row as a dict (the `--json` rows)."""
    out = []
    for row in result.rows:
        plain = next(r for r in result.rows if r.impl == row.impl and r.k == 0 and r.budget == row.budget)
        stats = row.runs[0].stats
        out.append({
            "impl": row.impl, "mode": row.label, "k": row.k, "soft_tokens": result.soft_tokens[row.budget],
            "max_soft_tokens": row.budget, "prompt_tokens": result.prompt_tokens[row.budget],
            "ttft_s": row.ttft, "ttft_s_runs": [r.ttft for r in row.runs],
            "tokens_per_s": row.tps if row.timed_answer else None,
            "tokens_per_s_runs": [r.tps for r in row.runs] if row.timed_answer else None,
            "vs_plain": row.tps / plain.tps if row.timed_answer else None,
            "mean_accepted": stats.mean_accepted_length if stats and stats.rounds else None,
            "answer_tokens": len(row.runs[0].tokens),
            "output": output_note(row, result.rows, result.reference, found),
        })
    return out


def ratios(result: Result) -> list[tuple[str, float]]:
    """(what, ours / mlx-vlm) for TTFT (as a speedup: theirs / ours) and tokens/s of matching rows."""
    out = []
    theirs = {(r.label.removeprefix("mlx-vlm "), r.budget): r for r in result.rows if r.impl == "mlx-vlm"}
    for row in result.rows:
        other = theirs.get((row.label.removeprefix("ours "), row.budget))
        if row.impl != "ours" or other is None:
            continue
        soft = result.soft_tokens[row.budget]
        if row.k == 0:
            out.append((f"TTFT, {soft} soft tokens (mlx-vlm's time / ours)", other.ttft / row.ttft))
        if row.timed_answer:
            out.append((f"tokens/s, {row.label.removeprefix('ours ')} (ours / mlx-vlm)", row.tps / other.tps))
    return out


def print_table(result: Result, name: str, args, found: dict) -> None:
    main = args.soft_tokens[0]
    forced = f"forced acceptance {args.force_acceptance}" if args.force_acceptance is not None else "unforced"
    image = args.image or "generated {}x{} PNG".format(*args.image_size)
    answer = ("TTFT only (plain requests of one token)" if args.ttft_only else
              f"{len(result.reference)} new tokens, greedy, {forced}")
    print(f"model: {name}")
    print(f"image: {image}; prompt: the image + "
          f"{PROMPT!r}; {result.prompt_tokens[main]} prompt tokens ({result.soft_tokens[main]} soft tokens at "
          f"max_soft_tokens {main}) | {answer} | device "
          f"{mx.default_device()} | median of {args.repeats} runs after a warm-up")
    print(f"\n{'mode':<{LABEL}}{'soft':>6}{'TTFT s':>9}{'tok/s':>9}{'vs plain':>10}{'mean acc':>10}  output")
    for r in table_rows(result, found):
        tps = f"{r['tokens_per_s']:.2f}" if r["tokens_per_s"] is not None else "-"
        vs = f"{r['vs_plain']:.2f}" if r["vs_plain"] is not None else ""
        acc = f"{r['mean_accepted']:.2f}" if r["mean_accepted"] is not None else ""
        print(f"{r['mode']:<{LABEL}}{r['soft_tokens']:>6}{r['ttft_s']:>9.2f}{tps:>9}{vs:>10}{acc:>10}  "
              f"{r['output']}".rstrip())
    ours = [label for label in found if found[label] is None]
    if ours and len(ours) == len(found):
        print("\nall our MTP outputs are identical to plain greedy decoding (checked in every run)")
    elif found:
        print("\nDIFFER from plain greedy decoding: " + ", ".join(f"{k} at {v}" for k, v in found.items()
                                                                 if v is not None))
    print(f"\n{result.mlx_vlm}")
    for what, ratio in ratios(result):
        print(f"  {what}: {ratio:.2f}x")


def tower_memory() -> list[dict]:
    """Parameters and bf16 bytes of each released checkpoint's towers and embedders, from the module shapes."""
    out = []
    for shape in PRESETS:
        config = preset_config(shape)[0]
        counts = tower_parameters(config, config["text_config"]["hidden_size"])
        v = config["vision_config"]
        out.append({"shape": shape, "vision": f"{v['hidden_size']} x {v['num_hidden_layers']}",
                    "audio": config.get("audio_config") is not None, **counts,
                    "total": sum(counts.values()), "bf16_bytes": 2 * sum(counts.values())})
    return out


def print_tower_memory(rows: list[dict]) -> None:
    print("parameters from the released module shapes (lazily built Towers: nothing allocated); bf16 bytes = 2 x "
          "parameters; GB = 10^9 bytes")
    print(f"{'shape':<9}{'vision':>10}{'vision_tower':>14}{'embed_vision':>14}{'audio_tower':>13}"
          f"{'embed_audio':>13}{'vision GB':>11}{'audio GB':>10}{'total GB':>10}")
    for r in rows:
        cells = [f"{r[k] / 1e6:.1f}M" if r.get(k) else "-" for k in
                 ("vision_tower", "embed_vision", "audio_tower", "embed_audio")]
        vision = 2 * (r["vision_tower"] + r["embed_vision"]) / 1e9
        audio = 2 * (r.get("audio_tower", 0) + r.get("embed_audio", 0)) / 1e9
        print(f"{r['shape']:<9}{r['vision']:>10}" + "".join(f"{c:>{w}}" for c, w in zip(cells, (14, 14, 13, 13)))
              + f"{vision:>11.3f}{f'{audio:.3f}' if audio else '-':>10}{r['bf16_bytes'] / 1e9:>10.3f}")


def versions() -> dict:
    import importlib.metadata

    def version(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {"mlx": mx.__version__, "mlx-vlm": version("mlx-vlm"), "mlx-lm": version("mlx-lm"),
            "python": platform.python_version(), "machine": f"{platform.system()} {platform.machine()}",
            "device": str(mx.default_device())}


# --- command line -------------------------------------------------------------------------------------------


def size_arg(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give WIDTHxHEIGHT, e.g. 640x480") from None
    if w < 1 or h < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: sides must be positive")
    return w, h


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mlx_gemma_mtp.bench.multimodal",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a multimodal target (or bundle) folder / hub id")
    p.add_argument("--draft", default=None)
    p.add_argument("--float32", action="store_true", help="--model: cast the weights to float32")
    p.add_argument("--shape", default="e2b", choices=tuple(PRESETS),
                   help="without --model: a random pair of this released shape with real towers (default e2b)")
    p.add_argument("--layers", type=int, default=4, help="--shape: keep this many target layers (default 4)")
    p.add_argument("--vocab", type=int, default=None, help="--shape: a smaller vocabulary")
    p.add_argument("--image", default=None, help="an image file (default: a generated test image)")
    p.add_argument("--image-size", type=size_arg, default=(640, 480), metavar="WxH",
                   help="size of the generated image (default 640x480)")
    p.add_argument("--soft-tokens", type=int, nargs="+", default=[70], metavar="N",
                   help=f"image budgets (max_soft_tokens, of {SUPPORTED_SOFT_TOKENS}); the first gets every row, "
                        "the others TTFT only (default 70)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--k", type=int, nargs="+", default=[3], help="fixed draft lengths (default 3)")
    p.add_argument("--force-acceptance", type=float, default=None, metavar="R")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per row after the warm-up (median)")
    p.add_argument("--ttft-only", action="store_true",
                   help="only time to first token at each --soft-tokens budget (plain requests of one token)")
    p.add_argument("--mlx-vlm", action="store_true", help="also run mlx-vlm's image + MTP path on the same weights")
    p.add_argument("--report-divergence", action="store_true",
                   help="print where greedy MTP differs from plain decoding instead of stopping (GPUs)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON ('-': stdout)")
    p.add_argument("--tower-memory", action="store_true",
                   help="print the towers' parameters and bf16 bytes at every released size and exit")
    args = p.parse_args(argv)
    if bad := [b for b in args.soft_tokens if b not in SUPPORTED_SOFT_TOKENS]:
        p.error(f"--soft-tokens {bad[0]}: choose from {SUPPORTED_SOFT_TOKENS}")
    if args.repeats < 1 or args.max_tokens < 2 or min(args.k) < 1:
        p.error("--repeats must be >= 1, --max-tokens >= 2 and every --k >= 1")
    if args.force_acceptance is not None and not 0.0 <= args.force_acceptance <= 1.0:
        p.error("--force-acceptance must be in [0, 1]")
    if args.draft and not args.model:
        p.error("--draft needs --model")
    return args


def main(argv: list[str] | None = None) -> Result | None:
    args = parse_args(argv)
    if args.tower_memory:
        rows = tower_memory()
        print_tower_memory(rows)
        if args.json:
            write_json(args.json, {"tower_memory": rows, "versions": versions()})
        return None
    bundle, name = load_pair(args)
    result = benchmark(bundle, name, args)
    if args.json:
        found = check_exact(result.rows, result.reference, strict=False)
        write_json(args.json, {"command": "python -m mlx_gemma_mtp.bench.multimodal " + " ".join(
            argv if argv is not None else sys.argv[1:]), "model": name, "versions": versions(),
            "repeats": args.repeats, "force_acceptance": args.force_acceptance, "mlx_vlm": result.mlx_vlm,
            "rows": table_rows(result, found), "ratios": dict(ratios(result)), "answer": result.reference})
    return result


def write_json(target: str, value: dict) -> None:
    text = json.dumps(value, indent=2)
    if target == "-":
        print(text)
    else:
        Path(target).write_text(text + "\n")


if __name__ == "__main__":
    main()
