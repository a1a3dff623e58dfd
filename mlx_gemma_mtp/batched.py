"""Many sequences decoding together, plain and MTP, each exactly as it would alone.

A `Batch` holds up to B rows. A sequence joins with its prompt already prefilled in a batch-1 cache (`prefill`,
as a lone generation does) and its first token chosen; its K/V move into its row of the batch's caches
(`batch_cache.BatchCache`: slots tagged with positions, so rows at different positions never skew each other's
RoPE). Each `step(k)` then runs one round for every row: k = 0 a plain step, k >= 1 the drafter proposes k tokens
per row (one batched drafter pass per draft, each row seeing only its own K/V up to its own hidden state) and one
batched target forward verifies them. Row b accepts its own n_b; its rejected drafts become holes in its slots
and its next position follows its own length. One host sync per round for the whole batch: the accepted counts
and tokens of every row at once.

Randomness is per row: each row carries its own RNG key, split at every draw, so a seeded row draws from its own
stream whatever else is in the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .batch_cache import BatchCache
from .cache import KVCache
from .drafting import _sampled_token
from .logprobs import TokenLogprobs, token_scores
from .logprobs import rows as token_rows
from .models.gemma4_assistant import Drafter
from .models.gemma4_text import Model
from .sampling import SamplerConfig, choose, greedy_accept
from .speculative import DRAFT_POSITION_OFFSET, accept


@dataclass
class RowSampling:
    """How a row picks tokens: its sampler and, when sampling, its own RNG key (split at every draw); and how
    many alternatives its log-probabilities report (None: none computed)."""

    sampler: SamplerConfig
    key: mx.array | None = None
    top_logprobs: int | None = None

    def next_key(self) -> mx.array | None:
        """A fresh key for one draw from this row's stream (None when greedy)."""
        if self.key is None:
            return None
        self.key, key = mx.random.split(self.key)
        return key


def row_sampling(sampler: SamplerConfig, row_seed: int, top_logprobs: int | None = None) -> RowSampling:
    """A row's sampling state: seeded by the sampler's seed when it has one, else by `row_seed`."""
    if sampler.greedy:
        return RowSampling(sampler, None, top_logprobs)
    return RowSampling(sampler, mx.random.key(sampler.seed if sampler.seed is not None else row_seed), top_logprobs)


# (batch, active rows, K, {row: its K}) -> (drafts (B, K), {row: q (its K, V)} for sampling rows): the drafter, or a
# test's oracle
BatchProposer = Callable[["Batch", list[int], int, dict[int, int]], tuple[mx.array, dict[int, mx.array]]]


