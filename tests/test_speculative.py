"""The exactness property of MTP decoding and checks of the draft/verify loop, on tiny random MLX models."""

from __future__ import annotations

import math
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlx.utils import tree_flatten, tree_unflatten

from mlx_gemma_mtp import SamplerConfig, stream_generate
from mlx_gemma_mtp import cache as cache_module
from mlx_gemma_mtp.cache import SlidingKVCache
from mlx_gemma_mtp.load import Bundle, GenerationDefaults
from mlx_gemma_mtp.models.config import FULL, SLIDING, ModelArgs
from mlx_gemma_mtp.models.gemma4_assistant import Drafter, DrafterArgs
from mlx_gemma_mtp.models.gemma4_text import Model

VOCAB = 64


def _perturb(module: nn.Module, seed: int) -> None:
    """Re-draw weights so that the greedy continuation depends on the context (recipe of hf_oracle's
    `_perturb_weights`: norms ~U(0.5, 1.5), q/k norms scaled by d^-1/4 since Gemma 4 has no 1/sqrt(d), a sharp
    final norm, variance-preserving projections, small embeddings)."""
    flat = tree_flatten(module.parameters())
    keys = mx.random.split(mx.random.key(seed), len(flat))
    params = []
    for k, (name, p) in zip(keys, flat):
        if not mx.issubdtype(p.dtype, mx.floating):
            continue
        u = mx.random.uniform(0.5, 1.5, p.shape, key=k)
        if name == "model.norm.weight":
            p = 6.0 * u
        elif name.endswith(("q_norm.weight", "k_norm.weight")):
            p = u * p.shape[0] ** -0.25
        elif "norm" in name or name.endswith(("layer_scalar", "scale", "per_expert_scale")):
            p = u
        elif "embed_tokens" in name:
            p = mx.random.normal(p.shape, key=k) * (0.4 / math.sqrt(p.shape[-1]))
        else:
            p = mx.random.normal(p.shape, key=k) / math.sqrt(p.shape[-1])
        params.append((name, p))
    module.update(tree_unflatten(params))


def make_target(seed=0, layers=(SLIDING, SLIDING, FULL, SLIDING, FULL), shared=0, ple=0, k_eq_v=False,
                moe=False, window=6) -> Model:
    args = ModelArgs(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=len(layers),
        num_attention_heads=2, num_key_value_heads=2 if k_eq_v else 1, head_dim=8, global_head_dim=16,
        num_global_key_value_heads=1 if k_eq_v else None, sliding_window=window, layer_types=list(layers),
        vocab_size_per_layer_input=VOCAB, hidden_size_per_layer_input=ple, attention_k_eq_v=k_eq_v,
        num_kv_shared_layers=shared, use_double_wide_mlp=shared > 0, enable_moe_block=moe,
        num_experts=4 if moe else None, top_k_experts=2 if moe else None, moe_intermediate_size=8 if moe else None,
    )
    model = Model(args)
    _perturb(model, seed)
    mx.eval(model.parameters())
    return model


def make_drafter(target: Model, seed=1, ordered=False) -> Drafter:
    t = target.args
    text = ModelArgs(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=t.num_key_value_heads, head_dim=t.head_dim, global_head_dim=t.global_head_dim,
        num_global_key_value_heads=t.num_global_key_value_heads, attention_k_eq_v=t.attention_k_eq_v,
        sliding_window=t.sliding_window, layer_types=[SLIDING, SLIDING, SLIDING, FULL],
        num_kv_shared_layers=4, hidden_size_per_layer_input=0, final_logit_softcapping=None,
    )
    args = DrafterArgs(text, t.hidden_size, ordered, num_centroids=8, centroid_intermediate_top_k=2)
    args.validate_against(t)
    drafter = Drafter(args)
    _perturb(drafter, seed)
    if ordered:
        perm = np.random.RandomState(seed).permutation(VOCAB)
        drafter.masked_embedding.token_ordering = mx.array(perm, dtype=mx.int32)
    mx.eval(drafter.parameters())
    return drafter


def bundle(target, drafter=None, eos=()) -> Bundle:
    return Bundle(target, drafter, None, {}, GenerationDefaults(list(eos)), Path("."))


def tokens(b: Bundle, prompt, **kw) -> list[int]:
    return [r.token for r in stream_generate(b, prompt, **kw)]


