"""Forced acceptance for the batching benchmark (`bench.batching --forced-acceptance A`): random weights accept
no drafts, so the drafter's work is kept real but its tokens made an oracle's. The drafter runs as usual (its
cost is measured), then each draft at position p of stream j is replaced by stream j's reference token (its
`serial plain` output) at p when a deterministic coin of (j, p) says so (with probability A), and left as the
drafter's token otherwise (which a random target then rejects). The coins are the same for the batched rounds
and the serial MTP runs, so both see the same acceptance.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import mlx.core as mx
import numpy as np

from ..batched import Batch
from ..batching import BatchGenerator
from ..load import Bundle
from ..sampling import SamplerConfig
from ..speculative import drafter_proposer

if TYPE_CHECKING:
    from .batching import Run


class Oracle:
    """Each stream's reference (prompt + its serial plain output, set by each serial plain run) and its coins:
    draft position p of stream j is the reference token when coins[j][p] (probability `rate`), the drafter's own
    token otherwise."""

    def __init__(self, prompts: list[list[int]], rate: float, max_tokens: int, seed: int = 0):
        self.prompts, self.rate = prompts, rate
        self.references = [list(p) for p in prompts]
        self.coins = [np.random.default_rng([seed, j]).random(len(p) + max_tokens + 16) < rate
                      for j, p in enumerate(prompts)]

    def record(self, run: Run) -> Run:
        """Take each stream's serial plain output of `run` as its reference."""
        for j, out in enumerate(run.outputs):
            self.references[j] = self.prompts[j] + out
        return run

    def drafts(self, j: int, position: int, k: int) -> tuple[list[int], list[bool]]:
        """Stream j's forced tokens and whether to force each, for the k drafts after the token at `position`."""
        ref, coins = self.references[j], self.coins[j]
        ps = range(position + 1, position + 1 + k)
        return [ref[p] if p < len(ref) else 0 for p in ps], [p < len(ref) and bool(coins[p]) for p in ps]

    def solo(self, bundle: Bundle, j: int):
        """A batch-1 proposer for stream j: the real drafter, then the forced tokens."""
        real = drafter_proposer(bundle.state.draft_step, SamplerConfig())

        def propose(last, hidden, kv, position, k):
            tokens, _ = real(last, hidden, kv, position, k)
            ref, use = self.drafts(j, position, k)
            return mx.where(mx.array(use), mx.array(ref, dtype=mx.int32), tokens), None

        return propose

    def batch(self, streams: int) -> BatchForced:
        return BatchForced(self, {tuple(p): j for j, p in enumerate(self.prompts[:streams])})


class BatchForced:
    """A `BatchProposer`: the real batched drafter (`Batch._drafts`), then each row's forced tokens (a row's stream
    is found by its request's prompt, since rows are handed out as requests join)."""

    def __init__(self, oracle: Oracle, stream_of: dict[tuple, int]):
        self.oracle, self.stream_of = oracle, stream_of
        self.generator: BatchGenerator | None = None  # set once made (`bench.batching.batched`)

    def __call__(self, batch: Batch, rows: list[int], k: int, *budgets):
        drafts, q = Batch._drafts(batch, rows, k, *budgets)  # budgets: each row's K (what it still needs)
        ref = np.zeros((batch.cache.rows, k), np.int32)
        use = np.zeros((batch.cache.rows, k), bool)
        for b in rows:
            j = self.stream_of[tuple(self.generator.running[b].prompt.ids)]
            position = int(batch.cache.lengths[b])  # the row's newest token (`last`) sits at this position
            ref[b], use[b] = self.oracle.drafts(j, position, k)
        return mx.where(mx.array(use), mx.array(ref), drafts), q
