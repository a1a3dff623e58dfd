"""Build the offline demo pair: a small Gemma 4-architecture target + its distilled MTP drafter.

    python -m mlx_gemma_mtp.demo.make --out mlx_gemma_mtp/demo/pair

Everything comes from a corpus every machine has offline: the Python standard library's own source. Steps (all
seeded): collect the stdlib `.py` files (every 20th file is held out for evaluation); train a byte-level BPE
tokenizer on the training files (byte-level rather than sentencepiece because sentencepiece's whitespace
normalisation destroys code indentation); train an E2B-style target (PLE, KV sharing, double-wide MLP on shared
layers, sliding + full layers with proportional RoPE); distill a drafter with the cluster head through
`mlx_gemma_mtp.tuner.train_drafter`. Run time and sizes are printed; the README quotes them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sysconfig
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from ..decode import stream_generate
from ..load import load
from ..models.config import FULL, SLIDING, ModelArgs
from ..models.gemma4_text import Model
from ..tuner.train_drafter import DrafterTrainConfig, train_drafter

SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>"]
TARGET_FILES = ("tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json",
                "model.safetensors")
EXCLUDE = ("/test", "site-packages", "idlelib", "lib2to3", "/turtledemo", "/ensurepip")


def stdlib_files() -> tuple[list[Path], list[Path]]:
    """(train, held-out) stdlib source files, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not any(x in str(p) for x in EXCLUDE))
    return [f for i, f in enumerate(files) if i % 20], [f for i, f in enumerate(files) if i % 20 == 0]


def read(files: list[Path]) -> list[str]:
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


def train_tokenizer(texts: list[str], vocab_size: int, out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.save(str(out / "tokenizer.json"))
    # no bos_token: the corpus is documents separated by <eos>, never BOS, so a raw prompt must not get one
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<eos>", "pad_token": "<pad>",
              "unk_token": "<unk>"}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def encode_corpus(out: Path, texts: list[str]) -> np.ndarray:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    eos = SPECIAL.index("<eos>")
    ids = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids + [eos])
    return np.array(ids, dtype=np.int32)


def target_args(vocab_size: int, hidden: int, layers: int) -> ModelArgs:
    types = [FULL if (i + 1) % 4 == 0 else SLIDING for i in range(layers)]
    return ModelArgs(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=1, head_dim=64, global_head_dim=128,
        sliding_window=128, layer_types=types, vocab_size_per_layer_input=vocab_size,
        hidden_size_per_layer_input=32, num_kv_shared_layers=layers // 2, use_double_wide_mlp=True,
        final_logit_softcapping=30.0,
    )


def batches(data: np.ndarray, batch: int, seq: int, seed: int):
    rng = np.random.default_rng(seed)
    while True:
        starts = rng.integers(0, len(data) - seq - 1, batch)
        chunk = np.stack([data[s : s + seq + 1] for s in starts])
        yield mx.array(chunk[:, :-1]), mx.array(chunk[:, 1:])


def train_target(args: ModelArgs, data: np.ndarray, steps: int, batch: int, seq: int, lr: float, seed: int):
    mx.random.seed(seed)
    model = Model(args)
    # PLE and embeddings start small: the embedding is scaled by sqrt(H) at the input
    model.model.embed_tokens.weight = mx.random.normal(model.model.embed_tokens.weight.shape) * 0.02
    schedule = optim.join_schedules(
        [optim.linear_schedule(1e-5, lr, 50), optim.cosine_decay(lr, max(1, steps - 50), lr * 0.05)], [50]
    )
    opt = optim.AdamW(schedule, weight_decay=0.01)

    def loss_fn(m, x, y):
        logits = m(x)
        return nn.losses.cross_entropy(logits, y, reduction="mean")

    grad_fn = nn.value_and_grad(model, loss_fn)
    state = [model.state, opt.state]

    def step(x, y):
        loss, grads = grad_fn(model, x, y)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        opt.update(model, grads)
        return loss

    step = mx.compile(step, inputs=state, outputs=state)  # fuses a tiny model's many small ops
    tic, it = time.perf_counter(), batches(data, batch, seq, seed)
    for i in range(1, steps + 1):
        x, y = next(it)
        loss = step(x, y)
        mx.eval(state, loss)
        if i % 10 == 0 or i == steps:
            rate = i * batch * seq / (time.perf_counter() - tic)
            print(f"\rtarget step {i}/{steps} loss {loss.item():.3f} ({rate:.0f} tokens/s)", end="", flush=True)
    print()
    return model


def held_out_loss(model: Model, data: np.ndarray, seq: int, n: int = 8) -> float:
    losses = []
    for i in range(n):
        chunk = mx.array(data[i * seq : i * seq + seq + 1])
        losses.append(nn.losses.cross_entropy(model(chunk[None, :-1]), chunk[None, 1:], reduction="mean").item())
    return sum(losses) / len(losses)


