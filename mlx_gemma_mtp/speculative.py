"""MTP speculative decoding: draft K tokens with the Gemma 4 assistant, verify them in one target forward.

References: spec §5 (HF `SinglePositionMultiTokenCandidateGenerator`, `_assisted_decoding`); Leviathan et al.
2023, "Fast Inference from Transformers via Speculative Decoding" (Alg. 1) for T > 0; gpt-fast's speculative step
for the shape of the loop. Each round queues its drafts lazily before the previous round's tokens are handed out
(the drafter computes while the caller reads them), then the verify pass, and reads the accepted count once: one
host sync per round.

Round state (spec §5.1) is a `Frontier`: the newest token (not yet in the cache) and the target's post-norm hidden
state of the position before it; the drafter sees the producer K/V of positions <= that position
(`drafting.cache_windows`). A queued round is a `Frontier` (a plain step, K = 0) or `Drafts` (K >= 1).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from dataclasses import dataclass

import mlx.core as mx

from .cache import trim_cache
from .constraint import Constraint
from .distributed.lockstep import agreed, agreed_round
from .draft_length import DraftLength
from .drafting import DraftStep, KVWindow, cache_windows, draft
from .logprobs import TokenLogprobs, rows
from .models.gemma4_text import Model
from .plain import Chooser, Frontier, plain_step
from .sampling import (
    SamplerConfig,
    candidate_log_probs,
    choose,
    greedy_accept,
    match_accept,
    speculative_accept,
)
from .stats import DraftStats

# Default drafter query position = position of the hidden state + DRAFT_POSITION_OFFSET. HF's convention (1: the
# position of the token being fed, i.e. one past the last K/V entry) is the one the released assistants ship with
# in transformers' reference implementation, and the parity oracle uses it; mlx-vlm and vLLM use 0. Only the
# acceptance rate depends on it (RoPE sees a uniform one-step shift); `drafter_proposer` takes either.
DRAFT_POSITION_OFFSET = 1


@dataclass
class Drafts:
    """A drafting round's drafts, queued (maybe still computing)."""

    tokens: mx.array  # (K,)
    q: mx.array | None  # (K, V) draft log-probabilities when sampling, None when greedy
    alternatives: mx.array | None = None  # (K, M) the drafter's next choices per draft (under a grammar, greedy)


def accept(logits: mx.array, drafts: mx.array, q: mx.array | None, sampler: SamplerConfig,
           key: mx.array | None = None):
    """(n accepted, tokens (K+1,)) from the verify rows' logits (K+1, V): drafts[:n] then the target's token;
    greedy or exact speculative sampling (randomness from `key`; None: MLX's global RNG)."""
    if sampler.greedy:
        return greedy_accept(logits, drafts)
    if drafts.size == 0:
        return mx.array(0), choose(logits, sampler, key)
    ids, target = candidate_log_probs(logits, sampler)  # (K+1, top_k) with top-k on: no vocabulary-wide work
    if sampler.speculative_rule == "match":
        return match_accept(target, drafts, key, target_ids=ids)
    return speculative_accept(target, q, drafts, key, target_ids=ids)


# (last token, hidden, {layer type: KVWindow}, position of the last token, K) -> (drafts (K,), q (K, V) or None),
# or a third value: the drafter's next choices per draft (K, M) ids, best first (see `Drafts`)
Proposer = Callable[[mx.array, mx.array, dict[str, KVWindow], int, int], tuple]


def drafter_proposer(step: DraftStep, sampler: SamplerConfig, position_offset: int = DRAFT_POSITION_OFFSET,
                     constraint: Constraint | None = None) -> Proposer:
    """The real drafter through its compiled `step` (the pair's: `bundle.state.draft_step`), querying at (position
    of the hidden state) + `position_offset` (1: HF, 0: mlx-vlm). Under a grammar (`constraint`) the first draft
    is chosen among the tokens it allows next (known when the round is queued; the later ones are not)."""

    def propose(last, hidden, windows, last_position, k):
        position = last_position - 1 + position_offset
        mask = None if constraint is None else constraint.next_mask()
        return draft(step, last, hidden, windows, position, k, sampler, mask)

    return propose


class Stopwatch:
    """The decoding loop's own time: it runs from each resume of the generator to its next yield, so the caller's
    work on a yielded token (detokenizing, printing, a UI) is never charged to a round."""

    def __init__(self, clock: Callable[[], float]):
        self.clock, self.total, self.since = clock, 0.0, clock()

    def pause(self) -> None:
        self.total += self.clock() - self.since

    def resume(self) -> None:
        self.since = self.clock()

    def lap(self) -> float:
        """Running time since the previous lap (or the start)."""
        now = self.clock()
        lap, self.total, self.since = self.total + now - self.since, 0.0, now
        return lap


