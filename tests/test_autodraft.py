"""The draft-length policy: acceptance bookkeeping, costs learned online (from injected seconds or a fake clock, never
real timing), what persists across generations, reproducibility with a seed, no measurement inside a generation."""

from __future__ import annotations

import dataclasses
import itertools
import random

import mlx.core as mx
import pytest
from test_speculative import PROMPT, bundle, make_drafter, make_target, tokens

import mlx_gemma_mtp.draft_length as auto
from mlx_gemma_mtp import SamplerConfig, calibration, stream_generate
from mlx_gemma_mtp.draft_length import AutoDraftLength, Learned
from mlx_gemma_mtp.round_cost import CostModel, DraftCosts, cost_model
from mlx_gemma_mtp.stats import DraftStats

# a flat analytic model: a round at K costs 1 + 0.2 K (+ the round overhead) units, no context term
FLAT = CostModel(0.2, (), ())


def _ask(policy, remaining: int, finished: list[tuple[int, float]], context: int) -> int:
    """Tell `policy` the seconds of the rounds finished since its last choice, then ask it for K (as the loop does)."""
    for k, seconds in finished:
        policy.timed(k, seconds)
    return policy.choose(remaining, context)


def _play(policy, rounds: list[tuple[int, float]], context: int = 100) -> None:
    """Play `rounds` (K, seconds) in this order, told as `mtp_generate_step` tells them: a drafting round's time at
    its host sync (before the next choice), a plain step's once the next round is queued (after the next choice;
    a last plain step's is not told)."""
    late = None
    for k, seconds in rounds:
        policy._plan = [k]
        assert policy.choose(10_000, context) == k
        if late is not None:
            policy.timed(*late)
            late = None
        if k:
            policy.timed(k, seconds)
        else:
            late = (0, seconds)


def test_conditional_acceptance_counts_only_rounds_that_reached_the_position():
    stats = DraftStats()
    for k, n in [(4, 4), (4, 1), (2, 2), (4, 0)]:
        stats.record(k, n)
    assert stats.drafted_per_position == [4, 4, 3, 3]
    assert stats.accepted_per_position == [3, 2, 1, 1]
    assert stats.reached_per_position == [4, 3, 1, 1]
    assert stats.acceptance_per_position == pytest.approx([3 / 4, 2 / 4, 1 / 3, 1 / 3])
    assert stats.conditional_acceptance_per_position == pytest.approx([3 / 4, 2 / 3, 1.0, 1.0])
    merged = DraftStats().merge(stats).merge(stats)
    assert merged.reached_per_position == [8, 6, 2, 2]


def test_plain_steps_are_counted_apart_from_drafting_rounds():
    stats = DraftStats()
    for k, n in [(3, 2), (0, 0), (0, 0), (2, 0)]:
        stats.record(k, n)
    assert (stats.rounds, stats.plain_rounds, stats.drafted, stats.accepted) == (2, 2, 5, 2)
    assert stats.mean_accepted_length == 1.0  # per drafting round: plain steps do not dilute it
    merged = DraftStats().merge(stats).merge(stats)
    assert (merged.rounds, merged.plain_rounds) == (4, 4)


def _policy(accept_rates, model=FLAT, max_k=8, rounds=2000, **kw) -> AutoDraftLength:
    """A policy whose stats saw `rounds` rounds at K=max_k with conditional acceptance `accept_rates[i]`."""
    policy = AutoDraftLength(model, max_k, **kw)
    stats = policy.stats
    stats.drafted_per_position = [rounds] * max_k
    reached, accepted = [], []
    survive = float(rounds)
    for a in accept_rates:
        reached.append(round(survive))
        survive *= a
        accepted.append(round(survive))
    stats.reached_per_position, stats.accepted_per_position = reached, accepted
    return policy


def _best(policy, context=100) -> int:
    rates = policy.rates(context)
    return max(range(len(rates)), key=rates.__getitem__)


def test_high_acceptance_and_cheap_drafts_pick_long_drafts():
    policy = _policy([0.9] * 8, CostModel(0.02, (), ()))
    assert policy.acceptance()[:3] == pytest.approx([0.9] * 3, abs=0.01)
    assert _best(policy) == 8


