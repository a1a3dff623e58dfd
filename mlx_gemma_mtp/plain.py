"""Plain decoding: the prompt's prefill and one-token target steps, pipelined as in mlx-lm's `generate_step`.

Both plain decoding and MTP prefill `prompt[:-1]` in chunks without logits and then run the last prompt token
alone, so the first generated token is computed identically with and without a drafter. A plain step is also
MTP's K = 0 round (`speculative.mtp_generate_step`).
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Protocol

import mlx.core as mx

from .constraint import Constraint
from .distributed.lockstep import Lockstep, agreed
from .logprobs import Scores, TokenLogprobs, rows, token_scores
from .models.gemma4_text import MediaRows, Model, TargetOutput
from .sampling import SamplerConfig, choose


@dataclass(frozen=True)
class Chooser:
    """How a step turns the target's logits into the emitted token: the sampler, rank 0's decision on a target
    sharded over processes (`lockstep`), the log-probabilities reported with it (`top_logprobs` best tokens
    besides the chosen one's; None: none) and the grammar the answer must follow (`constraint`, or None)."""

    sampler: SamplerConfig
    lockstep: Lockstep | None = None
    top_logprobs: int | None = None
    constraint: Constraint | None = None

    def token(self, logits: mx.array) -> mx.array:
        """(1, V) logits -> the token (1,), lazy; rank 0's on every rank of a sharded target."""
        if self.constraint is not None:
            logits = self.constraint.restrict(logits)
        return agreed(self.lockstep, choose(logits, self.sampler))

    def read(self, step: Frontier) -> tuple[int, bool, TokenLogprobs | None]:
        """`step.emitted()`, which a grammar consumes: the next step's mask depends on it."""
        item = step.emitted()
        if self.constraint is not None:
            self.constraint.consume([item[0]])
        return item

    def scores(self, logits: mx.array, tokens: mx.array) -> Scores | None:
        """Log-probabilities of `tokens` (R,) at the rows of `logits` (R, V), when asked for."""
        return None if self.top_logprobs is None else token_scores(logits, tokens, self.top_logprobs)


@dataclass
class Frontier:
    """Where decoding stands (spec §5.1): the newest token, not yet in the cache, and the target's post-norm
    hidden state of the position before it (what the drafter reads). Either may still be computing; `scores` are
    the token's log-probabilities when asked for."""

    token: mx.array  # (1,)
    hidden: mx.array | None  # (1, 1, H); None when nothing drafts
    scores: Scores | None = None

    def arrays(self) -> list[mx.array]:
        return [self.token, *([] if self.hidden is None else [self.hidden]),
                *([] if self.scores is None else self.scores.arrays())]

    def emitted(self) -> tuple[int, bool, TokenLogprobs | None]:
        """(token, from_draft, logprobs) as the generators yield it (reading it waits for the step)."""
        return self.token.item(), False, rows(self.scores, 1)[0]


class ChunkMedia(Protocol):
    """A prompt's images and audio as prefill feeds them (`media.encoder.PromptMedia`); absolute positions."""

    def cut(self, start: int, end: int) -> int: ...  # a chunk end that splits no item

    def rows(self, start: int, end: int) -> MediaRows | None: ...  # the soft tokens of chunk [start, end)


def prefill(model: Model, prompt: mx.array, cache: list, step: int, want_hidden: bool,
            before_last: Callable[[], None] | None = None, media: ChunkMedia | None = None) -> TargetOutput:
    """Feed `prompt` (T,) into `cache`: all but the last token in chunks without logits, then the last one.
    `before_last` runs when everything but the last token is in the cache (the prompt cache snapshots there).
    With `media`, chunks end where no image or audio item is split (a chunk may then exceed `step`)."""
    chunks = prefill_chunks(model, prompt, cache, step, want_hidden, before_last, media)
    while True:
        try:
            next(chunks)
        except StopIteration as done:
            return done.value


def prefill_chunks(model: Model, prompt: mx.array, cache: list, step: int, want_hidden: bool,
                   before_last: Callable[[], None] | None = None, media: ChunkMedia | None = None
                   ) -> Generator[int, None, TargetOutput]:
    """`prefill`, pausing after each chunk (a batch interleaves a joining prompt with its decoding rounds) with
    the chunk's length; returns the last token's output."""
    offset = cache[0].offset if cache else 0  # the absolute position of prompt[0]
    start, end = 0, prompt.size - 1
    while start < end:
        stop = min(start + step, end)
        if media is not None:
            stop = media.cut(offset + start, offset + stop) - offset
        rows = None if media is None else media.rows(offset + start, offset + stop)
        model.forward(prompt[None, start:stop], cache, rows=0, media=rows)
        # keys *and* values: a lazy value buffer keeps every chunk's activations alive (memory ~ prompt x hidden)
        mx.eval([(c.keys, c.values) for c in cache])
        mx.clear_cache()
        yield stop - start
        start = stop
    if before_last is not None:
        before_last()
    return model.forward(prompt[None, -1:], cache, return_hidden=want_hidden)


def first_token(out: TargetOutput, chooser: Chooser) -> Frontier:
    """The token sampled after the prompt (lazy), with the hidden state it was sampled from."""
    logits = out.logits[:, -1]
    token = chooser.token(logits)
    return Frontier(token, out.hidden, chooser.scores(logits, token))


def plain_step(target: Model, cache: list, y: mx.array, chooser: Chooser) -> Frontier:
    """Queue one plain decoding step for token `y` (1,): the next token and the hidden state of `y`'s position,
    computing while the caller reads the previous token (mlx-lm's pipelining)."""
    out = target.forward(y[None], cache, return_hidden=True)
    logits = out.logits[:, -1]
    token = chooser.token(logits)
    step = Frontier(token, out.hidden, chooser.scores(logits, token))
    mx.async_eval(step.arrays())
    return step


def generate_step(target: Model, cache: list, first: Frontier, chooser: Chooser
                  ) -> Generator[tuple[int, bool, TokenLogprobs | None], None, None]:
    """Plain decoding from the first token (chosen, maybe still computing) on: (token, False, logprobs) per step.
    Each step is queued before the previous token is read, the first one included, so building the next graph
    overlaps the computation of the current one."""
    at = first
    while True:
        if chooser.constraint is not None:  # the next mask needs this token: read it first (no pipelining)
            item = chooser.read(at)
            following = plain_step(target, cache, at.token, chooser)
        else:
            following = plain_step(target, cache, at.token, chooser)
            item = at.emitted()
        yield item
        at = following
