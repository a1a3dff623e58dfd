"""Distil a Gemma 4 MTP drafter (`gemma4_assistant`) for a given target, in MLX.

The drafter is trained on exactly what decoding feeds it (spec §4.2–4.3, §5.1). For a token chunk x of length
N = seq_len + unroll, one cached-free target forward gives the post-norm hidden states, the producer K/V of every
position and the target's next-token distributions. The drafter at hidden position p (p = 0..seq_len-1, all
rows at once) gets h_p, the input token x_{p+1}, query RoPE position p + DRAFT_POSITION_OFFSET and the producer
K/V at positions <= p (sliding layers: p-W..p, the last W+1 entries decoding shows it); its step j (1-based) feeds
its own previous `next_hidden` and x_{p+j} and is trained toward the target's distribution at row p+j (KL at
temperature 1, or cross-entropy on the target's argmax). Gradients flow through the unrolled steps.

The inputs of steps j > 1 are the data tokens, not the target's greedy tokens: target row p+j is the target's
distribution given x_0..x_{p+j}, so only data-token inputs pair every drafter input with the label the target
computed for that same context. Greedy-token inputs would pair an input with a label computed for a different
prefix. Data sampled from the target itself (`mlx-gemma-mtp generate` outputs) makes the two coincide.

The clustered head (E2B/E4B style) is trained as a readout: the dense tied embedding learns the token logits,
`masked_embedding.centroids` learns (on stop-gradient drafter states) to rank the cluster holding the target's
mass/top token first. Outputs are HF assistant folders that `mlx_gemma_mtp.load(target, draft=OUTPUT)` reads.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from ..decode import MAX_DRAFT_TOKENS, stream_generate
from ..load import Bundle, load, load_drafter, read_config, resolve
from ..models.config import FULL, SLIDING
from ..models.gemma4_assistant import Drafter
from ..models.gemma4_text import KV, Model
from ..models.masked_embedder import MaskedEmbedder
from ..speculative import DRAFT_POSITION_OFFSET, DraftStats
from .distill_data import batch, load_sequences, split_held_out
from .drafter_init import add_clusters, drafter_args, new_drafter, write_drafter

LOSSES = ("kl", "greedy")
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
CHECKPOINT_DRAFTER = "drafter"  # step_N/drafter: the weights, loadable as a drafter
KEEP_CHECKPOINTS = 2
EVAL_SEQUENCES = 64  # held-out chunks scored teacher-forced at each evaluation
# resuming with different values of these would silently change the run; the others only affect reporting
_RESUME_FREE = {"steps", "eval_every", "eval_prompts", "eval_tokens", "checkpoint_every"}


@dataclass
class DrafterTrainConfig:
    """Options of `train_drafter`; the CLI flags have the same names (`--seq-len` for `seq_len`)."""

    steps: int = 2000
    batch_size: int = 4
    seq_len: int = 256  # drafter rows (hidden positions) per sequence; chunks hold seq_len + unroll tokens
    learning_rate: float = 3e-4
    warmup: int = 100
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0  # 0: no clipping
    unroll: int = 4  # draft steps trained (and drafted at evaluation)
    loss: str = "kl"  # "kl": match the target's distribution (T=1); "greedy": cross-entropy on its argmax
    step_decay: float = 1.0  # weight of draft step j is step_decay**(j-1) (normalised); < 1 favours early steps
    # from-scratch architecture; None = the released assistants' choice for a target of this size
    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_attention_heads: int | None = None
    num_hidden_layers: int = 4  # layer types [S, ..., S, F]
    ordered_embeddings: bool = False  # clustered LM head (E2B/E4B assistants); added to an init drafter if missing
    num_centroids: int = 2048
    centroid_top_k: int = 32
    eval_every: int = 200  # 0: no evaluation
    eval_prompts: int = 4  # held-out prompts decoded with MTP at each evaluation
    eval_tokens: int = 64  # tokens generated per evaluation prompt
    checkpoint_every: int = 500  # 0: no checkpoints
    seed: int = 0
    held_out_fraction: float = 0.02

    def validate(self) -> None:
        def bad(name, why):
            raise ValueError(f"train-drafter: {name}={getattr(self, name)!r} {why}")

        for name in ("steps", "batch_size", "seq_len", "unroll", "num_hidden_layers", "num_centroids",
                     "centroid_top_k", "eval_prompts", "eval_tokens"):
            if getattr(self, name) < 1:
                bad(name, "must be >= 1")
        for name in ("warmup", "weight_decay", "max_grad_norm", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                bad(name, "must be >= 0")
        if self.loss not in LOSSES:
            bad("loss", f"must be one of {LOSSES}")
        if not self.learning_rate > 0 or not self.step_decay > 0:
            bad("learning_rate" if not self.learning_rate > 0 else "step_decay", "must be > 0")
        if not 0 <= self.held_out_fraction < 1:
            bad("held_out_fraction", "must be in [0, 1)")
        if self.centroid_top_k > self.num_centroids:
            bad("centroid_top_k", f"must be <= num_centroids ({self.num_centroids})")


@dataclass
class EvalResult:
    step: int
    loss_per_step: list[float]  # held-out, teacher-forced, per draft step
    top1_per_step: list[float]  # drafter's top token == target's top token, teacher-forced
    acceptance_per_position: list[float]  # real greedy MTP decoding of held-out prompts
    mean_accepted_length: float  # accepted drafts per round in that decoding


@dataclass
class TrainResult:
    output: Path
    step: int  # steps done in total (including those before a resume)
    losses: list[float] = field(default_factory=list)  # training loss of each step of this run
    step_losses: list[list[float]] = field(default_factory=list)  # per draft step, each step of this run
    evals: list[EvalResult] = field(default_factory=list)
    checkpoints: Path | None = None


# ---------------------------------------------------------------------------------------------------------------
# Drafter construction
# ---------------------------------------------------------------------------------------------------------------


def initial_drafter(target: Model, cfg: DrafterTrainConfig, init_drafter: str | Path | None) -> Drafter:
    """A new drafter (see drafter_init) or an existing one to fine-tune (float32); either gets a clustered head
    when `ordered_embeddings` asks for one and it has none."""
    if init_drafter is None:
        args = drafter_args(target.args, cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
                            cfg.num_hidden_layers)
        drafter = new_drafter(target, args, cfg.seed)
    else:
        folder = resolve(init_drafter, "init_drafter")
        if (c := read_config(folder)).get("quantization") or c.get("quantization_config"):
            raise ValueError(f"init_drafter {folder} is quantized; fine-tune from the unquantized drafter")
        drafter = load_drafter(folder, target.args, mx.float32)
    if cfg.ordered_embeddings and "masked_embedding" not in drafter:
        add_clusters(drafter, cfg.num_centroids, cfg.centroid_top_k, cfg.seed)
    return drafter


# ---------------------------------------------------------------------------------------------------------------
# Teacher forcing and losses
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Teacher:
    """What the target says about one batch (all stop-gradient). Row r of `log_probs`/`top` predicts token r+1."""

    embeds: mx.array  # (B, N, H) target scaled embeddings of every token
    hidden: mx.array  # (B, R, H) post-norm hidden states of positions 0..R-1
    shared_kv: dict[str, KV]  # producer K/V of all N positions
    masks: dict[str, mx.array]  # {layer type: (R, N) bool} keys visible from hidden position p (row p)
    log_probs: mx.array | None  # (B, N, V) float32, temperature 1 ("kl" loss only)
    top: mx.array  # (B, N) the target's argmax tokens


def drafter_masks(rows: int, keys: int, window: int) -> dict[str, mx.array]:
    """Row p sees full-layer keys 0..p and sliding-layer keys p-W..p, as `drafting.visible_kv` does."""
    p, k = mx.arange(rows)[:, None], mx.arange(keys)[None]
    return {FULL: k <= p, SLIDING: (k <= p) & (k >= p - window)}


def teach(target: Model, x: mx.array, rows: int, with_log_probs: bool) -> Teacher:
    """One cache-free target forward over `x` (B, N); hidden states of the first `rows` positions."""
    out = target.forward(x, rows=x.shape[1], return_hidden=True, return_shared_kv=True)
    sg = mx.stop_gradient
    log_probs = sg(out.logits - mx.logsumexp(out.logits, axis=-1, keepdims=True)) if with_log_probs else None
    kv = {t: (sg(k), sg(v)) for t, (k, v) in out.shared_kv.items()}
    return Teacher(sg(target.model.embed(x)), sg(out.hidden[:, :rows]), kv,
                   drafter_masks(rows, x.shape[1], target.args.sliding_window), log_probs,
                   sg(mx.argmax(out.logits, axis=-1)))


def unrolled_states(drafter: Drafter, teacher: Teacher, unroll: int) -> list[mx.array]:
    """The drafter's post-norm states y (B, R, Hd) of draft steps 1..unroll, every hidden position at once."""
    hidden, R = teacher.hidden, teacher.hidden.shape[1]
    ys = []
    for j in range(1, unroll + 1):
        hidden, y = drafter(teacher.embeds[:, j : j + R], hidden, teacher.shared_kv, DRAFT_POSITION_OFFSET,
                            teacher.masks)
        ys.append(y)
    return ys


