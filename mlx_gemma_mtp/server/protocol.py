"""The OpenAI API's request and response shapes: requests parsed and checked (before the model's lock is taken, so a
bad request never waits or touches state), and the JSON objects of completions and their stream chunks."""

from __future__ import annotations

import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..decode import GenerationResponse
from ..load import Bundle
from ..logprobs import MAX_TOP_LOGPROBS
from ..prompt_cache import PromptCaches
from ..sampling import SamplerConfig
from .logprobs import chat_logprobs, completion_logprobs
from .tools import ToolCalls, ToolError, ToolRequest, tool_request_from

MAX_BODY_BYTES = 64 * 1024 * 1024  # images and audio come base64-encoded in the body


# Fields this server does not implement, with the values that mean "not used": anything else is a 400 naming the
# field (a client must never get a 200 that silently ignored what it asked for).
UNSUPPORTED = {
    "functions": (None, []), "function_call": (None, "none", "auto"),  # the deprecated form of `tools`
    "frequency_penalty": (None, 0, 0.0), "presence_penalty": (None, 0, 0.0), "repetition_penalty": (None, 1, 1.0),
    "logit_bias": (None, {}), "best_of": (None, 1), "echo": (None, False), "suffix": (None, ""),
    "guided_json": (None,), "guided_regex": (None,), "guided_choice": (None,), "guided_grammar": (None,),
}


