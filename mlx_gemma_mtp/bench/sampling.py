"""Sampling cost at Gemma 4's vocabulary, old against new in one run: `python -m mlx_gemma_mtp.bench_sampling`.

Times `log_probs` on a (K+1, V) = (9, 262144) float32 batch of logits (the verify rows of a K = 8 round) for each
filter setting, and the whole T > 0 acceptance of a K = 8 round (`speculative.accept`) at Gemma's defaults
(temperature 1.0, top_k 64, top_p 0.95), against the implementation before issue 10, which sorted the whole
vocabulary for top-p and formed p, q and the residual vocabulary-wide. That implementation is kept below, marked
REFERENCE, as the oracle: the script raises unless old and new keep the same tokens with the same log-probabilities
(to float32 rounding) and accept the same drafts from the same random numbers. Times are the median of
`--repeats` calls, each evaluated (`mx.eval`).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import mlx.core as mx
import numpy as np

from ..models.gemma4_text import TargetOutput
from ..sampling import SamplerConfig, log_probs, sample
from ..speculative import accept

GEMMA = {"temperature": 1.0, "top_k": 64, "top_p": 0.95}  # generation_config.json of the Gemma 4 checkpoints
CASES = {
    "unfiltered": SamplerConfig(temperature=1.0),
    "top-k 64": SamplerConfig(temperature=1.0, top_k=64),
    "top-k 64 + top-p 0.95": SamplerConfig(**GEMMA),
    "top-p 0.95": SamplerConfig(temperature=1.0, top_p=0.95),
    "min-p 0.05": SamplerConfig(temperature=1.0, min_p=0.05),
}
ATOL = 1e-5  # log-probabilities agree to float32 rounding (the old code normalised over V entries, mostly -inf)

# ------------------------------------------------------------------------------------------------------------
# REFERENCE: `sampling.py` before issue 10 (full-vocabulary sort and scatter), verbatim but for the names.
# Kept as the oracle for exactness and the baseline for speed; do not optimise.

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
    """REFERENCE `log_probs`: (..., V) logits -> (..., V) filtered log-probabilities, sorting the vocabulary."""
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


# ------------------------------------------------------------------------------------------------------------


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of `fn()` evaluated, in ms, after one untimed warm-up call."""
    mx.eval(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def check_same(name: str, old: mx.array, new: mx.array) -> float:
    """Raise unless `old` and `new` log-probabilities keep the same tokens with equal values; the max |diff|."""
    old, new = np.array(old), np.array(new)
    kept_old, kept_new = np.isfinite(old), np.isfinite(new)
    if not (kept_old == kept_new).all():
        raise AssertionError(f"{name}: kept tokens differ in {(kept_old != kept_new).sum()} places")
    diff = float(np.abs(old[kept_old] - new[kept_old]).max())
    if diff > ATOL:
        raise AssertionError(f"{name}: log-probabilities differ by {diff:.3g} > {ATOL}")
    return diff


def gemma_like_logits(rows: int, vocab: int, seed: int) -> mx.array:
    """(rows, vocab) float32 logits with a long-tailed spread like an LM head's (a few tokens stand out)."""
    key_body, key_peak = mx.random.split(mx.random.key(seed))
    body = 2.0 * mx.random.normal((rows, vocab), key=key_body)
    return body + 6.0 * (mx.random.uniform(shape=(rows, vocab), key=key_peak) > 0.9995)


def _accept_inputs(logits: mx.array, cfg: SamplerConfig, seed: int):
    """Drafts and their q (K, V) as the drafter gives them: sampled from a perturbed copy of the target's rows."""
    k = logits.shape[0] - 1
    noise = mx.random.normal(logits[:k].shape, key=mx.random.key(seed + 1))
    q = log_probs(logits[:k] + noise, cfg)  # (K, V), -inf outside the drafter's top-k
    drafts = sample(q, mx.random.key(seed + 2))
    mx.eval(q, drafts)
    return q, drafts


def bench_accept(logits: mx.array, repeats: int, seed: int) -> tuple[float, float, str]:
    """(old ms, new ms, check) for the acceptance of a K = len(logits) - 1 round at Gemma's defaults."""
    cfg = SamplerConfig(**GEMMA)
    q, drafts = _accept_inputs(logits, cfg, seed)
    out = TargetOutput(logits=logits[None], hidden=None, shared_kv=None)

    def old():
        return reference_speculative_accept(reference_log_probs(logits, cfg), q, drafts)

    def new():
        return accept(out, drafts, q, cfg)

    for s in range(5):  # same random numbers -> the same accepted count (the resample draws differ by design)
        mx.random.seed(s)
        n_old = old()[0].item()
        mx.random.seed(s)
        n_new, tokens = new()
        if n_new.item() != n_old or not mx.all(tokens[: n_old] == drafts[: n_old]).item():
            raise AssertionError(f"speculative accept: old accepted {n_old}, new {n_new.item()} (seed {s})")
    return median_ms(old, repeats), median_ms(new, repeats), "same n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m mlx_gemma_mtp.bench_sampling",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=9, help="verify rows, K + 1")
    p.add_argument("--vocab", type=int, default=262_144)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    logits = gemma_like_logits(args.rows, args.vocab, args.seed)
    mx.eval(logits)
    print(f"({args.rows}, {args.vocab}) float32 logits, {mx.default_device()}, median of {args.repeats} calls")
    print(f"{'case':28s} {'old ms':>9s} {'new ms':>9s} {'speedup':>8s}  check")
    for name, cfg in CASES.items():
        diff = check_same(name, reference_log_probs(logits, cfg), log_probs(logits, cfg))
        old = median_ms(lambda cfg=cfg: reference_log_probs(logits, cfg), args.repeats)
        new = median_ms(lambda cfg=cfg: log_probs(logits, cfg), args.repeats)
        print(f"{name:28s} {old:9.2f} {new:9.2f} {old / new:7.1f}x  same tokens, max |diff| {diff:.1e}")
    old, new, check = bench_accept(logits, args.repeats, args.seed)
    print(f"{f'accept K={args.rows - 1}, Gemma defaults':28s} {old:9.2f} {new:9.2f} {old / new:7.1f}x  {check}")


if __name__ == "__main__":
    main()
