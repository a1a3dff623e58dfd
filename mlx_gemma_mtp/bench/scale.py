"""Memory and time of the README's commands at a released shape: `python -m mlx_gemma_mtp.bench.scale --shape e2b`.

Writes the preset as a released-layout bf16 checkpoint (random weights, presets.py; plus a small Gemma-4-style
tokenizer, so the text commands run) into a work folder and runs each command in its own process under a small
stdlib-only parent that reads the process's peak RSS (`getrusage(RUSAGE_CHILDREN)`; a child inherits its
parent's peak across fork: this script's own, about 0.26 GB since the package imports MLX, is below every
measured process's import baseline, so it does not raise their peaks). Prints one row per step with its bound:

- `convert -q --recipe mixed`, target + assistant: peak above the import baseline <= 1.25x the largest shard;
- `eval-quant` (the code of `convert --report`) on a few short prompts: the same bound; KL / top-1 shown;
- `load` of the 4-bit bundle: peak <= 1.2x the bundle's bytes; load time shown;
- `generate` with the drafter, 8 tokens: greedy MTP prints the same text as plain decoding (peak shown against
  the load bound);
- `train-drafter`, batch 4 x 256 tokens, unroll 4, a few steps, on the shape cut to `--train-layers` layers
  (real vocabulary and widths; float32, as bf16 matmuls are ~30x slower on MLX's CPU backend): the peak above
  holding the target and the drafter's AdamW state, in (batch, rows, vocabulary) float32 tensors, against the
  9 that the all-rows loss held at least (the target's log-probs, each step's logits and log_p - log_q).

Everything is removed afterwards unless `--keep`. Quantized matmuls are slow on MLX's CPU backend (~12 s per
E2B token on 2 cores), so the prompts are short and `eval-quant` skips its acceptance decoding.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..testing.tokenizer import write_gemma4_tokenizer

SHARD_BOUND, LOAD_BOUND = 1.25, 1.2
GB = 1e9

# Runs one command and prints its wall time and peak RSS. It imports only the standard library: the measured
# process is its child, and a child starts with its parent's peak.
_DRIVER = r"""
import json, resource, subprocess, sys, time
unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
tic = time.perf_counter()
r = subprocess.run(json.loads(sys.argv[1]), capture_output=True, text=True)
print(json.dumps({"rc": r.returncode, "seconds": time.perf_counter() - tic, "out": r.stdout, "err": r.stderr,
                  "peak": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * unit}))