class RequestError(ValueError):
    """A bad request: answered with status 400 (or `status`) and an OpenAI-style error body."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error",
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass
class ServerState:
    """What every request handler shares: the model, its prompt cache and the lock that makes it batch 1."""

    bundle: Bundle
    model_name: str  # the id /v1/models reports; requests may name it, or any of `aliases`
    num_draft_tokens: int | str | None = None
    default_max_tokens: int = 512
    prompt_caches: PromptCaches = field(default_factory=PromptCaches)  # a conversation's next turn reuses its K/V
    lock: threading.Lock = field(default_factory=threading.Lock)
    disconnects: int = 0  # requests whose client went away before the end (their generation was stopped)
    group: Any = None  # under mlx.launch: the ranks that follow every generation of this one (rank 0)
    aliases: tuple[str, ...] = ()  # other names a request may give `model` (the path the server was started with)
    allowed_origins: tuple[str, ...] = ()  # browser origins allowed by CORS ("*": any); localhost pages always
    stopping: threading.Event = field(default_factory=threading.Event)  # set at shutdown: generations end
    allow_local_media: bool = False  # image/audio parts may name files on this machine (serve --allow-local-media)
    # several requests at once (serve --max-concurrency > 1): their generations decode together; None: one at a time
    generator: Any = None
    cache_lock: threading.Lock = field(default_factory=threading.Lock)  # the prompt caches, across handler threads

    @property
    def max_tokens_cap(self) -> int | None:
        return getattr(self.bundle.target.args, "max_position_embeddings", None)


# ------------------------------------------------------------------------------------------------------------
# Request parsing: all is checked before the lock is taken, so a bad request never waits or touches state.
# ------------------------------------------------------------------------------------------------------------

def _number(body: dict, name: str, integer: bool = False):
    value = body.get(name)
    if value is None:
        return None
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise RequestError(f"'{name}' must be {'an integer' if integer else 'a number'}, got {value!r}", name)
    return value


def sampler_from(body: dict, state: ServerState) -> SamplerConfig:
    """OpenAI's fields over the checkpoint's generation defaults (temperature 1.0, OpenAI's, if none)."""
    defaults = state.bundle.generation
    temperature, top_p = _number(body, "temperature"), _number(body, "top_p")
    top_k, min_p, seed = _number(body, "top_k", True), _number(body, "min_p"), _number(body, "seed", True)
    if top_k == -1:  # vLLM's spelling of "off"
        top_k = 0
    try:
        return SamplerConfig(
            temperature=float(temperature if temperature is not None else (defaults.temperature or 1.0)),
            top_p=float(top_p if top_p is not None else (defaults.top_p or 1.0)),
            top_k=top_k if top_k is not None else (defaults.top_k or 0),
            min_p=float(min_p or 0.0),
            seed=seed,
        )
    except ValueError as e:
        found = re.search(r"SamplerConfig\.(\w+)=", str(e))
        raise RequestError(str(e), found.group(1) if found else None) from None


def max_tokens_from(body: dict, state: ServerState) -> int:
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    value = _number(body, name, integer=True)
    if value is None:
        value = state.default_max_tokens if state.max_tokens_cap is None else min(state.default_max_tokens,
                                                                                 state.max_tokens_cap)
    if value < 1:
        raise RequestError(f"'{name}' must be a positive integer, got {value}", name)
    if state.max_tokens_cap is not None and value > state.max_tokens_cap:
        raise RequestError(f"'{name}'={value} exceeds the model's context length "
                           f"({state.max_tokens_cap} tokens)", name)
    return value


def logprobs_from(body: dict, chat: bool) -> int | None:
    """How many alternatives a request wants with each token's log-probability (None: no logprobs)."""
    if not chat:  # completions: `logprobs` is the number of alternatives
        top = _number(body, "logprobs", integer=True)
        if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
            raise RequestError(f"'logprobs' must be 0..{MAX_TOP_LOGPROBS}, got {top}", "logprobs")
        return top
    wanted, top = body.get("logprobs"), _number(body, "top_logprobs", integer=True)
    if wanted not in (None, True, False):
        raise RequestError(f"'logprobs' must be a boolean, got {wanted!r}", "logprobs")
    if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
        raise RequestError(f"'top_logprobs' must be 0..{MAX_TOP_LOGPROBS}, got {top}", "top_logprobs")
    if top and not wanted:
        raise RequestError("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return (top or 0) if wanted else None


def stop_from(body: dict) -> list[str] | None:
    stop = body.get("stop")
    if stop is None:
        return None
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise RequestError(f"'stop' must be a non-empty string or a list of them, got {body.get('stop')!r}",
                           "stop")
    return stop


MEDIA_PARTS = ("image_url", "input_audio", "video_url", "image", "audio", "video")


def _content(content, i: int) -> str | list[dict]:
    """A message's content: a string, null, or a list of parts: text, `image_url` / `video_url` (vLLM's name; a
    data: URL, a local path only when the server allows it) and `input_audio` (base64 with its format). Text
    alone is joined."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list) or not all(isinstance(p, dict) for p in content):
        raise RequestError(f"messages[{i}].content must be a string or a list of content parts",
                           f"messages[{i}].content")
    for j, p in enumerate(content):
        if p.get("type") == "text" and isinstance(p.get("text"), str) or p.get("type") in MEDIA_PARTS:
            continue
        raise RequestError(f"messages[{i}].content[{j}] must be a text, image_url, video_url or input_audio part, got "
                           f"type {p.get('type')!r}", f"messages[{i}].content[{j}]")
    if all(p["type"] == "text" for p in content):
        return "".join(p["text"] for p in content)
    return content


def messages_from(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise RequestError("'messages' must be a list of {\"role\": ..., \"content\": ...} objects",
                           "messages")
    if not messages:
        raise RequestError("'messages' must not be empty", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError(f"messages[{i}] must be an object with a string 'role'", f"messages[{i}]")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": _content(m.get("content"), i)})
    return out


def prompt_from(body: dict) -> str | list[int]:
    """/v1/completions' prompt: a string, a list of one string, or token ids."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if (isinstance(prompt, list) and prompt
            and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt)):
        return prompt
    raise RequestError("'prompt' must be a string, a list of one string or a non-empty list of token ids "
                       "(one prompt per request)", "prompt")