def write_target(model: Model, out: Path) -> None:
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(out / "model.safetensors"), {k: v.astype(mx.float16) for k, v in weights.items()})
    (out / "config.json").write_text(json.dumps(model.args.to_dict(), indent=2))
    gen = {"eos_token_id": [SPECIAL.index("<eos>")]}  # trained without BOS (see write_tokenizer)
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m mlx_gemma_mtp.demo.make", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "pair")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--steps", type=int, default=700)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--stage1-steps", type=int, default=200, help="drafter distillation on the corpus")
    p.add_argument("--drafter-steps", type=int, default=300, help="drafter distillation on target continuations")
    p.add_argument("--continuations", type=int, default=300, help="target continuations for stage 2")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true")
    p.add_argument("--target-from", type=Path, default=None,
                   help="skip tokenizer and target training: copy them from an earlier output folder")
    a = p.parse_args(argv)
    if a.out.exists() and not a.force:
        raise SystemExit(f"error: {a.out} exists; pass --force to rebuild the demo pair")
    tmp = a.out.with_name(a.out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tic = time.perf_counter()
    train_files, held_files = stdlib_files()
    if a.target_from:  # reuse a target (and tokenizer) trained by an earlier run of this script
        for name in TARGET_FILES:
            shutil.copy2(a.target_from / name, tmp / name)
    else:
        train_texts = read(train_files)
        train_tokenizer(train_texts, a.vocab_size, tmp)
        data, held = encode_corpus(tmp, train_texts), encode_corpus(tmp, read(held_files))
        print(f"corpus: {len(train_files)} train files ({len(data)} tokens), {len(held_files)} held out ({len(held)})")
        args = target_args(a.vocab_size, a.hidden, a.layers)
        model = train_target(args, data, a.steps, a.batch, a.seq, a.lr, a.seed)
        print(f"target held-out loss {held_out_loss(model, held, a.seq):.3f} nats/token")
        write_target(model, tmp)
    root = Path(sysconfig.get_paths()["stdlib"])
    (tmp / "held_out.txt").write_text("\n".join(str(f.relative_to(root)) for f in held_files))
    distill(tmp, train_files, a)
    if a.out.exists():
        shutil.rmtree(a.out)
    tmp.rename(a.out)
    size = sum(f.stat().st_size for f in a.out.rglob("*") if f.is_file()) / 1e6
    print(f"demo pair written to {a.out} ({size:.1f} MB) in {(time.perf_counter() - tic) / 60:.1f} min")


def drafter_config(a, steps: int, learning_rate: float) -> DrafterTrainConfig:
    return DrafterTrainConfig(
        steps=steps, batch_size=8, seq_len=128, learning_rate=learning_rate, warmup=50, unroll=4,
        hidden_size=128, intermediate_size=512, num_attention_heads=4, ordered_embeddings=True,
        num_centroids=64, centroid_top_k=8, eval_every=max(1, steps // 4), checkpoint_every=0, seed=a.seed,
    )


def distill(out: Path, train_files: list[Path], a) -> None:
    """Distill a 4-layer drafter with the cluster head (train_drafter) into out/drafter, in two stages: on the
    stdlib corpus, then on the target's own greedy continuations (what greedy decoding shows the drafter: a weak
    target's continuations differ a lot from human code, and later draft steps learn from the inputs they see)."""
    corpus = out.parent / (out.name + "-corpus.txt")
    corpus.write_text("\n".join(read(train_files)))
    own = out.parent / (out.name + "-continuations.jsonl")
    stage1 = out / "drafter-stage1"
    try:
        train_drafter(load(out, dtype=mx.float32), corpus, stage1, config=drafter_config(a, a.stage1_steps, 2e-3))
        bundle = load(out, draft=stage1, dtype=mx.float32)
        write_continuations(bundle, encode_corpus(out, read(train_files)), own, a.continuations, a.seed)
        train_drafter(bundle, own, out / "drafter", init_drafter=stage1,
                      config=drafter_config(a, a.drafter_steps, 1e-3))
    finally:
        for f in (corpus, own):
            f.unlink(missing_ok=True)
        for d in (stage1, out / "drafter-stage1.checkpoints", out / "drafter.checkpoints"):
            shutil.rmtree(d, ignore_errors=True)


def write_continuations(bundle, data: np.ndarray, path: Path, count: int, seed: int) -> None:
    """`count` greedy continuations (128 tokens) of random 64-token corpus windows, as pre-tokenized JSONL.

    Generated with MTP (its output is exactly the target's greedy output, only faster)."""
    rng = np.random.default_rng(seed + 1)
    with open(path, "w") as f:
        for i, start in enumerate(rng.integers(0, len(data) - 64, count)):
            prompt = data[start : start + 64].tolist()
            new = [r.token for r in stream_generate(bundle, prompt, 128, num_draft_tokens=4)]
            f.write(json.dumps({"tokens": prompt + new}) + "\n")
            print(f"\rcontinuations {i + 1}/{count}", end="", flush=True)
    print()


if __name__ == "__main__":
    main()
