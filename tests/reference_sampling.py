"""REFERENCE sampler: `mlx_gemma_mtp/sampling.py` before issue 10 (full-vocabulary sort and scatter), verbatim
but for the names. The tests' oracle for the candidate-space filters and acceptance rule that replaced it
(test_sampling.py): top-k by the same argpartition, so even which of several tied tokens stays must agree. It
lives with the tests, not the package, so that a wheel ships no oracle; do not optimise it.
"""

from __future__ import annotations

import math

import mlx.core as mx

from mlx_gemma_mtp.sampling import SamplerConfig, sample

_NEG_INF = float("-inf")


def _ref_normalize(x):
    return x - mx.logsumexp(x, axis=-1, keepdims=True)


def _ref_top_k(x, k):
    if k >= x.shape[-1]:
        return x
    drop = mx.argpartition(-x, kth=k - 1, axis=-1)[..., k:]
    return mx.put_along_axis(x, drop, mx.array(_NEG_INF, x.dtype), axis=-1)


def _ref_top_p(logprobs, top_p):
    order = mx.argsort(-logprobs, axis=-1)
    sorted_lp = mx.take_along_axis(logprobs, order, axis=-1)
    mass_before = mx.cumsum(mx.exp(sorted_lp), axis=-1, inclusive=False)
    kept = mx.where(mass_before < top_p, sorted_lp, _NEG_INF)
    return mx.put_along_axis(logprobs, order, kept, axis=-1)


def _ref_min_p(logprobs, min_p):
    threshold = mx.max(logprobs, axis=-1, keepdims=True) + math.log(min_p)
    return mx.where(logprobs >= threshold, logprobs, _NEG_INF)


def reference_log_probs(logits: mx.array, cfg: SamplerConfig) -> mx.array:
    """REFERENCE `log_probs`: (..., V) logits -> (..., V) filtered log-probabilities, sorting the
    vocabulary."""
    x = logits.astype(mx.float32) / cfg.temperature
    if cfg.top_k > 0:
        x = _ref_top_k(x, cfg.top_k)
    x = _ref_normalize(x)
    if cfg.top_p < 1.0:
        x = _ref_normalize(_ref_top_p(x, cfg.top_p))
    if cfg.min_p > 0.0:
        x = _ref_normalize(_ref_min_p(x, cfg.min_p))
    return x


def reference_speculative_accept(target_logprobs, draft_logprobs, draft_tokens, key=None):
    """REFERENCE `speculative_accept`: p, q and the residual formed over the whole vocabulary."""
    k = draft_tokens.shape[-1]
    key_accept, key_residual = [None, None] if key is None else list(mx.random.split(key, 2))
    p = mx.exp(target_logprobs.astype(mx.float32))
    q = mx.exp(draft_logprobs.astype(mx.float32))
    d = draft_tokens.astype(mx.int32)
    p_d = mx.take_along_axis(p[..., :k, :], d[..., None], axis=-1)[..., 0]
    q_d = mx.take_along_axis(q, d[..., None], axis=-1)[..., 0]
    u = mx.random.uniform(shape=p_d.shape, key=key_accept)
    n = mx.sum(mx.cumprod((u * q_d < p_d).astype(mx.int32), axis=-1), axis=-1).astype(mx.int32)
    residual = mx.concatenate([mx.maximum(p[..., :k, :] - q, 0.0), p[..., k:, :]], axis=-2)
    empty = mx.sum(residual, axis=-1, keepdims=True) <= 0
    residual = mx.where(empty, p, residual)
    resampled = sample(mx.log(residual), key_residual)
    drafts = mx.concatenate([d, resampled[..., k:]], axis=-1)
    tokens = mx.where(mx.arange(k + 1) < n[..., None], drafts, resampled)
    return n, tokens
