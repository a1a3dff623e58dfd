"""Tests for mlx_gemma_mtp.sampling: sampler config, logit filters, and the acceptance rules.

The key test is a seeded Monte-Carlo check that speculative sampling (Leviathan et al. 2023) emits
tokens with exactly the target's distribution. The chi-square p-value is computed here (regularized
upper incomplete gamma), so the tests need only numpy.
"""

import math

import mlx.core as mx
import numpy as np
import pytest
from reference_sampling import reference_log_probs as reference_pre_issue_10

from mlx_gemma_mtp.drafting import _sampled_token
from mlx_gemma_mtp.models.gemma4_assistant import Drafter, DrafterArgs
from mlx_gemma_mtp.sampling import (
    SamplerConfig,
    candidate_log_probs,
    choose,
    greedy_accept,
    log_probs,
    match_accept,
    sample,
    scatter_log_probs,
    speculative_accept,
)
from mlx_gemma_mtp.testing.presets import tiny_e2b_pair as random_pair

# ------------------------------------------------------------------------------------------------------------
# chi-square survival function without scipy (Numerical Recipes: series for P, Lentz continued fraction for Q)


def _gamma_q(a: float, x: float) -> float:
    """Regularized upper incomplete gamma Q(a, x)."""
    if x <= 0:
        return 1.0
    log_prefactor = -x + a * math.log(x) - math.lgamma(a)
    if x < a + 1:
        term = total = 1.0 / a
        for i in range(1, 10_000):
            term *= x / (a + i)
            total += term
            if abs(term) < abs(total) * 1e-15:
                break
        return 1.0 - total * math.exp(log_prefactor)
    tiny = 1e-300
    b = x + 1 - a
    c, d = 1 / tiny, 1 / b
    h = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1 / d
        h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return math.exp(log_prefactor) * h


def chi2_pvalue(observed: np.ndarray, expected_probs: np.ndarray) -> float:
    """Pearson chi-square goodness-of-fit p-value; zero-probability cells must be empty."""
    observed, expected_probs = observed.ravel(), expected_probs.ravel()
    support = expected_probs > 0
    assert observed[~support].sum() == 0, f"mass outside the support: {observed[~support]}"
    expected = expected_probs[support] * observed.sum()
    stat = float(((observed[support] - expected) ** 2 / expected).sum())
    return _gamma_q((support.sum() - 1) / 2, stat / 2)


@pytest.mark.parametrize("x", [0.3, 1.0, 4.0, 9.0, 25.0])
def test_chi2_helper_matches_closed_forms(x):
    assert _gamma_q(1.0, x / 2) == pytest.approx(math.exp(-x / 2), rel=1e-10)  # df = 2
    assert _gamma_q(0.5, x / 2) == pytest.approx(math.erfc(math.sqrt(x / 2)), rel=1e-9)  # df = 1
    assert _gamma_q(2.5, 11.070497693516351 / 2) == pytest.approx(0.05, rel=1e-6)  # df = 5, 95% quantile


# ------------------------------------------------------------------------------------------------------------
# SamplerConfig


@pytest.mark.parametrize(
    "field, value",
    [("temperature", -0.1), ("temperature", float("nan")), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1),
     ("min_p", -0.1), ("min_p", 1.0), ("top_k", 2.5), ("top_k", True), ("seed", -1), ("seed", 1.5),
     ("temperature", "0.7")],
)
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=rf"{field}={value!r}"):
        SamplerConfig(**{field: value})


def test_config_greedy_flag():
    assert SamplerConfig().greedy
    assert not SamplerConfig(temperature=0.7, top_p=0.9, top_k=5, min_p=0.1, seed=3).greedy


# ------------------------------------------------------------------------------------------------------------
# log_probs and sample


def _lp(probs, **cfg) -> np.ndarray:
    out = log_probs(mx.log(mx.array(probs, mx.float32)), SamplerConfig(**{"temperature": 1.0, **cfg}))
    assert out.dtype == mx.float32
    return np.array(out)


def _kept(lp: np.ndarray) -> set[int]:
    return set(np.flatnonzero(np.isfinite(lp)).tolist())


