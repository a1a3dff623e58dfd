"""Log-probabilities reported with the emitted tokens (OpenAI's `logprobs` / `top_logprobs`).

They are the target's own distribution, the log-softmax of its logits (before temperature and filters, as OpenAI
and mlx-lm report them), at the row that emitted each token: a plain step's row, or in an MTP round the verify
forward's rows, drafted tokens included; so they are plain decoding's values. Computed lazily with the token and
evaluated in the round's one host sync; nothing is computed when none are asked for.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

MAX_TOP_LOGPROBS = 20  # OpenAI's limit on top_logprobs


@dataclass
class Scores:
    """Lazy log-probabilities of R emitted tokens and of the `top` most likely tokens at each of their rows."""

    logprob: mx.array  # (R,) float32
    top_ids: mx.array  # (R, top) int32, most likely first
    top_logprobs: mx.array  # (R, top) float32

    def arrays(self) -> list[mx.array]:
        return [self.logprob, self.top_ids, self.top_logprobs]


@dataclass(frozen=True)
class TokenLogprobs:
    """One emitted token's log-probability and the most likely alternatives at its position."""

    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, log-probability), most likely first


def token_scores(logits: mx.array, tokens: mx.array, top: int) -> Scores:
    """Scores of `tokens` (R,) under `logits` (R, V) (any float dtype), with the `top` best tokens per row."""
    x = logits.astype(mx.float32)
    lp = x - mx.logsumexp(x, axis=-1, keepdims=True)  # (R, V)
    chosen = mx.take_along_axis(lp, tokens.reshape(-1, 1).astype(mx.int32), axis=-1)[:, 0]
    if top == 0:
        return Scores(chosen, mx.zeros((lp.shape[0], 0), mx.int32), mx.zeros((lp.shape[0], 0), mx.float32))
    ids = mx.argpartition(-lp, top - 1, axis=-1)[:, :top]  # (R, top), unordered: no vocabulary-wide sort
    values = mx.take_along_axis(lp, ids, axis=-1)
    order = mx.argsort(-values, axis=-1)
    return Scores(chosen, mx.take_along_axis(ids, order, axis=-1).astype(mx.int32),
                  mx.take_along_axis(values, order, axis=-1))


def rows(scores: Scores | None, count: int) -> list[TokenLogprobs | None]:
    """The first `count` rows of evaluated `scores` as host values (None entries when none were asked for)."""
    if scores is None:
        return [None] * count
    logprob, ids, values = (a.tolist() for a in scores.arrays())
    return [TokenLogprobs(logprob[i], tuple(zip(ids[i], values[i]))) for i in range(count)]