def test_costly_drafts_or_low_acceptance_pick_plain_decoding():
    assert _best(_policy([0.05] * 8)) == 0
    assert _best(_policy([0.9] * 8, CostModel(1.5, (), ()))) == 0


def test_expected_rate_matches_the_formula():
    policy = _policy([0.8, 0.5] + [0.1] * 6)
    a = policy.acceptance()
    expected_k2 = (1 + a[0] + a[0] * a[1]) / FLAT.round(2, 100)
    assert policy.rates(100)[2] == pytest.approx(expected_k2)
    assert FLAT.round(2, 100) == pytest.approx(1 + auto.VERIFY_SLOPE * 2 + auto.ROUND_OVERHEAD + 2 * 0.2)


def test_unexplored_positions_follow_the_last_explored_one_one_position_at_a_time():
    """Only K=1 rounds so far, all accepted: later positions are assumed as good, so the policy tries longer
    drafts instead of staying at K=1 forever; counting alone (no timing), only one position past what some round
    has reached."""
    policy = AutoDraftLength(CostModel(0.05, (), ()), 8, timed=False)
    for _ in range(50):
        policy.accepted(1, 1)
    assert policy.acceptance()[1] == pytest.approx(policy.acceptance()[0])
    assert _best(policy) == 8 and _ask(policy, 100, [], 100) == 2


def test_costs_follow_the_context_length():
    """Full-attention layers read more K/V as the context grows, sliding ones stop at their window; an estimate
    measured early is re-priced at the current context instead of going stale."""
    model = CostModel(0.1, ((16, 0.001), (None, 0.001)), ((None, 0.0005),))
    assert model.round(0, 8) == pytest.approx(1 + 0.008 + 0.008)
    assert model.round(0, 1000) == pytest.approx(1 + 0.016 + 1.0)
    assert model.round(3, 1000) - model.round(3, 8) > model.round(0, 1000) - model.round(0, 8)  # drafts read it too
    policy = AutoDraftLength(model, 8)
    _play(policy, [(0, 0.01)] * 4, 8)  # plain steps after a plain step set the unit at context 8
    assert policy.seconds(0, 1000) == pytest.approx(0.01 * model.round(0, 1000) / model.round(0, 8))


def test_one_round_moves_a_cost_estimate_by_a_bounded_factor():
    learned = Learned()
    learned.observe(2, 1.0)  # the first timed round gives the analytic model its unit
    assert learned.level == 1.0 and learned.seconds_per_unit(2) == 1.0
    learned.samples[2] = 10
    learned.observe(2, 100.0)  # a hiccup (another process, a retrace): a lone slow round counts as OUTLIER
    assert learned.seconds_per_unit(2) == pytest.approx(auto.OUTLIER ** max(auto.EMA, 1 / 11))
    learned.observe(2, 1e-6)
    assert learned.seconds_per_unit(2) >= 1.0 / auto.CLIP
    before = learned.seconds_per_unit(2)
    learned.observe(2, 3 * before)
    learned.observe(2, 3 * before)  # two slow rounds in a row: the machine changed, the estimate moves halfway
    assert learned.seconds_per_unit(2) > 1.4 * before


def test_a_busier_machine_reprices_every_k_and_a_new_k_only_itself():
    learned = Learned()
    learned.observe(3, 1.0)
    learned.observe(0, 0.5)
    learned.samples[3] = 20
    plain = learned.seconds_per_unit(0)
    learned.observe(3, 1.2)  # the K played all along got slower: the machine is busier
    moved = learned.seconds_per_unit(3)
    assert moved > 1.0 and learned.seconds_per_unit(0) / plain == pytest.approx(moved ** (1 - auto.EMA))
    level = learned.level
    learned.observe(6, 1.8 * learned.seconds_per_unit(6))  # a first round at K = 6 costs more than K = 3 suggested
    assert learned.level == level and learned.seconds_per_unit(6) == pytest.approx(1.8 * moved)
    assert learned.seconds_per_unit(7) == pytest.approx(learned.seconds_per_unit(6))  # the nearest measured K
    for _ in range(12):
        learned.observe(3, 2.0 * learned.seconds_per_unit(3))  # much busier: once the level moved by STALE, ...
    assert learned.fresh(3) and not learned.fresh(0) and not learned.fresh(6)  # ... the others are stale