def check_model(body: dict, state: ServerState) -> None:
    """A request names this server's model (or none): another name is a 404, as OpenAI answers it."""
    model = body.get("model")
    if not isinstance(model, (str, type(None))):
        raise RequestError("'model' must be a string", "model")
    if model and model not in (state.model_name, *state.aliases):
        raise RequestError(f"The model '{model}' does not exist: this server serves '{state.model_name}' "
                           f"(GET /v1/models lists it)", "model", status=404, code="model_not_found")


def refuse_unsupported(body: dict) -> None:
    """A 400 naming the first field this server would otherwise have to ignore."""
    for name, unused in UNSUPPORTED.items():
        value = body.get(name)
        if not any(value == u and type(value) is type(u) for u in unused):
            raise RequestError(f"'{name}' is not supported by this server (got {value!r:.80}); leave it out",
                               name)


def json_schema_from(body: dict) -> dict | None:
    """`response_format` as the JSON schema the answer must follow: json_object is any JSON object, json_schema
    gives its `schema`; "text" (or none) is free text."""
    spec = body.get("response_format")
    if spec is None or spec == {"type": "text"}:
        return None
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        schema = (spec.get("json_schema") or {}).get("schema") if isinstance(spec.get("json_schema"), dict) else None
        if not isinstance(schema, dict):
            raise RequestError("'response_format.json_schema.schema' must be a JSON schema object",
                               "response_format")
        return schema
    raise RequestError(f"'response_format' must be {{'type': 'text' | 'json_object' | 'json_schema'}}, got "
                       f"{spec!r:.80}", "response_format")


def parse_request(body: Any, state: ServerState, chat: bool) -> dict:
    """Keyword arguments for `stream_generate` plus `stream` / `include_usage` / `max_tokens_given` / `tools` (a
    `ToolRequest` or None), or a RequestError."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    check_model(body, state)
    refuse_unsupported(body)
    stream = body.get("stream", False)
    if not isinstance(stream, (bool, type(None))):
        raise RequestError(f"'stream' must be a boolean, got {stream!r}", "stream")
    n = _number(body, "n", integer=True)
    if n not in (None, 1):
        raise RequestError("only n=1 is supported (one generation per request)", "n")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError("'stream_options' must be an object", "stream_options")
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None and (not chat or not isinstance(kwargs, dict)):
        raise RequestError("'chat_template_kwargs' must be an object (chat completions only)",
                           "chat_template_kwargs")
    prompt = messages_from(body) if chat else prompt_from(body)
    try:
        tools = tool_request_from(body, prompt if chat else None)  # tool calls and results added to `prompt`
    except ToolError as e:
        raise RequestError(str(e), e.param) from None
    return {
        "prompt": prompt,
        "tools": tools,
        "max_tokens": max_tokens_from(body, state),
        "sampler": sampler_from(body, state),
        "stop": stop_from(body),
        "chat_template_kwargs": kwargs,
        "stream": bool(stream),
        "include_usage": bool(options.get("include_usage")),
        "max_tokens_given": body.get("max_completion_tokens", body.get("max_tokens")) is not None,
        "logprobs": logprobs_from(body, chat),
        "json_schema": json_schema_from(body),
    }


def fit_context(prompt_tokens: int, request: dict, state: ServerState, chat: bool) -> None:
    """The prompt and the answer must fit the model's context (OpenAI's 400 otherwise); a default `max_tokens`
    is cut to what is left instead."""
    limit = state.max_tokens_cap
    if limit is None:
        return
    if prompt_tokens >= limit:
        raise RequestError(f"the prompt is {prompt_tokens} tokens; this model's context is {limit} tokens "
                           f"(max_position_embeddings): shorten the prompt", "messages" if chat else "prompt")
    room = limit - prompt_tokens
    if request["max_tokens"] > room:
        if request["max_tokens_given"]:
            raise RequestError(f"this model's context is {limit} tokens: {prompt_tokens} in the prompt leave "
                               f"{room} for the answer, and max_tokens asks for {request['max_tokens']}",
                               "max_tokens")
        request["max_tokens"] = room


# ------------------------------------------------------------------------------------------------------------
# Response shapes
# ------------------------------------------------------------------------------------------------------------

def usage(last: GenerationResponse, cached: int = 0) -> dict:
    """OpenAI's usage (`cached`: prompt tokens the prompt cache held), with the MTP statistics under "mtp"."""
    out = {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.generation_tokens,
           "total_tokens": last.prompt_tokens + last.generation_tokens,
           "prompt_tokens_details": {"cached_tokens": cached}}
    if (d := last.draft) is not None:
        out["mtp"] = {"drafting_rounds": d.rounds, "plain_steps": d.plain_rounds, "drafted": d.drafted,
                      "accepted": d.accepted, "mean_accepted_length": round(d.mean_accepted_length, 4)}
    return out


