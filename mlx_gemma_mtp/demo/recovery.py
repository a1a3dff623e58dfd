"""Fine-tune recovery experiment: does re-distilling the drafter win back what a fine-tune of the target lost?

    python -m mlx_gemma_mtp.demo.recovery --work /tmp/recovery

1. Fine-tune a copy of the demo target on a different corpus (the standard library's *test* suites, which the
   demo never saw), seeded.
2. Measure greedy MTP acceptance of the original demo drafter with the fine-tuned target on held-out test files.
3. Re-distill the drafter for the fine-tuned target with `train-drafter` (starting from the original drafter).
4. Measure again, and print the before/after table (plus the original pair on the same prompts for reference).
"""

from __future__ import annotations

import argparse
import shutil
import sysconfig
from pathlib import Path

import mlx.core as mx
import numpy as np

from .. import load, stream_generate
from ..speculative import DraftStats
from ..tuner.train_drafter import DrafterTrainConfig, train_drafter
from . import demo_dtype, demo_path
from .make import TARGET_FILES, batches, write_target


def test_files() -> tuple[list[Path], list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"]) / "test"
    files = sorted(p for p in root.glob("test_*.py"))
    return [f for i, f in enumerate(files) if i % 10], [f for i, f in enumerate(files) if i % 10 == 0]


def fine_tune(bundle, texts: list[str], steps: int, seed: int, out: Path) -> None:
    """Continue training the demo target on `texts`; write it (with the demo tokenizer) to `out`."""
    import mlx.nn as nn
    import mlx.optimizers as optim

    ids = []
    for text in texts:
        ids.extend(bundle.tokenizer.encode(text) + bundle.generation.eos_token_ids[:1])
    data = np.array(ids, dtype=np.int32)
    model = bundle.target
    opt = optim.AdamW(1e-3, weight_decay=0.01)
    grad_fn = nn.value_and_grad(model, lambda m, x, y: nn.losses.cross_entropy(m(x), y, reduction="mean"))
    it = batches(data, 8, 256, seed)
    for i in range(1, steps + 1):
        x, y = next(it)
        loss, grads = grad_fn(model, x, y)
        opt.update(model, optim.clip_grad_norm(grads, 1.0)[0])
        mx.eval(model.parameters(), opt.state, loss)
        print(f"\rfine-tune step {i}/{steps} loss {loss.item():.3f}", end="", flush=True)
    print()
    out.mkdir(parents=True, exist_ok=True)
    write_target(model, out)
    for name in TARGET_FILES:
        if name.startswith("tokenizer"):
            shutil.copy2(demo_path() / name, out / name)


def acceptance(bundle, prompts: list[list[int]], k: int, max_tokens: int) -> DraftStats:
    stats = DraftStats()
    for prompt in prompts:
        *_, last = stream_generate(bundle, prompt, max_tokens, num_draft_tokens=k)
        stats.merge(last.draft)
    return stats


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m mlx_gemma_mtp.demo.recovery", description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--finetune-steps", type=int, default=150)
    p.add_argument("--distill-steps", type=int, default=150)
    p.add_argument("--prompts", type=int, default=6)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    dtype = demo_dtype() or mx.float32
    train, held = test_files()
    original = load(demo_path(), dtype=dtype)
    held_texts = [f.read_text(encoding="utf-8", errors="replace") for f in held]
    prompts = [ids[256:384] for ids in map(original.tokenizer.encode, held_texts) if len(ids) > 512][: a.prompts]

    tuned_dir = a.work / "target-finetuned"
    fine_tune(load(demo_path(), dtype=mx.float32), [f.read_text(errors="replace") for f in train],
              a.finetune_steps, a.seed, tuned_dir)
    tuned = load(tuned_dir, draft=demo_path() / "drafter", dtype=dtype)
    before = acceptance(tuned, prompts, a.k, 64)

    corpus = a.work / "test-corpus.txt"
    corpus.write_text("\n".join(f.read_text(errors="replace") for f in train))
    config = DrafterTrainConfig(steps=a.distill_steps, batch_size=8, seq_len=128, learning_rate=1e-3, warmup=20,
                                unroll=a.k, eval_every=0, checkpoint_every=0, seed=a.seed)
    train_drafter(load(tuned_dir, dtype=mx.float32), corpus, a.work / "drafter-redistilled",
                  init_drafter=demo_path() / "drafter", config=config, force=True)
    redistilled = load(tuned_dir, draft=a.work / "drafter-redistilled", dtype=dtype)
    after = acceptance(redistilled, prompts, a.k, 64)
    reference = acceptance(original, prompts, a.k, 64)

    def line(name, s: DraftStats):
        per = " ".join(f"{x:.2f}" for x in s.acceptance_per_position)
        return f"{name:<44}{s.mean_accepted_length:>8.2f}{s.acceptance_rate:>9.1%}  {per}"

    print(f"\n{len(prompts)} held-out test-suite prompts, K={a.k}, greedy, 64 new tokens each")
    print(f"{'pair':<44}{'mean acc':>8}{'accept':>9}  acceptance per position")
    print(line("demo target + demo drafter (reference)", reference))
    print(line("fine-tuned target + original drafter", before))
    print(line("fine-tuned target + re-distilled drafter", after))


if __name__ == "__main__":
    main()
