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
Teacher forcing and the loss, chunked over rows so no (batch, rows, vocabulary) float32 tensor of all rows ever
exists, are in distill_loss.py.
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
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from ..decode import MAX_DRAFT_TOKENS, stream_generate
from ..load import Bundle, load, load_drafter, read_config, resolve
from ..models.gemma4_assistant import Drafter
from ..models.gemma4_text import Model
from ..speculative import DraftStats
from .distill_data import batch, load_sequences, split_held_out
from .distill_loss import Teacher, drafter_masks, loss_and_grad, teach, teacher_forced_scores, unrolled_states

__all__ = ["DrafterTrainConfig", "Teacher", "drafter_masks", "teach", "train_drafter", "unrolled_states"]
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
# Optimizer and evaluation (the teacher and the loss: distill_loss.py)
# ---------------------------------------------------------------------------------------------------------------


def make_optimizer(cfg: DrafterTrainConfig) -> optim.Optimizer:
    """AdamW, linear warmup then cosine decay to 10% of the peak."""
    lr = cfg.learning_rate
    decay = optim.cosine_decay(lr, max(1, cfg.steps - cfg.warmup), end=0.1 * lr)
    schedule = decay if cfg.warmup == 0 else optim.join_schedules(
        [optim.linear_schedule(lr / (cfg.warmup + 1), lr, cfg.warmup), decay], [cfg.warmup])
    return optim.AdamW(schedule, weight_decay=cfg.weight_decay, bias_correction=True)


def evaluate(bundle: Bundle, drafter: Drafter, held_out: np.ndarray, cfg: DrafterTrainConfig, step: int
             ) -> EvalResult:
    """Teacher-forced loss and top-1 agreement per draft step, and acceptance of real greedy MTP decoding (the
    library's own `stream_generate`) on the first `eval_prompts` held-out chunks, each cut to seq_len // 2."""
    seqs = held_out[:EVAL_SEQUENCES]
    loss, top1 = np.zeros(cfg.unroll), np.zeros(cfg.unroll)
    for i in range(0, len(seqs), cfg.batch_size):
        x = mx.array(seqs[i : i + cfg.batch_size])
        teacher = teach(bundle.target, x, cfg.seq_len)
        batch_loss, batch_top1 = teacher_forced_scores(drafter, teacher, cfg.unroll, cfg.loss)
        w = len(x) / len(seqs)
        loss += w * np.array(batch_loss)
        top1 += w * np.array(batch_top1)
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
    tokens = cfg.batch_size * (cfg.seq_len + cfg.unroll)  # target tokens per step
    for step in range(start + 1, cfg.steps + 1):
        tic = time.perf_counter()
        teacher = teach(model, batch(train, step, cfg.batch_size, cfg.seed), cfg.seq_len)
        (loss, per_step, cluster), grads = loss_and_grad(drafter, teacher, cfg.unroll, cfg.loss, cfg.step_decay)
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