def _assert_normalised(lp: np.ndarray):
    np.testing.assert_allclose(np.exp(lp).sum(-1), 1.0, atol=1e-5)


def test_log_probs_requires_temperature():
    for fn in (log_probs, candidate_log_probs):
        with pytest.raises(ValueError, match="temperature"):
            fn(mx.zeros((4,)), SamplerConfig())


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
def test_temperature_scaling(dtype):
    logits = np.array([[1.0, 2.0, 3.0, -1.0], [0.0, 0.5, 0.25, 4.0]], np.float32)
    out = log_probs(mx.array(logits).astype(dtype), SamplerConfig(temperature=2.0))
    assert out.dtype == mx.float32 and out.shape == logits.shape
    x = logits / 2.0
    expected = x - np.log(np.exp(x).sum(-1, keepdims=True))
    np.testing.assert_allclose(np.array(out), expected, atol=2e-2 if dtype != mx.float32 else 1e-6)


def test_top_k_keeps_exactly_k():
    logits = np.random.default_rng(0).normal(size=(2, 3, 17)).astype(np.float32)
    out = np.array(log_probs(mx.array(logits), SamplerConfig(temperature=1.0, top_k=4)))
    _assert_normalised(out)
    for row_logits, row in zip(logits.reshape(-1, 17), out.reshape(-1, 17)):
        top = np.argsort(-row_logits)[:4]
        assert _kept(row) == set(top.tolist())
        e = np.exp(row_logits[top])
        np.testing.assert_allclose(np.exp(row[top]), e / e.sum(), rtol=1e-5)
    assert _kept(_lp([0.1, 0.2, 0.7], top_k=10)) == {0, 1, 2}  # k >= V is a no-op


@pytest.mark.parametrize("top_p, kept", [(0.45, {2}), (0.75, {2, 0}), (0.81, {2, 0, 3}), (1.0, {0, 1, 2, 3})])
def test_top_p_keeps_minimal_nucleus(top_p, kept):
    out = _lp([0.3, 0.05, 0.5, 0.15], top_p=top_p)  # sorted: 2 (0.5), 0 (0.3), 3 (0.15), 1 (0.05)
    assert _kept(out) == kept
    _assert_normalised(out)


@pytest.mark.parametrize("min_p, kept", [(0.2, {0, 1, 2}), (0.5, {0, 1}), (0.9, {0})])
def test_min_p_relative_to_max(min_p, kept):
    out = _lp([0.5, 0.3, 0.15, 0.05], min_p=min_p)  # threshold = min_p * 0.5
    assert _kept(out) == kept
    _assert_normalised(out)


def test_filters_apply_in_order_with_renormalisation():
    # After top-k=2 the top token has mass 4/7 > 0.5, so top-p=0.5 then keeps only it (HF order).
    out = _lp([0.4, 0.3, 0.2, 0.1], top_k=2, top_p=0.5)
    assert _kept(out) == {0}
    np.testing.assert_allclose(out[0], 0.0, atol=1e-6)


def test_sample_is_seeded_and_respects_support():
    lp = mx.broadcast_to(mx.log(mx.array([0.2, 0.0, 0.5, 0.3])), (20_000, 4))
    a, b = sample(lp, mx.random.key(1)), sample(lp, mx.random.key(1))
    assert a.dtype == mx.int32 and a.shape == (20_000,)
    assert mx.array_equal(a, b) and not mx.array_equal(a, sample(lp, mx.random.key(2)))
    counts = np.bincount(np.array(a), minlength=4)
    assert counts[1] == 0
    assert chi2_pvalue(counts, np.array([0.2, 0.0, 0.5, 0.3])) > 0.01


# ------------------------------------------------------------------------------------------------------------
# greedy_accept


def _onehot_logits(argmaxes, vocab=6):
    logits = np.zeros((len(argmaxes), vocab), np.float32)
    logits[np.arange(len(argmaxes)), argmaxes] = 5.0
    return mx.array(logits)


