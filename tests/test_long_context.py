"""Long contexts: prefill memory, the drafter's compiled shapes as the context grows, exact MTP at 8k+ tokens.

The models are tiny, so what grows with the context is what would dominate on a real one: lazily held
activations, traced graphs, evicted sliding-window entries.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from test_speculative import VOCAB, bundle, make_drafter, make_target

from mlx_gemma_mtp import drafting, stream_generate
from mlx_gemma_mtp.cache import SlidingKVCache
from mlx_gemma_mtp.models.config import FULL, SLIDING, ModelArgs
from mlx_gemma_mtp.models.gemma4_text import Model
from mlx_gemma_mtp.plain import prefill
from mlx_gemma_mtp.sampling import SamplerConfig
from mlx_gemma_mtp.speculative import drafter_proposer


def tiny_model(hidden: int, window: int) -> Model:
    """A sliding and a full producer with one small K/V head each: the cache costs little next to `hidden`."""
    args = ModelArgs(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=64, num_hidden_layers=3, num_attention_heads=1,
        num_key_value_heads=1, head_dim=8, global_head_dim=8, sliding_window=window,
        layer_types=[SLIDING, FULL, SLIDING], vocab_size_per_layer_input=VOCAB, hidden_size_per_layer_input=0,
    )
    model = Model(args)
    mx.eval(model.parameters())
    return model


def test_prefill_holds_only_the_cache():
    """After a 4096-token prefill, the memory beyond the weights is the cache's. Each chunk is evaluated with its
    values too: a lazy value buffer keeps every chunk's layer inputs alive (prompt x hidden, 4 MB here)."""
    model = tiny_model(hidden=256, window=8)
    prompt = mx.arange(4096) % VOCAB
    mx.eval(prompt)
    before = mx.get_active_memory()
    cache = model.make_cache()
    out = prefill(model, prompt, cache, 256, want_hidden=False)  # the last token's forward is still lazy
    held, cache_bytes = mx.get_active_memory() - before, sum(c.nbytes for c in cache)
    activations = prompt.size * model.args.hidden_size * 4
    assert held < cache_bytes + activations / 8, f"{held / 1e6:.2f} MB held, cache {cache_bytes / 1e6:.2f} MB"
    mx.eval(out.logits)


def grow(cache: list, lengths: np.random.Generator, max_rollback: int, until: int):
    """Decode-like growth without a model: verify passes of 1..max_rollback+1 entries, then rollbacks of all
    but one of them at most; the caches must hold an entry already. Yields after each round."""
    kv = [mx.zeros((1, 1, max_rollback + 1, c.keys.shape[3])) for c in cache]
    rounds = 0
    while cache[0].offset < until:
        T = int(lengths.integers(1, max_rollback + 2))
        n = int(lengths.integers(0, T))
        for c, x in zip(cache, kv):
            c.update(x[:, :, :T], x[:, :, :T])
            c.trim(n)
        rounds += 1
        if rounds % 256 == 0:  # keep the lazy update chains short
            mx.eval([(c.keys, c.values) for c in cache])
        yield


@pytest.mark.parametrize("context, most", [(32_768, 24), (131_072, 30)])
def test_window_shapes_grow_logarithmically(context, most):
    """The drafter's K/V windows take O(log context) distinct shapes (one compiled graph each), and every window
    still shows exactly the visible entries: all on the full layer, the last `window + 1` on the sliding one."""
    model = tiny_model(hidden=16, window=512)
    cache = model.make_cache(max_rollback=16)
    model.forward(mx.arange(4)[None], cache, rows=0)  # K/V of the right shapes, for `grow` to copy
    full_cache, sliding_cache = cache[model.producers[FULL]], cache[model.producers[SLIDING]]
    shapes = set()
    for _ in grow(cache, np.random.default_rng(0), 16, context):
        windows = drafting.cache_windows(model, cache)
        shapes.add(tuple(w.keys.shape for w in windows.values()))
        full, sliding = windows[FULL], windows[SLIDING]
        assert (full.lo, full.hi) == (0, full_cache.length)
        assert sliding.hi - sliding.lo == min(sliding_cache.length, 512 + 1)
    assert len(shapes) <= most, f"{len(shapes)} window shapes up to {context} tokens of context"
    assert sliding_cache.start > 0 and sliding_cache.length < 1024  # it evicts: its window stops growing


