"""The drafter's compiled decoding step and the K/V windows it reads, against the eager drafter on exact K/V."""

import mlx.core as mx
import numpy as np
import pytest
from test_sampling import chi2_pvalue

from mlx_gemma_mtp.cache import bucket_size, trim_cache
from mlx_gemma_mtp.drafting import DraftStep, cache_windows, draft, visible_kv
from mlx_gemma_mtp.sampling import SamplerConfig
from mlx_gemma_mtp.testing.presets import tiny_e2b_pair as random_pair


@pytest.fixture(scope="module")
def pair():
    b = random_pair(64, vocab=512)
    return b.target, b.drafter


def fill(target, cache, context: int, step: int = 512):
    """Prefill `context` tokens in chunks (small attention scores), then 4 more; the last forward's output."""
    ids = (mx.arange(context + 4)[None] * 7) % 512
    for start in range(0, context, step):
        target.forward(ids[:, start : min(start + step, context)], cache, rows=0)
    return target.forward(ids[:, context:], cache, return_hidden=True, return_shared_kv=True)


# inside and past the window (128), across buckets, and in the geometric sizes (> 2048) after evictions
@pytest.mark.parametrize("context", [5, 129, 200, 300, 2600])
@pytest.mark.parametrize("drop", [0, 3])
def test_windows_hold_exactly_the_visible_entries(pair, context, drop):
    target, _ = pair
    cache = target.make_cache(max_rollback=8)
    out = fill(target, cache, context)
    trim_cache(cache, drop)
    expected = visible_kv(out.shared_kv, drop, target.args.sliding_window)
    for layer_type, w in cache_windows(target, cache).items():
        assert w.keys.shape[2] == bucket_size(w.hi - w.lo)  # the window's size depends on its length alone
        for got, want in zip(w.exact(), expected[layer_type]):
            assert got.shape == want.shape and mx.array_equal(got, want)


def _eager_drafts(target, drafter, last, hidden, kv, position, k):
    tokens = []
    for _ in range(k):
        hidden, y = drafter(target.model.embed(last[None]), hidden, kv, position)
        last = drafter.top_token(y)[0]
        tokens.append(last.item())
    return tokens


@pytest.mark.parametrize("context", [40, 260, 2600])
def test_compiled_greedy_drafts_equal_the_eager_drafter(pair, context):
    target, drafter = pair
    cache = target.make_cache(max_rollback=8)
    out = fill(target, cache, context - 4)
    hidden, last = out.hidden, mx.array([17])
    step = DraftStep(target, drafter)
    windows = cache_windows(target, cache)
    eager = _eager_drafts(target, drafter, last, hidden, visible_kv(out.shared_kv, 0, 128), context, 6)
    drafts, q = draft(step, last, hidden, windows, context, 6, SamplerConfig())
    assert drafts.tolist() == eager and q is None
    # the step body (sampling path) agrees numerically with the eager call
    h_c, y_c = step.body(last, hidden, step.context(windows, context))
    h_e, y_e = drafter(target.model.embed(last[None]), hidden, visible_kv(out.shared_kv, 0, 128), context)
    assert mx.allclose(h_c, h_e, atol=1e-5) and mx.allclose(y_c, y_e, atol=1e-5)


def test_compiled_step_sees_weight_updates(pair):
    """A drafter being trained is read afresh at each call, not frozen into the compiled graph."""
    target, drafter = pair
    cache = target.make_cache(max_rollback=8)
    out = target.forward(mx.arange(20)[None], cache, return_hidden=True)
    step = DraftStep(target, drafter)
    ctx = step.context(cache_windows(target, cache), 20)
    before = step.body(mx.array([3]), out.hidden, ctx)[0]
    saved = drafter.post_projection.weight
    try:
        drafter.post_projection.weight = saved * 2
        after = step.body(mx.array([3]), out.hidden, ctx)[0]
        assert mx.allclose(after, before * 2, atol=1e-5)
    finally:
        drafter.post_projection.weight = saved


def test_sampled_drafts_follow_their_q(pair):
    """T > 0: the exact acceptance rule needs every draft to be *sampled* from the q it returns. 4000 seeded draws
    of the first draft (its q is the same every time) against q by chi-square; q has mass 1 on the candidates."""
    target, drafter = pair
    cache = target.make_cache(max_rollback=8)
    out = target.forward((mx.arange(60)[None] * 5) % 512, cache, return_hidden=True)
    step, cfg = DraftStep(target, drafter), SamplerConfig(temperature=1.5, top_k=40)
    windows = cache_windows(target, cache)
    mx.random.seed(3)
    counts, q0 = np.zeros(512), None
    for _ in range(4000):
        drafts, q = draft(step, mx.array([9]), out.hidden, windows, 60, 2, cfg)
        counts[drafts[0].item()] += 1
        q0 = q[0] if q0 is None else q0
        assert q.shape == (2, 512) and mx.allclose(mx.exp(q).sum(axis=-1), mx.ones(2), atol=1e-5)
    probs = np.exp(np.array(q0))
    assert (probs > 0).sum() == 40  # top-k applied to the candidates, as the target's processing does
    assert counts[probs == 0].sum() == 0
    assert chi2_pvalue(counts[probs > 0], probs[probs > 0]) > 0.001


def test_compiled_steps_are_shared_across_seeds_and_draft_lengths_and_bounded(pair, monkeypatch):
    import mlx_gemma_mtp.drafting as drafting

    target, drafter = pair
    cache = target.make_cache(max_rollback=8)
    out = target.forward(mx.arange(30)[None], cache, return_hidden=True)
    step = drafting.DraftStep(target, drafter)
    windows = cache_windows(target, cache)
    for seed in range(5):
        for k in (1, 2, 5):  # one step graph for every K: a new K costs no compile
            draft(step, mx.array([4]), out.hidden, windows, 30, k, SamplerConfig(temperature=0.8, seed=seed))
    assert len(step._steps) == 1
    for k in (1, 3, 8):
        draft(step, mx.array([4]), out.hidden, windows, 30, k, SamplerConfig())
    assert len(step._steps) == 2
    monkeypatch.setattr(drafting, "MAX_GRAPHS", 3)
    for t in (0.5, 0.6, 0.7, 0.9):
        draft(step, mx.array([4]), out.hidden, windows, 30, 2, SamplerConfig(temperature=t))
    assert len(step._steps) == 3
