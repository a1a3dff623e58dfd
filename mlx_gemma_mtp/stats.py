"""Counters of speculative decoding: rounds, drafts and acceptance per draft position (`DraftStats`, public)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DraftStats:
    """Counters of one generation; per-position lists are indexed by draft position (0 = first draft).

    `rounds` counts drafting rounds (K >= 1) only; plain steps (K = 0: "auto" when drafting does not pay, or a last
    step the budget leaves no room to draft in) count in `plain_rounds`."""

    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    drafted_per_position: list[int] = field(default_factory=list)
    accepted_per_position: list[int] = field(default_factory=list)
    # rounds that drafted position i and accepted every draft before it: the denominator of the acceptance of
    # position i *given* the earlier ones (accepted / drafted is the unconditional survival rate)
    reached_per_position: list[int] = field(default_factory=list)
    plain_rounds: int = 0

    def _grow(self, positions: int) -> None:
        missing = positions - len(self.drafted_per_position)
        self.drafted_per_position += [0] * max(0, missing)
        self.accepted_per_position += [0] * max(0, missing)
        self.reached_per_position += [0] * max(0, missing)

    def record(self, num_drafts: int, num_accepted: int) -> None:
        if num_drafts == 0:
            self.plain_rounds += 1
            return
        self._grow(num_drafts)
        self.rounds += 1
        self.drafted += num_drafts
        self.accepted += num_accepted
        for i in range(num_drafts):
            self.drafted_per_position[i] += 1
            self.accepted_per_position[i] += i < num_accepted
            self.reached_per_position[i] += i <= num_accepted

    def merge(self, other: DraftStats | None) -> DraftStats:
        """Add another generation's counters (e.g. over several prompts); returns self."""
        if other is not None:
            self._grow(len(other.drafted_per_position))
            counters = zip(other.drafted_per_position, other.accepted_per_position, other.reached_per_position)
            for i, (d, a, r) in enumerate(counters):
                self.drafted_per_position[i] += d
                self.accepted_per_position[i] += a
                self.reached_per_position[i] += r
            self.rounds += other.rounds
            self.plain_rounds += other.plain_rounds
            self.drafted += other.drafted
            self.accepted += other.accepted
        return self

    @property
    def acceptance_per_position(self) -> list[float]:
        return [a / d if d else 0.0 for a, d in zip(self.accepted_per_position, self.drafted_per_position)]

    @property
    def conditional_acceptance_per_position(self) -> list[float]:
        """P(draft i accepted | drafts before it accepted), the a_i of the expected-length formula."""
        return [a / r if r else 0.0 for a, r in zip(self.accepted_per_position, self.reached_per_position)]

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Accepted drafts per drafting round (the target's own token of each round not counted)."""
        return self.accepted / self.rounds if self.rounds else 0.0
