"""Continuous batching: requests join a running batch between rounds and leave when done, each decoding exactly
as it would alone (greedy: the same tokens; sampling: the same distribution, from its own RNG stream).

A `BatchGenerator` owns a `batched.Batch` of `max_batch_size` rows. Its scheduler step does one thing at a time:
one prefill chunk of the request joining (so the running streams keep flowing while a long prompt is read),
then one decoding round for every running row. A request joins when its prompt is prefilled (in a batch-1
cache, through its prompt cache when it has one, exactly as a lone generation) and a row is free; it leaves when
it stops (EOS, stop string, max_tokens) or is cancelled, its prompt cache then holding the conversation.

`batch_generate` runs it on the caller's thread; `serve --max-concurrency N` runs it on a thread of its own
(`start`), each request's responses arriving on its own queue.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial

import mlx.core as mx

from .batch_draft_length import BatchDraftLength
from .batched import Batch, BatchProposer, row_sampling
from .decode import MAX_DRAFT_TOKENS, GenerationResponse, encode_prompt, eos_ids, resolve_draft_request
from .load import Bundle
from .logprobs import MAX_TOP_LOGPROBS, token_scores
from .logprobs import rows as token_rows
from .media.encoder import PromptMedia
from .memory import generation_stream, release_streams_at_thread_exit
from .plain import prefill_chunks
from .prompt import EncodedPrompt, Prompt
from .prompt_cache import PromptCache
from .sampling import SamplerConfig, choose
from .stats import DraftStats
from .textstream import ANSWER, TextStream

_DONE = object()  # a request's queue ends with this (or an exception)


@dataclass
class Request:
    """One generation in the batch: its prompt and settings, where its responses go, and its progress."""

    prompt: EncodedPrompt
    max_tokens: int
    sampler: SamplerConfig
    stop: tuple[str, ...]
    prompt_cache: PromptCache | None
    text: TextStream
    seed: int  # the row's RNG seed when its sampler has none
    logprobs: int | None = None  # alternatives reported with each token's log-probability (None: none)
    responses: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    row: int | None = None
    generated: int = 0
    received: list[int] = field(default_factory=list)  # what its prompt cache holds afterwards
    stats: DraftStats = field(default_factory=DraftStats)
    started: float = field(default_factory=time.perf_counter)
    prompt_tps: float = 0.0
    first_token_at: float = 0.0
    cache: list | None = None


class BatchStream:
    """A request's responses, as `stream_generate` yields them; closing it early cancels the request."""

    def __init__(self, request: Request, generator: BatchGenerator):
        self.request, self.generator = request, generator

    def __iter__(self) -> Iterator[GenerationResponse]:
        return self

    def __next__(self) -> GenerationResponse:
        if self.generator.driven_here:
            while self.request.responses.empty():
                self.generator.step()
        item = self.request.responses.get()
        if item is _DONE:
            self.request.responses.put(_DONE)  # a second next() after the end also stops
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self.request.cancelled.set()
        self.generator.wake()