def oracle_proposer(reference: list[int], corrupt=lambda i: False):
    """Drafts from the known target continuation `reference` (absolute positions), wrong where corrupt(i)."""

    def propose(last, hidden, kv, position, k):
        out = [(reference[i] + 1) % VOCAB if corrupt(i) else reference[i] for i in range(position + 1, position + 1 + k)]
        return mx.array(out, dtype=mx.int32), None

    return propose


configs = st.fixed_dictionaries({
    "seed": st.integers(0, 1000),
    "layers": st.sampled_from([
        (SLIDING, SLIDING, FULL, SLIDING, FULL),
        (SLIDING, FULL, SLIDING, SLIDING, FULL, SLIDING, FULL),
        (SLIDING, SLIDING, SLIDING, FULL),
    ]),
    "shared": st.sampled_from([0, 2]),
    "ple": st.sampled_from([0, 4]),
    "k_eq_v": st.booleans(),
    "moe": st.booleans(),
    "window": st.integers(3, 8),
})


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs, ordered=st.booleans(), k=st.integers(1, 8), prompt_len=st.integers(1, 24),
       max_tokens=st.integers(1, 40), data=st.data())
def test_speculative_greedy_equals_plain_greedy(cfg, ordered, k, prompt_len, max_tokens, data):
    """The product's core property: MTP output == the target's own greedy output, token for token (float32)."""
    layers = cfg["layers"]
    if set(layers[: len(layers) - cfg["shared"]]) != set(layers):  # a shared type needs a producer
        cfg = {**cfg, "shared": 0}
    target = make_target(**cfg)
    drafter = make_drafter(target, cfg["seed"] + 1, ordered)
    prompt = data.draw(st.lists(st.integers(0, VOCAB - 1), min_size=prompt_len, max_size=prompt_len))
    b = bundle(target, drafter)
    plain = tokens(b, prompt, max_tokens=max_tokens, num_draft_tokens=0)
    assert len(plain) == max_tokens
    assert tokens(b, prompt, max_tokens=max_tokens, num_draft_tokens=k) == plain
    # drafts that are right most of the time exercise long accepted blocks and rollbacks of every size
    wrong = set(data.draw(st.lists(st.integers(0, prompt_len + max_tokens), max_size=6)))
    mixed = oracle_proposer(prompt + plain + [0] * 10, corrupt=lambda i: i in wrong)
    assert tokens(b, prompt, max_tokens=max_tokens, num_draft_tokens=k, proposer=mixed) == plain


@pytest.fixture(scope="module")
def pair():
    target = make_target(seed=3, layers=(SLIDING, SLIDING, FULL, SLIDING, SLIDING, FULL), shared=2, ple=4,
                         window=4)
    return target, make_drafter(target, 4, ordered=True)


PROMPT = [5, 9, 2, 33, 17, 8, 40, 41, 3, 12, 60, 7]  # 12 tokens, window 4: wraps before decoding starts


def test_oracle_drafts_all_accepted_and_wrong_drafts_none(pair):
    b = bundle(*pair)
    plain = tokens(b, PROMPT, max_tokens=48, num_draft_tokens=0)
    assert len(set(plain)) > 8, "the random target must not repeat itself"
    ref = PROMPT + plain + [0] * 16
    for k in (1, 4, 8):
        rs = list(stream_generate(b, PROMPT, max_tokens=48, num_draft_tokens=k, proposer=oracle_proposer(ref)))
        assert [r.token for r in rs] == plain
        assert rs[-1].draft.acceptance_rate == 1.0 and rs[-1].draft.drafted > 0
        assert sum(r.from_draft for r in rs) == rs[-1].draft.accepted
        rs = list(stream_generate(b, PROMPT, max_tokens=48, num_draft_tokens=k,
                                  proposer=oracle_proposer(ref, corrupt=lambda i: True)))
        assert [r.token for r in rs] == plain
        assert rs[-1].draft.accepted == 0
        assert (rs[-1].draft.rounds, rs[-1].draft.plain_rounds) == (46, 1)  # the last step has no room to draft


def test_eos_inside_accepted_block_cuts_exactly(pair):
    b = bundle(*pair)
    plain = tokens(b, PROMPT, max_tokens=40, num_draft_tokens=0)
    j = 10
    eos = plain[j]
    first = plain.index(eos)  # the first occurrence is where generation must stop
    b = bundle(*pair, eos=[eos])
    ref = PROMPT + plain + [0] * 16
    rs = list(stream_generate(b, PROMPT, max_tokens=40, num_draft_tokens=8, proposer=oracle_proposer(ref)))
    assert [r.token for r in rs] == plain[: first + 1]
    assert rs[-1].finish_reason == "stop" and all(r.finish_reason is None for r in rs[:-1])


