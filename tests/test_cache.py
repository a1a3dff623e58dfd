"""KV caches: exact rollback (also after sliding layers evicted old entries), no silent failures, atomicity.

Unit tests store each entry's absolute position in its keys/values, so any misplaced, lost or stale entry
shows up as a wrong number. Model tests compare runs that decode junk tokens and roll them back against a
clean run and against HF.
"""

from __future__ import annotations

import hf_oracle as oracle
import mlx.core as mx
import numpy as np
import pytest

import mlx_gemma_mtp
from mlx_gemma_mtp import cache as cache_module
from mlx_gemma_mtp.cache import KVCache, SlidingKVCache, bucket_size, trim_cache

WINDOW = 8


def positions(start: int, T: int) -> tuple[mx.array, mx.array]:
    """Keys/values (1, 2, T, 3) holding their absolute position (values: negated)."""
    k = mx.broadcast_to(mx.arange(start, start + T, dtype=mx.float32)[None, None, :, None], (1, 2, T, 3))
    return k, -k


def assert_holds_positions(c: KVCache) -> None:
    """The held entries are exactly positions start..offset-1, in order."""
    k, v = c.state()
    expected = np.arange(c.start, c.offset, dtype=np.float32)
    assert k.shape == (1, 2, c.length, 3) and c.start >= 0
    np.testing.assert_array_equal(np.array(k)[0, 1, :, 2], expected)
    np.testing.assert_array_equal(np.array(v)[0, 0, :, 0], -expected)


def feed(c: KVCache, T: int) -> tuple[mx.array, mx.array]:
    return c.update(*positions(c.offset, T))


def test_full_cache_appends_and_trims_exactly():
    c = KVCache()
    for T in (5, 1, 300, 1, 7):  # 300 forces a regrow past the first buffer
        k, _ = feed(c, T)
        assert k.shape[2] == c.length == c.offset and c.start == 0
        assert_holds_positions(c)
    c.trim(10)
    assert (c.offset, c.length) == (304, 304)
    assert_holds_positions(c)
    feed(c, 3)  # overwrites the trimmed slots
    assert_holds_positions(c)


def test_bucket_sizes_are_few_and_tight():
    """Buffer and drafter-window sizes: multiples of 256 that hold n, growing geometrically past 2048 (at most
    ~30% to spare), so only 26 of them cover 128k tokens (one compiled drafter graph each)."""
    sizes = [bucket_size(n) for n in range(1, 131_073)]
    assert all(s % 256 == 0 and s >= n for n, s in enumerate(sizes, start=1)) and sizes == sorted(sizes)
    assert all(bucket_size(s) == s for s in set(sizes))  # a buffer of a bucket size holds any smaller window
    assert max(s / n for n, s in enumerate(sizes, start=1) if n > 2048) < 1.31
    assert len(set(sizes)) == 26


def test_full_cache_buffer_grows_through_bucket_sizes():
    """Geometric growth: few regrows (copies O(context) in total) and bounded unused room."""
    c, capacities = KVCache(), set()
    while c.offset < 20_000:
        feed(c, 97)
        capacity = c.keys.shape[2]
        capacities.add(capacity)
        assert capacity == bucket_size(capacity) and capacity <= 1.31 * (c.length + 256 + 97)
    assert len(capacities) <= 16
    assert_holds_positions(c)


@pytest.mark.parametrize("n", [-1, 308])
def test_full_cache_impossible_trim_raises_and_changes_nothing(n):
    c = KVCache()
    feed(c, 307)
    with pytest.raises(ValueError, match=f"cannot roll back {n} tokens from a cache holding 307"):
        c.trim(n)
    assert (c.offset, c.length) == (307, 307)
    assert_holds_positions(c)