def _token_loss(logits: mx.array, teacher: Teacher, j: int, kind: str) -> mx.array:
    R = logits.shape[1]
    log_q = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    if kind == "greedy":
        return -mx.take_along_axis(log_q, teacher.top[:, j : j + R, None], axis=-1).mean()
    log_p = teacher.log_probs[:, j : j + R]
    return (mx.exp(log_p) * (log_p - log_q)).sum(axis=-1).mean()  # KL(target || drafter)


def _cluster_loss(head: MaskedEmbedder, y: mx.array, teacher: Teacher, j: int, kind: str) -> mx.array:
    """Cross-entropy of the centroid scores against the cluster of the target's top token ("greedy") or the
    target's probability mass per cluster ("kl"). Trains the centroids only."""
    scores = head.centroids(mx.stop_gradient(y))
    log_c = scores - mx.logsumexp(scores, axis=-1, keepdims=True)
    R, C = y.shape[1], scores.shape[-1]
    if kind == "greedy":
        cluster_of = mx.argsort(head.token_ordering) // (head.token_ordering.size // C)
        return -mx.take_along_axis(log_c, cluster_of[teacher.top[:, j : j + R]][..., None], axis=-1).mean()
    mass = mx.exp(teacher.log_probs[:, j : j + R])[..., head.token_ordering]
    return -(mass.reshape(*mass.shape[:-1], C, -1).sum(axis=-1) * log_c).sum(axis=-1).mean()


