"""The draft length of a batch's rounds: fixed, or "auto": the K that gives the most tokens per second over the
whole batch, from the round times measured at each batch size and the drafts' acceptance so far.

Speculation pays less as the batch grows (a round's forward is no longer nearly free per extra row, and every
row's rejected drafts cost the whole batch), so "auto" may fall to plain steps (K = 0) at larger batch sizes.
Each K of `CANDIDATES` is timed once at a batch size before it is ranked (its fastest time counts: the first
round of a K also traces graphs), and every `REEXPLORE` rounds the next candidate is timed again, since acceptance
and context length drift.
"""

from __future__ import annotations

CANDIDATES = (0, 1, 2, 3, 4, 6, 8)
REEXPLORE = 64
PRIOR_ACCEPTANCE = 0.6  # until drafts were verified: optimistic enough to try drafting
SMOOTHING = 0.1  # weight of a round in the acceptance average


class BatchDraftLength:
    def __init__(self, k: int | str, max_k: int):
        self.fixed = None if k == "auto" else k
        self.candidates = tuple(c for c in CANDIDATES if c <= max_k)
        self.drafts = k != 0  # whether rounds may draft (the responses then carry draft statistics)
        self.acceptance = PRIOR_ACCEPTANCE  # probability that a draft is accepted given the previous ones were
        self.times: dict[tuple[int, int], float] = {}  # (K, batch size) -> fastest round seconds seen
        self.rounds = 0

    def choose(self, rows: int) -> int:
        if self.fixed is not None:
            return self.fixed
        self.rounds += 1
        untimed = [k for k in self.candidates if (k, rows) not in self.times]
        if untimed:
            return untimed[0]
        if self.rounds % REEXPLORE == 0:  # time one candidate again, in turn
            k = self.candidates[(self.rounds // REEXPLORE) % len(self.candidates)]
            self.times.pop((k, rows), None)
            return k
        return max(self.candidates, key=lambda k: self.rate(k, rows))

    def rate(self, k: int, rows: int) -> float:
        """Expected tokens per second of a round of K drafts for `rows` rows."""
        a = self.acceptance
        tokens = k + 1 if a >= 1 else (1 - a ** (k + 1)) / (1 - a)  # 1 + a + a^2 + ... + a^k per row
        return rows * tokens / self.times[k, rows]

    def timed(self, k: int, rows: int, seconds: float, emitted: dict[int, list[int]]) -> None:
        """A round of K drafts for `rows` rows took `seconds` and gave each row `emitted[row]`."""
        key = (k, rows)
        self.times[key] = min(seconds, self.times.get(key, seconds))
        if k and emitted:
            accepted = sum(len(t) - 1 for t in emitted.values())
            rejected = sum(len(t) - 1 < k for t in emitted.values())
            if accepted + rejected:
                self.acceptance += SMOOTHING * (accepted / (accepted + rejected) - self.acceptance)
