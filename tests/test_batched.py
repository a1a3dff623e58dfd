"""Batched decoding: every sequence's greedy output equals its own batch-1 run, token for token (float32, the four
layouts, K = 0..8, past the sliding window and through compactions, rows of different lengths finishing at
different times, joining and leaving mid-generation, a row cancelled mid-round); at T > 0 a seeded row draws the
same text whatever else is in the batch; the prompt cache and media prompts go through a batch. (`auto` for a
batch: test_batch_draft_length.py.)"""

from __future__ import annotations

import threading

import mlx.core as mx
import numpy as np
import pytest

import mlx_gemma_mtp
from mlx_gemma_mtp import PromptCache, SamplerConfig
from mlx_gemma_mtp import batch_cache as batch_cache_module
from mlx_gemma_mtp.batched import Batch
from mlx_gemma_mtp.batching import BatchGenerator, batch_generate

KINDS = ("e2b", "e4b", "31b", "moe")


@pytest.fixture(scope="module")
def bundles(pair_dir):
    made = {}

    def get(kind: str):
        if kind not in made:
            made[kind] = mlx_gemma_mtp.load(pair_dir(kind, ordered=kind in ("e2b", "e4b"))[0], dtype=mx.float32)
            made[kind].generation.eos_token_ids = []
            made[kind].tokenizer = None  # token-id prompts; no tokenizer EOS either: long runs
        return made[kind]

    return get


def prompts(seed: int, lengths=(5, 23, 11, 40, 7)) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[2] + rng.integers(5, 200, size=n).tolist() for n in lengths]


def solo(bundle, prompt, max_tokens, k=0, sampler=None) -> list[int]:
    return [r.token for r in mlx_gemma_mtp.stream_generate(bundle, prompt, max_tokens=max_tokens,
                                                           num_draft_tokens=k, sampler=sampler)]


def oracle(references: dict[int, list[int]], wrong_every: int = 3):
    """Drafts from each row's reference continuation (prompt + its solo tokens, by position), every
    `wrong_every`-th position corrupted: rows accept different counts, leaving holes of different sizes."""

    def propose(batch: Batch, rows: list[int], k: int, ks: dict[int, int]):
        drafts = np.zeros((batch.cache.rows, k), np.int32)
        for b in rows:
            ref, L = references[b], int(batch.cache.lengths[b])  # `last` sits at position L
            for i in range(k):
                p = L + 1 + i
                token = ref[p] if p < len(ref) else 3
                drafts[b, i] = (token + 1) % 200 if (p * 7 + b) % wrong_every == 0 else token
        return mx.array(drafts), {}

    return propose


def run_rows(bundle, prompt_list, max_tokens, k, propose=None, max_batch_size=None):
    """(each prompt's tokens, the generator, each prompt's last response)."""
    generator = BatchGenerator(bundle, max_batch_size or len(prompt_list), k, propose=propose)
    streams = [generator.submit(p, m) for p, m in zip(prompt_list, max_tokens)]
    responses = [list(s) for s in streams]
    return [[r.token for r in rs] for rs in responses], generator, [rs[-1] for rs in responses]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", range(9))
def test_batched_greedy_equals_each_rows_solo_run(bundles, kind, k):
    bundle = bundles(kind)
    ps = prompts(1)
    budgets = [30, 12, 25, 30, 3]  # rows finish at different times
    references = [solo(bundle, p, n) for p, n in zip(ps, budgets)]
    propose = oracle({b: p + r for b, (p, r) in enumerate(zip(ps, references))}) if k else None
    got, _, last = run_rows(bundle, ps, budgets, k, propose)
    assert got == references
    if k:  # the oracle's corruptions made rows accept some drafts and reject others
        stats = [r.draft for r in last if r.draft is not None and r.draft.drafted]
        assert any(0 < s.accepted < s.drafted for s in stats), [(s.accepted, s.drafted) for s in stats]


@pytest.mark.parametrize("kind", ["e2b", "moe"])
def test_the_real_drafter_in_a_batch_equals_solo(bundles, kind):
    bundle = bundles(kind)
    ps = prompts(2)
    references = [solo(bundle, p, 20, k=2) for p in ps]
    assert run_rows(bundle, ps, [20] * len(ps), 2)[0] == references
    assert batch_generate(bundle, ps, max_tokens=20, num_draft_tokens="auto").tokens == references


