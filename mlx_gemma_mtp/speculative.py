"""MTP speculative decoding: draft K tokens with the Gemma 4 assistant, verify them in one target forward.

References: spec §5 (HF `SinglePositionMultiTokenCandidateGenerator`, `_assisted_decoding`); Leviathan et al.
2023, "Fast Inference from Transformers via Speculative Decoding" (Alg. 1) for T > 0; gpt-fast's speculative step
for the shape of the loop. Each round builds the drafts and the verify pass as one lazy MLX graph and reads the
accepted count once: one host sync per round.

Round state (spec §5.1): `last` is the newest token (not yet in the cache), `hidden` the target's post-norm hidden
state of the position before it; the drafter sees the producer K/V of positions <= that position
(`drafting.cache_windows`).
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass, field

import mlx.core as mx

from .cache import trim_cache
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
    """Counters of one generation; per-position lists are indexed by draft position (0 = first draft)."""

    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    drafted_per_position: list[int] = field(default_factory=list)
    accepted_per_position: list[int] = field(default_factory=list)
    # rounds that drafted position i and accepted every draft before it: the denominator of the acceptance of
    # position i *given* the earlier ones (accepted / drafted is the unconditional survival rate)
    reached_per_position: list[int] = field(default_factory=list)

    def _grow(self, positions: int) -> None:
        missing = positions - len(self.drafted_per_position)
        self.drafted_per_position += [0] * max(0, missing)
        self.accepted_per_position += [0] * max(0, missing)
        self.reached_per_position += [0] * max(0, missing)

    def record(self, num_drafts: int, num_accepted: int) -> None:
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
        """Accepted drafts per round (the target's own token of each round not counted)."""
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
    token = choose(out.logits[:, -1], sampler)
    mx.async_eval(token, out.hidden)
    return token, out.hidden


def _plain_rounds(target: Model, cache: list, last: mx.array, draft_length: Callable[[int], int],
                  sampler: SamplerConfig, stats: DraftStats, remaining: int):
    """K = 0 rounds for as long as the policy keeps choosing them, each queued before the previous token is read:
    plain decoding's pipelining (syncing before every round would make "auto" slower than plain decoding exactly
    when it falls back to it). Yields (token, False); returns (newest token, hidden state of the position before
    it, tokens produced, the policy's K for the next round or None once `remaining` tokens are produced)."""
    produced, (token, hidden) = 0, plain_step(target, cache, last, sampler)
    while True:
        produced += 1
        stats.record(0, 0)
        next_k = draft_length(remaining - produced) if produced < remaining else None
        following = plain_step(target, cache, token, sampler) if next_k == 0 else None  # before reading `token`
        yield token.item(), False
        if following is None:
            return token, hidden, produced, next_k
        token, hidden = following


def mtp_generate_step(
    target: Model, propose: Proposer, cache: list, first_hidden: mx.array, first_token: mx.array,
    draft_length: Callable[[int], int], sampler: SamplerConfig, stats: DraftStats, max_tokens: int,
) -> Generator[tuple[int, bool], None, None]:
    """Yield (token, from_draft) after the first token (which the caller already emitted), `max_tokens` at most.

    Args:
        propose: the draft source, normally `drafter_proposer(...)` (benchmarks and tests substitute oracles).
        cache: the target's cache holding the prompt (all but `first_token`).
        first_hidden: the target's post-norm hidden state of the last prompt token, (1, 1, H).
        first_token: the token sampled from it, (1,).
        draft_length: tokens still wanted -> K for the next round (0: a plain decoding round); called once per
            round, before it.
    """
    last, hidden = first_token, first_hidden
    remaining = max_tokens
    K = draft_length(remaining) if remaining > 0 else 0
    while remaining > 0:
        K = max(0, min(K, remaining - 1))  # never draft past the budget
        if K == 0:
            last, hidden, produced, K = yield from _plain_rounds(target, cache, last, draft_length, sampler, stats,
                                                                 remaining)
            remaining -= produced
            continue
        # `last` sits at the cache's offset; the cache holds exactly the accepted tokens before it
        drafts, q = propose(last, hidden, cache_windows(target, cache), cache[0].offset, K)
        mx.async_eval(drafts)  # the drafter computes while the verify graph is being built (no host sync)
        out = target.forward(mx.concatenate([last, drafts])[None], cache, rows=K + 1, return_hidden=True)
        n, tokens = accept(out, drafts, q, sampler)
        mx.eval(n, tokens)  # the round's one host sync
        n, tokens = n.item(), tokens.tolist()
        trim_cache(cache, K - n)
        stats.record(K, n)
        last, hidden = mx.array(tokens[n : n + 1]), out.hidden[:, n : n + 1]
        remaining -= n + 1
        for i in range(n + 1):
            yield tokens[i], i < n
        if remaining > 0:
            K = draft_length(remaining)