def _queue_round(target: Model, propose: Proposer, cache: list, at: Frontier, k: int, chooser: Chooser
                 ) -> Frontier | Drafts:
    """Start a round lazily: a plain step for `at.token` (k = 0) or the k drafts after it."""
    if k == 0:
        return plain_step(target, cache, at.token, chooser)
    # `at.token` sits at the cache's offset; the cache holds exactly the accepted tokens before it
    tokens, q, *alternatives = propose(at.token, at.hidden, cache_windows(target, cache), cache[0].offset, k)
    tokens = agreed(chooser.lockstep, tokens)
    alternatives = alternatives[0] if alternatives and alternatives[0] is not None else None
    if alternatives is not None:
        alternatives = agreed(chooser.lockstep, alternatives)
    mx.async_eval(tokens, *([] if alternatives is None else [alternatives]))  # the drafter computes meanwhile
    return Drafts(tokens, q, alternatives)


def _verify(target: Model, cache: list, last: mx.array, drafts: Drafts, chooser: Chooser
            ) -> tuple[int, list[tuple[int, bool, TokenLogprobs | None]], Frontier]:
    """One target forward over `last` and the drafts, the acceptance rule, the rollback of rejected drafts: (n
    accepted, the round's n + 1 emitted (token, from_draft, logprobs), the new frontier). Under a grammar, only
    the drafts it allows are verified, against the masked target distribution (`constraint.py`)."""
    tokens, q, masks = drafts.tokens, drafts.q, None
    if chooser.constraint is not None:  # the drafts are read here: a second host sync, once per round
        tokens, q, masks = chooser.constraint.kept_drafts(drafts.tokens, q, drafts.alternatives, chooser.lockstep)
    k = tokens.size
    out = target.forward(mx.concatenate([last, tokens])[None], cache, rows=k + 1, return_hidden=True)
    logits = out.logits[0] if masks is None else mx.where(masks, out.logits[0], float("-inf"))
    n, emitted = agreed_round(chooser.lockstep, *accept(logits, tokens, q, chooser.sampler))
    scores = chooser.scores(out.logits[0], emitted)  # every row's: rows past n are dropped below
    mx.eval(n, emitted, *(scores.arrays() if scores else []))  # the round's one host sync
    n, emitted = n.item(), emitted.tolist()[: n.item() + 1]
    trim_cache(cache, k - n)
    if chooser.constraint is not None:
        chooser.constraint.consume(emitted)
    items = [(t, i < n, lp) for i, (t, lp) in enumerate(zip(emitted, rows(scores, n + 1)))]
    return n, items, Frontier(mx.array(emitted[n:]), out.hidden[:, n : n + 1])


def mtp_generate_step(
    target: Model, cache: list, first: Frontier, propose: Proposer, draft_length: DraftLength, chooser: Chooser,
    stats: DraftStats, max_tokens: int, clock: Callable[[], float] = time.perf_counter,
) -> Generator[tuple[int, bool, TokenLogprobs | None], None, None]:
    """Yield (token, from_draft, logprobs) for `max_tokens` (>= 1) tokens at most, `first.token` first (read once
    the first round is queued).

    Every round's first work is queued before the previous round's tokens are handed out (mlx-lm's pipelining): a
    plain step, or the drafts, which the drafter computes while the caller reads those tokens. A drafting round
    then verifies its drafts in one target forward and reads the accepted count: one host sync per round.

    Args:
        cache: the target's cache holding the prompt (all but `first.token`).
        first: the token sampled after the prompt and the hidden state of the last prompt token (1, 1, H).
        propose: the draft source, normally `drafter_proposer(...)` (benchmarks and tests substitute oracles).
        draft_length: the policy (`draft_length.DraftLength`): asked for K (0: a plain step) before each round,
            told each round's accepted count as soon as it is known and its seconds once its tokens are read: the
            loop's own time from the previous round's tokens being read to its own (the caller's time between
            yielded tokens is not counted; `clock` is its time source).
        chooser: the sampler (drafts are accepted by its rule), the lock-step of a sharded target, the logprobs.
    """
    watch, at, remaining = Stopwatch(clock), first, max_tokens - 1
    head = chooser.read(first) if chooser.constraint is not None else None  # a grammar's next mask needs it
    if remaining > 0:  # the first round starts before the first token is handed out
        k = _next_k(draft_length, remaining, cache)
        queued = _queue_round(target, propose, cache, at, k, chooser)
    watch.pause()
    yield head or first.emitted()
    watch.resume()
    while remaining > 0:
        if isinstance(queued, Drafts):
            n, emitted, at = _verify(target, cache, at.token, queued, chooser)
            draft_length.timed(k, watch.lap())
        else:  # a plain step: its token is read once the next round is queued (under a grammar, before)
            n, emitted, at = 0, None, queued
            if chooser.constraint is not None:
                emitted = [chooser.read(at)]
                draft_length.timed(0, watch.lap())
        stats.record(k, n)
        draft_length.accepted(k, n)
        remaining -= n + 1
        if remaining > 0:  # the next round starts before these tokens are handed out
            k = _next_k(draft_length, remaining, cache)
            queued = _queue_round(target, propose, cache, at, k, chooser)
        if emitted is None:
            emitted = [at.emitted()]
            draft_length.timed(0, watch.lap())
        for item in emitted:
            watch.pause()
            yield item
            watch.resume()


def _next_k(draft_length: DraftLength, remaining: int, cache: list) -> int:
    return max(0, min(draft_length.choose(remaining, cache[0].offset), remaining - 1))  # never past the budget
