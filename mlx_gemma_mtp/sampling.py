"""Token sampling and the speculative acceptance rule, as pure lazy functions over ``mx.array``.

``log_probs`` turns logits into filtered log-probabilities (temperature, top-k, top-p, min-p; the
filters follow mlx-lm's ``sample_utils``, applied in HF's order with renormalisation after each).
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
    seed: int | None = None
    # T > 0 acceptance of drafts: "leviathan" (min(1, p/q), residual resampling; accepts sum min(p, q)) or
    # "match" (the target samples its own token, a draft is kept iff equal; mlx-lm/mlx-vlm's rule, for comparison)
    speculative_rule: str = "leviathan"

    def __post_init__(self):
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


def _split(key: mx.array | None, num: int = 2) -> list[mx.array | None]:
    """``num`` independent keys derived from ``key``; ``None`` (the global RNG) stays ``None``."""
    return [None] * num if key is None else list(mx.random.split(key, num))


def _normalize(x: mx.array) -> mx.array:
    return x - mx.logsumexp(x, axis=-1, keepdims=True)


def _top_k(x: mx.array, k: int) -> mx.array:
    if k >= x.shape[-1]:
        return x
    drop = mx.argpartition(-x, kth=k - 1, axis=-1)[..., k:]
    return mx.put_along_axis(x, drop, mx.array(_NEG_INF, x.dtype), axis=-1)


def _top_p(logprobs: mx.array, top_p: float) -> mx.array:
    # Keep the smallest prefix (by descending probability) whose mass reaches top_p: a token stays if the mass
    # strictly before it is < top_p, so the most likely token always stays.
    order = mx.argsort(-logprobs, axis=-1)
    sorted_lp = mx.take_along_axis(logprobs, order, axis=-1)
    mass_before = mx.cumsum(mx.exp(sorted_lp), axis=-1, inclusive=False)
    kept = mx.where(mass_before < top_p, sorted_lp, _NEG_INF)
    return mx.put_along_axis(logprobs, order, kept, axis=-1)


def _min_p(logprobs: mx.array, min_p: float) -> mx.array:
    threshold = mx.max(logprobs, axis=-1, keepdims=True) + math.log(min_p)
    return mx.where(logprobs >= threshold, logprobs, _NEG_INF)


def log_probs(logits: mx.array, cfg: SamplerConfig) -> mx.array:
    """Processed log-probabilities of the sampling distribution.

    Args:
        logits: ``(..., V)`` raw logits, any float dtype.
        cfg: sampler options; ``cfg.temperature`` must be > 0.

    Returns:
        ``(..., V)`` float32 log-probabilities after temperature, top-k, top-p and min-p (in that order, each
        renormalised), with filtered tokens at ``-inf``.
    """
    if cfg.greedy:
        raise ValueError("log_probs needs temperature > 0; use argmax (greedy_accept) for temperature=0.")
    x = logits.astype(mx.float32) / cfg.temperature
    if cfg.top_k > 0:
        x = _top_k(x, cfg.top_k)
    x = _normalize(x)
    if cfg.top_p < 1.0:
        x = _normalize(_top_p(x, cfg.top_p))
    if cfg.min_p > 0.0:
        x = _normalize(_min_p(x, cfg.min_p))
    return x


def choose(logits: mx.array, cfg: SamplerConfig) -> mx.array:
    """The target's own next token: ``(..., V)`` logits -> ``(...,)`` int32, argmax or a sample of ``log_probs``."""
    return mx.argmax(logits, axis=-1).astype(mx.int32) if cfg.greedy else sample(log_probs(logits, cfg))


def sample(logprobs: mx.array, key: mx.array | None = None) -> mx.array:
    """Draw one token per row: ``(..., V)`` log-probabilities (or logits) -> ``(...,)`` int32 ids."""
    return mx.random.categorical(logprobs, axis=-1, key=key).astype(mx.int32)


def _accepted_prefix(accept: mx.array) -> mx.array:
    """Length of the all-True prefix along the last axis: ``(..., K)`` bool -> ``(...,)`` int32."""
    return mx.sum(mx.cumprod(accept.astype(mx.int32), axis=-1), axis=-1).astype(mx.int32)