def test_max_tokens_smaller_than_k_and_k_zero(pair):
    b = bundle(*pair)
    plain = tokens(b, PROMPT, max_tokens=12, num_draft_tokens=0)
    ref = PROMPT + plain + [0] * 16
    for m in (1, 2, 3):
        rs = list(stream_generate(b, PROMPT, max_tokens=m, num_draft_tokens=8, proposer=oracle_proposer(ref)))
        assert [r.token for r in rs] == plain[:m] and rs[-1].finish_reason == "length"
        assert rs[-1].draft.drafted <= m - 1  # never drafts past the budget
    rs = list(stream_generate(b, PROMPT, max_tokens=12, num_draft_tokens=0))
    assert [r.token for r in rs] == plain and rs[-1].draft is None


def test_auto_draft_length_is_exact_and_reports(pair):
    b = bundle(*pair)
    plain = tokens(b, PROMPT, max_tokens=30, num_draft_tokens=0)
    rs = list(stream_generate(b, PROMPT, max_tokens=30, num_draft_tokens="auto"))
    assert [r.token for r in rs] == plain
    assert rs[-1].draft.rounds > 0


def test_bad_draft_requests(pair):
    target, drafter = pair
    with pytest.raises(ValueError, match="needs a drafter"):
        tokens(bundle(target), PROMPT, num_draft_tokens=3)
    with pytest.raises(ValueError, match="num_draft_tokens"):
        tokens(bundle(target, drafter), PROMPT, num_draft_tokens=99)
    with pytest.raises(ValueError, match="outside the model.s vocabulary"):
        tokens(bundle(target, drafter), [VOCAB + 5])


def test_sampling_with_mtp_matches_target_distribution(pair):
    """T > 0: the second emitted token (the first speculative round) follows the target's exact distribution.

    The exact joint p(t1, t2 | prompt) is computed from the target; 1500 seeded MTP runs are compared with it by
    a chi-square test over the marginal of t2 (cells with expected count >= 5). Drafts are sampled from a uniform
    q (the random drafter's q rarely overlaps this peaky target), so rejections, residual resampling and
    accepted drafts all occur.
    """
    target, drafter = pair
    b = bundle(target, drafter)

    def uniform_proposer(last, hidden, kv, position, k):
        q = mx.full((k, VOCAB), -math.log(VOCAB))
        return mx.random.randint(0, VOCAB, (k,)).astype(mx.int32), q

    cfg = SamplerConfig(temperature=1.0)
    prompt = mx.array(PROMPT)
    p1 = mx.softmax(target(prompt[None])[0, -1])
    seqs = mx.concatenate([mx.broadcast_to(prompt, (VOCAB, len(PROMPT))), mx.arange(VOCAB)[:, None]], axis=1)
    p2 = mx.softmax(target(seqs)[:, -1], axis=-1)  # (t1, t2)
    marginal = np.array((p1[:, None] * p2).sum(axis=0))
    mx.random.seed(0)
    n = 1500
    counts = np.zeros(VOCAB)
    accepted = 0
    for _ in range(n):
        rs = list(stream_generate(b, PROMPT, max_tokens=3, sampler=cfg, num_draft_tokens=3,
                                  proposer=uniform_proposer))
        counts[rs[1].token] += 1
        accepted += rs[1].from_draft
    expected = marginal * n
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    chi2 = float(((obs - exp) ** 2 / np.maximum(exp, 1e-9)).sum())
    dof = len(obs) - 1
    # Wilson-Hilferty: chi2 critical value at p = 0.001
    z = 3.09
    critical = dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3
    assert chi2 < critical, (chi2, critical, dof)
    assert accepted > 0, "drafts must sometimes be accepted for this test to mean anything"


