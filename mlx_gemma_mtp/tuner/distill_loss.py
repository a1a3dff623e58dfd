"""Teacher forcing and the drafter's distillation loss, computed without vocabulary-wide tensors for all rows.

The target runs once, cache-free, over a chunk x of N = rows + unroll tokens (spec §4.2–4.3, §5.1): its post-norm
hidden states, producer K/V and argmax tokens form the `Teacher`. The drafter at hidden position p (all rows at
once) gets h_p, the token x_{p+1}, query position p + DRAFT_POSITION_OFFSET and the producer K/V at positions
<= p (sliding layers: p-W..p); step j feeds its own previous `next_hidden` and x_{p+j} and is trained toward the
target's distribution at row p+j (KL at temperature 1, or cross-entropy on the target's argmax).

Memory: at Gemma 4's vocabulary (V = 262,144) one (batch 4, 256 rows, V) float32 tensor is 1 GB, and a loss over
all rows holds several (target log-probs, drafter logits, their softmax, gradients). Here the teacher keeps the
target's hidden states (B, N, H) only, and the loss is computed over chunks of rows (LOSS_CHUNK_ELEMENTS values
of each (rows, V) tensor), each evaluated before the next: the chunk's target log-probs come from the target's
head on its rows, the gradients of the tied head and the centroids are accumulated, and the gradients w.r.t. the
drafter states are back-propagated through the unrolled drafter in one pass at the end. The values are those of
the all-rows loss, summed in another order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from ..models.config import FULL, SLIDING
from ..models.gemma4_assistant import Drafter
from ..models.gemma4_text import KV, Model
from ..speculative import DRAFT_POSITION_OFFSET

LOSS_CHUNK_ELEMENTS = 1 << 25  # values of one (rows, V) float32 tensor of a loss chunk (128 MB)


@dataclass
class Teacher:
    """What the target says about one batch (all stop-gradient). Row r of `log_probs`/`top` predicts token r+1."""

    embeds: mx.array  # (B, N, H) target scaled embeddings of every token
    final: mx.array  # (B, N, H) post-norm hidden states of every position: the target head's input
    rows: int  # R: drafter rows (hidden positions 0..R-1)
    shared_kv: dict[str, KV]  # producer K/V of all N positions
    masks: dict[str, mx.array]  # {layer type: (R, N) bool} keys visible from hidden position p (row p)
    top: mx.array  # (B, N) the target's argmax tokens
    head: Callable[[mx.array], mx.array]  # the target's tied, softcapped head: (..., H) -> (..., V) float32

    @property
    def hidden(self) -> mx.array:
        """(B, R, H) post-norm hidden states of the drafter's rows."""
        return self.final[:, : self.rows]

    def log_probs(self, start: int, stop: int) -> mx.array:
        """(B, stop - start, V) float32 log-probabilities of the target at rows start..stop-1, temperature 1."""
        logits = self.head(self.final[:, start:stop])
        return mx.stop_gradient(logits - mx.logsumexp(logits, axis=-1, keepdims=True))


