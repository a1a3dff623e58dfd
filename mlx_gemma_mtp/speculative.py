"""MTP speculative decoding: draft K tokens with the Gemma 4 assistant, verify them in one target forward.

References: spec §5 (HF `SinglePositionMultiTokenCandidateGenerator`, `_assisted_decoding`); Leviathan et al.
2023, "Fast Inference from Transformers via Speculative Decoding" (Alg. 1) for T > 0; gpt-fast's speculative step
for the shape of the loop. Each round queues its drafts lazily before the previous round's tokens are handed out
(the drafter computes while the caller reads them), then the verify pass, and reads the accepted count once: one
host sync per round.

Round state (spec §5.1): `last` is the newest token (not yet in the cache), `hidden` the target's post-norm hidden
state of the position before it; the drafter sees the producer K/V of positions <= that position
(`drafting.cache_windows`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field

import mlx.core as mx

from .cache import trim_cache
from .distributed import agree, agree_pair
from .drafting import KVWindow, cache_windows, draft, draft_step
from .models.gemma4_assistant import Drafter
from .models.gemma4_text import Model, TargetOutput
from .sampling import (
    SamplerConfig,
    candidate_log_probs,
    choose,
    greedy_accept,
    match_accept,
    speculative_accept,
)

# Default drafter query position = position of the hidden state + DRAFT_POSITION_OFFSET. HF's convention (1: the
# position of the token being fed, i.e. one past the last K/V entry) is the one the released assistants ship with
# in transformers' reference implementation, and the parity oracle uses it; mlx-vlm and vLLM use 0. Only the
# acceptance rate depends on it (RoPE sees a uniform one-step shift); `drafter_proposer` takes either.
DRAFT_POSITION_OFFSET = 1


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


def accept(out: TargetOutput, drafts: mx.array, q: mx.array | None, sampler: SamplerConfig):
    """(n accepted, tokens (K+1,)): drafts[:n] then the target's token; greedy or exact speculative sampling."""
    logits = out.logits[0]
    if sampler.greedy:
        return greedy_accept(logits, drafts)
    if drafts.size == 0:
        return mx.array(0), choose(logits, sampler)
    ids, target = candidate_log_probs(logits, sampler)  # (K+1, top_k) with top-k on: no vocabulary-wide work
    if sampler.speculative_rule == "match":
        return match_accept(target, drafts, target_ids=ids)
    return speculative_accept(target, q, drafts, target_ids=ids)


# (last token, hidden, {layer type: KVWindow}, position of the last token, K) -> (drafts (K,), q (K, V) or None)
Proposer = Callable[[mx.array, mx.array, dict[str, KVWindow], int, int], tuple[mx.array, mx.array | None]]


def drafter_proposer(target: Model, drafter: Drafter, sampler: SamplerConfig,
                     position_offset: int = DRAFT_POSITION_OFFSET) -> Proposer:
    """The real drafter, querying at (position of the hidden state) + `position_offset` (1: HF, 0: mlx-vlm)."""
    step = draft_step(target, drafter)

    def propose(last, hidden, windows, last_position, k):
        position = last_position - 1 + position_offset
        return draft(step, last, hidden, windows, position, k, sampler)

    return propose


def plain_step(target: Model, cache: list, y: mx.array, sampler: SamplerConfig) -> tuple[mx.array, mx.array]:
    """Queue one plain decoding step for token `y` (1,): (the next token (1,), the hidden state of `y`'s position),
    computing while the caller reads the previous token (mlx-lm's pipelining)."""
    out = target.forward(y[None], cache, return_hidden=True)
    token = agree(target, choose(out.logits[:, -1], sampler))  # rank 0's token on every rank of a sharded target
    mx.async_eval(token, out.hidden)
    return token, out.hidden


# The draft-length policy, called once per round before it is queued: (tokens still wanted, [(K, seconds of the
# loop's own time)] of the rounds finished since the previous call, context length = tokens in the cache) -> K
DraftLength = Callable[[int, list[tuple[int, float]], int], int]


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


