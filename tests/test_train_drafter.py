"""Drafter distillation on a tiny random target: teacher forcing equals decoding, training raises acceptance, the
output loads and decodes exactly, resume is exact, and bad inputs give clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import write_tokenizer
from mlx.utils import tree_flatten
from test_speculative import VOCAB, bundle, make_drafter, make_target, tokens

import mlx_gemma_mtp.tuner.distill_loss as dl
import mlx_gemma_mtp.tuner.train_drafter as td
from mlx_gemma_mtp import load
from mlx_gemma_mtp.cli import main
from mlx_gemma_mtp.drafting import visible_kv
from mlx_gemma_mtp.load import load_tokenizer
from mlx_gemma_mtp.models.config import FULL, SLIDING
from mlx_gemma_mtp.speculative import DRAFT_POSITION_OFFSET
from mlx_gemma_mtp.tuner.distill_data import chunk, load_sequences
from mlx_gemma_mtp.tuner.drafter_init import balanced_clusters, write_drafter
from mlx_gemma_mtp.tuner.train_drafter import DrafterTrainConfig, train_drafter

SEQ_LEN, UNROLL = 24, 3
CFG = DrafterTrainConfig(
    steps=40, batch_size=8, seq_len=SEQ_LEN, unroll=UNROLL, learning_rate=3e-3, warmup=5, hidden_size=32,
    intermediate_size=64, num_attention_heads=2, eval_every=40, eval_prompts=4, eval_tokens=24, checkpoint_every=0,
    held_out_fraction=0.1, num_centroids=8, centroid_top_k=2,
)


def save_target(model, path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(model.args.to_dict()))
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def target():
    return make_target(seed=0)


@pytest.fixture(scope="module")
def target_folder(target, tmp_path_factory):
    return save_target(target, tmp_path_factory.mktemp("train") / "target")


@pytest.fixture(scope="module")
def dataset(target, target_folder):
    """Pre-tokenized sequences sampled from the target itself at T=1: the drafter's task is learnable."""
    mx.random.seed(0)
    x = mx.random.randint(0, VOCAB, (96, 1))
    for _ in range(SEQ_LEN + UNROLL - 1):
        x = mx.concatenate([x, mx.random.categorical(target(x)[:, -1])[:, None]], axis=1)
    return write_jsonl(target_folder.parent / "data.jsonl", [{"tokens": r} for r in np.array(x).tolist()])


@pytest.fixture(scope="module")
def trained(target, dataset, target_folder):
    out = target_folder.parent / "drafter"
    return train_drafter(bundle(target), dataset, out, config=CFG)


def test_teacher_forced_rows_equal_decoding_draft_steps(target):
    """Row p of the all-positions training pass == the drafter as decoding calls it at hidden position p."""
    drafter = make_drafter(target, seed=2, ordered=True)
    x = mx.random.randint(0, VOCAB, (2, 20), key=mx.random.key(1))
    rows, W = 16, target.args.sliding_window
    teacher = td.teach(target, x, rows)
    ys = td.unrolled_states(drafter, teacher, 4)
    for p in (0, 2, W, rows - 1):
        prefix = {t: (k[..., : p + 1, :], v[..., : p + 1, :]) for t, (k, v) in teacher.shared_kv.items()}
        kv, hidden = visible_kv(prefix, 0, W), teacher.hidden[:, p : p + 1]
        for j in range(1, 5):
            token = x[:, p + j : p + j + 1]
            hidden, y = drafter(target.model.embed(token), hidden, kv, p + DRAFT_POSITION_OFFSET)
            np.testing.assert_allclose(np.array(y[:, 0]), np.array(ys[j - 1][:, p]), atol=2e-5, rtol=1e-4)


def test_training_lowers_loss_and_raises_acceptance(trained):
    first, last = np.mean(trained.losses[:5]), np.mean(trained.losses[-5:])
    assert last < 0.7 * first, trained.losses
    assert len(trained.step_losses[-1]) == UNROLL
    before, after = trained.evals[0], trained.evals[-1]
    assert (before.step, after.step) == (0, CFG.steps)
    assert after.mean_accepted_length > before.mean_accepted_length + 0.4, (before, after)
    assert min(after.top1_per_step) > 0.25 and max(before.top1_per_step) < 0.1
    assert all(a < b for a, b in zip(after.loss_per_step, before.loss_per_step))