@pytest.mark.parametrize(
    "drafts, n_expected",
    # all accepted, none, partial, and a later match after a mismatch (ignored)
    [([2, 0, 4], 3), ([5, 0, 4], 0), ([2, 0, 3], 2), ([2, 1, 4], 1)],
)
def test_greedy_accept(drafts, n_expected):
    target = [2, 0, 4, 1]
    n, tokens = greedy_accept(_onehot_logits(target), mx.array(drafts))
    assert n.shape == () and n.dtype == mx.int32 and tokens.dtype == mx.int32 and tokens.shape == (4,)
    n, tokens = n.item(), tokens.tolist()
    assert n == n_expected
    assert tokens[:n] == drafts[:n] and tokens[n] == target[n]


def test_greedy_accept_k0_and_batch():
    n, tokens = greedy_accept(_onehot_logits([3]), mx.zeros((0,), mx.int32))
    assert n.item() == 0 and tokens.tolist() == [3]
    logits = mx.stack([_onehot_logits([2, 0, 4]), _onehot_logits([1, 1, 1])])
    n, tokens = greedy_accept(logits, mx.array([[2, 0], [1, 5]]))
    assert n.tolist() == [2, 1] and tokens[:, 0].tolist() == [2, 1]


def test_accept_rejects_bad_shapes():
    with pytest.raises(ValueError, match="shape mismatch"):
        greedy_accept(mx.zeros((3, 6)), mx.zeros((3,), mx.int32))
    with pytest.raises(ValueError, match="shape mismatch"):
        speculative_accept(mx.zeros((4, 6)), mx.zeros((3, 5)), mx.zeros((3,), mx.int32))


# ------------------------------------------------------------------------------------------------------------
# speculative_accept: edge cases

V, K = 6, 3


def _log(rows) -> mx.array:
    return mx.log(mx.array(np.asarray(rows, np.float32)))


def test_speculative_k0_samples_target():
    p = np.array([0.1, 0.0, 0.4, 0.2, 0.3, 0.0])
    n, tokens = speculative_accept(
        mx.broadcast_to(_log([p]), (20_000, 1, V)), mx.zeros((20_000, 0, V)), mx.zeros((20_000, 0), mx.int32),
        mx.random.key(0),
    )
    assert n.shape == (20_000,) and tokens.shape == (20_000, 1) and not n.any().item()
    assert chi2_pvalue(np.bincount(np.array(tokens[:, 0]), minlength=V), p) > 0.01


def test_speculative_zero_probability_drafts():
    p = _log([[0.5, 0.5, 0, 0, 0, 0]] * 2)  # (K+1=2, V)
    q = _log([[0.0, 0.5, 0.5, 0, 0, 0]])  # q(0) = 0 < p(0); p(2) = 0 < q(2)
    for seed in range(20):
        n, tokens = speculative_accept(p, q, mx.array([0]), mx.random.key(seed))  # q(d) = 0, p(d) > 0: accept
        assert n.item() == 1
        n, tokens = speculative_accept(p, q, mx.array([2]), mx.random.key(seed))  # p(d) = 0: always reject
        assert n.item() == 0 and tokens[0].item() == 0  # residual max(p - q, 0) has mass only on token 0


def test_speculative_p_equals_q_accepts_all_and_is_finite():
    rows = np.random.default_rng(1).dirichlet(np.ones(V), size=K + 1).astype(np.float32)
    lp = _log(rows)
    n, tokens = speculative_accept(lp, lp[:K], mx.array([1, 2, 3]), mx.random.key(0))
    assert n.item() == K and tokens[:K].tolist() == [1, 2, 3] and 0 <= tokens[K].item() < V


def test_speculative_is_reproducible_and_global_rng_works():
    p, q = _log(P_ROWS[: K + 1]), _log(Q_ROWS[:K])
    d = sample(mx.broadcast_to(q, (64, K, V)), mx.random.key(5))
    p, q = mx.broadcast_to(p, (64, K + 1, V)), mx.broadcast_to(q, (64, K, V))
    a, b, c = (speculative_accept(p, q, d, mx.random.key(s)) for s in (7, 7, 8))
    assert mx.array_equal(a[0], b[0]) and mx.array_equal(a[1], b[1])
    assert not (mx.array_equal(a[0], c[0]) and mx.array_equal(a[1], c[1]))
    n, tokens = speculative_accept(p, q, d)  # key=None: MLX's global RNG
    assert n.shape == (64,) and tokens.shape == (64, K + 1)


