"""Text generation: plain decoding and MTP speculative decoding behind one streaming API.

Three layers, as in mlx-lm: token generators (`plain.generate_step`, `speculative.mtp_generate_step`),
`stream_generate` (prompt handling, detokenizing, stop conditions, stats) and `generate` (returns a string). The
arguments are checked once, into a `GenerationOptions`, before anything runs.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import mlx.core as mx

from .load import Bundle
from .logprobs import MAX_TOP_LOGPROBS, TokenLogprobs
from .media.content import has_media, split_media
from .media.encoder import PromptMedia
from .media.placeholders import expand, video_rewrite
from .memory import generation_stream, on_stream, release_streams_at_thread_exit, wired_limit
from .plain import Chooser, first_token, generate_step, prefill
from .prompt import EncodedPrompt, Prompt, prompt_ids
from .prompt_cache import PromptCache
from .sampling import SamplerConfig
from .speculative import Proposer, drafter_proposer, mtp_generate_step
from .stats import DraftStats
from .textstream import ANSWER, TextStream

MAX_DRAFT_TOKENS = 16  # rollback slack the caches keep; longer drafts are refused


@dataclass
class GenerationResponse:
    text: str  # new text since the previous response
    token: int
    from_draft: bool  # True when a drafter proposed this token and the target accepted it
    finish_reason: str | None  # "stop" (EOS or stop string), "length", or None while generating
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB
    draft: DraftStats | None  # live counters of the MTP path, None for plain decoding
    channel: str = ANSWER  # which part `text` belongs to: "answer", or "thought" inside Gemma 4's thinking
    logprobs: TokenLogprobs | None = None  # the token's log-probability and alternatives, when asked for


@dataclass(frozen=True)
class GenerationOptions:
    """One generation's settings, checked (`GenerationOptions.of`) before anything runs."""

    max_tokens: int
    sampler: SamplerConfig
    num_draft_tokens: int | str  # an int (0 = plain decoding) or "auto"
    stop: tuple[str, ...]
    prefill_step_size: int
    proposer: Proposer | None
    prompt_cache: PromptCache | None
    logprobs: int | None = None  # report log-probabilities with this many alternatives (None: none)
    json_schema: dict | None = None  # the answer must be JSON following it (None: free text)

    @classmethod
    def of(cls, bundle: Bundle, max_tokens, sampler, num_draft_tokens, stop, prefill_step_size, proposer,
           prompt_cache, logprobs=None, json_schema=None) -> GenerationOptions:
        """`stream_generate`'s arguments checked and resolved, or a ValueError naming the bad one."""
        sampler = SamplerConfig() if sampler is None else sampler
        if not isinstance(sampler, SamplerConfig):
            raise ValueError(f"sampler must be a SamplerConfig (e.g. SamplerConfig(temperature=0.7)), got "
                             f"{type(sampler).__name__}")
        for name, value in (("max_tokens", max_tokens), ("prefill_step_size", prefill_step_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r}: must be a positive integer")
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        if not all(isinstance(s, str) for s in stop):
            raise ValueError(f"stop={stop!r}: pass a string or a list of strings")
        if prompt_cache is not None and not isinstance(prompt_cache, PromptCache):
            raise ValueError(f"prompt_cache must be a PromptCache, got {type(prompt_cache).__name__}")
        if logprobs is not None and (not isinstance(logprobs, int) or isinstance(logprobs, bool)
                                     or not 0 <= logprobs <= MAX_TOP_LOGPROBS):
            raise ValueError(f"logprobs={logprobs!r}: None, or the number of alternatives to report with each "
                             f"token's log-probability, 0..{MAX_TOP_LOGPROBS}")
        if json_schema is not None and not isinstance(json_schema, dict):
            raise ValueError(f"json_schema must be a dict (a JSON schema; {{'type': 'object'}} for any JSON "
                             f"object), got {type(json_schema).__name__}")
        return cls(max_tokens, sampler, resolve_draft_request(bundle, num_draft_tokens, proposer), tuple(stop),
                   prefill_step_size, proposer, prompt_cache, logprobs, json_schema)


def encode_prompt(bundle: Bundle, prompt: Prompt | EncodedPrompt, chat_template_kwargs: dict | None = None,
                  local_files: bool = True) -> EncodedPrompt:
    """What `stream_generate` would feed for `prompt`: token ids, with the images, videos and audio of chat messages
    decoded and processed (a server does this before it takes the model). `local_files`: whether media parts may
    name local paths (a server allows them only when told to)."""
    if isinstance(prompt, EncodedPrompt):
        encoded = prompt
    else:
        items, rewrite = [], None
        if has_media(prompt):
            if bundle.media is None:
                raise ValueError(f"{bundle.path} takes no images or audio (nor video): its config.json has no "
                                 "vision_config (a text-only checkpoint or conversion); load the released "
                                 "multimodal checkpoint")
            prompt, media = split_media(prompt, local_files)
            items = [bundle.media.prepare(item) for item in media]
            # a video's frame times are text: HF writes them into the rendered template before tokenizing
            rewrite = video_rewrite(items, lambda i: bundle.tokenizer.convert_ids_to_tokens(i), bundle.media.tokens)
        ids = prompt_ids(bundle.tokenizer, bundle.special, prompt, chat_template_kwargs, where=str(bundle.path),
                         rewrite=rewrite)
        encoded = expand(ids, items, bundle.media.tokens) if items else EncodedPrompt(ids)
    if not encoded.ids:
        raise ValueError("the prompt encodes to no tokens")
    vocab = bundle.target.args.vocab_size
    if bad := [t for t in encoded.ids if not 0 <= t < vocab]:  # the tokenizer must fit the model too
        raise ValueError(f"prompt token ids {bad[:5]} are outside the model's vocabulary [0, {vocab})")
    return encoded


def _tokens(bundle: Bundle, prompt: EncodedPrompt, options: GenerationOptions, stats: DraftStats | None
            ) -> Iterator:
    """(token, from_draft) for the prompt: prefill (after what the prompt cache holds), then plain decoding or MTP.
    Both loops queue their next step or round before they hand out the first token."""
    target, state, sampler, prompt_cache = bundle.target, bundle.state, options.sampler, options.prompt_cache
    use_mtp = options.num_draft_tokens != 0  # resolved: 0 whenever there is nothing to draft with
    ids = prompt.ids
    if prompt_cache is None:
        cache, start, snapshot = target.make_cache(max_rollback=MAX_DRAFT_TOKENS), 0, None
    else:
        # keyed on media content too: two images of one size expand to the same ids
        cache, start = prompt_cache.fetch(target, prompt.keys(), MAX_DRAFT_TOKENS)
        snapshot = partial(prompt_cache.snapshot, cache, len(ids) - 1)
    if (inside := prompt.span_inside(start)) is not None:  # a cached prefix ends where no item is split
        raise RuntimeError(f"prompt cache reuse stopped inside an {inside.kind} at {start}; please report this")
    media = PromptMedia(prompt, bundle.media) if prompt.spans else None
    out = prefill(target, mx.array(ids[start:]), cache, options.prefill_step_size, use_mtp, snapshot, media)
    constraint = None if options.json_schema is None else state.constraint(
        bundle.tokenizer, options.json_schema, eos_ids(bundle))
    chooser = Chooser(sampler, state.lockstep, options.logprobs, constraint)
    first = first_token(out, chooser)
    if not use_mtp:
        yield from generate_step(target, cache, first, chooser)
        return
    policy = state.draft_length(options.num_draft_tokens, sampler, MAX_DRAFT_TOKENS)
    propose = options.proposer or drafter_proposer(state.draft_step, sampler, constraint=constraint)
    yield from mtp_generate_step(target, cache, first, propose, policy, chooser, stats, options.max_tokens)


def resolve_draft_request(bundle: Bundle, num_draft_tokens, proposer) -> int | str:
    """The draft length to use: an int (0 = plain decoding) or "auto". None and "auto" mean plain decoding
    without a drafter; "auto" prices drafting from the drafter, so a custom proposer alone needs an int."""
    if num_draft_tokens in (None, "auto"):
        if bundle.drafter is not None:
            return "auto"
        if proposer is not None:
            raise ValueError("num_draft_tokens='auto' prices drafting from the drafter; with a custom proposer "
                             "pass an int")
        return 0
    if not isinstance(num_draft_tokens, int) or isinstance(num_draft_tokens, bool) or \
            not 0 <= num_draft_tokens <= MAX_DRAFT_TOKENS:
        raise ValueError(f"num_draft_tokens={num_draft_tokens!r}: use 'auto' or an int in [0, {MAX_DRAFT_TOKENS}]")
    if num_draft_tokens > 0 and bundle.drafter is None and proposer is None:
        raise ValueError(f"num_draft_tokens={num_draft_tokens} needs a drafter: load(model, draft=...)")
    return num_draft_tokens


def stream_generate(
    bundle: Bundle,
    prompt: Prompt,
    max_tokens: int = 256,
    sampler: SamplerConfig | None = None,
    num_draft_tokens: int | str | None = None,
    stop: str | list[str] | None = None,
    prefill_step_size: int = 512,
    proposer: Proposer | None = None,
    chat_template_kwargs: dict | None = None,
    prompt_cache: PromptCache | None = None,
    logprobs: int | None = None,
    json_schema: dict | None = None,
) -> Iterator[GenerationResponse]:
    """Generate from `prompt` (string, chat messages, token ids, or an `encode_prompt` result), yielding one
    response per token.

    Chat messages may hold images and audio as content parts (`{"type": "image", "image": "photo.jpg"}`: a path,
    bytes, a PIL image, a numpy array or a data: URL; `{"type": "audio", "audio": "clip.wav"}` on E2B/E4B), in
    any order among the text parts. A string gets the tokenizer's BOS prepended when the tokenizer does not add it (Gemma 4); chat messages are
    rendered by the checkpoint's own chat template; token ids are used as given. Generation stops at any EOS id
    of `config.json`, `generation_config.json` or the tokenizer (released Gemma 4: 1, 106, 50).

    Args:
        sampler: greedy when None. With a seed, the same call gives the same tokens every time, for every
            `num_draft_tokens` including "auto" (at T > 0 "auto" then chooses K from this generation's acceptance
            counts alone: no timings, nothing learned earlier).
        num_draft_tokens: MTP draft length: an int (0 = plain decoding), "auto", or None (= "auto" when the
            bundle has a drafter). Output is the target's own, with or without drafts. Batch size is 1.
        stop: a string or strings that end generation; the answer's text is cut before them.
        proposer: replaces the drafter as the source of drafts (benchmarks, oracle tests); needs an int
            `num_draft_tokens`.
        chat_template_kwargs: options for the chat template, e.g. `{"enable_thinking": True}` (Gemma 4 then
            thinks first: those deltas come with `channel="thought"`). Thinking is off unless asked for.
        prompt_cache: a `PromptCache` kept across the turns of a conversation: the longest common prefix with
            the previous request is reused and only the rest is prefilled (output identical to a fresh run).
        logprobs: report each token's log-probability under the target's distribution (its log-softmax, before
            temperature and filters) and this many most likely alternatives (0..20) in `response.logprobs`;
            drafted tokens get the verify pass's values, which are plain decoding's.
        json_schema: the answer must be JSON following this schema (`{"type": "object"}`: any JSON object),
            by constrained decoding (llguidance): the target's distribution restricted to what the schema allows
            next, with or without drafts (greedy MTP equals greedy plain decoding under the same schema).
    """
    options = GenerationOptions.of(bundle, max_tokens, sampler, num_draft_tokens, stop, prefill_step_size, proposer,
                                   prompt_cache, logprobs, json_schema)
    encoded = encode_prompt(bundle, prompt, chat_template_kwargs)
    _warn_past_context(bundle, len(encoded), max_tokens)
    release_streams_at_thread_exit()
    with bundle.exclusive():
        yield from _generate(bundle, encoded, options)


def _warn_past_context(bundle: Bundle, prompt_tokens: int, max_tokens: int) -> None:
    """The model was trained up to `max_position_embeddings`; past it output degrades (nothing breaks)."""
    limit = getattr(bundle.target.args, "max_position_embeddings", None)
    if limit and prompt_tokens + max_tokens > limit:
        where = "the prompt alone" if prompt_tokens > limit else "the prompt plus max_tokens"
        warnings.warn(f"{where} ({prompt_tokens} + {max_tokens} tokens) exceeds the model's "
                      f"max_position_embeddings={limit}; output past it is unreliable", stacklevel=3)


def _generate(bundle: Bundle, prompt: EncodedPrompt, options: GenerationOptions) -> Iterator[GenerationResponse]:
    sampler, prompt_cache, max_tokens = options.sampler, options.prompt_cache, options.max_tokens
    if sampler.seed is not None:
        mx.random.seed(sampler.seed)
    elif not sampler.greedy and bundle.state.lockstep is not None:
        mx.random.seed(bundle.state.lockstep.shared_seed())  # the ranks of a sharded target draw the same numbers
    stats = DraftStats() if options.num_draft_tokens != 0 else None
    eos = set(eos_ids(bundle))
    ids = prompt.ids
    text = TextStream(bundle.tokenizer, list(options.stop), bundle.special.channels)
    text.resume(ids)  # a prompt may leave a thought open
    mx.reset_peak_memory()
    tic = time.perf_counter()
    prompt_tps = n = 0
    tokens = on_stream(_tokens(bundle, prompt, options, stats), generation_stream)  # on generation's own stream
    received = prompt.keys()  # what the prompt cache holds afterwards: media content-keyed
    with _kept_in(prompt_cache, received), wired_limit(bundle.target, bundle.drafter, streams=[generation_stream]):
        for n, (token, from_draft, scores) in enumerate(tokens, start=1):
            received.append(token)
            if n == 1:
                prefilled = len(ids) - (prompt_cache.reused if prompt_cache is not None else 0)
                prompt_tps, tic = prefilled / (time.perf_counter() - tic), time.perf_counter()
            is_eos = token in eos
            channel, delta, stopped = text.add(None if is_eos else token)
            finish = "stop" if is_eos or stopped else "length" if n >= max_tokens else None
            if finish:
                delta += text.flush(stopped)
            elapsed = max(time.perf_counter() - tic, 1e-9)
            yield GenerationResponse(delta, token, from_draft, finish, len(ids), prompt_tps, n, n / elapsed,
                                     mx.get_peak_memory() / 1e9, stats, channel, scores)
            if finish:
                break
            if n % 256 == 0:
                mx.clear_cache()


def eos_ids(bundle: Bundle) -> list[int]:
    """Every id generation stops at: config.json's, generation_config.json's and the tokenizer's."""
    ids = set(bundle.generation.eos_token_ids) | set(getattr(bundle.tokenizer, "eos_token_ids", None) or [])
    return sorted(ids)


@contextlib.contextmanager
def _kept_in(prompt_cache: PromptCache | None, received: list[int]):
    """After a generation (finished, or closed by the caller) the prompt cache holds the prompt and what the caller
    received; after a failure its state is unknown, so it is dropped (the next request prefills afresh)."""
    if prompt_cache is None:
        yield
        return
    try:
        yield
    except GeneratorExit:
        prompt_cache.record(received)
        raise
    except BaseException:
        prompt_cache.reset()
        raise
    prompt_cache.record(received)


def generate(bundle: Bundle, prompt: Prompt, **kwargs) -> str:
    """The generated answer (same arguments as `stream_generate`); with thinking on, without the thought."""
    return "".join(r.text for r in stream_generate(bundle, prompt, **kwargs) if r.channel == ANSWER)