def test_compiled_drafter_traces_once_per_window_shape(monkeypatch):
    """Over 32k tokens of context the compiled drafter traces once per window shape, ~20 times, not once per few
    hundred tokens: a long-running process keeps a bounded number of graphs (~2 MB each on the demo pair)."""
    traced = []
    step_fn = drafting.DraftStep._step

    def counted(self, token, hidden, keys, *rest):  # Python runs only while mx.compile traces
        traced.append(tuple(k.shape for k in keys.values()))
        return step_fn(self, token, hidden, keys, *rest)

    monkeypatch.setattr(drafting.DraftStep, "_step", counted)
    target = make_target(window=64)
    step = drafting.DraftStep(target, make_drafter(target))
    cache = target.make_cache(max_rollback=16)
    hidden = target.forward(mx.arange(8)[None], cache, return_hidden=True).hidden
    shapes, rounds, K = set(), 0, 2
    # coarse growth (up to 300 tokens a round) reaches every size: the shapes depend on the length alone
    for _ in grow(cache, np.random.default_rng(1), 299, 32_768):
        windows = drafting.cache_windows(target, cache)
        shapes.add(tuple(w.keys.shape for w in windows.values()))
        tokens, _ = drafting.draft(step, mx.array([3]), hidden, windows, cache[0].offset, K, SamplerConfig())
        mx.eval(tokens)
        rounds += 1
    assert len(traced) == K * len(shapes), "the drafter retraced for a shape it had already compiled"
    assert len(shapes) <= 24 and rounds > 5 * len(shapes), (len(shapes), rounds)


@pytest.mark.slow
def test_mtp_equals_plain_greedy_at_long_context(monkeypatch):
    """10k tokens of context, float32: MTP with the compiled drafter (its drafts replaced by the target's own
    tokens most of the time, so long blocks are accepted and the rest rolled back) == plain greedy, while the
    sliding caches evict and the full layer's window crosses bucket sizes."""
    target = make_target(seed=7, layers=(SLIDING, SLIDING, FULL, SLIDING, FULL), shared=2, ple=4, window=128)
    drafter = make_drafter(target, seed=8, ordered=True)
    b = bundle(target, drafter)
    prompt = [int(t) for t in np.random.default_rng(2).integers(0, VOCAB, 8192)]
    plain = [r.token for r in stream_generate(b, prompt, max_tokens=2000, num_draft_tokens=0)]
    assert len(set(plain[-200:])) > 8, "the random target must not fall into a loop"
    reference = mx.array(prompt + plain + [0] * 16)
    real = drafter_proposer(b.state.draft_step, SamplerConfig())

    def mixed(last, hidden, windows, position, k):
        drafts, _ = real(last, hidden, windows, position, k)
        wanted = reference[position + 1 : position + 1 + k]
        keep = (mx.arange(position + 1, position + 1 + k) % 7) == 3  # the drafter's own (mostly wrong) guess
        return mx.where(keep, drafts, wanted), None

    caches = []
    make_cache = target.make_cache
    monkeypatch.setattr(target, "make_cache", lambda **kw: caches.append(make_cache(**kw)) or caches[-1])
    rs = list(stream_generate(b, prompt, max_tokens=2000, num_draft_tokens=6, proposer=mixed))
    assert [r.token for r in rs] == plain
    assert 0 < rs[-1].draft.accepted < rs[-1].draft.drafted
    sliding = [c for c in caches[-1] if isinstance(c, SlidingKVCache)]
    assert sliding and all(c.start > len(prompt) for c in sliding), "no eviction while decoding"
