"""The draft length of a batch's rounds: fixed, or "auto": the K that gives the most tokens per second over the
whole batch, from the round times measured at each batch size and each row's acceptance so far.

Speculation pays less as the batch grows (a round's forward is no longer nearly free per extra row, and every
row's rejected drafts cost the whole batch), so "auto" may fall to plain steps (K = 0) at larger batch sizes.

Why it is built this way (the first design timed every K once at every batch size before ranking them: up to seven
exploratory rounds per batch size, K = 8 included, which cost a 4-stream batch on a CPU 40% of plain decoding's
speed over 96 tokens):
- Costs and acceptance are learned apart. A round's seconds depend on K and the batch size B only; how many
  tokens it gives depends on each row's acceptance, learned per draft position (acceptance falls with depth) and
  per row (a code prompt and a prose prompt in one batch), a row's own counts blended with the batch's.
- A K not timed at this batch size is priced by a line through the K that were (least squares, t = c + d K); with
  one point, its slope relative to its intercept is the nearest batch size's (or `PRIOR_SLOPE` before any); with
  none, the nearest batch size's line as it is. Between two timed K the hope is pulled halfway down to the
  shorter one's time (a Metal qmv_wide cliff puts the K before it far below the line). A K is tried only when
  its hope beats the best rate, so a batch where plain steps win stops exploring after a K or two, and one where
  drafts pay climbs K by K. A plain round is timed at every batch size right after its first drafting round: it
  is the cheapest round to time and anchors the line (a prior slope can be 5x off: a compute-bound machine).
- Times drop at once to a faster reading (a first round also builds graphs) and drift up slowly with slower ones
  (the machine got busy), so the K in use re-prices itself; every `PROBE_EVERY` rounds at a batch size the
  runner-up is timed again when it is close.
"""

from __future__ import annotations

import numpy as np

CANDIDATES = (0, 1, 2, 3, 4, 6, 8)
PRIOR_ACCEPTANCE = 0.6  # a first draft's acceptance before any was verified: optimistic enough to try drafting
PRIOR_COUNT = 4.0  # ... worth this many verified drafts; a later position's prior is the position before it
ROW_WEIGHT = 8.0  # a row's own acceptance counts as much as the batch's once it has this many drafts at a position
MAX_COUNT = 512.0  # the batch's counts are scaled down to this many at a position (acceptance drifts)
PRIOR_SLOPE = 0.15  # a draft token's share of a plain round, before any drafting round was timed
HOPE_BETWEEN = 0.5  # a K between two timed ones is hoped to cost this far from the shorter one's time to the line
DRIFT = 0.1  # weight of a slower reading in a time estimate (a faster one replaces it)
CLIP = 1.5  # ... counted as at most this many times the estimate (a lone stall)
PROBE_EVERY = 32  # rounds at a batch size between re-timings of the runner-up ...
PROBE_WITHIN = 0.9  # ... when its rate is within this of the best's