def loss_fn(drafter: Drafter, teacher: Teacher, cfg: DrafterTrainConfig):
    """(total, per-step losses (unroll,), cluster loss): weighted mean over steps + the centroid readout loss."""
    weights = [cfg.step_decay**j for j in range(cfg.unroll)]
    losses, cluster = [], mx.array(0.0)
    for j, y in enumerate(unrolled_states(drafter, teacher, cfg.unroll), start=1):
        losses.append(_token_loss(drafter.model.embed_tokens.as_linear(y).astype(mx.float32), teacher, j, cfg.loss))
        if "masked_embedding" in drafter:
            cluster = cluster + _cluster_loss(drafter.masked_embedding, y, teacher, j, cfg.loss) / cfg.unroll
    total = sum(w * l for w, l in zip(weights, losses)) / sum(weights)
    return total + cluster, mx.stack(losses), cluster


def make_optimizer(cfg: DrafterTrainConfig) -> optim.Optimizer:
    """AdamW, linear warmup then cosine decay to 10% of the peak."""
    lr = cfg.learning_rate
    decay = optim.cosine_decay(lr, max(1, cfg.steps - cfg.warmup), end=0.1 * lr)
    schedule = decay if cfg.warmup == 0 else optim.join_schedules(
        [optim.linear_schedule(lr / (cfg.warmup + 1), lr, cfg.warmup), decay], [cfg.warmup])
    return optim.AdamW(schedule, weight_decay=cfg.weight_decay, bias_correction=True)


# ---------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------