"""

# The E2B/E4B chat format, for the Gemma-4-like tokenizer the script writes next to the source.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] | trim }}<turn|>\n{% endfor %}{% if add_generation_prompt %}<|turn>model\n{% endif %}"
)


@dataclass
class Run:
    seconds: float
    peak: int  # bytes
    out: str
    err: str


def measure(argv: list[str]) -> Run:
    """Run `argv` in a child of a small parent; its wall time and peak RSS. Raises if it fails."""
    r = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps(argv)], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"measuring parent failed:\n{r.stderr[-3000:]}")
    res = json.loads(r.stdout.splitlines()[-1])
    if res["rc"]:
        raise RuntimeError(f"{' '.join(argv)} exited with {res['rc']}:\n{res['err'][-3000:]}")
    return Run(res["seconds"], res["peak"], res["out"], res["err"])


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "mlx_gemma_mtp", *args]


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def _bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*.safetensors"))


@dataclass
class Row:
    step: str
    run: Run
    measured: float  # the quantity bounded (ratio to its reference size)
    bound: float | None
    rule: str  # how `measured` is defined
    note: str = ""
    ok: bool = True

    def __post_init__(self):
        self.ok = self.ok and (self.bound is None or self.measured <= self.bound)


def write_source(work: Path, shape: str, layers: int | None, vocab: int | None, name: str) -> tuple[Path, Path]:
    """The preset as a released HF checkpoint under work/name (a subprocess: presets imports MLX)."""
    argv = [sys.executable, "-m", "mlx_gemma_mtp.testing.presets", "write", "--shape", shape, "--out", str(work / name)]
    argv += ["--layers", str(layers)] if layers else []
    argv += ["--vocab", str(vocab)] if vocab else []
    subprocess.run(argv, check=True, capture_output=True, text=True)
    target, assistant = sorted(p for p in (work / name).iterdir() if p.is_dir())  # X, X-assistant
    return target, assistant


def _tail(text: str, marker: str) -> str:
    return next((line for line in reversed(text.splitlines()) if marker in line), "").strip()


def step_convert(src: Path, assistant: Path, out: Path, baseline: int) -> Row:
    largest = max(f.stat().st_size for f in [*src.glob("*.safetensors"), *assistant.glob("*.safetensors")])
    # the written checkpoint's towers are stand-ins (presets' default): the text model is what is measured here
    run = measure(cli("convert", "--hf-path", str(src), "--draft-hf-path", str(assistant), "--mlx-path", str(out),
                      "-q", "--recipe", "mixed", "--text-only"))
    return Row("convert -q --recipe mixed", run, (run.peak - baseline) / largest, SHARD_BOUND,
               f"(peak - import) / largest source shard ({largest / GB:.2f} GB)",
               f"bundle {_bytes(out) / GB:.2f} GB")


def step_eval_quant(src: Path, bundle: Path, baseline: int, largest: int, prompts: int, tokens: int) -> Row:
    run = measure(cli("eval-quant", "--model", str(bundle), "--reference", str(src), "--num-prompts",
                      str(prompts), "--prompt-tokens", str(tokens), "--max-tokens", "0"))
    report = json.loads((bundle / "quality_report.json").read_text())
    note = (f"{report['positions']} positions: mean KL {report['mean_kl']:.4f}, max KL {report['max_kl']:.4f}, "
            f"top-1 {report['top1_agreement']:.0%}")
    return Row("eval-quant (convert --report)", run, (run.peak - baseline) / largest, SHARD_BOUND,
               "(peak - import) / largest source shard", note)


def step_load(bundle: Path) -> Row:
    code = ("import time, mlx_gemma_mtp as m\ntic = time.perf_counter()\nb = m.load(%r)\n"
            "print('load', time.perf_counter() - tic, b.drafter is not None)") % str(bundle)
    run = measure(python(code))
    seconds, has_drafter = run.out.split()[1:3]
    size = _bytes(bundle)
    return Row("load (4-bit bundle)", run, run.peak / size, LOAD_BOUND, f"peak / bundle bytes ({size / GB:.2f} GB)",
               f"load() {float(seconds):.1f} s, drafter {'loaded' if has_drafter == 'True' else 'MISSING'}",
               has_drafter == "True")


def step_generate(bundle: Path, max_tokens: int, k: int) -> list[Row]:
    args = ("generate", "--model", str(bundle), "--prompt", "Hi", "--no-chat-template", "--max-tokens",
            str(max_tokens))
    plain, mtp = measure(cli(*args, "--num-draft-tokens", "0")), measure(cli(*args, "--num-draft-tokens", str(k)))
    size, same = _bytes(bundle), plain.out == mtp.out
    rows = []
    for name, run in ((f"generate {max_tokens} tokens, plain", plain), (f"generate {max_tokens} tokens, MTP K={k}",
                                                                         mtp)):
        mlx_peak = _tail(run.err, "peak memory").rsplit("peak memory:", 1)[-1].strip()
        note = f"MLX peak {mlx_peak}"
        if run is mtp:
            note += f"; output {'==' if same else '!='} plain; {_tail(run.err, 'MTP:').split(',')[0]}"
        rows.append(Row(name, run, run.peak / size, LOAD_BOUND, "peak / bundle bytes", note, same))
    return rows


def step_train(work: Path, shape: str, layers: int, vocab: int | None, seq_len: int, steps: int) -> list[Row]:
    """train-drafter on the shape cut to `layers` layers, converted to float32 (target and assistant)."""
    src, assistant = write_source(work, shape, layers, vocab, "train-src")
    target = work / "train-target"
    measure(cli("convert", "--hf-path", str(src), "--draft-hf-path", str(assistant), "--mlx-path", str(target),
                "--dtype", "float32", "--text-only"))
    config = json.loads((target / "config.json").read_text())
    V = config["text_config"]["vocab_size"]
    rng = random.Random(0)
    data = work / "train.jsonl"
    data.write_text("".join(json.dumps({"tokens": [rng.randrange(V) for _ in range(seq_len + 4)]}) + "\n"
                            for _ in range(4 * steps)))
    held = measure(python(f"import mlx_gemma_mtp as m\nm.load({str(target)!r})"))
    run = measure(cli("train-drafter", "--target", str(target), "--dataset", str(data), "--output",
                      str(work / "trained"), "--init-drafter", str(target / "drafter"), "--steps", str(steps),
                      "--batch-size", "4", "--seq-len", str(seq_len), "--unroll", "4", "--eval-every", "0",
                      "--checkpoint-every", "0", "--held-out-fraction", "0", "--warmup", "0"))
    all_rows = 4 * seq_len * V * 4  # one (batch, rows, vocabulary) float32 tensor
    state = 3 * _bytes(target / "drafter")  # float32 drafter: + gradients + AdamW's two moments
    last = _tail(run.err, "loss")
    # the all-rows loss held at least the target's (4, N, V) log-probs and, for the backward pass, each step's
    # logits and log_p - log_q (the KL's factor): 1 + 2 * unroll such tensors
    return [
        Row(f"  target ({layers} layers, float32) + drafter loaded", held, held.peak / GB, None, "peak, GB"),
        Row(f"train-drafter {steps} steps, 4 x {seq_len}, unroll 4", run, (run.peak - held.peak - state) / all_rows,
            1 + 2 * 4, f"(peak - loaded - drafter AdamW state) / one (4, {seq_len}, {V}) float32 tensor "
            f"({all_rows / GB:.2f} GB); the all-rows loss held >= 9", last.split(" lr ")[0]),
    ]


def run_scale(shape: str, work: Path, layers: int | None = None, vocab: int | None = None, max_tokens: int = 8,
              draft_tokens: int = 1, prompts: int = 2, prompt_tokens: int = 6, train_layers: int = 4,
              train_seq_len: int = 256, train_steps: int = 3) -> list[Row]:
    """Every step of the table (see the module docstring) for the preset `shape`, in `work`."""
    src, assistant = write_source(work, shape, layers, vocab, "src")
    config = json.loads((src / "config.json").read_text())
    write_gemma4_tokenizer(src, config["text_config"]["vocab_size"], CHAT_TEMPLATE)
    largest = max(f.stat().st_size for f in [*src.glob("*.safetensors"), *assistant.glob("*.safetensors")])
    base = measure(python("import mlx.core as mx\nimport mlx_gemma_mtp.convert\nmx.eval(mx.zeros(1))"))
    bundle = work / "bundle-4bit"
    rows = [Row("import mlx_gemma_mtp.convert", base, base.peak / GB, None, "peak, GB")]
    rows.append(step_convert(src, assistant, bundle, base.peak))
    rows.append(step_eval_quant(src, bundle, base.peak, largest, prompts, prompt_tokens))
    shutil.rmtree(src.parent)  # the bf16 source is not needed any more: free the disk
    rows.append(step_load(bundle))
    rows += step_generate(bundle, max_tokens, draft_tokens)
    shutil.rmtree(bundle)
    rows += step_train(work, shape, train_layers, vocab, train_seq_len, train_steps)
    return rows


def format_table(rows: list[Row]) -> str:
    """A Markdown table: step, wall time, peak RSS, measured / bound, pass, what is measured, notes."""
    lines = ["| step | time | peak RSS | measured | bound | ok | measured as | notes |",
             "|---|---:|---:|---:|---:|---|---|---|"]
    for r in rows:
        bound = "" if r.bound is None else f"<= {r.bound:.2f}"
        ok = ("pass" if r.ok else "FAIL") if r.bound is not None or not r.ok else ""
        lines.append(f"| {r.step} | {r.run.seconds:.1f} s | {r.run.peak / GB:.2f} GB | {r.measured:.2f} | {bound} "
                     f"| {ok} | {r.rule} | {r.note} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mlx_gemma_mtp.bench.scale", description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="e2b", help="a preset of presets.py (e2b, e4b, 26b-a4b, 31b)")
    p.add_argument("--work", default=None, help="parent of the work folder (default: the system's temp folder)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--layers", type=int, default=None, help="cut the target to this many layers (tests)")
    p.add_argument("--vocab", type=int, default=None, help="a smaller vocabulary (tests)")
    p.add_argument("--max-tokens", type=int, default=8, help="tokens generated, plain and with MTP")
    p.add_argument("--draft-tokens", type=int, default=1, help="draft length K of the MTP generation")
    p.add_argument("--prompts", type=int, default=2, help="eval-quant prompts")
    p.add_argument("--prompt-tokens", type=int, default=6, help="eval-quant tokens per prompt")
    p.add_argument("--train-layers", type=int, default=4, help="target layers of the train-drafter step")
    p.add_argument("--train-seq-len", type=int, default=256)
    p.add_argument("--train-steps", type=int, default=3)
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix=f"scale-{args.shape}-", dir=args.work))
    try:
        rows = run_scale(args.shape, work, args.layers, args.vocab, args.max_tokens, args.draft_tokens, args.prompts,
                         args.prompt_tokens, args.train_layers, args.train_seq_len, args.train_steps)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"python -m mlx_gemma_mtp.bench.scale {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(format_table(rows))
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