def test_past_the_window_through_many_compactions(bundles, monkeypatch):
    monkeypatch.setattr(batch_cache_module, "_HEADROOM", 4)  # buffers fill every few rounds
    monkeypatch.setattr(batch_cache_module, "bucket_size", lambda n: n)
    repacks = []
    real = batch_cache_module.SlotLayout._repack
    monkeypatch.setattr(batch_cache_module.SlotLayout, "_repack",
                        lambda self, keep, T: repacks.append(self.window) or real(self, keep, T))
    bundle = bundles("e2b")
    ps = prompts(3, (30, 3, 17))
    budgets = [90, 70, 80]  # the window is 8: long past it
    references = [solo(bundle, p, n) for p, n in zip(ps, budgets)]
    propose = oracle({b: p + r for b, (p, r) in enumerate(zip(ps, references))}, wrong_every=4)
    got, generator, _ = run_rows(bundle, ps, budgets, 4, propose)
    assert got == references
    sliding = generator.batch.cache.types["sliding_attention"]
    assert repacks.count(8) > 10 and sliding.capacity < 40  # compacted to the window, not grown with the context


def test_rows_join_and_leave_mid_generation(bundles):
    bundle = bundles("31b")
    ps = prompts(4, (5, 33, 9, 21, 14, 6))
    budgets = [10, 25, 4, 18, 12, 20]
    references = [solo(bundle, p, n) for p, n in zip(ps, budgets)]
    by_row: dict[int, list[int]] = {}  # rows are reused: the oracle finds each row's reference by its prompt

    def propose_by_prompt(batch, rows, k, ks):
        for b in rows:
            request = generator.running[b]
            i = next(j for j, p in enumerate(ps) if p == request.prompt.ids)
            by_row[b] = ps[i] + references[i]
        return oracle(by_row)(batch, rows, k, ks)

    generator = BatchGenerator(bundle, 2, 3, propose=propose_by_prompt)  # 6 requests through 2 rows
    streams = [generator.submit(p, n) for p, n in zip(ps, budgets)]
    assert [[r.token for r in s] for s in streams] == references


def test_a_burst_of_short_prompts_joins_in_one_step_and_a_long_prompt_a_chunk_per_step(bundles):
    """A step prefills up to `prefill_step_size` prompt tokens: three short prompts submitted together all join
    (their first token sampled) in one step, while a long one takes a chunk per step and the running rows get a
    token at every step meanwhile; every row still equals its solo run."""
    bundle = bundles("e2b")
    ps = prompts(6, (5, 7, 6, 80))
    references = [solo(bundle, p, 8) for p in ps]
    generator = BatchGenerator(bundle, 4, 0, prefill_step_size=32)
    streams = [generator.submit(p, 8) for p in ps[:3]]
    generator.step()
    assert len(generator.running) == 3 and not generator.waiting and generator.joining is None
    streams.append(generator.submit(ps[3], 8))
    for _ in range(2):  # the long prompt's first two chunks (32 + 32 of its 81 tokens)
        generated = [r.generated for r in generator.running.values()]
        generator.step()
        assert generator.joining is not None and len(generator.running) == 3
        assert [r.generated for r in generator.running.values()] == [g + 1 for g in generated]
    assert [[r.token for r in s] for s in streams] == references


def test_a_cancelled_row_leaves_the_others_untouched(bundles):
    bundle = bundles("e2b")
    ps = prompts(5, (12, 6, 20))
    references = [solo(bundle, p, 24) for p in ps]
    propose = oracle({b: p + r for b, (p, r) in enumerate(zip(ps, references))})
    generator = BatchGenerator(bundle, 3, 3, propose=propose)
    streams = [generator.submit(p, 24) for p in ps]
    first = [next(streams[1]).token for _ in range(5)]
    streams[1].close()  # mid-generation
    assert first == references[1][:5]
    assert [r.token for r in streams[0]] == references[0]
    assert [r.token for r in streams[2]] == references[2]
    assert not generator.busy and not generator.batch.cache.active.any()


def test_a_seeded_row_samples_the_same_text_whatever_else_is_in_the_batch(bundles):
    bundle = bundles("e2b")
    ps = prompts(6, (9, 15, 4))
    seeded = SamplerConfig(temperature=0.9, top_p=0.95, seed=11)

    def sampled(others: list[list[int]], k: int) -> list[int]:
        generator = BatchGenerator(bundle, 1 + len(others), k)
        mine = generator.submit(ps[0], 20, seeded)
        rest = [generator.submit(p, 20, SamplerConfig(temperature=1.0, seed=i)) for i, p in enumerate(others)]
        out = [r.token for r in mine]
        for s in rest:
            list(s)
        return out

    for k in (0, 2):
        alone = sampled([], k)
        assert sampled(ps[1:], k) == alone and sampled(ps[2:], k) == alone
        assert len(set(alone)) > 3  # sampling, not a constant