def test_long_generation_rolls_back_after_sliding_eviction(monkeypatch):
    """With a small buffer step the sliding caches evict old entries every few dozen tokens, also inside verify
    passes that are then partly rolled back; the output stays exact."""
    monkeypatch.setattr(cache_module, "_STEP", 16)  # the default (256) evicts once per ~500 tokens
    target = make_target(seed=5, layers=(SLIDING, SLIDING, FULL, SLIDING, FULL), shared=2, window=4)
    caches = []
    make_cache = target.make_cache
    monkeypatch.setattr(target, "make_cache", lambda **kw: caches.append(make_cache(**kw)) or caches[-1])
    b = bundle(target)
    prompt = [(7 * i + 3) % VOCAB for i in range(400)]
    plain = tokens(b, prompt, max_tokens=200, num_draft_tokens=0)
    mixed = oracle_proposer(prompt + plain + [0] * 16, corrupt=lambda i: i % 5 == 2)
    rs = list(stream_generate(b, prompt, max_tokens=200, num_draft_tokens=6, proposer=mixed))
    assert [r.token for r in rs] == plain
    assert 0 < rs[-1].draft.accepted < rs[-1].draft.drafted  # partial rejections happened
    sliding = [c for c in caches[-1] if isinstance(c, SlidingKVCache)]
    assert sliding and all(c.start > len(prompt) for c in sliding), "no eviction while decoding"


def test_position_convention_is_a_parameter(pair, monkeypatch):
    """Both conventions decode exactly; the drafter's query position differs by one (HF: the last token's)."""
    import mlx_gemma_mtp.speculative as spec

    target, drafter = pair
    b = bundle(target, drafter)
    plain = tokens(b, PROMPT, max_tokens=24, num_draft_tokens=0)
    queried = []
    real_draft = spec.draft
    monkeypatch.setattr(spec, "draft", lambda step, last, hidden, windows, position, *a: queried.append(position)
                        or real_draft(step, last, hidden, windows, position, *a))
    for offset in (0, 1):
        queried.clear()
        propose = spec.drafter_proposer(b.state.draft_step, SamplerConfig(), position_offset=offset)
        assert tokens(b, PROMPT, max_tokens=24, num_draft_tokens=3, proposer=propose) == plain
        assert queried[0] == len(PROMPT) - 1 + offset  # first round: the hidden state is the last prompt token


def test_batch_prompts_are_refused(pair):
    with pytest.raises(ValueError, match="batch size is 1"):
        tokens(bundle(*pair), [PROMPT, PROMPT])


def test_default_draft_length_with_a_proposer_and_no_drafter(pair):
    """Without a drafter, None/'auto' mean plain decoding; with a custom proposer they are refused clearly
    ('auto' measures the drafter), instead of crashing inside the cost measurement."""
    target, _ = pair
    b = bundle(target)
    plain = tokens(b, PROMPT, max_tokens=8, num_draft_tokens=0)
    rs = list(stream_generate(b, PROMPT, max_tokens=8, num_draft_tokens="auto"))
    assert [r.token for r in rs] == plain and rs[-1].draft is None
    wrong = oracle_proposer(PROMPT + plain + [0] * 8, corrupt=lambda i: True)
    for k in (None, "auto"):
        with pytest.raises(ValueError, match="custom proposer pass an int"):
            tokens(b, PROMPT, num_draft_tokens=k, proposer=wrong)


@pytest.mark.parametrize("pattern", [[0, 0, 3, 0, 2, 0, 0, 0, 4], [2, 0], [0], [5]])
def test_policy_switching_between_plain_and_mtp_rounds_is_exact(pair, pattern):
    """K = 0 rounds run pipelined inside the MTP loop; switching in and out of them keeps the output and asks the
    policy exactly once per round."""
    from mlx_gemma_mtp.drafting import DraftStep
    from mlx_gemma_mtp.plain import Chooser, first_token, prefill
    from mlx_gemma_mtp.speculative import drafter_proposer, mtp_generate_step
    from mlx_gemma_mtp.stats import DraftStats

    target, drafter = pair
    plain = tokens(bundle(target, drafter), PROMPT, max_tokens=40, num_draft_tokens=0)
    calls, told = [], []

    class Policy:
        def choose(self, remaining, context):
            calls.append((remaining, context))
            return pattern[(len(calls) - 1) % len(pattern)]

        def accepted(self, k, n):
            told.append(("accepted", k, n))

        def timed(self, k, seconds):
            told.append(("timed", k, seconds))

    cache = target.make_cache(max_rollback=8)
    first = first_token(prefill(target, mx.array(PROMPT), cache, 512, True), Chooser(SamplerConfig()))
    stats, greedy, seen = DraftStats(), SamplerConfig(), []
    real = drafter_proposer(DraftStep(target, drafter), greedy)

    def propose(last, hidden, windows, position, k):
        seen.append((last.item(), hidden, position))
        return real(last, hidden, windows, position, k)

    steps = mtp_generate_step(target, cache, first, propose, Policy(), Chooser(greedy), stats, 40)
    assert [t for t, *_ in steps] == plain
    assert calls[0] == (39, len(PROMPT))
    played = [min(pattern[i % len(pattern)], remaining - 1) for i, (remaining, _) in enumerate(calls)]
    assert (stats.rounds, stats.plain_rounds) == (len(played) - played.count(0), played.count(0))
    # every round's accepted count is told at once, in order, and equals the stats the loop keeps
    accepted = [(k, n) for what, k, n in told if what == "accepted"]
    assert [k for k, _ in accepted] == played and sum(n for _, n in accepted) == stats.accepted
    # every round is timed once with its own K, once its tokens are read (a plain step's after the next round is
    # queued: the last rounds may end the generation untimed)
    timed = [k for what, k, _ in told if what == "timed"]
    assert timed == played[: len(timed)] and len(timed) >= len(played) - 2
    assert all(s >= 0 for what, _, s in told if what == "timed")
    assert cache[0].offset == len(PROMPT) + 39  # every emitted token but the newest is in the cache
    # every drafting round starts from the true state: `last` at `position`, the hidden state of the one before
    sequence = PROMPT + plain
    full = target.forward(mx.array(sequence)[None], rows=len(sequence), return_hidden=True).hidden[0]
    for last, hidden, position in seen:
        assert last == sequence[position]
        assert mx.allclose(hidden[0, 0], full[position - 1], rtol=1e-3, atol=1e-3)  # float32, other shapes