def test_sliding_cache_keeps_window_plus_slack_and_rolls_back_exactly():
    """Random updates (1-6 tokens, like decode steps and verify passes) and rollbacks of up to the last
    update, for 1500 positions: every state holds exactly the right positions, old entries are evicted, and
    the last `window + 1` positions (what the target and the drafter read) are always held."""
    rng = np.random.default_rng(0)
    c = SlidingKVCache(WINDOW, max_rollback=4)
    evicted = False
    while c.offset < 1500:
        T = int(rng.integers(1, 7))
        k, _ = feed(c, T)
        assert k.shape[2] == c.length  # update returns everything held, in order
        assert_holds_positions(c)
        n = int(rng.integers(0, T + 1))
        c.trim(n)
        assert_holds_positions(c)
        assert c.length >= min(c.offset, WINDOW + 1)
        evicted |= c.start > 0
    assert evicted, "the test never made the cache evict old entries"
    assert c.length < 600, f"sliding cache holds {c.length} entries: it does not evict"


def test_sliding_cache_rollback_boundary_after_eviction():
    c = SlidingKVCache(WINDOW, max_rollback=2)
    while c.start == 0:
        feed(c, 1)
    feed(c, 3)
    assert c.offset > c.length > WINDOW + 1
    too_many = c.length - WINDOW  # would leave only `window` entries: the next query would miss a key
    with pytest.raises(ValueError, match="max_rollback"):
        c.trim(too_many)
    with pytest.raises(ValueError, match="cannot roll back"):
        c.trim(c.offset + 1)
    assert_holds_positions(c)  # failed trims changed nothing
    c.trim(too_many - 1)
    assert c.length == WINDOW + 1
    assert_holds_positions(c)
    feed(c, 2)
    assert_holds_positions(c)


def test_sliding_cache_before_eviction_rolls_back_anything_held():
    c = SlidingKVCache(WINDOW, max_rollback=2)
    feed(c, 30)
    c.trim(25)  # nothing evicted yet: every position can be rolled back
    assert (c.offset, c.length) == (5, 5)
    assert_holds_positions(c)


def test_trim_cache_is_all_or_nothing():
    full, sliding, full2 = KVCache(), SlidingKVCache(WINDOW, max_rollback=2), KVCache()
    cache = [full, sliding, full2]  # the failing layer sits between two that could trim
    while sliding.start == 0:
        for c in cache:
            feed(c, 1)
    before = [(c.offset, c.length) for c in cache]
    with pytest.raises(ValueError):
        trim_cache(cache, sliding.length - WINDOW)
    assert [(c.offset, c.length) for c in cache] == before
    for c in cache:
        assert_holds_positions(c)
    trim_cache(cache, 3)
    assert [(c.offset, c.length) for c in cache] == [(o - 3, n - 3) for o, n in before]
    with pytest.raises(ValueError):
        trim_cache(cache, -1)


# ------------------------------------------------------------------------------------------------------------
# Through the model (e2b: sliding + full producers, KV-sharing consumers)
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def e2b(target_dir, hf_target):
    return mlx_gemma_mtp.load(target_dir("e2b")).target, hf_target("e2b")


def token_ids(n: int, seed: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(6, 256, size=n)]


def fill(model, cache, ids, chunk=64):
    for s in range(0, len(ids), chunk):
        model.forward(mx.array([ids[s : s + chunk]]), cache, rows=0)


def sliding_caches(model, cache):
    return [c for c, t in zip(cache, model.args.layer_types) if t == oracle.S]