def test_a_machine_free_again_reprices_every_k_after_two_fast_rounds_in_a_row():
    """The end of a busy spell: the K played all along gets faster. One fast round is noise (the EMA's share); a
    second in a row is the machine, so the level (every K's price) moves with it, not only that K's estimate."""
    learned = Learned()
    learned.observe(3, 1.0)
    learned.observe(0, 0.5)
    learned.samples[3] = 20
    plain = learned.seconds_per_unit(0)
    learned.observe(3, 0.5)
    once = learned.seconds_per_unit(3)
    assert once == pytest.approx(0.5 ** auto.EMA) and learned.seconds_per_unit(0) / plain > 0.9
    learned.observe(3, 0.5)
    assert learned.seconds_per_unit(3) == pytest.approx(once * (0.5 / once) ** 0.5)  # halfway, as a slow pair
    assert learned.seconds_per_unit(0) / plain < 0.85  # plain re-priced too (before: 0.89 of its old price)
    learned = Learned()
    learned.observe(3, 1.0)
    learned.samples[3] = 20
    for surprise in (0.5, 1.0, 0.5):  # fast, as estimated, fast: never two in a row, each fast one is noise
        learned.observe(3, surprise * learned.seconds_per_unit(3))
    assert learned.level == pytest.approx(0.5 ** (2 * (1 - auto.EMA) * auto.EMA))


def test_a_change_the_next_round_contradicts_is_undone():
    """Two hiccups in a row look like a busier machine; when the next round at that K is as fast as before, they
    were hiccups: the estimate and the level go back to where they were (they stayed 40% too dear before)."""
    learned = Learned()
    learned.observe(0, 1.0)
    learned.observe(3, 2.0)
    learned.samples[0] = 20
    plain, level = learned.seconds_per_unit(0), learned.level
    learned.observe(0, 3.0)
    learned.observe(0, 3.0)  # believed: the machine is busier
    assert learned.seconds_per_unit(0) > 1.3 * plain and learned.level > 1.2 * level
    learned.observe(0, 1.0)  # ... but the next plain step says otherwise
    assert learned.seconds_per_unit(0) == pytest.approx(plain * auto.OUTLIER ** auto.EMA)
    assert learned.level == pytest.approx(level * auto.OUTLIER ** ((1 - auto.EMA) * auto.EMA))  # the first one counts
    learned.observe(0, 3.0)
    learned.observe(0, 3.0)
    learned.observe(0, 3.0)  # a third slow round agrees: the change stands
    assert learned.seconds_per_unit(0) > 1.8 * plain


def _simulate(policy_for, true_seconds, acceptance, rounds, seed=0, context=100):
    """Run a policy against a synthetic pair: `true_seconds[K]` per round (told as the loop tells it: a plain
    step's after the next choice), draft i accepted with probability `acceptance[i]` given the earlier ones.
    Returns the K of every round. (bench/auto_regret.py simulates the loop itself, host and device.)"""
    rng = random.Random(seed)
    policy, late, played = policy_for(), None, []
    for _ in range(rounds):
        k = policy.choose(10_000, context)
        if late is not None:
            policy.timed(*late)
        n = 0
        while n < k and rng.random() < acceptance[n]:
            n += 1
        policy.accepted(k, n)
        late = (k, true_seconds[k])
        if k:
            policy.timed(*late)
            late = None
        played.append(k)
    return played


# true costs of a pair where drafting pays at K = 3 (verify of 4 tokens is cheap on this device), not beyond
TRUE = [1.0, 1.5, 1.8, 1.9, 2.6, 3.0, 3.4, 3.8, 4.2]
GOOD = [0.9] * 8


def _expected_rate(k, true_seconds=TRUE, acceptance=GOOD):
    tokens, survive = 1.0, 1.0
    for a in acceptance[:k]:
        survive *= a
        tokens += survive
    return tokens / true_seconds[k]


def _mostly(played, k, last=40) -> bool:
    return sum(p == k for p in played[-last:]) >= 0.75 * last