def _check_shapes(target: mx.array, draft_tokens: mx.array, draft: mx.array | None = None):
    k = draft_tokens.shape[-1]
    ok = target.ndim >= 2 and target.shape[-2] == k + 1 and target.shape[:-2] == draft_tokens.shape[:-1]
    if draft is not None:
        ok = ok and draft.shape == (*draft_tokens.shape, target.shape[-1])
    if not ok:
        got = f"target {target.shape}, draft_tokens {draft_tokens.shape}"
        got += "" if draft is None else f", draft {draft.shape}"
        want = "target (..., K+1, V), draft (..., K, V), draft_tokens (..., K)"
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


def speculative_accept(
    target_logprobs: mx.array,
    draft_logprobs: mx.array,
    draft_tokens: mx.array,
    key: mx.array | None = None,
) -> tuple[mx.array, mx.array]:
    """Exact speculative sampling (Leviathan et al. 2023, Algorithm 1).

    Leading batch dims are allowed; every row gets independent randomness from the one ``key``.

    Args:
        target_logprobs: ``(..., K+1, V)`` target log-probabilities ``log p_i`` (after ``log_probs``).
        draft_logprobs: ``(..., K, V)`` log-probabilities ``log q_i`` each draft token was *sampled* from.
        draft_tokens: ``(..., K)`` int draft tokens, ``d_i ~ q_i``.
        key: PRNG key (``mx.random.key(seed)``); ``None`` uses MLX's global RNG.

    Returns:
        ``(n, tokens)`` as in ``greedy_accept``: ``tokens[:n]`` are the accepted drafts and ``tokens[n]``
        is drawn from ``norm(max(p_n - q_n, 0))`` after a rejection, or from ``p_K`` when all ``K`` drafts
        were accepted.
    """
    _check_shapes(target_logprobs, draft_tokens, draft_logprobs)
    k = draft_tokens.shape[-1]
    key_accept, key_residual = _split(key)
    p = mx.exp(target_logprobs.astype(mx.float32))  # (..., K+1, V)
    q = mx.exp(draft_logprobs.astype(mx.float32))  # (..., K, V)
    d = draft_tokens.astype(mx.int32)
    p_d = mx.take_along_axis(p[..., :k, :], d[..., None], axis=-1)[..., 0]  # (..., K)
    q_d = mx.take_along_axis(q, d[..., None], axis=-1)[..., 0]
    # u < p/q without dividing: q(d) = 0 accepts iff p(d) > 0, p(d) = 0 always rejects.
    u = mx.random.uniform(shape=p_d.shape, key=key_accept)
    n = _accepted_prefix(u * q_d < p_d)

    # Row i < K: the residual after rejecting draft i; row K: the bonus distribution p_K.
    # Sample every row at once, then keep row n.
    residual = mx.concatenate([mx.maximum(p[..., :k, :] - q, 0.0), p[..., k:, :]], axis=-2)
    # An all-zero residual means p == q, where rejection is impossible; fall back to p to stay finite.
    empty = mx.sum(residual, axis=-1, keepdims=True) <= 0
    residual = mx.where(empty, p, residual)
    resampled = sample(mx.log(residual), key_residual)  # (..., K+1)
    drafts = mx.concatenate([d, resampled[..., k:]], axis=-1)
    tokens = mx.where(mx.arange(k + 1) < n[..., None], drafts, resampled)
    return n, tokens


def match_accept(target_logprobs: mx.array, draft_tokens: mx.array, key: mx.array | None = None):
    """The exact-match rule: the target samples a token at every verify row; drafts are kept while equal to it.

    Exact as well (every emitted token is a target sample) but accepts only sum_v p(v) q(v) per draft, never more
    than `speculative_accept`'s sum_v min(p(v), q(v)). Same shapes and return value as `greedy_accept`.
    """
    _check_shapes(target_logprobs, draft_tokens)
    target = sample(target_logprobs, key)  # (..., K+1)
    n = _accepted_prefix(draft_tokens.astype(mx.int32) == target[..., :-1])
    return n, target