class BatchGenerator:
    """Up to `max_batch_size` generations decoding together over one bundle.

    Args:
        num_draft_tokens: an int K for every round (0: plain steps), or "auto"/None: K chosen per round for the
            batch (`batch_draft_length.BatchDraftLength`: aggregate tokens per second).
    """

    def __init__(self, bundle: Bundle, max_batch_size: int = 4, num_draft_tokens: int | str | None = None,
                 prefill_step_size: int = 512, propose: BatchProposer | None = None):
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size!r}: must be a positive integer")
        self.bundle, self.prefill_step_size = bundle, prefill_step_size
        k = resolve_draft_request(bundle, num_draft_tokens, propose)
        self.draft_length = BatchDraftLength(k, MAX_DRAFT_TOKENS)
        self.batch = Batch(bundle.target, bundle.drafter, max_batch_size, propose)
        self.waiting: deque[Request] = deque()
        self.joining: tuple[Request, Iterator] | None = None
        self.running: dict[int, Request] = {}
        self.eos = set(eos_ids(bundle))
        self.driven_here = True  # False once `start` runs the steps on a thread of its own
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._held = 0
        self._seeds = 0

    # --- requests ---------------------------------------------------------------------------------------------

    def submit(self, prompt: Prompt | EncodedPrompt, max_tokens: int = 256, sampler: SamplerConfig | None = None,
               stop: str | list[str] | None = None, chat_template_kwargs: dict | None = None,
               prompt_cache: PromptCache | None = None, logprobs: int | None = None) -> BatchStream:
        """Queue a generation; its responses come from the returned stream (as `stream_generate`'s, `logprobs`
        alike). A `prompt_cache` another queued or running request holds is not shared: this one then goes
        without."""
        sampler = sampler or SamplerConfig()
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ValueError(f"max_tokens={max_tokens!r}: must be a positive integer")
        if logprobs is not None and (not isinstance(logprobs, int) or isinstance(logprobs, bool)
                                     or not 0 <= logprobs <= MAX_TOP_LOGPROBS):
            raise ValueError(f"logprobs={logprobs!r}: None, or 0..{MAX_TOP_LOGPROBS} alternatives")
        encoded = encode_prompt(self.bundle, prompt, chat_template_kwargs)
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        text = TextStream(self.bundle.tokenizer, list(stops), self.bundle.special.channels)
        text.resume(encoded.ids)
        with self._wake:
            if prompt_cache is not None and (prompt_cache.busy or any(r.prompt_cache is prompt_cache
                                                                      for r in self._requests())):
                prompt_cache = None
            if prompt_cache is not None:
                prompt_cache.busy = True
            self._seeds += 1
            request = Request(encoded, max_tokens, sampler, stops, prompt_cache, text, self._seeds, logprobs)
            self.waiting.append(request)
            self._wake.notify()
        return BatchStream(request, self)

    def _requests(self) -> list[Request]:
        return [*self.waiting, *([self.joining[0]] if self.joining else []), *self.running.values()]

    @property
    def busy(self) -> bool:
        """Work to do now: rows running or joining, or requests waiting while no lone generation waits."""
        return bool(self.joining or self.running or (self.waiting and not self._held))

    @contextlib.contextmanager
    def hold(self):
        """While held, no request joins: the running ones finish and the bundle is free for a lone generation
        (one under a JSON schema), which would otherwise wait behind a never-empty batch."""
        with self._wake:
            self._held += 1
        try:
            yield
        finally:
            with self._wake:
                self._held -= 1
                self._wake.notify()

    # --- the scheduler ----------------------------------------------------------------------------------------

    def step(self) -> None:
        """Prefill of the joining requests, `prefill_step_size` prompt tokens at most (a long prompt takes a chunk
        per step, so that the running rows keep flowing; several short ones join in one step, so that a burst of
        requests does not wait a round per request), then one decoding round for the running rows."""
        with mx.stream(generation_stream):
            self._drop_cancelled()
            budget = self.prefill_step_size
            while budget > 0 and self._next_joining():
                budget -= self._advance_joining()
            if self.running:
                self._round()

    def _next_joining(self) -> bool:
        """Whether a request is joining, starting the next waiting one when none is and a row is free."""
        if self.joining is None and self.waiting and not self._held and self.batch.free_row() is not None:
            self._start_joining(self.waiting.popleft())
        return self.joining is not None

    def _drop_cancelled(self) -> None:
        for request in [r for r in self.waiting if r.cancelled.is_set()]:
            self.waiting.remove(request)
            if request.prompt_cache is not None:
                request.prompt_cache.busy = False
            request.responses.put(_DONE)
        for row, request in list(self.running.items()):
            if request.cancelled.is_set():
                self._leave(request)

    def _start_joining(self, request: Request) -> None:
        target, prompt, ids = self.bundle.target, request.prompt, request.prompt.ids
        try:
            if request.prompt_cache is not None:
                cache, start = request.prompt_cache.fetch(target, prompt.keys(), MAX_DRAFT_TOKENS)
                snapshot = partial(request.prompt_cache.snapshot, cache, len(ids) - 1)
            else:
                cache, start, snapshot = target.make_cache(max_rollback=MAX_DRAFT_TOKENS), 0, None
            media = PromptMedia(prompt, self.bundle.media) if prompt.spans else None
            chunks = prefill_chunks(target, mx.array(ids[start:]), cache, self.prefill_step_size, True, snapshot,
                                    media)
        except Exception as e:  # noqa: BLE001  the request fails alone; the batch goes on
            self._fail(request, e)
            return
        request.cache, request.received = cache, prompt.keys()
        self.joining = (request, chunks)

    def _advance_joining(self) -> int:
        """One chunk of the joining request's prefill, or its last token and first sampled token (it then
        joins the batch, or is done); the prompt tokens that took (at least 1)."""
        request, chunks = self.joining
        try:
            return next(chunks)
        except StopIteration as done:
            out = done.value
        except Exception as e:  # noqa: BLE001
            self.joining = None
            self._fail(request, e)
            return 1
        self.joining = None
        sampling = row_sampling(request.sampler, request.seed, request.logprobs)
        token = choose(out.logits[:, -1], request.sampler, sampling.next_key())
        scores = None if request.logprobs is None else token_scores(out.logits[:, -1], token, request.logprobs)
        mx.eval(token, [] if scores is None else scores.arrays())
        reused = request.prompt_cache.reused if request.prompt_cache is not None else 0
        request.prompt_tps = (len(request.prompt.ids) - reused) / max(time.perf_counter() - request.started, 1e-9)
        request.first_token_at = time.perf_counter()
        if self._emit(request, [token.item()], 0, token_rows(scores, 1)):
            self._finish(request)
            return 1
        row = self.batch.free_row()
        request.row = row
        self.batch.join(row, request.cache, token, out.hidden, sampling)
        self.running[row] = request
        return 1

    def _round(self) -> None:
        # a row near its budget does not hold the others back: it keeps what it needs of a round, the rest of its
        # round is dropped with its row; but no round drafts past what any row still needs
        limits = {r.row: r.max_tokens - r.generated - 1 for r in self.running.values()}  # drafts each can use
        k = min(self.draft_length.choose(len(self.running), limits), max(max(limits.values()), 0))
        tic = time.perf_counter()
        emitted = self.batch.step(k, limits)
        self.draft_length.timed(k, len(self.running), time.perf_counter() - tic, emitted, limits)
        for row, tokens in emitted.items():
            request = self.running[row]
            if k:
                request.stats.record(k, len(tokens) - 1)
            logprobs = self.batch.logprobs.get(row) or [None] * len(tokens)
            if self._emit(request, tokens, len(tokens) - 1 if k else 0, logprobs):
                self._leave(request)

    def _emit(self, request: Request, tokens: list[int], drafted: int, logprobs: list) -> bool:
        """Hand out a row's new tokens (the first `drafted` came from drafts) with their log-probabilities (None
        entries when not asked for); True when the request is done."""
        for i, token in enumerate(tokens):
            request.generated += 1
            request.received.append(token)
            is_eos = token in self.eos
            channel, delta, stopped = request.text.add(None if is_eos else token)
            finish = "stop" if is_eos or stopped else "length" if request.generated >= request.max_tokens else None
            if finish:
                delta += request.text.flush(stopped)
            elapsed = max(time.perf_counter() - request.first_token_at, 1e-9)
            request.responses.put(GenerationResponse(
                delta, token, i < drafted, finish, len(request.prompt.ids), request.prompt_tps, request.generated,
                request.generated / elapsed, mx.get_peak_memory() / 1e9,
                request.stats if self.draft_length.drafts else None, channel, logprobs[i]))
            if finish:
                return True
            if request.cancelled.is_set():
                return True
        return False

    def _leave(self, request: Request) -> None:
        row = request.row
        if request.prompt_cache is not None:
            self.batch.cache.extract(row, request.cache)
        self.batch.leave(row)
        self.draft_length.forget(row)
        del self.running[row]
        self._finish(request)

    def _finish(self, request: Request) -> None:
        if request.prompt_cache is not None:
            request.prompt_cache.record(request.received)
            request.prompt_cache.busy = False
        request.responses.put(_DONE)

    def _fail(self, request: Request, error: Exception) -> None:
        if request.prompt_cache is not None:
            request.prompt_cache.reset()
            request.prompt_cache.busy = False
        request.responses.put(error)

    # --- a thread of its own (a server) -----------------------------------------------------------------------

    def start(self) -> BatchGenerator:
        """Run the scheduler on a thread of its own until `stop`; it holds the bundle while it has work."""
        self.driven_here = False
        self._thread = threading.Thread(target=self._loop, name="batch-generator", daemon=True)
        self._thread.start()
        return self

    def wake(self) -> None:
        with self._wake:
            self._wake.notify()

    def stop(self, timeout: float = 10.0) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        release_streams_at_thread_exit()  # else MLX aborts the process at exit
        while True:
            with self._wake:
                while not self.busy and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    break
            with self.bundle.exclusive():  # a lone generation (e.g. a JSON-schema request) waits its turn
                while self.busy and not self._stopping:
                    with self._wake:  # `submit` reads the queues from other threads
                        try:
                            self.step()
                        except Exception as e:  # noqa: BLE001  a failed round fails its rows; the model is intact
                            self._fail_all(e)
        self._fail_all(RuntimeError("the server is shutting down"))

    def _fail_all(self, error: Exception) -> None:
        for request in self._requests():
            self._fail(request, error)
        self.running, self.waiting, self.joining = {}, deque(), None
        # a round that failed half-way may have left lazy arrays of a broken graph in the batch: start afresh
        self.batch = Batch(self.bundle.target, self.bundle.drafter, self.batch.cache.rows, self.batch.propose)