def test_prompt_cache_and_media_go_through_a_batch(tmp_path):
    from test_multimodal import chat, image, write_media_pair

    write_media_pair(tmp_path, "e2b")
    bundle = mlx_gemma_mtp.load(tmp_path, dtype=mx.float32)
    first = chat(image(24, 16, 3))
    fresh = [r.token for r in mlx_gemma_mtp.stream_generate(bundle, first, max_tokens=8, num_draft_tokens=2)]
    cache = PromptCache()
    generator = BatchGenerator(bundle, 2, 2)
    other = generator.submit(chat(text="hello there"), 8)
    mine = generator.submit(first, 8, prompt_cache=cache)
    assert [r.token for r in mine] == fresh
    list(other)
    # the next turn reuses the conversation, image included, and answers as a fresh run
    answer = bundle.tokenizer.decode(fresh)
    second = first + [{"role": "assistant", "content": answer}, {"role": "user", "content": "and then?"}]
    expected = [r.token for r in mlx_gemma_mtp.stream_generate(bundle, second, max_tokens=8, num_draft_tokens=2)]
    again = generator.submit(second, 8, prompt_cache=cache)
    assert [r.token for r in again] == expected
    assert cache.reused > 0


def test_a_server_thread_runs_requests_concurrently(bundles):
    bundle = bundles("e2b")
    ps = prompts(7, (6, 18, 10, 25))
    references = [solo(bundle, p, 15, k=2) for p in ps]
    generator = BatchGenerator(bundle, 4, 2).start()
    try:
        results = [None] * len(ps)

        def client(i):
            results[i] = [r.token for r in generator.submit(ps[i], 15)]

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(ps))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results == references
    finally:
        generator.stop()


def test_batch_generate_checks_its_arguments(bundles):
    bundle = bundles("e2b")
    with pytest.raises(ValueError, match="non-empty list"):
        batch_generate(bundle, [])
    with pytest.raises(ValueError, match="max_tokens"):
        batch_generate(bundle, prompts(0)[:1], max_tokens=0)
    with pytest.raises(ValueError, match="max_batch_size"):
        BatchGenerator(bundle, 0)


@pytest.mark.slow
def test_sampled_mtp_rows_follow_the_targets_distribution():
    """T > 0 in a batch: each row's second token (its first speculative round) follows the target's exact
    distribution. 16 rows x 100 batches with their own seeds, drafts from a uniform q (so rejections, residual
    resampling and accepted drafts all occur), against the exact marginal, by a chi-square test."""
    import math

    from test_speculative import PROMPT, VOCAB, bundle, make_drafter, make_target

    target = make_target(seed=0)
    b = bundle(target, make_drafter(target, seed=1))

    def uniform(batch, rows, k, ks):
        drafts = mx.random.randint(0, VOCAB, (batch.cache.rows, k)).astype(mx.int32)
        return drafts, {r: mx.full((ks[r], VOCAB), -math.log(VOCAB)) for r in rows}

    prompt = mx.array(PROMPT)
    p1 = mx.softmax(target(prompt[None])[0, -1])
    seqs = mx.concatenate([mx.broadcast_to(prompt, (VOCAB, len(PROMPT))), mx.arange(VOCAB)[:, None]], axis=1)
    marginal = np.array((p1[:, None] * mx.softmax(target(seqs)[:, -1], axis=-1)).sum(axis=0))
    counts, accepted, n = np.zeros(VOCAB), 0, 0
    for i in range(100):
        generator = BatchGenerator(b, 16, 3, propose=uniform)
        streams = [generator.submit(PROMPT, 3, SamplerConfig(temperature=1.0, seed=16 * i + r)) for r in range(16)]
        for s in streams:
            rs = list(s)
            counts[rs[1].token] += 1
            accepted += rs[1].from_draft
            n += 1
    expected = marginal * n
    big = expected >= 5
    obs, exp = np.append(counts[big], counts[~big].sum()), np.append(expected[big], expected[~big].sum())
    chi2 = float(((obs - exp) ** 2 / np.maximum(exp, 1e-9)).sum())
    dof = len(obs) - 1
    critical = dof * (1 - 2 / (9 * dof) + 3.09 * math.sqrt(2 / (9 * dof))) ** 3  # p = 0.001 (Wilson-Hilferty)
    assert chi2 < critical, (chi2, critical, dof)
    assert accepted > 0, "drafts must sometimes be accepted for this test to mean anything"


def test_logprobs_in_a_batch_equal_a_lone_generations(bundles):
    bundle = bundles("31b")
    ps = prompts(8, (7, 19))
    lone = [list(mlx_gemma_mtp.stream_generate(bundle, p, max_tokens=10, num_draft_tokens=2, logprobs=3))
            for p in ps]
    references = [p + [r.token for r in rs] for p, rs in zip(ps, lone)]
    generator = BatchGenerator(bundle, 2, 2, propose=oracle(dict(enumerate(references))))
    batched = [list(s) for s in [generator.submit(p, 10, logprobs=3) for p in ps]]
    for got, want in zip(batched, lone):
        assert [r.token for r in got] == [r.token for r in want]
        for g, w in zip(got, want):
            assert g.logprobs.top[0][0] == w.logprobs.top[0][0] and len(g.logprobs.top) == 3
            assert abs(g.logprobs.logprob - w.logprobs.logprob) < 1e-4
    assert any(r.from_draft for rs in batched for r in rs)  # drafted tokens' come from the verify rows