def collect(responses: list[GenerationResponse]) -> tuple[str, str]:
    """(answer, thought) of a whole generation."""
    answer = "".join(r.text for r in responses if r.channel != "thought")
    thought = "".join(r.text for r in responses if r.channel == "thought")
    return answer, thought


def delta_of(r: GenerationResponse, chat: bool) -> dict:
    if not chat:
        return {"text": r.text}
    return {"reasoning_content" if r.channel == "thought" else "content": r.text}


class Completion:
    """Builds the JSON objects of one request (ids and timestamps shared by all its chunks)."""

    def __init__(self, state: ServerState, chat: bool, tools: ToolRequest | None = None):
        self.chat, self.model = chat, state.model_name
        self.tools = ToolCalls(tools) if tools is not None and tools.offered else None  # splits calls from text
        self.cached = 0  # prompt tokens the prompt cache held, known once generation starts
        tokenizer = state.bundle.tokenizer
        self.token_text = (lambda t: tokenizer.decode([t])) if tokenizer is not None else str
        self.text_length = 0  # text already sent (completions' text_offset)
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def _object(self, kind: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def logprobs(self, responses: list[GenerationResponse]) -> dict | None:
        """The `logprobs` of a choice for these tokens (None when the request asked for none)."""
        if not responses or responses[0].logprobs is None:
            return None
        if self.chat:
            return chat_logprobs(responses, self.token_text)
        out = completion_logprobs(responses, self.token_text, self.text_length)
        self.text_length = out["text_offset"][-1] + len(out["tokens"][-1])
        return out

    def whole(self, responses: list[GenerationResponse]) -> dict:
        last = responses[-1]
        answer, thought = collect(responses)
        choice = {"index": 0, "finish_reason": last.finish_reason, "logprobs": self.logprobs(responses)}
        if self.chat:
            message = {"role": "assistant", "content": answer}
            if self.tools is not None:
                message.update(self.tools.message(answer, last.finish_reason))
                choice["finish_reason"] = self.tools.finish_reason(last.finish_reason)
            if thought:
                message["reasoning_content"] = thought
            return self._object("chat.completion", [{**choice, "message": message}], usage=usage(last, self.cached))
        return self._object("text_completion", [{**choice, "text": answer}], usage=usage(last, self.cached))

    def chunk(self, delta: dict, finish_reason: str | None = None, tokens: list | None = None, **extra) -> dict:
        """A stream chunk; `tokens`: the responses whose logprobs it carries."""
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        if self.tools is not None:
            finish_reason = self.tools.finish_reason(finish_reason)
        choice = {"index": 0, "finish_reason": finish_reason, "logprobs": self.logprobs(tokens or [])}
        choice.update({"delta": delta} if self.chat else delta)
        return self._object(kind, [choice], **extra)

    def deltas(self, r: GenerationResponse) -> list[dict]:
        """A response's stream deltas: its text, or with tools the content and each call once complete."""
        if self.tools is not None:
            return self.tools.deltas(r)
        return [delta_of(r, self.chat)] if r.text else []

    def usage_chunk(self, last: GenerationResponse) -> dict:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return self._object(kind, [], usage=usage(last, self.cached))