def test_wrong_analytic_prior_is_corrected_within_a_few_dozen_rounds():
    assert max(range(9), key=_expected_rate) == 3
    free = CostModel(0.0, (), ())  # the model prices drafting as free: it hopes for deep drafts
    played = _simulate(lambda: AutoDraftLength(free, 8), TRUE, GOOD, 120)
    assert max(played[:40]) > 3 and _mostly(played, 3)


def test_a_never_timed_k_next_to_the_best_is_tried_once_in_a_long_generation():
    """Costs need not be monotone in K: on this CPU a verify of 8 rows runs faster than one of 7, so K = 7 beats
    K = 6 and K = 8 on the E2B cut, a dip the line through the K timed around it never shows. A never-timed K next
    to the best one, between two timed K, is tried once while enough tokens are left to profit."""

    def policy():
        learned = Learned()
        for k, seconds in [(0, 1.0), (6, 1.0), (8, 1.0)] * 6:  # K = 8 the best; K = 7 priced on their line
            learned.observe(k, seconds)
        learned.compiled |= {6, 8}  # they ran: the draft step is traced
        auto_policy = AutoDraftLength(FLAT, 8, learned)
        for _ in range(50):
            auto_policy.accepted(8, 8)
        return auto_policy

    rates = policy().rates(100)
    assert max(range(9), key=rates.__getitem__) == 8
    assert policy().choose(auto.NEIGHBOUR_AFTER - 1, 100) == 8  # too few tokens left to profit
    tried = policy()
    assert tried.choose(500, 100) == 7
    tried.timed(7, 2.0 * tried.seconds(8, 100))  # K = 7 is dearer after all: not tried again
    tried.accepted(7, 7)
    assert [tried.choose(500, 100) for _ in range(5)] == [8] * 5


@pytest.mark.parametrize("stale", ["slow MTP", "free MTP"])
def test_stale_saved_costs_are_a_prior_that_the_rounds_overrule(stale):
    """A calibration from another machine or MLX build (MTP never paying, or priced as free) is dropped once the
    rounds contradict it, and the policy settles on the truly best K."""
    from mlx_gemma_mtp.bench.decoding import stale_costs

    prior = stale_costs(DraftCosts([0.0] + [0.2 * k for k in range(1, 9)], [0.0] + [1.0] * 9, 100))[stale]

    def policy():
        learned = Learned()
        for k in range(9):
            learned.prior[k] = (prior.verify[k + 1] + prior.draft[k]) / FLAT.round(k, 100)
        learned.calibrated = True
        return AutoDraftLength(FLAT, 8, learned)

    played = _simulate(policy, TRUE, GOOD, 150)
    assert _mostly(played, 3)


def test_the_first_drafting_round_is_a_trace_not_a_cost_sample():
    """The pair's first drafting round traces the draft step's graph (one graph for every K). Its lap holds the
    trace when no plain step before it hid it: no sample until a trace is priced (from what that lap took beyond
    the K's own later rounds), then a provisional one, less the trace, which the next round at K replaces. A new K
    after that costs no trace."""
    learned = Learned()
    policy = AutoDraftLength(FLAT, 8, learned)
    _play(policy, [(3, 0.05)])
    assert learned.shape[3] is None and learned.traced  # the draft step was traced in that round
    _play(policy, [(3, 0.03)])
    assert policy.seconds(3, 100) == pytest.approx(0.03)
    assert learned.compile_cost == pytest.approx(0.05 - 0.03)  # the trace is priced from what it took
    _play(policy, [(5, 0.04)])  # a new K: no trace, a sample of its own
    assert policy.seconds(5, 100) == pytest.approx(0.04) and learned.samples[5] == 1
    fresh = Learned(compile_cost=0.02, compiles_seen=1)
    policy = AutoDraftLength(FLAT, 8, fresh)
    _play(policy, [(0, 0.02), (0, 0.01), (2, 0.02), (4, 0.06)])  # the trace was hidden behind the plain step
    assert policy.seconds(2, 100) == pytest.approx(0.02) and fresh.samples[2] == 1
    assert policy.seconds(4, 100) == pytest.approx(0.06)


