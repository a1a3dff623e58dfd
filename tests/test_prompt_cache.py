"""The prompt cache across the turns of a conversation: every turn gives exactly the tokens of a fresh run (greedy,
float32), while prefilling only what is new; prefixes that end before a wrapped sliding window are restored from
a snapshot, never trimmed into a wrong state; MTP rejections and callers that stop early at a turn's end."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import GEMMA4_EOS, write_gemma4_tokenizer

import mlx_gemma_mtp
from mlx_gemma_mtp import PromptCache
from mlx_gemma_mtp.cache import SlidingKVCache


@pytest.fixture(scope="module")
def bundle(pair_dir):
    b = mlx_gemma_mtp.load(pair_dir("e2b")[0])
    b.generation.eos_token_ids = []  # long turns: nothing stops them early
    return b


def words(n: int, seed: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(5, 100, size=n)]


def run(bundle, prompt, k, cache=None, max_tokens=12) -> list[int]:
    return [r.token for r in mlx_gemma_mtp.stream_generate(bundle, prompt, max_tokens=max_tokens,
                                                           num_draft_tokens=k, prompt_cache=cache)]


def evicted(cache: PromptCache) -> bool:
    return any(isinstance(c, SlidingKVCache) and c.start > 0 for c in cache.cache)


@pytest.mark.parametrize("k", [0, 3, "auto"])
def test_turns_equal_fresh_runs_past_the_window(bundle, k):
    cache = PromptCache()
    p1 = [2, *words(1100, 1)]
    g1 = run(bundle, p1, k, cache)
    assert g1 == run(bundle, p1, k) and cache.reused == 0
    assert len(cache.tokens) == len(p1) + len(g1) - 1 or len(cache.tokens) == len(p1) + len(g1)
    assert evicted(cache), "the sliding caches must have wrapped for this test to mean anything"

    p2 = p1 + g1 + words(2500, 2)  # the conversation grows: everything cached is reused
    g2 = run(bundle, p2, k, cache)
    assert g2 == run(bundle, p2, k)
    assert cache.reused >= len(p1) + len(g1) - 1

    # the new prompt leaves the cached tokens just after the first prompt (a re-rendered turn): too far back for
    # the wrapped sliding windows, so they come from the snapshot taken at the end of the first prompt
    p3 = p2[: len(p1) + 3] + words(50, 3)
    g3 = run(bundle, p3, k, cache)
    assert g3 == run(bundle, p3, k)
    assert cache.reused == len(p1) - 1

    p4 = p3 + g3 + words(20, 4)
    assert run(bundle, p4, k, cache) == run(bundle, p4, k)


def test_a_caller_that_stops_early_leaves_a_consistent_cache(bundle):
    cache = PromptCache()
    p1 = [2, *words(400, 5)]
    stream = mlx_gemma_mtp.stream_generate(bundle, p1, max_tokens=40, num_draft_tokens=4, prompt_cache=cache)
    received = [next(stream).token for _ in range(7)]  # stops inside a round: accepted drafts not yet handed out
    stream.close()
    assert cache.tokens == (p1 + received)[: len(cache.tokens)] and len(cache.tokens) >= len(p1)
    p2 = p1 + received + words(30, 6)
    assert run(bundle, p2, 4, cache) == run(bundle, p2, 4)
    assert cache.reused >= len(p1)


def test_a_failed_request_drops_the_cache_and_the_next_is_exact(bundle, monkeypatch):
    cache = PromptCache()
    p1 = [2, *words(300, 7)]
    run(bundle, p1, 3, cache)

    def fail(*args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr(bundle.target, "forward", fail)
    with pytest.raises(RuntimeError, match="injected"):
        run(bundle, p1 + words(10, 8), 3, cache)
    monkeypatch.undo()
    assert cache.tokens == [] and cache.cache is None
    p2 = p1 + words(10, 8)
    assert run(bundle, p2, 3, cache) == run(bundle, p2, 3)


def test_a_cache_follows_its_model(bundle, pair_dir):
    cache = PromptCache()
    p1 = [2, *words(50, 9)]
    run(bundle, p1, 0, cache)
    other = mlx_gemma_mtp.load(pair_dir("e2b")[0])
    other.generation.eos_token_ids = []
    assert run(other, p1, 0, cache) == run(bundle, p1, 0) and cache.reused == 0  # started afresh
    with pytest.raises(ValueError, match="prompt_cache must be a PromptCache"):
        run(bundle, p1, 0, cache=[1, 2])


@pytest.fixture(scope="module")
def chat_bundle(target_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("chat-cache")
    shutil.copytree(target_dir("e2b"), path, dirs_exist_ok=True)
    write_gemma4_tokenizer(path, "31b")
    gen = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": GEMMA4_EOS}))
    return mlx_gemma_mtp.load(path)


def test_chat_turns_with_thoughts_stripped_equal_fresh_runs(chat_bundle):
    """Gemma 4's template re-renders earlier model turns without their thought spans: the cached tokens stop
    matching at the previous model turn. Each turn still equals a fresh run."""
    cache = PromptCache()
    long_user = "the user " * 120  # past the tiny model's sliding window
    messages = [{"role": "system", "content": "Hi"}, {"role": "user", "content": long_user}]
    for turn in range(3):
        kwargs = dict(max_tokens=10, num_draft_tokens=0, chat_template_kwargs={"enable_thinking": True})
        cached = list(mlx_gemma_mtp.stream_generate(chat_bundle, messages, prompt_cache=cache, **kwargs))
        fresh = list(mlx_gemma_mtp.stream_generate(chat_bundle, messages, **kwargs))
        assert [r.token for r in cached] == [r.token for r in fresh]
        if turn:
            assert 0 < cache.reused < cached[0].prompt_tokens
        answer = "".join(r.text for r in cached)
        messages += [{"role": "assistant", "content": f"<|channel>thought\nthe user<channel|>{answer}"},
                     {"role": "user", "content": f"the {turn} user " * 30}]


def test_conversation_benchmark_reuses_each_turn_and_checks_exactness(bundle):
    from mlx_gemma_mtp.bench.conversation import format_rows, run

    rows = run(bundle, [words(200, s) for s in range(4)], max_tokens=8, num_draft_tokens=3)
    assert [n for n, *_ in rows] == sorted(n for n, *_ in rows) and rows[0][3] == 0
    assert all(reused >= n - 200 - 1 for n, _, _, reused in rows[1:])  # all but the new turn (and one token)
    assert "TTFT cached" in format_rows(rows)


def test_alternating_conversations_benchmark_compares_one_entry_with_two(bundle):
    from mlx_gemma_mtp.bench.conversation import alternate, format_alternating

    rows = alternate(bundle, [words(120, s) for s in range(6)], max_tokens=6, num_draft_tokens=2)
    assert [i for i, *_ in rows] == [1, 2, 1, 2, 1, 2]
    assert all(r1 == 0 for *_, r1, _ in rows)  # one entry: each conversation pushed the other out
    assert all(r2 >= n - 120 - 1 for _, n, _, _, _, r2 in rows[2:])  # two: all but the new turn reused
    assert "TTFT 2 entries" in format_alternating(rows)