# ------------------------------------------------------------------------------------------------------------
# speculative_accept: exactness Monte-Carlo
#
# Target and draft rows depend only on the absolute position (not on the context), so the emitted stream
# must be independent draws from P_ROWS[0], P_ROWS[1], ... The rows include q = 0 where p > 0 and vice versa.

P_ROWS = np.array(
    [
        [0.30, 0.25, 0.20, 0.15, 0.10, 0.00],
        [0.05, 0.40, 0.00, 0.25, 0.10, 0.20],
        [0.10, 0.10, 0.30, 0.00, 0.20, 0.30],
        [0.25, 0.00, 0.25, 0.25, 0.25, 0.00],
        [0.15, 0.15, 0.20, 0.20, 0.15, 0.15],
        [0.10, 0.30, 0.10, 0.30, 0.00, 0.20],
        [0.20, 0.20, 0.20, 0.20, 0.10, 0.10],
    ]
)
Q_ROWS = np.array(
    [
        [0.10, 0.00, 0.40, 0.20, 0.05, 0.25],
        [0.30, 0.30, 0.10, 0.00, 0.10, 0.20],
        [0.00, 0.20, 0.30, 0.30, 0.20, 0.00],
        [0.25, 0.25, 0.25, 0.25, 0.00, 0.00],
        [0.50, 0.00, 0.00, 0.20, 0.20, 0.10],
        [0.10, 0.10, 0.10, 0.10, 0.30, 0.30],
    ]
)
N_RUNS, STREAM_LEN = 100_000, 4


def _simulate_stream(seed: int, candidates: bool = False):
    """Speculative rounds until every run emitted STREAM_LEN tokens.

    With `candidates`, the target rows are given as (target_ids, log-probs) in a scrambled id order per position.
    Returns (stream (N, STREAM_LEN), n of the first round (N,), drafts of the first round (N, K)).
    """
    log_p, log_q = _log(P_ROWS), _log(Q_ROWS)
    order = mx.array(np.argsort(np.random.default_rng(seed).random(P_ROWS.shape), axis=-1))  # (positions, V)
    if candidates:
        log_p = mx.take_along_axis(log_p, order, axis=-1)
    stream = np.full((N_RUNS, STREAM_LEN + K + 1), -1, np.int64)
    pos = np.zeros(N_RUNS, np.int64)
    first = None
    for round_key in mx.random.split(mx.random.key(seed), STREAM_LEN):  # every round emits >= 1 token
        key_draft, key_accept = mx.random.split(round_key)
        start = np.minimum(pos, STREAM_LEN - 1)  # finished runs keep drawing in range; their output is unused
        rows = mx.array(start[:, None] + np.arange(K + 1))  # (N, K+1) absolute positions of the verify rows
        target, draft_lp = log_p[rows], log_q[rows[:, :K]]  # (N, K+1, V), (N, K, V)
        drafts = sample(draft_lp, key_draft)  # d_i ~ q_i, as the algorithm requires
        target_ids = order[rows] if candidates else None
        n, tokens = speculative_accept(target, draft_lp, drafts, key_accept, target_ids=target_ids)
        mx.eval(n, tokens, drafts)
        n, tokens = np.array(n), np.array(tokens)
        for i in range(K + 1):  # write tokens[:n+1] at pos..pos+n
            emit = (i <= n) & (pos + i < stream.shape[1])
            stream[emit, pos[emit] + i] = tokens[emit, i]
        first = first or (n, np.array(drafts))
        pos = pos + n + 1
    assert (pos >= STREAM_LEN).all()
    return stream[:, :STREAM_LEN], *first


@pytest.fixture(scope="module")
def stream_run():
    return _simulate_stream(seed=0)


def test_first_token_distribution_is_target(stream_run):
    stream, _, _ = stream_run
    assert chi2_pvalue(np.bincount(stream[:, 0], minlength=V), P_ROWS[0]) > 0.01


def test_first_two_tokens_joint_is_product_of_targets(stream_run):
    stream, _, _ = stream_run
    joint = np.bincount(stream[:, 0] * V + stream[:, 1], minlength=V * V)
    assert chi2_pvalue(joint, np.outer(P_ROWS[0], P_ROWS[1])) > 0.01