def chunk_rows(batch: int, vocab: int) -> int:
    """Rows per loss chunk: (batch, rows, vocab) tensors of LOSS_CHUNK_ELEMENTS values."""
    return max(1, LOSS_CHUNK_ELEMENTS // (batch * vocab))


def drafter_masks(rows: int, keys: int, window: int) -> dict[str, mx.array]:
    """Row p sees full-layer keys 0..p and sliding-layer keys p-W..p, as `drafting.visible_kv` does."""
    p, k = mx.arange(rows)[:, None], mx.arange(keys)[None]
    return {FULL: k <= p, SLIDING: (k <= p) & (k >= p - window)}


def teach(target: Model, x: mx.array, rows: int) -> Teacher:
    """One cache-free target forward over `x` (B, N); the argmax tokens through the head in row chunks."""
    out = target.forward(x, rows=x.shape[1], return_hidden=True, return_shared_kv=True, return_logits=False)
    sg = mx.stop_gradient
    final, embeds = sg(out.hidden), sg(target.model.embed(x))
    kv = {t: (sg(k), sg(v)) for t, (k, v) in out.shared_kv.items()}
    mx.eval(final, embeds, kv)
    B, N = x.shape
    step, top = chunk_rows(B, target.args.vocab_size), []
    for r in range(0, N, step):
        top.append(mx.argmax(target.logits(final[:, r : r + step]), axis=-1))
        mx.eval(top[-1])
    masks = drafter_masks(rows, N, target.args.sliding_window)
    return Teacher(embeds, final, rows, kv, masks, mx.concatenate(top, axis=1), target.logits)


def unrolled_states(drafter: Drafter, teacher: Teacher, unroll: int) -> list[mx.array]:
    """The drafter's post-norm states y (B, R, Hd) of draft steps 1..unroll, every hidden position at once."""
    hidden, R = teacher.hidden, teacher.rows
    ys = []
    for j in range(1, unroll + 1):
        hidden, y = drafter(teacher.embeds[:, j : j + R], hidden, teacher.shared_kv, DRAFT_POSITION_OFFSET,
                            teacher.masks)
        ys.append(y)
    return ys


def _head_sums(W, C, y, log_p, top, ordering, kind: str):
    """Sums over a chunk's rows of the token loss (tied head `W`, (V, Hd)) and of the centroid loss (`C`, or
    None without a clustered head): cross-entropy of the centroid scores against the cluster of the target's
    top token ("greedy") or the target's probability mass per cluster ("kl"); the centroids see stop-gradient
    states, so that loss trains them only."""
    logits = (y @ W.T).astype(mx.float32)  # (B, c, V): the drafter's tied head
    log_q = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    if kind == "greedy":
        token = -mx.take_along_axis(log_q, top[..., None], axis=-1).sum()
    else:
        token = (mx.exp(log_p) * (log_p - log_q)).sum()  # KL(target || drafter) per row, summed
    if C is None:
        return token, mx.array(0.0)
    scores = mx.stop_gradient(y) @ C.T  # (B, c, clusters)
    log_c = scores - mx.logsumexp(scores, axis=-1, keepdims=True)
    n_clusters = C.shape[0]
    if kind == "greedy":
        cluster_of = mx.argsort(ordering) // (ordering.size // n_clusters)
        return token, -mx.take_along_axis(log_c, cluster_of[top][..., None], axis=-1).sum()
    mass = mx.exp(log_p)[..., ordering]
    return token, -(mass.reshape(*mass.shape[:-1], n_clusters, -1).sum(axis=-1) * log_c).sum()


def _chunks(teacher: Teacher, ys: list[mx.array], kind: str, vocab: int):
    """(step j, rows slice, target log-probs or None, target top tokens) per chunk of rows, step by step; the
    target's log-probs of a chunk are computed once for all steps (rows r0+1 .. r1+unroll)."""
    B, R = ys[0].shape[:2]
    step = chunk_rows(B, vocab)
    for r0 in range(0, R, step):
        r1 = min(R, r0 + step)
        log_p = teacher.log_probs(r0 + 1, r1 + len(ys)) if kind == "kl" else None
        for j in range(1, len(ys) + 1):
            lp = None if log_p is None else log_p[:, j - 1 : j - 1 + r1 - r0]
            yield j, slice(r0, r1), lp, teacher.top[:, j + r0 : j + r1]


def _head(drafter: Drafter):
    clustered = "masked_embedding" in drafter
    C = drafter.masked_embedding.centroids.weight if clustered else None
    ordering = drafter.masked_embedding.token_ordering if clustered else None
    return drafter.model.embed_tokens.weight, C, ordering


def loss_and_grad(drafter: Drafter, teacher: Teacher, unroll: int, kind: str, step_decay: float):
    """((total, per-step losses (unroll,), cluster loss), gradients w.r.t. the drafter's trainable parameters).

    total = the steps' mean losses weighted by step_decay**(j-1) (normalised) + the centroid readout loss
    (mean over steps); every loss is a mean over the batch's rows.
    """
    ys = unrolled_states(drafter, teacher, unroll)
    mx.eval(ys)
    W, C, ordering = _head(drafter)
    n = ys[0].shape[0] * ys[0].shape[1]
    decay = [step_decay**j for j in range(unroll)]
    weights = [w / sum(decay) / n for w in decay]

    def objective(W, C, y, log_p, top, weight):
        token, cluster = _head_sums(W, C, y, log_p, top, ordering, kind)
        return weight * token + cluster / (unroll * n), token, cluster

    grad_fn = mx.value_and_grad(objective, argnums=(0, 1, 2) if C is not None else (0, 2))
    sums, cluster = [mx.array(0.0)] * unroll, mx.array(0.0)
    dW, dC, dys = mx.zeros_like(W), None if C is None else mx.zeros_like(C), [[] for _ in ys]
    for j, rows, log_p, top in _chunks(teacher, ys, kind, W.shape[0]):
        (_, token, c), grads = grad_fn(W, C, ys[j - 1][:, rows], log_p, top, weights[j - 1])
        dW, dys[j - 1] = dW + grads[0], dys[j - 1] + [grads[-1]]
        dC = dC if C is None else dC + grads[1]
        sums[j - 1], cluster = sums[j - 1] + token, cluster + c
        mx.eval(dW, dC, dys[j - 1][-1], sums[j - 1], cluster)
    dys = [mx.concatenate(parts, axis=1) for parts in dys]

    def pullback(d: Drafter) -> mx.array:  # its gradient is the states' vector-Jacobian product with dys
        return sum((dy * y).sum() for y, dy in zip(unrolled_states(d, teacher, unroll), dys))

    _, grads = nn.value_and_grad(drafter, pullback)(drafter)
    grads["model"]["embed_tokens"]["weight"] = grads["model"]["embed_tokens"]["weight"] + dW
    if C is not None:
        centroids = grads["masked_embedding"]["centroids"]
        centroids["weight"] = centroids["weight"] + dC
    losses = mx.stack(sums) / n
    cluster = cluster / (unroll * n)
    total = sum(w * n * l for w, l in zip(weights, losses)) + cluster
    return (total, losses, cluster), grads


def teacher_forced_scores(drafter: Drafter, teacher: Teacher, unroll: int, kind: str) -> tuple[list, list]:
    """(mean token loss, top-1 agreement with the target) per draft step, chunk by chunk, no gradients."""
    ys = unrolled_states(drafter, teacher, unroll)
    mx.eval(ys)
    W, _, _ = _head(drafter)
    n = ys[0].shape[0] * ys[0].shape[1]
    loss, hits = [0.0] * unroll, [0.0] * unroll
    for j, rows, log_p, top in _chunks(teacher, ys, kind, W.shape[0]):
        y = ys[j - 1][:, rows]
        token, _ = _head_sums(W, None, y, log_p, top, None, kind)
        agree = (drafter.top_token(y) == top).astype(mx.float32).sum()
        loss[j - 1] += token.item() / n
        hits[j - 1] += agree.item() / n
    return loss, hits