def _queue_round(target: Model, propose: Proposer, cache: list, last: mx.array, hidden: mx.array, k: int,
                 sampler: SamplerConfig) -> tuple[mx.array, mx.array | None]:
    """Start a round lazily: a plain step for `last` (k = 0: (the next token, the hidden state of `last`'s
    position)) or the k drafts after it ((drafts (k,), q or None))."""
    if k == 0:
        return plain_step(target, cache, last, sampler)
    # `last` sits at the cache's offset; the cache holds exactly the accepted tokens before it
    drafts, q = propose(last, hidden, cache_windows(target, cache), cache[0].offset, k)
    drafts = agree(target, drafts)
    mx.async_eval(drafts)  # the drafter computes while the caller reads the previous round's tokens
    return drafts, q


def _verify(target: Model, cache: list, last: mx.array, drafts: mx.array, q: mx.array | None,
            sampler: SamplerConfig) -> tuple[int, list[int], mx.array, mx.array]:
    """One target forward over `last` and the drafts, the acceptance rule, the rollback of rejected drafts: (n
    accepted, the round's tokens (K + 1 ints), the new last token (1,), the hidden state of the position before
    it)."""
    k = drafts.size
    out = target.forward(mx.concatenate([last, drafts])[None], cache, rows=k + 1, return_hidden=True)
    n, tokens = agree_pair(target, *accept(out, drafts, q, sampler))
    mx.eval(n, tokens)  # the round's one host sync
    n, tokens = n.item(), tokens.tolist()
    trim_cache(cache, k - n)
    return n, tokens, mx.array(tokens[n : n + 1]), out.hidden[:, n : n + 1]


def mtp_generate_step(
    target: Model, propose: Proposer, cache: list, first_hidden: mx.array, first_token: mx.array,
    draft_length: DraftLength, sampler: SamplerConfig, stats: DraftStats, max_tokens: int,
    clock: Callable[[], float] = time.perf_counter, emit_first: bool = False,
) -> Generator[tuple[int, bool], None, None]:
    """Yield (token, from_draft) after the first token, `max_tokens` at most; with `emit_first` the first token
    itself comes first, read once the first round is queued (else the caller has already emitted it).

    Every round's first work is queued before the previous round's tokens are handed out (mlx-lm's pipelining): a
    plain step, or the drafts, which the drafter computes while the caller reads those tokens. A drafting round
    then verifies its drafts in one target forward and reads the accepted count: one host sync per round.

    Args:
        propose: the draft source, normally `drafter_proposer(...)` (benchmarks and tests substitute oracles).
        cache: the target's cache holding the prompt (all but `first_token`).
        first_hidden: the target's post-norm hidden state of the last prompt token, (1, 1, H).
        first_token: the token sampled from it, (1,).
        draft_length: the policy (`DraftLength`): (tokens still wanted, [(K, seconds)] of the rounds finished since
            its previous call, context length) -> K for the next round (0: a plain step); called once per round,
            before it. A round's seconds are the loop's own time from the previous round's tokens being read to
            its own (the caller's time between yielded tokens is not counted).
        clock: the time source of those seconds (tests pass a fake one).
    """
    if max_tokens <= 0:
        if emit_first:
            yield first_token.item(), False
        return
    watch, finished = Stopwatch(clock), []
    last, hidden, remaining = first_token, first_hidden, max_tokens
    k = _next_k(draft_length, remaining, finished, cache)
    queued = _queue_round(target, propose, cache, last, hidden, k, sampler)
    if emit_first:
        watch.pause()
        yield first_token.item(), False
        watch.resume()
    while True:
        if k == 0:
            (last, hidden), n, tokens = queued, 0, None
        else:
            n, tokens, last, hidden = _verify(target, cache, last, *queued, sampler)
            finished.append((k, watch.lap()))
        stats.record(k, n)
        remaining -= n + 1
        if remaining > 0:  # the next round starts before these tokens are handed out
            k, finished = _next_k(draft_length, remaining, finished, cache), []
            queued = _queue_round(target, propose, cache, last, hidden, k, sampler)
        if tokens is None:  # a plain step's token, read only once the next round is queued
            tokens = [last.item()]
            finished.append((0, watch.lap()))
        for i, token in enumerate(tokens[: n + 1]):
            watch.pause()
            yield token, i < n
            watch.resume()
        if remaining <= 0:
            return


def _next_k(draft_length: DraftLength, remaining: int, finished: list, cache: list) -> int:
    return max(0, min(draft_length(remaining, finished, cache[0].offset), remaining - 1))  # never past the budget