class Batch:
    """The rows decoding together, their frontier (newest token, hidden state before it) and their caches.
    `propose` replaces the drafter as the source of drafts (tests, benchmarks)."""

    def __init__(self, target: Model, drafter: Drafter | None, rows: int, propose: BatchProposer | None = None):
        self.target, self.drafter = target, drafter
        self.propose = propose
        self.cache = BatchCache(target, rows)
        self.last = mx.zeros((rows,), mx.int32)  # each row's newest token (emitted, not yet in the cache)
        self.hidden = mx.zeros((rows, 1, target.args.hidden_size), target.model.embed_tokens.weight.dtype)
        self.sampling: list[RowSampling | None] = [None] * rows
        self.logprobs: dict[int, list[TokenLogprobs]] = {}  # the last step's, for rows that asked for them
        mx.eval(self.last, self.hidden)  # a server's scheduler thread uses them: no lazy op of this thread's stream

    @property
    def active(self) -> list[int]:
        return [int(b) for b in np.nonzero(self.cache.active)[0]]

    def free_row(self) -> int | None:
        idle = np.nonzero(~self.cache.active)[0]
        return int(idle[0]) if idle.size else None

    def join(self, row: int, cache: list[KVCache], token: mx.array, hidden: mx.array | None,
             sampling: RowSampling) -> None:
        """A prefilled sequence takes `row`: its batch-1 `cache` (the whole prompt), its first token (1,) chosen
        from the prompt, and the hidden state that token was chosen from (1, 1, H); None without a drafter."""
        self.cache.insert(row, cache, cache[0].offset)
        self.last[row] = token[0]
        if hidden is not None:
            self.hidden[row] = hidden[0].astype(self.hidden.dtype)
        self.sampling[row] = sampling

    def leave(self, row: int) -> None:
        self.cache.remove(row)
        self.sampling[row] = None

    def step(self, k: int, limits: dict[int, int] | None = None) -> dict[int, list[int]]:
        """One round for every active row: k = 0 a plain step, else k drafts verified; row b drafts at most
        `limits[b]` of them (what it still needs: its random draws then follow its own budget, not the batch's).
        Returns each row's new tokens (1 for a plain step, n_b + 1 for a drafting round), read with one host
        sync."""
        rows = self.active
        if not rows:
            return {}
        if k == 0:
            tokens, n, logits = self._plain_step(rows)
        else:
            ks = {b: max(0, min(k, (limits or {}).get(b, k))) for b in rows}
            tokens, n, logits = self._drafting_round(rows, k, ks)
        scores = {b: token_scores(logits[b], tokens[b], self.sampling[b].top_logprobs) for b in rows
                  if self.sampling[b].top_logprobs is not None}  # every verify row's: those past n are dropped
        mx.eval(tokens, n, self.last, self.hidden, [s.arrays() for s in scores.values()])  # the round's one sync
        tokens, n = np.array(tokens), np.array(n)
        self.cache.accept(k + 1, n + 1)
        self.logprobs = {b: token_rows(s, int(n[b]) + 1) for b, s in scores.items()}
        return {b: tokens[b, : n[b] + 1].tolist() for b in rows}

    def _plain_step(self, rows: list[int]) -> tuple[mx.array, mx.array]:
        _, masks = self.cache.append(1)
        out = self.target.forward(self.last[:, None], self.cache.caches, rows=1, return_hidden=True,
                                  masks_by_type=masks)
        token = self._choose(out.logits[:, 0], rows)  # (B,)
        self.last, self.hidden = token, out.hidden
        return token[:, None], mx.zeros((self.cache.rows,), mx.int32), out.logits

    def _choose(self, logits: mx.array, rows: list[int]) -> mx.array:
        """Each row's token from its logits (B, V): greedy rows at once, sampling rows with their own RNG."""
        token = mx.argmax(logits, axis=-1).astype(mx.int32)
        for b in rows:
            s = self.sampling[b]
            if not s.sampler.greedy:
                token[b] = choose(logits[b], s.sampler, s.next_key())
        return token

    def _drafting_round(self, rows: list[int], k: int, ks: dict[int, int]) -> tuple[mx.array, mx.array]:
        drafts, q = (self.propose or Batch._drafts)(self, rows, k, ks)  # (B, k), {row: (ks[row], V)} if sampling
        _, masks = self.cache.append(k + 1)
        inputs = mx.concatenate([self.last[:, None], drafts], axis=1)  # (B, k + 1)
        out = self.target.forward(inputs, self.cache.caches, rows=k + 1, return_hidden=True, masks_by_type=masks)
        n, tokens = greedy_accept(out.logits, drafts)  # (B,), (B, k + 1); sampling rows are redone below
        n = mx.minimum(n, mx.array([ks.get(b, 0) for b in range(self.cache.rows)], mx.int32))
        for b in rows:
            s, kb = self.sampling[b], ks[b]
            if not s.sampler.greedy:
                n[b], tokens[b, : kb + 1] = accept(out.logits[b, : kb + 1], drafts[b, :kb], q[b][:kb], s.sampler,
                                                   s.next_key())
        self.last = mx.take_along_axis(tokens, n[:, None], axis=1)[:, 0]
        self.hidden = mx.take_along_axis(out.hidden, n[:, None, None], axis=1)
        return tokens, n, out.logits

    def _drafts(self, rows: list[int], k: int, ks: dict[int, int]) -> tuple[mx.array, dict[int, mx.array]]:
        """k draft tokens per row (B, k), each row's drafter seeing its own K/V up to its hidden state's position
        and querying at the position the lone loop uses; sampling rows sample their first `ks[row]` (their q
        rows returned), past that the greedy token fills in unused."""
        if self.drafter is None:
            raise ValueError("drafting needs a drafter: load(model, draft=...)")
        target, cache = self.target, self.cache
        masks = cache.visible(target.args.sliding_window)
        kv = {}
        for layer_type, producer in target.producers.items():
            end, c = cache.types[layer_type].end, cache.caches[producer]
            kv[layer_type] = (c.keys[..., :end, :], c.values[..., :end, :])
        position = mx.array((cache.lengths - 1 + DRAFT_POSITION_OFFSET).astype(np.int32))
        token, hidden, tokens, q = self.last, self.hidden, [], {b: [] for b in rows}
        for i in range(k):
            hidden, y = self.drafter(target.model.embed(token[:, None]), hidden, kv, position, masks)
            token = self.drafter.top_token(y)[:, 0].astype(mx.int32)  # (B,)
            for b in rows:
                s = self.sampling[b]
                if not s.sampler.greedy and i < ks[b]:
                    token_b, q_b = _sampled_token(self.drafter, y[b : b + 1], s.sampler, key=s.next_key())
                    token[b] = token_b[0]
                    q[b].append(q_b)
            tokens.append(token)
        V = self.drafter.args.text.vocab_size
        return mx.stack(tokens, axis=1), {b: mx.stack(v) if v else mx.zeros((0, V)) for b, v in q.items()}