class BatchDraftLength:
    def __init__(self, k: int | str, max_k: int):
        self.fixed = None if k == "auto" else k
        self.candidates = tuple(c for c in CANDIDATES if c <= max_k)
        self.drafts = k != 0  # whether rounds may draft (the responses then carry draft statistics)
        self.times: dict[tuple[int, int], float] = {}  # (K, batch size) -> fastest round seconds seen (reports)
        self.estimates: dict[tuple[int, int], float] = {}  # (K, batch size) -> round seconds expected now
        self.rounds: dict[int, int] = {}  # batch size -> rounds run at it
        positions = max(self.candidates)
        self.reached = np.zeros(positions)  # the batch's drafts at each position ...
        self.accepted = np.zeros(positions)  # ... and how many were accepted
        self.row_counts: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # row -> its own (reached, accepted)

    # --- choosing ---------------------------------------------------------------------------------------------

    def choose(self, rows: int, limits: dict[int, int] | None = None) -> int:
        """K for the next round of `rows` rows; `limits[row]`: the drafts that row can still use."""
        if self.fixed is not None:
            return self.fixed
        self.rounds[rows] = self.rounds.get(rows, 0) + 1
        limits = limits or {b: max(self.candidates) for b in range(rows)}
        pooled, line = self.acceptance(), self._line(rows)  # once per round: every K reads them
        rates = {k: self._tokens(k, limits, pooled) / self._seconds(k, rows, line) for k in self.candidates}
        best = max(rates, key=rates.get)
        if best and (0, rows) not in self.estimates and any(b == rows for _, b in self.estimates):
            return 0  # a plain round is the cheapest to time, and the line's anchor (a prior slope can be far off)
        if (best, rows) in self.estimates and self.rounds[rows] % PROBE_EVERY == 0:
            measured = [k for k in rates if k != best and (k, rows) in self.estimates]
            if measured:
                runner_up = max(measured, key=rates.get)
                if rates[runner_up] >= PROBE_WITHIN * rates[best]:
                    return runner_up
        return best

    def tokens(self, k: int, limits: dict[int, int]) -> float:
        """Expected tokens a round of K drafts gives the rows (row b drafts min(K, limits[b]))."""
        return self._tokens(k, limits, self.acceptance())

    def _tokens(self, k: int, limits: dict[int, int], pooled: np.ndarray) -> float:
        total = 0.0
        for b, limit in limits.items():
            a = self._row_acceptance(b, pooled)[: max(0, min(k, limit))]
            total += 1.0 + float(np.cumprod(a).sum())
        return total

    def acceptance(self) -> np.ndarray:
        """The batch's acceptance per draft position (each given that the drafts before it were accepted)."""
        out, prior = np.zeros(len(self.reached)), PRIOR_ACCEPTANCE
        for i in range(len(out)):
            out[i] = prior = (self.accepted[i] + PRIOR_COUNT * prior) / (self.reached[i] + PRIOR_COUNT)
        return out

    def _row_acceptance(self, row: int, pooled: np.ndarray) -> np.ndarray:
        if row not in self.row_counts:
            return pooled
        reached, accepted = self.row_counts[row]
        return (accepted + ROW_WEIGHT * pooled) / (reached + ROW_WEIGHT)

    def seconds(self, k: int, rows: int) -> float:
        """A round's expected seconds: measured at this batch size, else hoped from a line through the K that
        were (see the module's docstring)."""
        return self._seconds(k, rows, self._line(rows))

    def _seconds(self, k: int, rows: int, line: tuple[float, float] | None) -> float:
        if (k, rows) in self.estimates:
            return self.estimates[k, rows]
        if line is None:  # nothing timed yet: only the ranking matters (the prior acceptance then picks K = 2)
            return 1.0 + PRIOR_SLOPE * k
        c, d = line
        hope = max(c + d * k, 1e-6)
        below = [t for (j, b), t in self.estimates.items() if b == rows and j < k]
        if below and any(j > k for j, b in self.estimates if b == rows):  # between two timed K: a round costs no
            floor = max(below)  # less than a shorter one's, and a curve with a cliff is far below the line
            hope = floor + HOPE_BETWEEN * max(hope - floor, 0.0)
        return hope

    def _line(self, rows: int) -> tuple[float, float] | None:
        """(c, d) of t = c + d K at this batch size, from its timed K and a slope borrowed where it has one."""
        fit = self._fit(rows)
        if fit is not None:
            return fit
        others = sorted({b for _, b in self.estimates if b != rows}, key=lambda b: (abs(b - rows), b))
        points = [(k, t) for (k, b), t in self.estimates.items() if b == rows]
        if not points:
            return self._line(others[0]) if others else None
        slope = PRIOR_SLOPE
        for b in others:  # the nearest batch size whose line rests on two K or more
            if (fit := self._fit(b)) is not None:
                slope = fit[1] / fit[0]
                break
        (k0, t0), = points
        c = t0 / (1.0 + slope * k0)
        return c, slope * c

    def _fit(self, rows: int) -> tuple[float, float] | None:
        """Least squares through the K timed at this batch size (None with fewer than two)."""
        points = [(k, t) for (k, b), t in self.estimates.items() if b == rows]
        if len(points) < 2:
            return None
        ks, ts = np.array(points, dtype=float).T
        d = max(float(np.polyfit(ks, ts, 1)[0]), 0.0)
        return max(float(np.mean(ts - d * ks)), 1e-9), d

    # --- learning ---------------------------------------------------------------------------------------------

    def timed(self, k: int, rows: int, seconds: float, emitted: dict[int, list[int]],
              limits: dict[int, int] | None = None) -> None:
        """A round of K drafts for `rows` rows took `seconds` and gave each row `emitted[row]` (row b drafted
        min(K, limits[b]))."""
        key = (k, rows)
        self.times[key] = min(seconds, self.times.get(key, seconds))
        old = self.estimates.get(key)
        if old is None or seconds <= old:
            self.estimates[key] = seconds
        else:
            self.estimates[key] = old + DRIFT * (min(seconds, CLIP * old) - old)
        if k:
            for b, tokens in emitted.items():
                drafted = min(k, (limits or {}).get(b, k))
                self._count(b, drafted, len(tokens) - 1)

    def _count(self, row: int, drafted: int, accepted: int) -> None:
        """Row `row` drafted `drafted` tokens and `accepted` of them: positions 1..accepted were accepted, the
        next one (if drafted) rejected."""
        reached = np.zeros(len(self.reached))
        reached[: min(accepted + 1, drafted)] = 1
        hits = np.zeros(len(self.reached))
        hits[:accepted] = 1
        own = self.row_counts.setdefault(row, (np.zeros(len(self.reached)), np.zeros(len(self.reached))))
        own[0][:] += reached
        own[1][:] += hits
        self.reached += reached
        self.accepted += hits
        if self.reached[0] > MAX_COUNT:
            scale = MAX_COUNT / self.reached[0]
            self.reached *= scale
            self.accepted *= scale

    def forget(self, row: int) -> None:
        """The row's sequence left: the next one in it starts from the batch's acceptance."""
        self.row_counts.pop(row, None)