def test_output_loads_and_decodes_exactly(trained, target_folder):
    config = json.loads((trained.output / "config.json").read_text())
    assert config["model_type"] == "gemma4_assistant" and config["backbone_hidden_size"] == 32
    text = config["text_config"]
    assert text["layer_types"] == [SLIDING, SLIDING, SLIDING, FULL] and text["num_kv_shared_layers"] == 4
    assert (text["head_dim"], text["global_head_dim"], text["sliding_window"]) == (8, 16, 6)
    b = load(target_folder, draft=trained.output)
    prompt = [3, 14, 15, 9, 26, 5, 35]
    plain = tokens(b, prompt, max_tokens=30, num_draft_tokens=0)
    rs = list(td.stream_generate(b, prompt, max_tokens=30, num_draft_tokens=UNROLL))
    assert [r.token for r in rs] == plain
    assert rs[-1].draft.accepted > 0


def test_ordered_embeddings_fine_tune(trained, target, dataset, tmp_path):
    cfg = td.dataclasses.replace(CFG, steps=6, eval_every=0, ordered_embeddings=True)
    result = train_drafter(bundle(target), dataset, tmp_path / "ordered", init_drafter=trained.output, config=cfg)
    assert len(result.losses) == 6
    weights = mx.load(str(tmp_path / "ordered" / "model.safetensors"))
    ordering = weights["masked_embedding.token_ordering"]
    assert ordering.dtype == mx.int32 and sorted(ordering.tolist()) == list(range(VOCAB))
    assert json.loads((tmp_path / "ordered" / "config.json").read_text())["use_ordered_embeddings"] is True
    b = bundle(target, td.load_drafter(tmp_path / "ordered", target.args))
    prompt = [7, 1, 40, 22]
    assert tokens(b, prompt, max_tokens=20, num_draft_tokens=3) == tokens(b, prompt, max_tokens=20,
                                                                           num_draft_tokens=0)