def evaluate(bundle: Bundle, drafter: Drafter, held_out: np.ndarray, cfg: DrafterTrainConfig, step: int
             ) -> EvalResult:
    """Teacher-forced loss and top-1 agreement per draft step, and acceptance of real greedy MTP decoding (the
    library's own `stream_generate`) on the first `eval_prompts` held-out chunks, each cut to seq_len // 2."""
    seqs = held_out[:EVAL_SEQUENCES]
    loss, top1 = np.zeros(cfg.unroll), np.zeros(cfg.unroll)
    for i in range(0, len(seqs), cfg.batch_size):
        x = mx.array(seqs[i : i + cfg.batch_size])
        teacher = teach(bundle.target, x, cfg.seq_len, cfg.loss == "kl")
        ys = unrolled_states(drafter, teacher, cfg.unroll)
        R, w = cfg.seq_len, len(x) / len(seqs)
        for j, y in enumerate(ys, start=1):
            logits = drafter.model.embed_tokens.as_linear(y).astype(mx.float32)
            hits = (drafter.top_token(y) == teacher.top[:, j : j + R]).astype(mx.float32).mean()
            loss[j - 1] += w * _token_loss(logits, teacher, j, cfg.loss).item()
            top1[j - 1] += w * hits.item()
    stats, with_drafter = DraftStats(), dataclasses.replace(bundle, drafter=drafter)
    for row in held_out[: cfg.eval_prompts]:
        prompt = row[: max(1, cfg.seq_len // 2)].tolist()
        responses = stream_generate(with_drafter, prompt, max_tokens=cfg.eval_tokens,
                                    num_draft_tokens=min(cfg.unroll, MAX_DRAFT_TOKENS))
        *_, last = responses
        stats.merge(last.draft)
    return EvalResult(step, loss.tolist(), top1.tolist(), stats.acceptance_per_position,
                      stats.mean_accepted_length)


def _floats(xs: list[float]) -> str:
    return " ".join(f"{x:.3f}" for x in xs)


def format_eval(e: EvalResult) -> str:
    return (f"eval step {e.step}: held-out loss per step [{_floats(e.loss_per_step)}], top-1 "
            f"[{_floats(e.top1_per_step)}] | MTP acceptance per position [{_floats(e.acceptance_per_position)}], "
            f"mean accepted length {e.mean_accepted_length:.2f}")


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints and output
# ---------------------------------------------------------------------------------------------------------------


def checkpoint_dir(output: Path) -> Path:
    """Checkpoints live next to the output (which only appears at the end): OUTPUT.checkpoints/step_N."""
    return output.with_name(output.name + ".checkpoints")


def _checkpoint_steps(folder: Path) -> list[int]:
    if not folder.is_dir():
        return []
    steps = [p.name.removeprefix("step_") for p in folder.glob("step_*") if (p / STATE_FILE).is_file()]
    return sorted(int(s) for s in steps if s.isdigit())


def save_checkpoint(folder: Path, drafter: Drafter, optimizer: optim.Optimizer, step: int,
                    cfg: DrafterTrainConfig) -> Path:
    """step_N/: `drafter/` (a loadable float32 drafter folder), the optimizer and the trainer state; keeps the
    newest KEEP_CHECKPOINTS. Written under a temp name first, so a crash never leaves a half checkpoint."""
    tmp = folder / f".step_{step}.tmp-{uuid.uuid4().hex[:8]}"
    write_drafter(tmp / CHECKPOINT_DRAFTER, drafter, mx.float32)
    mx.save_safetensors(str(tmp / OPTIMIZER_FILE), dict(tree_flatten(optimizer.state)))
    (tmp / STATE_FILE).write_text(json.dumps({"step": step, "config": dataclasses.asdict(cfg)}, indent=2))
    final = folder / f"step_{step}"
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in _checkpoint_steps(folder)[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(folder / f"step_{old}")
    return final


def _check_resumable(saved: dict, cfg: DrafterTrainConfig, where: Path) -> None:
    now = dataclasses.asdict(cfg)
    if diff := sorted(k for k in now if k not in _RESUME_FREE and saved.get(k) != now[k]):
        changes = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in diff)
        raise ValueError(f"cannot resume from {where}: the options differ ({changes}); use the same options")


def _check_output(output: Path, force: bool) -> None:
    if output.exists() and not force:
        raise ValueError(f"output {output} already exists; pass --force (force=True) to replace it")
    if output.exists() and not output.is_dir():
        raise ValueError(f"output {output} exists and is not a folder; choose another output")


def _publish(output: Path, drafter: Drafter, dtype: mx.Dtype) -> None:
    """Write to a temp folder next to `output`, then move it into place (an old output goes only then)."""
    tmp = output.with_name(f".{output.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        write_drafter(tmp, drafter, dtype)
        if output.exists():
            old = output.with_name(f".{output.name}.old-{uuid.uuid4().hex[:8]}")
            output.rename(old)
            tmp.rename(output)
            shutil.rmtree(old)
        else:
            tmp.rename(output)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


# ---------------------------------------------------------------------------------------------------------------
# Training loop
# ---------------------------------------------------------------------------------------------------------------


def _report(line: str, keep: bool) -> None:
    """A `\\r`-updated progress line on a terminal; in logs only the lines worth keeping."""
    if sys.stderr.isatty():
        print("\r\033[K" + line, end="\n" if keep else "", file=sys.stderr, flush=True)
    elif keep:
        print(line, file=sys.stderr, flush=True)


def _start(target: Model, cfg: DrafterTrainConfig, init_drafter, checkpoints: Path, resume: bool, force: bool):
    """(drafter, optimizer, step done) for a new run, a fine-tune, or a resumed run."""
    steps = _checkpoint_steps(checkpoints)
    if steps and not resume:
        if not force:
            raise ValueError(f"{checkpoints} holds checkpoints of an earlier run; pass --resume to continue it "
                             "or --force to start over")
        shutil.rmtree(checkpoints)
    optimizer = make_optimizer(cfg)
    if resume and steps:
        latest = checkpoints / f"step_{steps[-1]}"
        state = json.loads((latest / STATE_FILE).read_text())
        _check_resumable(state["config"], cfg, latest)
        drafter = load_drafter(latest / CHECKPOINT_DRAFTER, target.args, mx.float32)
        optimizer.state = tree_unflatten(list(mx.load(str(latest / OPTIMIZER_FILE)).items()))
        _report(f"resuming from {latest} (step {state['step']})", True)
        start = state["step"]
    else:
        if resume:
            _report(f"no checkpoint in {checkpoints}: starting a new run", True)
        drafter = initial_drafter(target, cfg, init_drafter)
        start = 0
    if "masked_embedding" in drafter:
        drafter.masked_embedding.freeze(keys=["token_ordering"])  # an integer buffer, not a weight
    return drafter, optimizer, start


def train_drafter(
    target: str | Path | Bundle,
    dataset: str | Path,
    output: str | Path,
    init_drafter: str | Path | None = None,
    config: DrafterTrainConfig | None = None,
    force: bool = False,
    resume: bool = False,
) -> TrainResult:
    """Distil an MTP drafter for `target` on `dataset` and write it to `output` (an HF assistant folder).

    Args:
        target: the target's folder, hub id, or an already loaded `Bundle`.
        dataset: a .txt file or a .jsonl file with a "text" or "tokens" field per line (see distill_data).
        output: folder to create; it appears only when training has finished. Checkpoints go to
            OUTPUT.checkpoints/step_N (the drafter in step_N/drafter, loadable as any drafter).
        init_drafter: a drafter folder or hub id to fine-tune; None trains one from scratch.
        config: the training options (defaults: `DrafterTrainConfig()`).
        force: replace an existing output and discard the checkpoints of an earlier run.
        resume: continue from the newest checkpoint (same options; `steps` may grow).

    Raises:
        ValueError: output exists (without force), bad options, a dataset without usable sequences, or an
            init drafter that does not match the target.
        FileNotFoundError: the dataset or a model folder does not exist.
    """
    cfg = config or DrafterTrainConfig()
    cfg.validate()
    output = Path(output).expanduser()
    _check_output(output, force)
    bundle = target if isinstance(target, Bundle) else load(target)
    model = bundle.target
    sequences = load_sequences(dataset, bundle.tokenizer, cfg.seq_len + cfg.unroll, model.args.vocab_size)
    train, held_out = split_held_out(sequences, cfg.held_out_fraction, cfg.seed)
    checkpoints = checkpoint_dir(output)
    drafter, optimizer, start = _start(model, cfg, init_drafter, checkpoints, resume, force)
    result = TrainResult(output, start, checkpoints=checkpoints if cfg.checkpoint_every else None)
    evaluating = cfg.eval_every > 0 and len(held_out) > 0
    if cfg.eval_every > 0 and not len(held_out):
        _report("no held-out sequences (held_out_fraction 0 or a 1-sequence dataset): no evaluation", True)
    if evaluating:
        result.evals.append(evaluate(bundle, drafter, held_out, cfg, start))
        _report(format_eval(result.evals[-1]), True)
    step_and_grad = nn.value_and_grad(drafter, partial(loss_fn, cfg=cfg))
    tokens = cfg.batch_size * (cfg.seq_len + cfg.unroll)  # target tokens per step
    for step in range(start + 1, cfg.steps + 1):
        tic = time.perf_counter()
        teacher = teach(model, batch(train, step, cfg.batch_size, cfg.seed), cfg.seq_len, cfg.loss == "kl")
        (loss, per_step, cluster), grads = step_and_grad(drafter, teacher)
        if cfg.max_grad_norm > 0:
            grads, _ = optim.clip_grad_norm(grads, cfg.max_grad_norm)
        optimizer.update(drafter, grads)
        mx.eval(loss, per_step, cluster, drafter.parameters(), optimizer.state)
        result.step = step
        result.losses.append(loss.item())
        result.step_losses.append(per_step.tolist())
        line = (f"step {step}/{cfg.steps} loss {result.losses[-1]:.4f} [{_floats(result.step_losses[-1])}]"
                f"{f' clusters {cluster.item():.3f}' if 'masked_embedding' in drafter else ''} "
                f"lr {optimizer.learning_rate.item():.2e} {tokens / (time.perf_counter() - tic):.0f} tokens/s")
        eval_now = evaluating and (step % cfg.eval_every == 0 or step == cfg.steps)
        _report(line, keep=eval_now or step == cfg.steps or step % max(1, cfg.steps // 50) == 0)
        if eval_now:
            result.evals.append(evaluate(bundle, drafter, held_out, cfg, step))
            _report(format_eval(result.evals[-1]), True)
        if cfg.checkpoint_every and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
            save_checkpoint(checkpoints, drafter, optimizer, step, cfg)
    _check_output(output, force)  # it may have appeared while training
    _publish(output, drafter, model.model.norm.weight.dtype)
    _report(f"wrote {output} (step {result.step})", True)
    return result


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------

_HELP = {
    "seq_len": "hidden positions per sequence (chunks hold seq-len + unroll tokens)",
    "unroll": "draft steps trained, and drafted at evaluation",
    "loss": "kl: match the target's distribution at T=1; greedy: cross-entropy on its argmax",
    "step_decay": "weight of draft step j is step-decay^(j-1)",
    "hidden_size": "from scratch: drafter width (default 256, or 1024 for targets of hidden size >= 2816)",
    "intermediate_size": "from scratch: MLP width (default 8 * hidden size)",
    "num_attention_heads": "from scratch: query heads (default: >= 4, a multiple of the target's KV heads)",
    "ordered_embeddings": "clustered LM head (as the E2B/E4B assistants)",
    "eval_every": "evaluate held-out acceptance every N steps (0: never)",
    "checkpoint_every": "write OUTPUT.checkpoints/step_N every N steps (0: never)",
}


def add_train_drafter_parser(sub) -> None:
    p = sub.add_parser("train-drafter", help="distil an MTP drafter (gemma4_assistant) for a Gemma 4 target")
    p.add_argument("--target", required=True, help="folder or hub id of the Gemma 4 target (or converted bundle)")
    p.add_argument("--dataset", required=True,
                   help='a .txt file, or .jsonl with a "text" (or pre-tokenized "tokens") field per line')
    p.add_argument("--output", required=True, help="drafter folder to write (HF gemma4_assistant format)")
    p.add_argument("--init-drafter", default=None, help="drafter folder or hub id to fine-tune (default: new)")
    p.add_argument("--force", action="store_true", help="replace OUTPUT and discard earlier checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from the newest OUTPUT.checkpoints/step_N")
    defaults = DrafterTrainConfig()
    for f in dataclasses.fields(DrafterTrainConfig):
        flag, default = "--" + f.name.replace("_", "-"), getattr(defaults, f.name)
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=_HELP.get(f.name))
        else:
            kind = float if isinstance(default, float) else str if isinstance(default, str) else int
            p.add_argument(flag, type=kind, default=default, choices=LOSSES if f.name == "loss" else None,
                           help=_HELP.get(f.name, f"default {default}"))
    p.set_defaults(func=run_train_drafter)


def run_train_drafter(args: argparse.Namespace) -> None:
    config = DrafterTrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DrafterTrainConfig)})
    train_drafter(args.target, args.dataset, args.output, args.init_drafter, config, args.force, args.resume)