def _reference_log_probs(target, prompt: list[int], generated: list[int]) -> mx.array:
    """The target's log-softmax at every position of prompt + generated, in one forward: (T, V)."""
    sequence = prompt + generated
    logits = target.forward(mx.array(sequence)[None], rows=len(sequence)).logits[0].astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def _assert_logprobs_are_the_targets(responses, reference: mx.array, top: int) -> None:
    for i, r in enumerate(responses):
        row = reference[len(PROMPT) - 1 + i]
        assert r.logprobs.logprob == pytest.approx(row[r.token].item(), abs=1e-4)
        ids = [t for t, _ in r.logprobs.top]
        assert len(ids) == top and ids[0] == mx.argmax(row).item()
        assert [v for _, v in r.logprobs.top] == pytest.approx(row[mx.array(ids)].tolist(), abs=1e-4)


def test_logprobs_of_drafted_tokens_equal_plain_decodings(pair):
    """Every emitted token's log-probability and alternatives come from the target's own distribution: with MTP
    (drafted tokens read off the verify rows) they equal plain decoding's, token for token (drafts forced right
    two times in three, so every round accepts some)."""
    b = bundle(*pair)
    plain = list(stream_generate(b, PROMPT, max_tokens=30, num_draft_tokens=0, logprobs=4))
    propose = oracle_proposer(PROMPT + [r.token for r in plain] + [0] * 16, corrupt=lambda i: i % 3 == 2)
    for k in (1, 3, 6):
        mtp = list(stream_generate(b, PROMPT, max_tokens=30, num_draft_tokens=k, proposer=propose, logprobs=4))
        assert [r.token for r in mtp] == [r.token for r in plain] and sum(r.from_draft for r in mtp) >= 10
        for a, p in zip(mtp, plain):  # to float32 rounding: a several-row matmul sums in another order
            assert a.logprobs.logprob == pytest.approx(p.logprobs.logprob, abs=1e-4)
            assert [t for t, _ in a.logprobs.top] == [t for t, _ in p.logprobs.top]
            assert [v for _, v in a.logprobs.top] == pytest.approx([v for _, v in p.logprobs.top],
                                                                     abs=1e-4)
    _assert_logprobs_are_the_targets(plain, _reference_log_probs(pair[0], PROMPT, [r.token for r in plain]), 4)
    assert all(r.logprobs is None for r in stream_generate(b, PROMPT, max_tokens=3, num_draft_tokens=2))
    with pytest.raises(ValueError, match="logprobs=21"):
        next(stream_generate(b, PROMPT, max_tokens=3, logprobs=21))


def test_sampled_logprobs_are_the_targets_distribution_before_temperature(pair):
    b = bundle(*pair)
    sampler = SamplerConfig(temperature=1.5, top_k=20, seed=5)
    for k in (0, 3):
        rs = list(stream_generate(b, PROMPT, max_tokens=20, sampler=sampler, num_draft_tokens=k, logprobs=2))
        _assert_logprobs_are_the_targets(rs, _reference_log_probs(pair[0], PROMPT, [r.token for r in rs]), 2)
