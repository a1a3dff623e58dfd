"""The cost model's formula on hand-computed cases (costmodel.py)."""

import pytest

from mlx_gemma_mtp.bench import cost_model as costmodel
from mlx_gemma_mtp.round_cost import DraftCosts

# T_verify(T) = 10 ms + 1 ms per extra token, T_draft(K) = 2 ms per draft
COSTS = DraftCosts(draft=[0.0] + [0.002 * k for k in range(1, 9)], verify=[0.0] + [0.010 + 0.001 * (t - 1)
                                                                                  for t in range(1, 10)])


def test_expected_tokens_is_one_plus_the_sum_of_the_profile():
    profile = costmodel.PUBLISHED_31B
    assert costmodel.expected_tokens(profile, 0) == 1.0
    assert costmodel.expected_tokens(profile, 1) == pytest.approx(1.92)
    assert costmodel.expected_tokens(profile, 4) == pytest.approx(1 + 0.92 + 0.78 + 0.67 + 0.57)  # 3.94
    assert costmodel.expected_tokens([1.0], 6) == 7.0  # every draft accepted
    assert costmodel.expected_tokens([0.0], 6) == 1.0  # none: the target's own token only


def test_the_profile_extends_with_its_last_conditional_rate():
    ratio = 0.57 / 0.67
    ext = costmodel.extend(costmodel.PUBLISHED_31B, 6)
    assert ext[:4] == costmodel.PUBLISHED_31B
    assert ext[4] == pytest.approx(0.57 * ratio) and ext[5] == pytest.approx(0.57 * ratio**2)
    assert costmodel.extend([0.8], 3) == pytest.approx((0.8, 0.64, 0.512))  # one rate: geometric in it
    assert costmodel.extend([0.5, 0.0], 4) == (0.5, 0.0, 0.0, 0.0)
    assert costmodel.extend([0.9, 0.8, 0.7], 2) == (0.9, 0.8)


def test_expected_speedup_by_hand():
    # K=1: (1 + 0.92) * 10 / (11 + 2) = 1.4769...; K=4: 3.94 * 10 / (14 + 8) = 1.7909...
    assert costmodel.expected_speedup(COSTS, costmodel.PUBLISHED_31B, 1) == pytest.approx(19.2 / 13)
    assert costmodel.expected_speedup(COSTS, costmodel.PUBLISHED_31B, 4) == pytest.approx(39.4 / 22)
    assert costmodel.expected_speedup(COSTS, [0.0], 3) == pytest.approx(10 / (13 + 6))  # drafting for nothing
    assert costmodel.expected_speedup(COSTS, [0.5], 0) == 1.0
    free = DraftCosts([0.0] * 9, [0.0] + [0.01] * 9)  # verify as cheap as a step, free drafts: speedup = E[tokens]
    assert costmodel.expected_speedup(free, [0.8], 2) == pytest.approx(1 + 0.8 + 0.64)
    with pytest.raises(ValueError, match="K = 0..8"):
        costmodel.expected_speedup(COSTS, [0.5], 9)


def test_best_k_and_the_table():
    # 31B profile on COSTS: K=1 1.477, K=2 2.70*10/(12+4)=1.6875, K=3 3.37*10/19=1.7737, K=4 1.7909, K=5 <
    speedups = [costmodel.expected_speedup(COSTS, costmodel.PUBLISHED_31B, k) for k in range(9)]
    assert costmodel.best_k(COSTS, costmodel.PUBLISHED_31B) == speedups.index(max(speedups))
    assert costmodel.best_k(COSTS, [0.0]) == 0  # nothing accepted: plain decoding
    lines = costmodel.speedup_table(COSTS, {"published 31B": costmodel.PUBLISHED_31B, "none": [0.0]}, {4: 1.5})
    k4 = next(line for line in lines if line.startswith("4 "))
    assert k4.split() == ["4", "22.0", "3.94", "1.79x", "1.00", "0.45x", "1.50x"]
    assert lines[-1].split()[:5] == ["best", "K", f"K={costmodel.best_k(COSTS, costmodel.PUBLISHED_31B)}",
                                     f"{max(speedups):.2f}x", "K=0"]


def test_profiles_are_checked_and_converted():
    assert costmodel.parse_profile("0.92,0.78,0.67,0.57") == costmodel.PUBLISHED_31B
    assert costmodel.from_conditional([0.9, 0.5, 1.0]) == pytest.approx((0.9, 0.45, 0.45))
    assert costmodel.monotone([0.8, 0.6, 0.62, 0.1]) == (0.8, 0.6, 0.6, 0.1)
    for bad in ("0.5,0.7", "1.2", "", "a,b"):
        with pytest.raises(ValueError):
            costmodel.parse_profile(bad)
