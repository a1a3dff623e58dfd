"""The draft-length policy: acceptance bookkeeping and the choice of K from costs (no timing involved)."""

import pytest

from mlx_gemma_mtp.autodraft import AutoDraftLength, DraftCosts
from mlx_gemma_mtp.speculative import DraftStats


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


def _policy(accept_rates, verify, draft_step, max_k=8, rounds=2000):
    """A policy whose stats saw `rounds` rounds at K=max_k with conditional acceptance `accept_rates[i]`."""
    stats = DraftStats()
    stats.drafted_per_position = [rounds] * max_k
    reached, accepted = [], []
    survive = float(rounds)
    for a in accept_rates:
        reached.append(round(survive))
        survive *= a
        accepted.append(round(survive))
    stats.reached_per_position, stats.accepted_per_position = reached, accepted
    return AutoDraftLength(DraftCosts([draft_step * k for k in range(max_k + 1)], [0.0] + verify), stats, max_k)


def test_high_acceptance_and_flat_verify_pick_long_drafts():
    # survival 0.9^i: with the old (cumulative-as-conditional) estimate the expected length collapsed to 0.9^(i^2/2)
    policy = _policy([0.9] * 8, verify=[1.0] * 9, draft_step=0.05)
    assert policy.acceptance()[:3] == pytest.approx([0.9] * 3, abs=0.01)
    assert policy.best() == 8


def test_costly_drafts_or_low_acceptance_pick_plain_decoding():
    assert _policy([0.05] * 8, verify=[1.0] * 9, draft_step=0.3).best() == 0
    assert _policy([0.9] * 8, verify=[1.0 * t for t in range(1, 10)], draft_step=0.5).best() == 0


def test_expected_rate_matches_the_formula():
    policy = _policy([0.8, 0.5] + [0.1] * 6, verify=[1.0, 1.2, 1.4] + [2.0] * 6, draft_step=0.1)
    a = policy.acceptance()
    expected_k2 = (1 + a[0] + a[0] * a[1]) / (1.4 + 2 * 0.1)
    assert policy.expected_rate(2, a) == pytest.approx(expected_k2)


def test_unexplored_positions_follow_the_last_explored_one():
    """Only K=1 rounds so far, all accepted: later positions are assumed as good, so the policy tries longer
    drafts instead of staying at K=1 forever."""
    stats = DraftStats()
    for _ in range(50):
        stats.record(1, 1)
    costs = DraftCosts([0.1 * k for k in range(9)], [0.0] + [1.0 + 0.05 * t for t in range(9)])
    policy = AutoDraftLength(costs, stats, 8)
    assert policy.acceptance()[1] == pytest.approx(policy.acceptance()[0])
    assert policy.best() > 1


def test_probes_come_soon_after_few_rejections_and_rarely_after_many():
    costs = DraftCosts([0.5 * k for k in range(9)], [0.0] + [1.0] * 9)  # drafting costs half a verify per token
    few = DraftStats()
    few.record(1, 0), few.record(1, 0)
    policy = AutoDraftLength(costs, few, 8)
    ks = [policy(100) for _ in range(8)]
    assert ks[:2] == [0, 0] and 1 in ks[2:4]  # a probe after at most 3 plain rounds
    many = DraftStats()
    for _ in range(100):
        many.record(1, 0)
    policy = AutoDraftLength(costs, many, 8)
    ks = [policy(100) for _ in range(40)]
    assert ks.count(1) == 2 and ks[15] == 1  # every 16th round
