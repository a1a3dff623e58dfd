"""Expected MTP speedup from measured costs and an acceptance profile: what a run we cannot do would give.

A greedy round drafts K tokens (T_draft(K)), verifies them with one target forward of K + 1 tokens
(T_verify(K + 1), the acceptance rule included) and emits the accepted drafts plus the target's own next token.
Plain decoding emits one token per T_plain = T_verify(1). Hence (Leviathan et al. 2023, eq. 1, with measured
costs in place of their constant c):

    E[tokens per round](K) = 1 + s_1 + ... + s_K
    speedup(K)             = E[tokens per round](K) * T_verify(1) / (T_verify(K + 1) + T_draft(K))

The profile is s_i = P(draft position i is accepted), the fraction of rounds whose i-th draft is accepted — which
needs drafts 1..i-1 accepted too, so s_1 >= s_2 >= ... It is what `bench` prints as "acceptance per position"
(`DraftStats.acceptance_per_position`, accepted / drafted at position i), and how the published profile of a
healthy 31B pair, 0.92 / 0.78 / 0.67 / 0.57 at K = 4, is read here. A conditional profile c_i = P(i accepted |
1..i-1 accepted) converts with `from_conditional` (s_i = c_1 * ... * c_i). Greedy acceptance of position i does
not depend on K, so one profile serves every K. Past its last position the profile is extended geometrically with
its last conditional rate, s_{i+1} = s_i * s_n / s_{n-1} (0.57 * 0.85 = 0.485 at K = 5 for the 31B profile).
The model leaves out the loop's own overhead (bench prints it as T_round / (T_verify(K+1) + T_draft(K))).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

from ..round_cost import DraftCosts

PUBLISHED_31B = (0.92, 0.78, 0.67, 0.57)  # acceptance per draft position of a healthy 31B pair, K = 4


def parse_profile(text: str) -> tuple[float, ...]:
    """'0.92,0.78,0.67,0.57' -> a validated profile (the `--profile` option)."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--profile {text!r}: give comma-separated acceptance rates per draft position, e.g. "
                         "0.92,0.78,0.67,0.57") from None
    return check_profile(values)


def check_profile(profile: Sequence[float]) -> tuple[float, ...]:
    """The profile as a tuple; raises unless it is non-empty, in [0, 1] and non-increasing."""
    profile = tuple(float(p) for p in profile)
    if not profile or any(not 0.0 <= p <= 1.0 for p in profile):
        raise ValueError(f"acceptance profile {profile}: needs at least one rate, each in [0, 1]")
    if any(b > a for a, b in pairwise(profile)):
        raise ValueError(f"acceptance profile {profile}: rates per position cannot increase (position i is "
                         "accepted only if every earlier one is); for conditional rates use from_conditional()")
    return profile


def from_conditional(rates: Sequence[float]) -> tuple[float, ...]:
    """Conditional rates c_i = P(i accepted | all before accepted) -> the profile s_i = c_1 * ... * c_i."""
    out, survive = [], 1.0
    for c in rates:
        survive *= c
        out.append(survive)
    return check_profile(out)


def monotone(rates: Sequence[float]) -> tuple[float, ...]:
    """A measured profile made non-increasing (running minimum): a run's last rounds draft fewer positions, so
    accepted / drafted can rise a little at a later position."""
    out, low = [], 1.0
    for r in rates:
        low = min(low, r)
        out.append(low)
    return tuple(out)


def extend(profile: Sequence[float], k: int) -> tuple[float, ...]:
    """The profile's first k positions; past its end, geometric with its last conditional rate."""
    profile = check_profile(profile)
    out = list(profile[:k])
    last = profile[-1] / profile[-2] if len(profile) > 1 and profile[-2] > 0 else profile[-1]
    while len(out) < k:
        out.append(out[-1] * last)
    return tuple(out)


def expected_tokens(profile: Sequence[float], k: int) -> float:
    """E[tokens emitted per round] at draft length k: 1 + s_1 + ... + s_k."""
    return 1.0 + sum(extend(profile, k)) if k else 1.0


def expected_speedup(costs: DraftCosts, profile: Sequence[float], k: int) -> float:
    """Expected tokens/s of MTP at draft length k over plain decoding's, from measured costs (k = 0: 1.0)."""
    if not 0 <= k < len(costs.verify) - 1 or k >= len(costs.draft):
        raise ValueError(f"k={k}: the costs cover K = 0..{min(len(costs.verify) - 2, len(costs.draft) - 1)}")
    if k == 0:
        return 1.0
    return expected_tokens(profile, k) * costs.verify[1] / (costs.verify[k + 1] + costs.draft[k])


def speedup_table(costs: DraftCosts, profiles: dict[str, Sequence[float]],
                  measured: dict[int, float] | None = None) -> list[str]:
    """Lines of a table: per K, the modelled round time T_verify(K+1) + T_draft(K), the expected tokens per round
    and speedup under each profile, and a measured speedup where `measured` has one; then the best K per profile."""
    measured = measured or {}
    ks = range(1, min(len(costs.verify) - 1, len(costs.draft)))
    lines = [f"{'K':<3}{'T_round ms':>11}" + "".join(f"{name[:24]:>25}" for name in profiles)
             + ("   measured" if measured else ""),
             f"{'':<14}" + f"{'E[tokens]':>16}{'speedup':>9}" * len(profiles)]
    for k in ks:
        cells = "".join(f"{expected_tokens(p, k):>16.2f}{expected_speedup(costs, p, k):>8.2f}x"
                        for p in profiles.values())
        seen = f"{measured[k]:>10.2f}x" if k in measured else ""
        lines.append(f"{k:<3}{(costs.verify[k + 1] + costs.draft[k]) * 1e3:>11.1f}{cells}{seen}")
    best = [best_k(costs, p) for p in profiles.values()]
    lines.append(f"{'best K':<14}" + "".join(f"{'K=' + str(b):>16}{expected_speedup(costs, p, b):>8.2f}x"
                                              for b, p in zip(best, profiles.values())))
    return lines


def best_k(costs: DraftCosts, profile: Sequence[float]) -> int:
    """The draft length (0 = plain decoding) of the highest expected speedup within the measured costs."""
    ks = range(min(len(costs.verify) - 1, len(costs.draft)))
    return max(ks, key=lambda k: expected_speedup(costs, profile, k))