def test_balanced_clusters_are_equal_sized_and_group_similar_rows():
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((4, 8)) * 10
    rows = np.repeat(centers, 16, axis=0) + rng.standard_normal((64, 8))
    ordering = balanced_clusters(rows, 4)
    assert sorted(ordering.tolist()) == list(range(64))
    groups = {frozenset((ordering[i * 16 : (i + 1) * 16] // 16).tolist()) for i in range(4)}
    assert groups == {frozenset([c]) for c in range(4)}  # each cluster is one planted center
    three = balanced_clusters(rows[:48], 3)  # cluster counts need not be powers of two
    assert sorted(three.tolist()) == list(range(48))


def test_resume_continues_and_matches_the_uninterrupted_run(target, dataset, tmp_path, monkeypatch):
    cfg = td.dataclasses.replace(CFG, steps=8, checkpoint_every=3, eval_every=0, ordered_embeddings=True)
    full = train_drafter(bundle(target), dataset, tmp_path / "a", config=cfg)
    real_batch = td.batch

    def crash_at_step_5(train, step, *args):
        if step == 5:
            raise RuntimeError("simulated crash")
        return real_batch(train, step, *args)

    monkeypatch.setattr(td, "batch", crash_at_step_5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_drafter(bundle(target), dataset, tmp_path / "b", config=cfg)
    monkeypatch.setattr(td, "batch", real_batch)
    checkpoint = tmp_path / "b.checkpoints" / "step_3"
    assert checkpoint.is_dir() and not (tmp_path / "b").exists()
    assert td.load_drafter(checkpoint / "drafter", target.args) is not None  # a checkpoint is a loadable drafter
    with pytest.raises(ValueError, match="--resume"):
        train_drafter(bundle(target), dataset, tmp_path / "b", config=cfg)
    with pytest.raises(ValueError, match="learning_rate"):
        train_drafter(bundle(target), dataset, tmp_path / "b", config=td.dataclasses.replace(cfg, learning_rate=1e-3),
                      resume=True)
    resumed = train_drafter(bundle(target), dataset, tmp_path / "b", config=cfg, resume=True)
    assert resumed.step == 8 and len(resumed.losses) == 5
    np.testing.assert_allclose(resumed.losses, full.losses[3:], rtol=1e-5)
    a = mx.load(str(tmp_path / "a" / "model.safetensors"))
    b = mx.load(str(tmp_path / "b" / "model.safetensors"))
    for k in a:
        np.testing.assert_allclose(np.array(a[k]), np.array(b[k]), atol=1e-6, err_msg=k)


def test_text_datasets_are_tokenized_into_bos_chunks(tmp_path):
    write_tokenizer(tmp_path / "tok")
    tokenizer = load_tokenizer(tmp_path / "tok", [1])
    text = "The quick brown fox jumps over the lazy dog. " * 20
    (tmp_path / "d.txt").write_text(text)
    seqs = load_sequences(tmp_path / "d.txt", tokenizer, 10, 1000)
    bos, ids = tokenizer.bos_token_id, tokenizer.encode(text)
    body = ids[1:] if ids[0] == bos else ids  # one BOS per chunk, never two
    assert seqs.shape == (len(body) // 9, 10) and (seqs[:, 0] == bos).all() and (seqs[:, 1:] != bos).all()
    assert seqs[1, 1:].tolist() == body[9:18]
    write_jsonl(tmp_path / "d.jsonl", [{"text": text}, {"text": "short"}, {"tokens": list(range(25))}])
    seqs = load_sequences(tmp_path / "d.jsonl", tokenizer, 10, 1000)
    assert len(seqs) == len(body) // 9 + 2 and seqs[-1].tolist() == list(range(10, 20))  # tokens: as is
    assert chunk(list(range(7)), 3, None) == [[0, 1, 2], [3, 4, 5]]
    with pytest.raises(ValueError, match="no tokenizer"):
        load_sequences(tmp_path / "d.txt", None, 10, 1000)


def test_bad_inputs(target, target_folder, dataset, trained, tmp_path):
    b, out = bundle(target), tmp_path / "out"
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        train_drafter(b, tmp_path / "missing.jsonl", out, config=CFG)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty.txt"):
        train_drafter(b, tmp_path / "empty.txt", out, config=CFG)
    short = write_jsonl(tmp_path / "short.jsonl", [{"tokens": [1, 2, 3]}])
    with pytest.raises(ValueError, match=r"short.jsonl has no usable sequence"):
        train_drafter(b, short, out, config=CFG)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"tokens": [1, VOCAB + 1]}])
    with pytest.raises(ValueError, match=r"bad.jsonl:1"):
        train_drafter(b, bad, out, config=CFG)
    with pytest.raises(ValueError, match="--force"):
        train_drafter(b, dataset, trained.output, config=CFG)
    with pytest.raises(ValueError, match="loss"):
        train_drafter(b, dataset, out, config=td.dataclasses.replace(CFG, loss="mse"))
    other = make_target(seed=1, k_eq_v=True)
    write_drafter(tmp_path / "other", make_drafter(other), mx.float32)
    with pytest.raises(ValueError, match="drafter does not match the target"):
        train_drafter(b, dataset, out, init_drafter=tmp_path / "other", config=CFG)
    assert not out.exists()


def test_cli(target_folder, dataset, tmp_path, capsys):
    out = tmp_path / "cli-drafter"
    argv = ["train-drafter", "--target", str(target_folder), "--dataset", str(dataset), "--output", str(out),
            "--steps", "3", "--batch-size", "2", "--seq-len", "8", "--unroll", "2", "--hidden-size", "16",
            "--intermediate-size", "32", "--num-attention-heads", "2", "--eval-every", "3", "--eval-prompts", "1",
            "--eval-tokens", "8", "--checkpoint-every", "0", "--loss", "greedy", "--num-hidden-layers", "2"]
    assert main(argv) == 0
    assert "mean accepted length" in capsys.readouterr().err
    assert load(target_folder, draft=out).drafter.args.text.layer_types == [SLIDING, FULL]
    assert main(argv) == 1 and "--force" in capsys.readouterr().err
    shutil.rmtree(out)


# ------------------------------------------------------------------------------------------------------------
# the loss over row chunks (no (batch, rows, vocabulary) float32 tensor of all rows at real size)
# ------------------------------------------------------------------------------------------------------------


def all_rows_target(target, x, unroll):
    """What the loss used before chunking: the target's log-probs (B, N, V) and argmax, held whole. Computed outside
    any gradient transform, as training does: a target whose first forward in the process runs under
    `value_and_grad` gives other logits from then on (seen with MLX 0.32.4; the models' `mx.compile`d helpers
    are traced on that first call)."""
    out = target.forward(x, rows=x.shape[1], return_hidden=True, return_shared_kv=True)
    log_p = out.logits - mx.logsumexp(out.logits, axis=-1, keepdims=True)
    teacher = td.teach(target, x, x.shape[1] - unroll)
    mx.eval(log_p)
    return log_p, mx.argmax(out.logits, axis=-1), teacher


def all_rows_loss(drafter, teacher, log_p, top, unroll, kind, step_decay):
    """The loss as it was before chunking: every row at once."""
    R = teacher.rows
    losses, cluster = [], mx.array(0.0)
    for j, y in enumerate(td.unrolled_states(drafter, teacher, unroll), start=1):
        logits = drafter.model.embed_tokens.as_linear(y).astype(mx.float32)
        log_q = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        if kind == "greedy":
            losses.append(-mx.take_along_axis(log_q, top[:, j : j + R, None], axis=-1).mean())
        else:
            lp = log_p[:, j : j + R]
            losses.append((mx.exp(lp) * (lp - log_q)).sum(axis=-1).mean())
        if "masked_embedding" in drafter:
            head = drafter.masked_embedding
            scores = head.centroids(mx.stop_gradient(y))
            log_c = scores - mx.logsumexp(scores, axis=-1, keepdims=True)
            C = scores.shape[-1]
            if kind == "greedy":
                cluster_of = mx.argsort(head.token_ordering) // (head.token_ordering.size // C)
                c = -mx.take_along_axis(log_c, cluster_of[top[:, j : j + R]][..., None], axis=-1).mean()
            else:
                mass = mx.exp(log_p[:, j : j + R])[..., head.token_ordering]
                c = -(mass.reshape(*mass.shape[:-1], C, -1).sum(axis=-1) * log_c).sum(axis=-1).mean()
            cluster = cluster + c / unroll
    weights = [step_decay**j for j in range(unroll)]
    total = sum(w * l for w, l in zip(weights, losses)) / sum(weights)
    return total + cluster, mx.stack(losses), cluster


@pytest.mark.parametrize("kind,ordered", [("kl", False), ("kl", True), ("greedy", True)])
def test_chunked_loss_and_gradients_equal_the_all_rows_loss(kind, ordered, target, monkeypatch):
    drafter = make_drafter(target, seed=3, ordered=ordered)
    if ordered:
        drafter.masked_embedding.freeze(keys=["token_ordering"])
    x = mx.random.randint(0, VOCAB, (3, 23), key=mx.random.key(4))
    unroll, decay = 3, 0.7
    log_p, top, teacher = all_rows_target(target, x, unroll)
    want, want_grads = nn.value_and_grad(drafter, lambda d: all_rows_loss(d, teacher, log_p, top, unroll, kind,
                                                                          decay))(drafter)
    chunk_calls = []
    real = dl._head_sums

    def spy(W, C, y, log_p, top, ordering, kind):
        chunk_calls.append(y.shape[1])
        return real(W, C, y, log_p, top, ordering, kind)

    monkeypatch.setattr(dl, "_head_sums", spy)
    monkeypatch.setattr(dl, "LOSS_CHUNK_ELEMENTS", 3 * VOCAB * 6)  # 6 rows per chunk: 4 chunks of 20 rows
    got, grads = dl.loss_and_grad(drafter, teacher, unroll, kind, decay)
    assert chunk_calls == [6, 6, 6, 6, 6, 6, 6, 6, 6, 2, 2, 2]  # every chunk: at most 6 rows, all rows covered
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=2e-5, atol=1e-6)
    flat, want_flat = dict(tree_flatten(grads)), dict(tree_flatten(want_grads))
    assert flat.keys() == want_flat.keys()
    for k in flat:
        np.testing.assert_allclose(np.array(flat[k]), np.array(want_flat[k]), rtol=1e-4, atol=1e-6, err_msg=k)
    loss, top1 = dl.teacher_forced_scores(drafter, teacher, unroll, kind)
    np.testing.assert_allclose(loss, np.array(want[1]), rtol=2e-5)
    assert all(0 <= t <= 1 for t in top1)