@dataclass
class BatchResponse:
    texts: list[str]  # each prompt's answer (with thinking on, without the thought)
    tokens: list[list[int]]
    finish_reasons: list[str | None]
    stats: list[DraftStats | None]


def batch_generate(bundle: Bundle, prompts: list, max_tokens: int = 256, sampler: SamplerConfig | None = None,
                   num_draft_tokens: int | str | None = None, stop: str | list[str] | None = None,
                   chat_template_kwargs: dict | None = None, max_batch_size: int | None = None,
                   prefill_step_size: int = 512) -> BatchResponse:
    """Generate an answer for each prompt, decoding them together (mlx-lm's name). Each answer is the one
    `generate` gives for that prompt alone (greedy: token for token; sampling: from the same distribution; each
    row draws from its own RNG stream, seeded by the sampler's seed, so a seeded prompt gets the same text
    whatever else is in the batch).

    Args:
        prompts: each a string, chat messages or token ids, as `stream_generate` takes them.
        max_batch_size: rows decoded together (default: all prompts); more prompts wait for a free row.
    """
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a non-empty list of prompts (strings, chat messages or token ids)")
    generator = BatchGenerator(bundle, max_batch_size or len(prompts), num_draft_tokens, prefill_step_size)
    streams = [generator.submit(p, max_tokens, sampler, stop, chat_template_kwargs) for p in prompts]
    with bundle.exclusive():
        responses = [list(s) for s in streams]
    return BatchResponse(
        ["".join(r.text for r in rs if r.channel == ANSWER) for rs in responses],
        [[r.token for r in rs] for rs in responses],
        [rs[-1].finish_reason if rs else None for rs in responses],
        [rs[-1].draft if rs else None for rs in responses],
    )