@pytest.mark.parametrize("position", [2, 3])
def test_later_token_marginals_are_target(stream_run, position):
    stream, _, _ = stream_run
    assert chi2_pvalue(np.bincount(stream[:, position], minlength=V), P_ROWS[position]) > 0.01


def test_acceptance_rate_matches_theory_and_beats_exact_match(stream_run):
    _, n, drafts = stream_run
    alpha = np.minimum(P_ROWS[:K], Q_ROWS[:K]).sum(-1)  # Leviathan: P(accept d_i | reached) = sum min(p, q)
    rate = (n >= 1).mean()
    assert abs(rate - alpha[0]) < 0.01, (rate, alpha[0])
    expected_n = sum(np.prod(alpha[: i + 1]) for i in range(K))
    assert abs(n.mean() - expected_n) < 0.02, (n.mean(), expected_n)

    # The naive exact rule "sample x ~ p, accept iff x == d" accepts with probability sum p * q only.
    x = np.array(sample(mx.broadcast_to(_log(P_ROWS[:1]), (N_RUNS, V)), mx.random.key(123)))
    naive_rate = (x == drafts[:, 0]).mean()
    naive_theory = (P_ROWS[0] * Q_ROWS[0]).sum()
    assert abs(naive_rate - naive_theory) < 0.01, (naive_rate, naive_theory)
    assert rate > naive_rate and alpha[0] >= naive_theory
    print(
        f"first-draft acceptance: speculative {rate:.4f} (theory {alpha[0]:.4f}), "
        f"exact-match {naive_rate:.4f} (theory {naive_theory:.4f}); "
        f"mean accepted {n.mean():.4f} (theory {expected_n:.4f})"
    )


def test_match_accept_is_the_exact_match_rule():
    """`match_accept` keeps drafts while they equal the target's own samples: first token ~ p_0, acceptance
    sum p*q (below Leviathan's sum min(p, q) on the same rows)."""
    n_runs = 50_000
    log_p, log_q = _log(P_ROWS[: K + 1]), _log(Q_ROWS[:K])
    key_draft, key_accept = mx.random.split(mx.random.key(7))
    drafts = sample(mx.broadcast_to(log_q, (n_runs, K, V)), key_draft)
    n, tokens = match_accept(mx.broadcast_to(log_p, (n_runs, K + 1, V)), drafts, key_accept)
    n, tokens = np.array(n), np.array(tokens)
    assert chi2_pvalue(np.bincount(tokens[:, 0], minlength=V), P_ROWS[0]) > 0.01
    rate, theory = (n >= 1).mean(), (P_ROWS[0] * Q_ROWS[0]).sum()
    assert abs(rate - theory) < 0.01, (rate, theory)
    assert theory < np.minimum(P_ROWS[0], Q_ROWS[0]).sum()
    with pytest.raises(ValueError, match="speculative_rule"):
        SamplerConfig(temperature=1.0, speculative_rule="sometimes")


def test_choose_is_argmax_or_a_sample_of_the_processed_distribution():
    logits = mx.random.normal((3, 50), key=mx.random.key(1))
    greedy = choose(logits, SamplerConfig())
    assert greedy.dtype == mx.int32 and greedy.tolist() == mx.argmax(logits, axis=-1).tolist()
    cfg = SamplerConfig(temperature=0.7, top_k=5)
    mx.random.seed(4)
    drawn = choose(logits, cfg)
    mx.random.seed(4)
    ids, lp = candidate_log_probs(logits, cfg)  # choose samples on the candidates, then maps them to ids
    assert drawn.dtype == mx.int32
    assert drawn.tolist() == mx.take_along_axis(ids, sample(lp)[:, None], axis=-1)[:, 0].tolist()
    # and the draws follow log_probs over the vocabulary
    probs = np.exp(np.array(log_probs(logits[:1], cfg)))[0]
    draws = np.array(choose(mx.broadcast_to(logits[:1], (20_000, 50)), cfg))
    assert chi2_pvalue(np.bincount(draws, minlength=50), probs) > 0.01