def test_only_a_plain_step_between_plain_steps_is_a_clean_sample():
    """Plain steps are pipelined and drafting rounds are not: a plain step after a drafting round (or first in a
    generation) also holds its own graph building, and one before the pair's first drafting round the draft step's
    trace: upper bounds, kept only until a plain step after a plain step is timed."""
    learned = Learned()
    policy = AutoDraftLength(FLAT, 8, learned)
    _play(policy, [(0, 0.02), (0, 0.011), (4, 0.03)])  # between plain steps, but the next round traced the step
    assert policy.seconds(0, 100) == pytest.approx(0.011) and not learned.plain_clean
    _play(policy, [(2, 0.02), (2, 0.02), (0, 0.012), (2, 0.02)])  # after a drafting round: an upper bound
    assert policy.seconds(0, 100) == pytest.approx(0.011) and not learned.plain_clean
    _play(policy, [(0, 0.02), (0, 0.01), (2, 0.02)])
    assert policy.seconds(0, 100) == pytest.approx(0.01) and learned.plain_clean
    _play(policy, [(0, 0.5), (2, 0.02)])  # after a drafting round, with a clean estimate: not a sample
    assert policy.seconds(0, 100) == pytest.approx(0.01)


def test_a_pair_that_never_drafted_drafts_only_when_the_tokens_left_pay_for_the_trace():
    learned = Learned()
    learned.compile_cost, learned.plain_clean = 5.0, True  # the draft step's trace costs 5 s
    learned.level, learned.shape[0], learned.timed_at[0], learned.samples[0] = 0.01, 1.0, 0.01, 50
    policy = AutoDraftLength(CostModel(0.02, (), ()), 8, learned)
    policy._last = 0  # past the generation's opening
    for _ in range(40):
        learned.accepted[:3] = [learned.accepted[i] + 1 for i in range(3)]
        learned.reached[:3] = [learned.reached[i] + 1 for i in range(3)]
    assert policy.choose(20, 100) == 0  # 20 tokens left: drafting would not pay for the trace
    assert policy.choose(100_000, 100) > 0


PLATEAU = [1.0, 1.6, 1.9, 2.0, 2.1, 2.1, 2.2, 2.2, 2.3]  # a verify flat past a few rows: deep K pay most


def _opening_on_a_hard_passage(hard_rounds: int, rounds: int = 200) -> list[int]:
    """The K of every round of a generation whose first `hard_rounds` rounds accept no draft (a passage the
    drafter cannot guess) and every later draft 9 times in 10, on `PLATEAU` costs."""
    policy, rng, late, played = AutoDraftLength(FLAT, 8), random.Random(0), None, []
    for r in range(rounds):
        k = policy.choose(10_000, 100)
        if late is not None:
            policy.timed(*late)
            late = None
        n = 0
        while n < k and r >= hard_rounds and rng.random() < 0.9:
            n += 1
        policy.accepted(k, n)
        if k:
            policy.timed(k, PLATEAU[k])
        else:
            late = (0, PLATEAU[0])
        played.append(k)
    return played


def test_a_generation_that_opens_on_a_hard_passage_drafts_again(monkeypatch):
    """Plain steps chosen on the evidence of a few drafting rounds are not final: drafting gets another round every
    RETRY_EVERY plain steps until EVIDENCE rounds reached the first draft, and finds the passage's end."""
    def back_to_drafting(played: list[int]) -> int:  # the round drafting resumed after the hard passage
        return next(r for r in range(10, len(played)) if played[r])

    played = _opening_on_a_hard_passage(10)
    assert back_to_drafting(played) <= 10 + auto.RETRY_EVERY and _mostly(played, 8)
    monkeypatch.setattr(auto, "EVIDENCE", 0)  # without the retries: plain steps until a probe, much later
    assert back_to_drafting(_opening_on_a_hard_passage(10)) > 50


def test_close_contenders_are_tried_again_and_clearly_worse_ones_soon_are_not():
    """K = 3 is the best, K = 2 and 4 within 10%, K = 0 and 8 far behind: the bandit keeps timing the close ones
    now and then (their estimates rest on few rounds), hardly ever the far ones."""
    close = [1.0, 1.5, 1.45, 1.7, 2.1, 2.6, 3.0, 3.4, 4.2]
    assert sorted(range(9), key=lambda k: -_expected_rate(k, close))[:3] == [3, 4, 2]
    ks = _simulate(lambda: AutoDraftLength(FLAT, 8), close, GOOD, 600)
    late = ks[100:]
    assert late.count(3) > 0.8 * len(late)
    assert late.count(2) + late.count(4) >= 6 and late.count(0) + late.count(8) <= 4


