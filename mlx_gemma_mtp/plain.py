"""Plain decoding: the prompt's prefill and one-token target steps, pipelined as in mlx-lm's `generate_step`.

Both plain decoding and MTP prefill `prompt[:-1]` in chunks without logits and then run the last prompt token
alone, so the first generated token is computed identically with and without a drafter. A plain step is also
MTP's K = 0 round (`speculative.mtp_generate_step`).
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass

import mlx.core as mx

from .distributed.lockstep import Lockstep, agreed
from .models.gemma4_text import Model, TargetOutput
from .sampling import SamplerConfig, choose


@dataclass
class Frontier:
    """Where decoding stands (spec §5.1): the newest token, not yet in the cache, and the target's post-norm
    hidden state of the position before it (what the drafter reads). Either may still be computing."""

    token: mx.array  # (1,)
    hidden: mx.array | None  # (1, 1, H); None when nothing drafts


def prefill(model: Model, prompt: mx.array, cache: list, step: int, want_hidden: bool,
            before_last: Callable[[], None] | None = None) -> TargetOutput:
    """Feed `prompt` (T,) into `cache`: all but the last token in chunks without logits, then the last one.
    `before_last` runs when everything but the last token is in the cache (the prompt cache snapshots there)."""
    for start in range(0, prompt.size - 1, step):
        model.forward(prompt[None, start : min(start + step, prompt.size - 1)], cache, rows=0)
        # keys *and* values: a lazy value buffer keeps every chunk's activations alive (memory ~ prompt x hidden)
        mx.eval([(c.keys, c.values) for c in cache])
        mx.clear_cache()
    if before_last is not None:
        before_last()
    return model.forward(prompt[None, -1:], cache, return_hidden=want_hidden)


def first_token(out: TargetOutput, sampler: SamplerConfig, lockstep: Lockstep | None) -> Frontier:
    """The token sampled after the prompt (lazy), with the hidden state it was sampled from."""
    return Frontier(agreed(lockstep, choose(out.logits[:, -1], sampler)), out.hidden)


def plain_step(target: Model, cache: list, y: mx.array, sampler: SamplerConfig,
               lockstep: Lockstep | None = None) -> Frontier:
    """Queue one plain decoding step for token `y` (1,): the next token and the hidden state of `y`'s position,
    computing while the caller reads the previous token (mlx-lm's pipelining)."""
    out = target.forward(y[None], cache, return_hidden=True)
    token = agreed(lockstep, choose(out.logits[:, -1], sampler))  # rank 0's token on every rank of a sharded target
    mx.async_eval(token, out.hidden)
    return Frontier(token, out.hidden)


def generate_step(target: Model, cache: list, first: mx.array, sampler: SamplerConfig,
                  lockstep: Lockstep | None = None) -> Generator[tuple[int, bool], None, None]:
    """Plain decoding from the first token (chosen, maybe still computing) on; each step is queued before the
    previous token is read, the first one included, so building the next graph overlaps the computation of the
    current one."""
    y = first
    while True:
        following = plain_step(target, cache, y, sampler, lockstep).token
        yield y.item(), False
        y = following