# ------------------------------------------------------------------------------------------------------------
# Candidate space (issue 10): the filters on the top-k candidates equal a full sort of the vocabulary


def _sorted_log_probs(sorted_row: np.ndarray, keep: np.ndarray) -> np.ndarray:
    vals = np.where(keep, sorted_row, -np.inf)
    return vals - np.logaddexp.reduce(vals[keep])


def reference_log_probs(logits: np.ndarray, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> np.ndarray:
    """The filters by the book, in float64: one stable descending sort per row (ties: lower id first), top-k,
    top-p and min-p on the sorted row, each renormalised."""
    x = logits.astype(np.float64).reshape(-1, logits.shape[-1]) / temperature
    out = np.full_like(x, -np.inf)
    for row, out_row in zip(x, out):
        order = np.argsort(-row, kind="stable")
        keep = np.arange(len(row)) < (top_k or len(row))
        if top_p < 1.0:
            probs = np.exp(_sorted_log_probs(row[order], keep))
            keep &= np.cumsum(probs) - probs < top_p
        if min_p > 0.0:
            lp = _sorted_log_probs(row[order], keep)
            keep &= lp >= lp.max() + math.log(min_p)
        out_row[order] = _sorted_log_probs(row[order], keep)
    return out.reshape(logits.shape)


def _assert_same_log_probs(got: mx.array, want: np.ndarray):
    got = np.array(got)
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))  # the same tokens kept
    np.testing.assert_allclose(got[np.isfinite(want)], want[np.isfinite(want)], atol=2e-5)


CONFIGS = [  # the third is Gemma's default
    {"top_k": 8}, {"top_p": 0.9}, {"top_k": 64, "top_p": 0.95}, {"min_p": 0.1},
    {"top_k": 20, "top_p": 0.6, "min_p": 0.2, "temperature": 0.7},
    {"top_p": 0.5, "min_p": 0.05, "temperature": 1.8},
]


def _tied_logits(rows: int, vocab: int, top_k: int, seed: int) -> np.ndarray:
    """Logits on a coarse grid (ties everywhere, at the top-p boundary too), with the k-th and (k+1)-th largest
    distinct per row so that the top-k set is defined without a tie-break."""
    rng = np.random.default_rng(seed)
    x = np.round(rng.normal(size=(rows, vocab)) * 2) / 2
    if top_k:
        top = np.argsort(-x, axis=-1, kind="stable")[:, :top_k]
        np.put_along_axis(x, top, np.take_along_axis(x, top, -1) + 10.0, axis=-1)  # ties stay inside the k
    return x.astype(np.float32)


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("seed", [0, 1])
def test_log_probs_equal_a_full_sort_reference_with_ties(cfg, seed):
    logits = _tied_logits(6, 700, cfg.get("top_k", 0), seed)
    sampler = SamplerConfig(**{"temperature": 1.0, **cfg})
    _assert_same_log_probs(log_probs(mx.array(logits), sampler), reference_log_probs(logits, **cfg))
    ids, lp = candidate_log_probs(mx.array(logits), sampler)
    if cfg.get("top_k"):  # the candidate form is the same distribution, on sorted ids
        assert ids.shape == (6, cfg["top_k"]) and (np.diff(np.array(ids), axis=-1) > 0).all()
        want = np.take_along_axis(reference_log_probs(logits, **cfg), np.array(ids), -1)
        _assert_same_log_probs(lp, want)
    else:
        assert ids is None


def _lm_like_logits(rows: int, vocab: int = 262_144) -> np.ndarray:
    """A few hundred tokens per row hold ~99% of the mass, as after an LM head."""
    rng = np.random.default_rng(2)
    return (2 * rng.normal(size=(rows, vocab)) + 12 * (rng.random((rows, vocab)) > 0.999)).astype(np.float32)


@pytest.mark.parametrize("cfg", [{"top_k": 64, "top_p": 0.95}, {"top_k": 64, "min_p": 0.05}])
def test_log_probs_equal_a_full_sort_reference_at_gemma_vocab(cfg):
    logits = _lm_like_logits(2)
    out = log_probs(mx.array(logits), SamplerConfig(**{"temperature": 1.0, **cfg}))
    _assert_same_log_probs(out, reference_log_probs(logits, **cfg))


