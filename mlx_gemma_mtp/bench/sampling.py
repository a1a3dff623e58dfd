"""Sampling cost at Gemma 4's vocabulary: `python -m mlx_gemma_mtp.bench.sampling`.

Times the current `log_probs` on a (K+1, V) = (9, 262144) float32 batch of logits (the verify rows of a K = 8
round) for each filter setting, and the whole T > 0 acceptance of a K = 8 round (`speculative.accept`) at
Gemma's defaults (temperature 1.0, top_k 64, top_p 0.95). Times are absolute: the median of `--repeats` calls,
each evaluated (`mx.eval`). There is no old-against-new baseline: the implementation before issue 10 (a
full-vocabulary sort) lives with the tests as their oracle (tests/reference_sampling.py, where exactness is
checked), and an "old way" rewritten here would be a strawman whose ratio meant nothing. The one ratio
printed, "x unfiltered", is each row's time over `log_probs` without filters: the normalisation over V that
every sampler pays, so it says what the filters (and the acceptance rule) add on top of it. Each row also runs
cheap invariant checks (rows normalised, top-k and min-p bounds kept; the accepted tokens are a prefix of the
drafts and the next one survives the filters) and raises if one fails, so a broken sampler cannot print a fast
time.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import mlx.core as mx
import numpy as np

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
ATOL = 5e-3  # a float32 logsumexp over 262,144 entries (MLX on CPU) is off by ~1e-4 of the mass; a dropped
# renormalisation (e.g. after top-p 0.95) is off by 5e-2
SEEDS = 5  # acceptance rounds checked, one per seed


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of `fn()` evaluated, in ms, after one untimed warm-up call."""
    mx.eval(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def check_log_probs(name: str, logprobs: mx.array, cfg: SamplerConfig) -> str:
    """Raise unless every row is a distribution that respects `cfg`'s top-k and min-p; says how many tokens
    each row kept. Not an oracle (tests/test_sampling.py has those): a guard against timing a broken
    filter."""
    lp = np.array(logprobs, dtype=np.float64)
    kept = np.isfinite(lp)
    counts = kept.sum(axis=-1)
    mass = np.where(kept, np.exp(np.where(kept, lp, 0.0)), 0.0).sum(axis=-1)
    if counts.min() < 1 or np.abs(mass - 1.0).max() > ATOL:
        raise AssertionError(f"{name}: rows keep {counts.min()}..{counts.max()} tokens with mass "
                             f"{mass.min():.6f}..{mass.max():.6f}; each row must keep a token and sum to 1")
    if cfg.top_k > 0 and counts.max() > cfg.top_k:
        raise AssertionError(f"{name}: a row keeps {counts.max()} tokens, more than top_k = {cfg.top_k}")
    if cfg.min_p > 0.0:
        floor = np.max(lp, axis=-1) + math.log(cfg.min_p) - ATOL
        if (np.where(kept, lp, np.inf).min(axis=-1) < floor).any():
            raise AssertionError(f"{name}: a kept token is below min_p = {cfg.min_p} times the top "
                                 "probability")
    return f"kept {counts.min()}-{counts.max()} of {lp.shape[-1]} per row"


def gemma_like_logits(rows: int, vocab: int, seed: int) -> mx.array:
    """(rows, vocab) float32 logits with a long-tailed spread like an LM head's (a few tokens stand out)."""
    key_body, key_peak = mx.random.split(mx.random.key(seed))
    body = 2.0 * mx.random.normal((rows, vocab), key=key_body)
    return body + 6.0 * (mx.random.uniform(shape=(rows, vocab), key=key_peak) > 0.9995)


def accept_inputs(logits: mx.array, cfg: SamplerConfig, seed: int) -> tuple[mx.array, mx.array]:
    """Drafts and their q (K, V) as the drafter gives them: sampled from a perturbed copy of the target's
    rows."""
    k = logits.shape[0] - 1
    noise = mx.random.normal(logits[:k].shape, key=mx.random.key(seed + 1))
    q = log_probs(logits[:k] + noise, cfg)  # (K, V), -inf outside the drafter's top-k
    drafts = sample(q, mx.random.key(seed + 2))
    mx.eval(q, drafts)
    return q, drafts


def check_accept(logits: mx.array, drafts: mx.array, n: mx.array, tokens: mx.array,
                 cfg: SamplerConfig) -> int:
    """Raise unless (n, tokens) is a possible outcome of a round: n in 0..K, tokens[:n] the drafts, tokens[n]
    a token the filters keep at row n. Returns n."""
    k, n = drafts.shape[0], n.item()
    got, want = tokens.tolist(), drafts.tolist()
    if not 0 <= n <= k or got[:n] != want[:n]:
        raise AssertionError(f"speculative accept: n = {n} with tokens {got} for drafts {want}; n must be in "
                             f"0..{k} and the first n tokens the drafts")
    if not math.isfinite(log_probs(logits[n], cfg)[got[n]].item()):
        raise AssertionError(f"speculative accept: token {got[n]} after {n} accepted drafts is one the "
                             "target's filters drop")
    return n


def bench_accept(logits: mx.array, repeats: int, seed: int) -> tuple[float, str]:
    """(ms, check) for the acceptance of a K = len(logits) - 1 round at Gemma's defaults."""
    cfg = SamplerConfig(**GEMMA)
    q, drafts = accept_inputs(logits, cfg, seed)
    counts = []
    for s in range(SEEDS):
        mx.random.seed(s)
        counts.append(check_accept(logits, drafts, *accept(logits, drafts, q, cfg), cfg))
    ms = median_ms(lambda: accept(logits, drafts, q, cfg), repeats)
    return ms, f"accepted {' '.join(map(str, counts))} of {drafts.shape[0]} (seeds 0-{SEEDS - 1})"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m mlx_gemma_mtp.bench.sampling",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=9, help="verify rows, K + 1")
    p.add_argument("--vocab", type=int, default=262_144)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.rows < 2 or args.vocab <= GEMMA["top_k"] or args.repeats < 1:
        p.error(f"--rows {args.rows} / --vocab {args.vocab} / --repeats {args.repeats}: need at least 2 rows "
                f"(one draft), a vocabulary above top-k {GEMMA['top_k']} and at least 1 repeat")

    logits = gemma_like_logits(args.rows, args.vocab, args.seed)
    mx.eval(logits)
    print(f"({args.rows}, {args.vocab}) float32 logits, {mx.default_device()}, median of {args.repeats} "
          "calls; x unfiltered: time over log_probs without filters")
    print(f"{'case':28s} {'ms':>9s} {'x unfiltered':>13s}  check")
    floor = None
    for name, cfg in CASES.items():
        check = check_log_probs(name, log_probs(logits, cfg), cfg)
        ms = median_ms(lambda cfg=cfg: log_probs(logits, cfg), args.repeats)
        floor = floor or ms  # CASES starts with the unfiltered case
        print(f"{name:28s} {ms:9.2f} {ms / floor:12.2f}x  {check}")
    ms, check = bench_accept(logits, args.repeats, args.seed)
    print(f"{f'accept K={args.rows - 1}, Gemma defaults':28s} {ms:9.2f} {ms / floor:12.2f}x  {check}")


if __name__ == "__main__":
    main()