def test_nothing_accepted_means_plain_steps():
    ks = _simulate(lambda: AutoDraftLength(FLAT, 8), TRUE, [0.0] * 8, 400)
    assert ks[100:].count(0) > 0.95 * 300


def test_untimed_policy_ignores_the_seconds():
    def run(seconds):
        return _simulate(lambda: AutoDraftLength(FLAT, 8, timed=False), seconds, GOOD, 60)

    assert run(TRUE) == run([1.0] * 9) == run(list(reversed(TRUE)))


def test_learned_state_carries_over_with_older_evidence_weighing_less():
    learned = Learned()
    first = AutoDraftLength(FLAT, 8, learned)
    for _ in range(400):
        first.accepted(2, 1)
    policy = AutoDraftLength(FLAT, 8, learned)  # folds the first generation in
    assert learned.reached[0] == pytest.approx(auto.MAX_COUNT)  # capped: older evidence scaled down
    assert learned.accepted[0] / learned.reached[0] == pytest.approx(1.0)
    assert learned.reached[1] / learned.reached[0] == pytest.approx(1.0)
    assert policy.acceptance()[1] < 0.2  # position 1 was always rejected, and that was remembered
    rounds = learned.rounds[:]
    AutoDraftLength(FLAT, 8, learned)
    assert learned.rounds == [r * auto.DECAY for r in rounds]


# ---- on tiny real models -------------------------------------------------------------------------------------------


@pytest.fixture
def fresh_pair():
    """A freshly loaded pair each time (the learned state lives on the drafter)."""

    def make():
        target = make_target(seed=3, layers=("sliding_attention", "sliding_attention", "full_attention"), window=4)
        return bundle(target, make_drafter(target, 4, ordered=True))

    return make


def test_no_measurement_inside_a_generation(fresh_pair, monkeypatch):
    """The first token is never delayed by a cost measurement: auto learns from the rounds that run anyway."""
    def fail(*a, **k):
        pytest.fail("a cost measurement ran inside stream_generate")

    monkeypatch.setattr(calibration, "measure_costs", fail)
    monkeypatch.setattr(calibration, "_timed_pair", fail)
    b = fresh_pair()
    for sampler in (SamplerConfig(), SamplerConfig(temperature=1.0), SamplerConfig(temperature=1.0, seed=1)):
        rs = list(stream_generate(b, PROMPT, max_tokens=24, sampler=sampler, num_draft_tokens="auto"))
        assert len(rs) == 24 and rs[-1].draft.rounds + rs[-1].draft.plain_rounds > 0


@pytest.mark.parametrize("k", [0, 3, "auto"])
def test_seeded_sampling_is_reproducible_for_every_draft_length(fresh_pair, k):
    """The same call with the same seed gives the same tokens: on a freshly loaded pair, again, and on the same pair
    after other generations (which taught auto things and moved MLX's global RNG)."""
    cfg = SamplerConfig(temperature=1.0, seed=7)
    first = tokens(fresh_pair(), PROMPT, max_tokens=40, sampler=cfg, num_draft_tokens=k)
    assert tokens(fresh_pair(), PROMPT, max_tokens=40, sampler=cfg, num_draft_tokens=k) == first
    b = fresh_pair()
    tokens(b, PROMPT, max_tokens=30, num_draft_tokens="auto")
    tokens(b, PROMPT, max_tokens=30, sampler=SamplerConfig(temperature=1.0), num_draft_tokens="auto")
    mx.random.uniform()
    assert tokens(b, PROMPT, max_tokens=40, sampler=cfg, num_draft_tokens=k) == first
    assert tokens(b, PROMPT, max_tokens=40, sampler=SamplerConfig(temperature=1.0, seed=8),
                  num_draft_tokens=k) != first  # the seed matters