def test_top_p_alone_at_gemma_vocab_equals_the_pre_candidate_implementation():
    """Top-p without top-k still orders the whole vocabulary. Not against the float64 reference: a float32 sum
    over 262,144 terms (MLX's logsumexp on CPU) loses ~1e-3 of the tail mass, which moves the top-p boundary by
    a token or so, in the old code and the new alike."""
    logits, cfg = mx.array(_lm_like_logits(2)), SamplerConfig(temperature=1.0, top_p=0.95)
    _assert_same_log_probs(log_probs(logits, cfg), np.array(reference_pre_issue_10(logits, cfg)))


@pytest.mark.parametrize("cfg", CONFIGS)
def test_log_probs_equal_the_pre_candidate_implementation(cfg):
    """Against the code this replaced (kept in tests/reference_sampling.py), with ties at the top-k boundary too:
    both pick top-k with the same argpartition, so even which of several tied tokens stays agrees."""
    logits = mx.array(np.round(np.random.default_rng(3).normal(size=(5, 4000)) * 2) / 2, mx.float32)
    sampler = SamplerConfig(**{"temperature": 1.0, **cfg})
    _assert_same_log_probs(log_probs(logits, sampler), np.array(reference_pre_issue_10(logits, sampler)))


def test_gemma_filters_keep_exactly_the_nucleus_of_the_top_k():
    """Hand-built rows over the full vocabulary; a wrong candidate path (a token kept from outside the top-k, a
    tie broken by candidate position instead of id, a nucleus token dropped) changes the kept set."""
    vocab = 262_144
    logits = np.full((2, vocab), -30.0, np.float32)
    # row 0: 0.5, 0.3, 0.15 in the top-3 and 0.05 just outside it
    logits[0, [262_143, 7, 131_072, 99_999]] = np.log([0.5, 0.3, 0.15, 0.05])
    # row 1: a tie across the top-p boundary; the lower id goes first
    logits[1, [150_000, 200_000, 3]] = np.log([0.4, 0.3, 0.3])
    out = np.array(log_probs(mx.array(logits), SamplerConfig(temperature=1.0, top_k=3, top_p=0.6)))
    assert _kept(out[0]) == {262_143, 7}  # after top-k: 0.53, 0.32, 0.16; mass before 0.16 is 0.84
    np.testing.assert_allclose(np.exp(out[0, [262_143, 7]]), [0.625, 0.375], rtol=1e-5)
    assert _kept(out[1]) == {150_000, 3}  # mass before id 3: 0.4, before id 200000: 0.7


@pytest.mark.parametrize("top_k", [0, 64])
@pytest.mark.parametrize("top_p, kept", [(0.25, {5}), (0.5, {5, 131_072}), (0.75, {5, 131_072, 200_000})])
def test_top_p_boundary_is_strict_and_ties_go_by_id(top_k, top_p, kept):
    """Four tokens of probability exactly 1/4: the token whose mass before equals top_p is dropped, and the tie
    is broken by id (what a stable sort of the vocabulary did), with or without the top-k candidate path."""
    logits = mx.full((1, 262_144), -1e4).at[0, mx.array([200_000, 5, 262_143, 131_072])].add(1e4)
    out = np.array(log_probs(logits, SamplerConfig(temperature=1.0, top_k=top_k, top_p=top_p)))[0]
    assert _kept(out) == kept
    np.testing.assert_allclose(np.exp(out[sorted(kept)]), 1 / len(kept), rtol=1e-6)


# ------------------------------------------------------------------------------------------------------------
# Acceptance on the target's candidates (target_ids)


def _verify_round(seed: int, vocab: int = 300, k: int = 4):
    """Target logits (K+1, V), a perturbed drafter's q (K, V) and drafts sampled from it; the sampler."""
    cfg = SamplerConfig(temperature=1.0, top_k=8, top_p=0.9)
    logits = mx.random.normal((k + 1, vocab), key=mx.random.key(seed)) * 2
    q = log_probs(logits[:k] + mx.random.normal((k, vocab), key=mx.random.key(seed + 100)), cfg)
    return logits, q, sample(q, mx.random.key(seed + 200)), cfg


