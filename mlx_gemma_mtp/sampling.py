"""Token sampling and the speculative acceptance rule, as pure lazy functions over ``mx.array``.

``log_probs`` turns logits into filtered log-probabilities (temperature, top-k, top-p, min-p; the
filters follow mlx-lm's ``sample_utils``, applied in HF's order with renormalisation after each).
``candidate_log_probs`` gives the same on the top-k candidates only: with top-k on, nothing after the
selection touches the vocabulary (V = 262,144 for Gemma 4), and the acceptance rules take that form too.
``greedy_accept`` is the exact-match rule for argmax drafts. ``speculative_accept`` is exact
speculative sampling (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative
Decoding", Algorithm 1): accept draft ``d_i`` with probability ``min(1, p_i(d_i) / q_i(d_i))``,
resample the first rejection from ``norm(max(p - q, 0))``, else draw the bonus from ``p_K``. The
emitted tokens follow the target's distribution exactly only if each ``d_i`` was *sampled* from ``q_i``.

Nothing here syncs with the host; callers evaluate the returned arrays once per round.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx

_NEG_INF = float("-inf")


@dataclass(frozen=True)
class SamplerConfig:
    """Sampling options. ``temperature == 0`` means greedy; the filters are off at their defaults."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    # the same call with the same seed gives the same tokens, whatever num_draft_tokens; with "auto" at T > 0 the
    # draft length then depends on acceptance counts only, not timings
    seed: int | None = None
    # T > 0 acceptance of drafts: "leviathan" (min(1, p/q), residual resampling; accepts sum min(p, q)) or
    # "match" (the target samples its own token, a draft is kept iff equal; mlx-lm/mlx-vlm's rule, for comparison)
    speculative_rule: str = "leviathan"

    def __post_init__(self):
        _check_types(self)
        checks = (
            ("temperature", self.temperature, self.temperature >= 0, ">= 0 (0 means greedy)"),
            ("top_p", self.top_p, 0 < self.top_p <= 1, "in (0, 1] (1 disables it)"),
            ("top_k", self.top_k, self.top_k >= 0, ">= 0 (0 disables it)"),
            ("min_p", self.min_p, 0 <= self.min_p < 1, "in [0, 1) (0 disables it)"),
        )
        checks += (("speculative_rule", self.speculative_rule, self.speculative_rule in ("leviathan", "match"),
                    "'leviathan' or 'match'"),)
        for name, value, ok, rule in checks:
            if not ok:  # NaN fails every comparison, so it is rejected too
                raise ValueError(f"SamplerConfig.{name}={value!r} is invalid; it must be {rule}.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_types(cfg: SamplerConfig) -> None:
    """Wrong types name the field (a float top_k or a string temperature would fail deep inside MLX)."""
    for name in ("temperature", "top_p", "min_p"):
        value = getattr(cfg, name)
        if not (_is_int(value) or isinstance(value, float)):
            raise ValueError(f"SamplerConfig.{name}={value!r} is invalid; it must be a number.")
    if not _is_int(cfg.top_k):
        raise ValueError(f"SamplerConfig.top_k={cfg.top_k!r} is invalid; it must be an integer (0 disables it).")
    if cfg.seed is not None and not (_is_int(cfg.seed) and 0 <= cfg.seed < 2**64):
        raise ValueError(f"SamplerConfig.seed={cfg.seed!r} is invalid; it must be None or an integer in "
                         "[0, 2**64).")


def _split(key: mx.array | None, num: int = 2) -> list[mx.array | None]:
    """``num`` independent keys derived from ``key``; ``None`` (the global RNG) stays ``None``."""
    return [None] * num if key is None else list(mx.random.split(key, num))


def _normalize(x: mx.array) -> mx.array:
    return x - mx.logsumexp(x, axis=-1, keepdims=True)


def _top_k(x: mx.array, k: int) -> tuple[mx.array, mx.array]:
    """The ``k`` largest of ``x`` ``(..., V)``: their ids ``(..., k)`` int32 in increasing order, and their values.

    Ties at the k-th value are settled by ``argpartition``, the choice the full-vocabulary version made too.
    """
    ids = mx.argpartition(-x, kth=k - 1, axis=-1)[..., :k]
    ids = mx.sort(ids, axis=-1).astype(mx.int32)  # id order: `_top_p` breaks ties by it
    return ids, mx.take_along_axis(x, ids, axis=-1)


def _top_p(logprobs: mx.array, top_p: float) -> mx.array:
    """Keep the smallest prefix (by descending probability, ties by position) whose mass reaches ``top_p``.

    A token stays if the mass strictly before it is < top_p, so the most likely token always stays. The last axis
    must be in token-id order: a stable descending sort puts tied tokens in that order, and this finds the same
    prefix from sorted values alone (no argsort, no scatter back).
    """
    desc = -mx.sort(-logprobs, axis=-1)
    mass_before = mx.cumsum(mx.exp(desc), axis=-1, inclusive=False)
    kept = mx.sum(mass_before < top_p, axis=-1, keepdims=True)  # >= 1: the first token's mass before is 0
    last = mx.take_along_axis(desc, kept - 1, axis=-1)  # the smallest kept value
    above = logprobs > last
    tied = logprobs == last
    # of the tokens tied at `last`, the prefix holds the first `kept - #above` in id order
    room = kept - mx.sum(above, axis=-1, keepdims=True)
    keep = above | (tied & (mx.cumsum(tied.astype(mx.int32), axis=-1) <= room))
    return mx.where(keep, logprobs, _NEG_INF)


def _min_p(logprobs: mx.array, min_p: float) -> mx.array:
    threshold = mx.max(logprobs, axis=-1, keepdims=True) + math.log(min_p)
    return mx.where(logprobs >= threshold, logprobs, _NEG_INF)


def candidate_log_probs(logits: mx.array, cfg: SamplerConfig) -> tuple[mx.array | None, mx.array]:
    """Processed log-probabilities on the sampling distribution's candidates: the top-k tokens when top-k is on.

    Everything after top-k (renormalising, top-p's sort, min-p) then runs on ``(..., k)`` values instead of the
    vocabulary: at V = 262,144 and Gemma's top_k = 64 that is the difference between a full sort per row and none.
    The result equals ``log_probs`` restricted to ``ids`` (every other token has probability 0).

    Args:
        logits: ``(..., V)`` raw logits, any float dtype.
        cfg: sampler options; ``cfg.temperature`` must be > 0.

    Returns:
        ``(ids, logprobs)``: ``ids`` ``(..., k)`` int32 token ids in increasing order and ``logprobs`` ``(..., k)``
        float32 over them, or ``ids=None`` and ``logprobs`` ``(..., V)`` when top-k is off (``top_k`` 0 or >= V).
        Filtered tokens are at ``-inf``.
    """
    if cfg.greedy:
        raise ValueError("log_probs needs temperature > 0; use argmax (greedy_accept) for temperature=0.")
    x = logits.astype(mx.float32) / cfg.temperature
    ids = None
    if 0 < cfg.top_k < x.shape[-1]:
        ids, x = _top_k(x, cfg.top_k)
    x = _normalize(x)
    if cfg.top_p < 1.0:  # with top-k off this sorts the vocabulary: exact top-p needs the full order
        x = _normalize(_top_p(x, cfg.top_p))
    if cfg.min_p > 0.0:
        x = _normalize(_min_p(x, cfg.min_p))
    return ids, x


def scatter_log_probs(ids: mx.array, logprobs: mx.array, vocab_size: int) -> mx.array:
    """Candidate log-probabilities ``(..., n)`` at ``ids`` -> ``(..., vocab_size)``, ``-inf`` elsewhere."""
    out = mx.full((*ids.shape[:-1], vocab_size), _NEG_INF, dtype=mx.float32)
    return mx.put_along_axis(out, ids, logprobs.astype(mx.float32), axis=-1)


def log_probs(logits: mx.array, cfg: SamplerConfig) -> mx.array:
    """Processed log-probabilities of the sampling distribution.

    Args:
        logits: ``(..., V)`` raw logits, any float dtype.
        cfg: sampler options; ``cfg.temperature`` must be > 0.

    Returns:
        ``(..., V)`` float32 log-probabilities after temperature, top-k, top-p and min-p (in that order, each
        renormalised), with filtered tokens at ``-inf``.
    """
    ids, x = candidate_log_probs(logits, cfg)
    return x if ids is None else scatter_log_probs(ids, x, logits.shape[-1])


def _to_ids(index: mx.array, ids: mx.array | None) -> mx.array:
    """Positions ``(...,)`` along the candidate axis -> token ids (``ids`` None: positions are ids)."""
    return index if ids is None else mx.take_along_axis(ids, index[..., None], axis=-1)[..., 0]


def choose(logits: mx.array, cfg: SamplerConfig, key: mx.array | None = None) -> mx.array:
    """The target's own next token: ``(..., V)`` logits -> ``(...,)`` int32, argmax or a sample of ``log_probs``
    (from ``key``; None: MLX's global RNG)."""
    if cfg.greedy:
        return mx.argmax(logits, axis=-1).astype(mx.int32)
    ids, x = candidate_log_probs(logits, cfg)
    return _to_ids(sample(x, key), ids)


def sample(logprobs: mx.array, key: mx.array | None = None) -> mx.array:
    """Draw one token per row: ``(..., V)`` log-probabilities (or logits) -> ``(...,)`` int32 ids."""
    return mx.random.categorical(logprobs, axis=-1, key=key).astype(mx.int32)


def _accepted_prefix(accept: mx.array) -> mx.array:
    """Length of the all-True prefix along the last axis: ``(..., K)`` bool -> ``(...,)`` int32."""
    return mx.sum(mx.cumprod(accept.astype(mx.int32), axis=-1), axis=-1).astype(mx.int32)


def _check_shapes(target: mx.array, draft_tokens: mx.array, draft: mx.array | None = None,
                  target_ids: mx.array | None = None):
    k = draft_tokens.shape[-1]
    ok = target.ndim >= 2 and target.shape[-2] == k + 1 and target.shape[:-2] == draft_tokens.shape[:-1]
    if target_ids is not None:
        ok = ok and target_ids.shape == target.shape
    if draft is not None:  # with target_ids the vocabulary size is the draft's own
        ok = ok and draft.shape[:-1] == draft_tokens.shape
        ok = ok and (target_ids is not None or draft.shape[-1] == target.shape[-1])
    if not ok:
        got = f"target {target.shape}, draft_tokens {draft_tokens.shape}"
        got += "" if draft is None else f", draft {draft.shape}"
        got += "" if target_ids is None else f", target_ids {target_ids.shape}"
        want = "target (..., K+1, V) (or target and target_ids (..., K+1, n)), draft (..., K, V), "
        want += "draft_tokens (..., K)"
        raise ValueError(f"shape mismatch ({got}); expected {want}.")


def greedy_accept(target_logits: mx.array, draft_tokens: mx.array) -> tuple[mx.array, mx.array]:
    """Exact-match acceptance of argmax drafts.

    Args:
        target_logits: ``(..., K+1, V)`` target logits at the verify positions (leading batch dims allowed).
        draft_tokens: ``(..., K)`` int draft tokens.

    Returns:
        ``(n, tokens)``: ``n`` ``(...,)`` int32, the length of the longest prefix with
        ``draft[i] == argmax(target_logits[i])``; ``tokens`` ``(..., K+1)`` int32 with ``tokens[:n]`` the
        accepted drafts and ``tokens[n]`` the target's argmax at row ``n`` (correction or bonus).
        Entries after ``n`` are meaningless.
    """
    _check_shapes(target_logits, draft_tokens)
    target = mx.argmax(target_logits, axis=-1).astype(mx.int32)  # (..., K+1)
    n = _accepted_prefix(draft_tokens.astype(mx.int32) == target[..., :-1])
    return n, target  # the accepted drafts equal the target's argmax, so the argmax row is the answer


def _log_prob_of(logprobs: mx.array, ids: mx.array | None, tokens: mx.array) -> mx.array:
    """``log p(tokens)`` ``(...,)`` from ``(..., n)`` log-probabilities over ``ids`` (None: the vocabulary);
    ``-inf`` for a token that is not a candidate."""
    if ids is None:
        return mx.take_along_axis(logprobs, tokens[..., None], axis=-1)[..., 0]
    return mx.max(mx.where(ids == tokens[..., None], logprobs, _NEG_INF), axis=-1)  # candidate ids are distinct


def speculative_accept(
    target_logprobs: mx.array,
    draft_logprobs: mx.array,
    draft_tokens: mx.array,
    key: mx.array | None = None,
    target_ids: mx.array | None = None,
) -> tuple[mx.array, mx.array]:
    """Exact speculative sampling (Leviathan et al. 2023, Algorithm 1).

    Leading batch dims are allowed; every row gets independent randomness from the one ``key``. With
    ``target_ids`` (``candidate_log_probs``' candidates) the target is given on its support only, and so is the
    work: the residual ``max(p - q, 0)`` is zero wherever ``p`` is, so it is formed and sampled there.

    Args:
        target_logprobs: ``(..., K+1, V)`` target log-probabilities ``log p_i`` (after ``log_probs``), or
            ``(..., K+1, n)`` over ``target_ids`` (``p`` is 0 elsewhere).
        draft_logprobs: ``(..., K, V)`` log-probabilities ``log q_i`` each draft token was *sampled* from.
        draft_tokens: ``(..., K)`` int draft tokens, ``d_i ~ q_i``.
        key: PRNG key (``mx.random.key(seed)``); ``None`` uses MLX's global RNG.
        target_ids: ``(..., K+1, n)`` int token ids of ``target_logprobs``' last axis, distinct per row; ``None``
            when that axis is the vocabulary.

    Returns:
        ``(n, tokens)`` as in ``greedy_accept``: ``tokens[:n]`` are the accepted drafts and ``tokens[n]``
        is drawn from ``norm(max(p_n - q_n, 0))`` after a rejection, or from ``p_K`` when all ``K`` drafts
        were accepted.
    """
    _check_shapes(target_logprobs, draft_tokens, draft_logprobs, target_ids)
    k = draft_tokens.shape[-1]
    key_accept, key_residual = _split(key)
    log_p = target_logprobs.astype(mx.float32)  # (..., K+1, n or V)
    d = draft_tokens.astype(mx.int32)
    rows_ids = None if target_ids is None else target_ids[..., :k, :]
    p_d = mx.exp(_log_prob_of(log_p[..., :k, :], rows_ids, d))  # (..., K)
    q_d = mx.exp(_log_prob_of(draft_logprobs, None, d).astype(mx.float32))
    # u < p/q without dividing: q(d) = 0 accepts iff p(d) > 0, p(d) = 0 always rejects.
    u = mx.random.uniform(shape=p_d.shape, key=key_accept)
    n = _accepted_prefix(u * q_d < p_d)

    # Row i < K: the residual after rejecting draft i; row K: the bonus distribution p_K.
    # Sample every row at once, then keep row n.
    p = mx.exp(log_p)
    log_q = draft_logprobs if rows_ids is None else mx.take_along_axis(draft_logprobs, rows_ids, axis=-1)
    residual = mx.maximum(p[..., :k, :] - mx.exp(log_q.astype(mx.float32)), 0.0)
    residual = mx.concatenate([residual, p[..., k:, :]], axis=-2)
    # An all-zero residual means p == q, where rejection is impossible; fall back to p to stay finite.
    empty = mx.sum(residual, axis=-1, keepdims=True) <= 0
    residual = mx.where(empty, p, residual)
    resampled = _to_ids(sample(mx.log(residual), key_residual), target_ids)  # (..., K+1)
    drafts = mx.concatenate([d, resampled[..., k:]], axis=-1)
    tokens = mx.where(mx.arange(k + 1) < n[..., None], drafts, resampled)
    return n, tokens


def match_accept(target_logprobs: mx.array, draft_tokens: mx.array, key: mx.array | None = None,
                 target_ids: mx.array | None = None):
    """The exact-match rule: the target samples a token at every verify row; drafts are kept while equal to it.

    Exact as well (every emitted token is a target sample) but accepts only sum_v p(v) q(v) per draft, never more
    than `speculative_accept`'s sum_v min(p(v), q(v)). Same shapes and return value as `greedy_accept`;
    ``target_ids`` as in `speculative_accept`.
    """
    _check_shapes(target_logprobs, draft_tokens, target_ids=target_ids)
    target = _to_ids(sample(target_logprobs, key), target_ids)  # (..., K+1)
    n = _accepted_prefix(draft_tokens.astype(mx.int32) == target[..., :-1])
    return n, target