def test_what_auto_learns_stays_with_the_pair_per_sampling_setting(fresh_pair):
    b = fresh_pair()
    memory = b.state.auto_records  # priced as a drafter far smaller than its target, so that the prior drafts
    memory.model = dataclasses.replace(memory.model, draft_step=0.05)
    rs = list(stream_generate(b, PROMPT, max_tokens=30, num_draft_tokens="auto"))
    greedy = memory.settings[("greedy",)]
    assert greedy.previous == rs[-1].draft and rs[-1].draft.rounds > 0  # the prior starts by drafting
    list(stream_generate(b, PROMPT, max_tokens=30, num_draft_tokens="auto"))
    assert memory.settings[("greedy",)] is greedy and greedy.reached[0] == rs[-1].draft.reached_per_position[0]
    list(stream_generate(b, PROMPT, max_tokens=10, sampler=SamplerConfig(temperature=0.7), num_draft_tokens="auto"))
    assert len(memory.settings) == 2
    list(stream_generate(b, PROMPT, max_tokens=10, sampler=SamplerConfig(temperature=0.7, seed=1),
                         num_draft_tokens="auto"))
    assert len(memory.settings) == 2  # seeded: nothing kept, nothing read
    b.state.forget()
    assert b.state.auto_records is not memory and not b.state.auto_records.settings


def test_the_loop_times_only_its_own_code(fresh_pair):
    """Seconds reported to the policy cover the loop's work, never the caller's time between tokens (fake clock:
    every call advances it by 1; the caller spends 1000 per token)."""
    from mlx_gemma_mtp.plain import Chooser, first_token, prefill
    from mlx_gemma_mtp.speculative import drafter_proposer, mtp_generate_step

    b = fresh_pair()
    ticks, caller = itertools.count(), [0]
    reports = []

    class Policy:
        def choose(self, remaining, context):
            return [0, 0, 2, 1][len(reports) % 4]

        def accepted(self, k, n):
            pass

        def timed(self, k, seconds):
            reports.append((k, seconds))

    cache = b.target.make_cache(max_rollback=8)
    greedy = SamplerConfig()
    first = first_token(prefill(b.target, mx.array(PROMPT), cache, 512, True), Chooser(greedy))
    propose = drafter_proposer(b.state.draft_step, greedy)
    steps = mtp_generate_step(b.target, cache, first, propose, Policy(), Chooser(greedy), DraftStats(), 31,
                              clock=lambda: next(ticks) + caller[0])
    for _ in steps:
        caller[0] += 1000
    assert len(reports) > 10 and all(0 < s < 20 for _, s in reports)


def test_saved_calibration_is_a_prior_keyed_by_machine_and_mlx(fresh_pair, monkeypatch, tmp_path):
    monkeypatch.setenv("MLX_GEMMA_MTP_CACHE", str(tmp_path))
    b = fresh_pair()
    target, drafter = b.target, b.drafter
    costs = calibration.measure_costs(target, drafter, 3, context=16)
    assert len(costs.verify) == 5 and all(t > 0 for t in costs.verify[1:]) and costs.context == 16
    assert len(costs.draft) == 4 and costs.draft[0] == 0 and all(t > 0 for t in costs.draft[1:])
    assert calibration.saved_costs(target, drafter, True) is None
    calibration.save_costs(target, drafter, True, costs)
    assert calibration.saved_costs(target, drafter, True) == costs
    assert calibration.saved_costs(target, drafter, False) is None  # sampled drafting: its own entry
    learned = b.state.draft_length("auto", SamplerConfig(), 8).learned
    model = cost_model(target, drafter)
    per_unit = [(costs.verify[k + 1] + costs.draft[k]) / model.round(k, 16) for k in range(4)]
    assert learned.calibrated and learned.prior[2] == pytest.approx(per_unit[2] / per_unit[0])
    assert learned.prior[8] == learned.prior[3]  # beyond the measured K: the last one's
    assert learned.level is None and learned.shape == [None] * 9  # a prior: the rounds set level and shapes
    monkeypatch.setattr(mx, "__version__", "0.0.0-other")
    assert calibration.saved_costs(target, drafter, True) is None  # another MLX build: not this machine's costs
    calibration._cache_file().write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable draft-cost cache"):
        assert calibration.saved_costs(target, drafter, True) is None