@pytest.mark.parametrize("junk_at", ["steady", "growth"])
def test_rollback_after_eviction_matches_clean_run(e2b, junk_at):
    """Decode far past the window (sliding layers have evicted old entries), run 5 junk tokens in one forward,
    roll them back, continue: logits equal a run that never saw the junk.

    "growth": the junk forward itself makes the sliding caches evict (the riskiest moment for the slack).
    """
    model, _ = e2b
    prefix, tail, junk = token_ids(540, seed=10), token_ids(12, seed=11), token_ids(5, seed=12)
    cache = model.make_cache()
    fill(model, cache, prefix)
    sliding = sliding_caches(model, cache)
    assert sliding and all(c.start > 0 for c in sliding), (
        "sliding caches never evicted; the test is too short"
    )
    assert all(c.start == 0 for c in cache if c not in sliding)
    pad = []  # one more forward before the junk (also in the clean run)
    if junk_at == "growth":  # fill the buffer so that the 5 junk tokens no longer fit
        pad = token_ids(sliding[0].keys.shape[2] - sliding[0].length - len(junk) + 1, seed=14)
        model.forward(mx.array([pad]), cache, rows=0)
    start_before = sliding[0].start
    model.forward(mx.array([junk]), cache, rows=len(junk))
    if junk_at == "growth":
        assert sliding[0].start > start_before, "the junk forward did not trigger an eviction"
    trim_cache(cache, len(junk))
    assert all(c.offset == len(prefix) + len(pad) for c in cache)
    ours = np.array(mx.concatenate([model.forward(mx.array([[t]]), cache).logits for t in tail], axis=1))

    clean = model.make_cache()  # the same forwards without the junk
    fill(model, clean, prefix)
    if pad:
        model.forward(mx.array([pad]), clean, rows=0)
    ref = np.array(mx.concatenate([model.forward(mx.array([[t]]), clean).logits for t in tail], axis=1))
    np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=0, err_msg="rollback changed the logits")


def test_decode_with_frequent_eviction_and_rollback_matches_hf(e2b, monkeypatch):
    """With a tiny buffer growth step the sliding caches evict every few tokens; decoding (single tokens and
    chunks) with rollbacks of junk in between must still give HF's logits for the clean sequence. This checks
    the model's use of the cache after eviction (key start position, masks), which a clean-run comparison
    cannot see. (HF on the >512 tokens needed with the default step costs seconds.)"""
    monkeypatch.setattr(cache_module, "_STEP", 4)
    model, hf = e2b
    ids = token_ids(64, seed=15)
    plan = (
        [12] + [1] * 20 + ["junk"] + [1] * 10 + [4, "junk", 1, 1, 3] + [1] * 10
    )  # forwards; junk is rolled back
    cache = model.make_cache(max_rollback=5)
    ref, pos, worst, starts = None, 0, 0.0, set()
    for step in plan:
        if step == "junk":
            model.forward(mx.array([token_ids(5, seed=pos)]), cache, rows=5)
            trim_cache(cache, 5)
            continue
        chunk = ids[pos : pos + step]
        ref = oracle.target_forward(hf, chunk, None if ref is None else ref["past_key_values"])
        out = model.forward(mx.array([chunk]), cache, rows=step)
        worst = max(worst, float(np.abs(np.array(out.logits) - ref["logits"].numpy()).max()))
        starts.add(sliding_caches(model, cache)[0].start)
        pos += step
    assert len(starts - {0}) >= 5, (
        f"sliding caches evicted too rarely ({sorted(starts)}); the test is too weak"
    )
    assert worst <= 1e-4, f"decode logits after eviction + rollback differ from HF by {worst}"


def test_model_cache_rollback_errors(e2b):
    model, _ = e2b
    cache = model.make_cache(max_rollback=2)
    fill(model, cache, token_ids(540, seed=13))
    sliding = sliding_caches(model, cache)
    assert all(c.start > 0 for c in sliding)
    offsets = [(c.offset, c.length) for c in cache]
    with pytest.raises(ValueError, match="max_rollback"):
        trim_cache(cache, sliding[0].length - WINDOW)
    with pytest.raises(ValueError, match="cannot roll back 541 tokens"):
        trim_cache(cache, 541)
    assert [(c.offset, c.length) for c in cache] == offsets
    trim_cache(cache, 2)  # max_rollback tokens can always be rolled back
    assert all(c.offset == 538 for c in cache)