@pytest.mark.parametrize("seed", range(6))
def test_speculative_accept_on_candidates_agrees_with_the_dense_form(seed):
    logits, q, drafts, cfg = _verify_round(seed)
    ids, lp = candidate_log_probs(logits, cfg)
    dense = log_probs(logits, cfg)
    for s in range(8):  # the same uniforms decide acceptance in both forms
        n_dense, _ = speculative_accept(dense, q, drafts, mx.random.key(s))
        n, tokens = speculative_accept(lp, q, drafts, mx.random.key(s), target_ids=ids)
        assert n.item() == n_dense.item()
        n = n.item()
        assert tokens[:n].tolist() == drafts[:n].tolist()
        t = tokens[n].item()  # from the residual max(p_n - q_n, 0) after a rejection, from p_K after none
        p_t = np.exp(np.array(dense[n]))[t]
        assert p_t > 0 and (n == len(drafts) or p_t > np.exp(np.array(q[n]))[t])


def test_speculative_draft_outside_the_target_candidates_is_rejected():
    ids = mx.array([[0, 1], [0, 1]])  # p on tokens {0, 1} only
    lp = _log([[0.5, 0.5], [0.5, 0.5]])
    q = _log([[0.0, 0.5, 0.5, 0, 0, 0]])
    for seed in range(20):
        n, tokens = speculative_accept(lp, q, mx.array([2]), mx.random.key(seed), target_ids=ids)
        assert n.item() == 0 and tokens[0].item() == 0  # residual max(p - q, 0) has mass only on token 0
        n, tokens = speculative_accept(lp, q, mx.array([0]), mx.random.key(seed), target_ids=ids)
        assert n.item() == 1 and tokens[1].item() in (0, 1)  # q(0) = 0 < p(0): always accepted
    with pytest.raises(ValueError, match="shape mismatch"):
        speculative_accept(lp, q, mx.array([0]), target_ids=ids[:, :1])


def test_match_accept_on_candidates_returns_token_ids():
    ids = mx.broadcast_to(mx.array([40, 7, 300]), (3, 3))
    lp = mx.broadcast_to(_log([[0.0, 1.0, 0.0]]), (3, 3))  # the target always picks id 7
    n, tokens = match_accept(lp, mx.array([7, 8]), mx.random.key(0), target_ids=ids)
    assert n.item() == 1 and tokens.tolist() == [7, 7, 7]


def test_candidate_space_stream_follows_the_target():
    """The Monte-Carlo stream with the target given on candidates (a scrambled id order per position)."""
    stream, _, _ = _simulate_stream(seed=0, candidates=True)
    joint = np.bincount(stream[:, 0] * V + stream[:, 1], minlength=V * V)
    assert chi2_pvalue(joint, np.outer(P_ROWS[0], P_ROWS[1])) > 0.01
    for position in range(STREAM_LEN):
        assert chi2_pvalue(np.bincount(stream[:, position], minlength=V), P_ROWS[position]) > 0.01


@pytest.mark.parametrize("top_k", [0, 16])
def test_sampled_draft_token_q_is_the_processed_candidate_distribution(top_k):
    """drafting._sampled_token processes only the drafter's candidates; q equals log_probs over the vocabulary
    with every other token at -inf, and the token is drawn from it."""
    cfg = SamplerConfig(temperature=0.9, top_k=top_k, top_p=0.8)
    clustered = random_pair(64, vocab=512).drafter
    for drafter in (clustered, Drafter(DrafterArgs(clustered.args.text, 64, False))):  # and a plain head
        y = mx.random.normal((1, 1, drafter.args.text.hidden_size), key=mx.random.key(top_k))
        ids, logits = drafter.candidates(y)
        full = logits if ids is None else scatter_log_probs(ids, logits, 512)  # -inf off the candidates
        want = np.array(log_probs(full[0, 0], cfg))
        for seed in range(5):
            mx.random.seed(seed)
            token, q = _sampled_token(drafter, y, cfg)
            assert token.shape == (1,) and q.shape == (512,)
            _assert_same_log_probs(q, want)
            assert np.isfinite(want[token.item()])

