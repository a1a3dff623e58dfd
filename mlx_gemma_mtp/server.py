"""`mlx-gemma-mtp serve`: an OpenAI-compatible HTTP server over the public API (load, stream_generate).

Endpoints: `POST /v1/chat/completions`, `POST /v1/completions` (JSON, or server-sent events with
`"stream": true`), `GET /v1/models`, `GET /health`. Request and response shapes follow OpenAI's API reference;
`usage` adds the MTP draft statistics (`usage.mtp`), and a Gemma 4 thought goes to `reasoning_content` (vLLM's
and DeepSeek's name).

The HTTP layer is the standard library's `ThreadingHTTPServer`: the model generates for one request at a time
(batch size 1, a lock around generation; later requests wait their turn), so an async framework would buy no
concurrency and would add a runtime dependency. One `PromptCache` is kept across requests, so each turn of a
growing conversation prefills only what is new (another conversation shares a shorter prefix and prefills the
rest; the output is always a fresh run's). A client that disconnects mid-stream makes the next write fail,
which closes its generator and releases the lock.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import socket
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .decode import GenerationResponse, stream_generate
from .distributed import broadcast_json, distributed_group
from .load import Bundle
from .prompt_cache import PromptCache
from .sampling import SamplerConfig

MAX_BODY_BYTES = 16 * 1024 * 1024
DISCONNECTED = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)


class RequestError(ValueError):
    """A bad request: answered with status 400 (or `status`) and an OpenAI-style error body."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


@dataclass
class ServerState:
    """What every request handler shares: the model, its prompt cache and the lock that makes it batch 1."""

    bundle: Bundle
    model_name: str
    num_draft_tokens: int | str | None = None
    default_max_tokens: int = 512
    prompt_cache: PromptCache = field(default_factory=PromptCache)
    lock: threading.Lock = field(default_factory=threading.Lock)
    disconnects: int = 0  # streams whose client went away before the end (their generation was stopped)
    group: Any = None  # under mlx.launch: the ranks that follow every generation of this one (rank 0)

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


def stop_from(body: dict) -> list[str] | None:
    stop = body.get("stop")
    if stop is None:
        return None
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise RequestError(f"'stop' must be a non-empty string or a list of them, got {body.get('stop')!r}",
                           "stop")
    return stop


def _text_content(content, i: int) -> str:
    """A message's content: a string, null, or a list of {"type": "text", "text": ...} parts (text only)."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise RequestError(f"messages[{i}].content must be a string or a list of text parts (this server is "
                       f"text-only)", f"messages[{i}].content")


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
        out.append({"role": role, "content": _text_content(m.get("content"), i)})
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


def parse_request(body: Any, state: ServerState, chat: bool) -> dict:
    """Keyword arguments for `stream_generate` plus `stream` / `include_usage`, or a RequestError."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    if not isinstance(body.get("model", ""), (str, type(None))):
        raise RequestError("'model' must be a string", "model")
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
    return {
        "prompt": messages_from(body) if chat else prompt_from(body),
        "max_tokens": max_tokens_from(body, state),
        "sampler": sampler_from(body, state),
        "stop": stop_from(body),
        "chat_template_kwargs": kwargs,
        "stream": bool(stream),
        "include_usage": bool(options.get("include_usage")),
    }


# ------------------------------------------------------------------------------------------------------------
# Response shapes
# ------------------------------------------------------------------------------------------------------------

def usage(last: GenerationResponse) -> dict:
    out = {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.generation_tokens,
           "total_tokens": last.prompt_tokens + last.generation_tokens}
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

    def __init__(self, state: ServerState, chat: bool):
        self.chat, self.model = chat, state.model_name
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def _object(self, kind: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def whole(self, responses: list[GenerationResponse]) -> dict:
        last = responses[-1]
        answer, thought = collect(responses)
        if self.chat:
            message = {"role": "assistant", "content": answer}
            if thought:
                message["reasoning_content"] = thought
            choice = {"index": 0, "message": message, "finish_reason": last.finish_reason, "logprobs": None}
            return self._object("chat.completion", [choice], usage=usage(last))
        choice = {"index": 0, "text": answer, "finish_reason": last.finish_reason, "logprobs": None}
        return self._object("text_completion", [choice], usage=usage(last))

    def chunk(self, delta: dict, finish_reason: str | None = None, **extra) -> dict:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        choice = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
        choice.update({"delta": delta} if self.chat else delta)
        return self._object(kind, [choice], **extra)

    def usage_chunk(self, last: GenerationResponse) -> dict:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return self._object(kind, [], usage=usage(last))


# ------------------------------------------------------------------------------------------------------------
# HTTP
# ------------------------------------------------------------------------------------------------------------

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "mlx-gemma-mtp"
    timeout = 120  # seconds a client may stall while sending or receiving before its connection is dropped
    state: ServerState  # set on the subclass made by make_server

    def do_GET(self):  # http.server's naming
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/health":
            self.send_json(200, {"status": "ok"})
        elif path == "/v1/models":
            model = {"id": self.state.model_name, "object": "model", "created": 0,
                     "owned_by": "mlx-gemma-mtp"}
            self.send_json(200, {"object": "list", "data": [model]})
        else:
            self.not_found()

    def do_POST(self):
        path = self.path.split("?", 1)[0].rstrip("/")
        if path not in ("/v1/chat/completions", "/v1/completions"):
            try:
                self.read_body()  # keeps the connection's framing intact for the next request
            except RequestError:
                self.close_connection = True
            self.not_found()
            return
        chat = path.endswith("chat/completions")
        try:
            request = parse_request(self.read_json(), self.state, chat)
        except RequestError as e:
            self.send_json(e.status, error_body(str(e), e.param))
            return
        self.complete(request, chat)

    def not_found(self):
        self.send_json(404, error_body(f"no such endpoint: {self.command} {self.path}"))

    def read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True  # the unread body would be taken for the next request
            raise RequestError("chunked request bodies are not supported; send Content-Length", status=411)
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self.close_connection = True
            raise RequestError("bad Content-Length header") from None
        if length < 0 or length > MAX_BODY_BYTES:
            self.close_connection = True
            raise RequestError(f"the request body must be 0..{MAX_BODY_BYTES} bytes", status=413)
        return self.rfile.read(length)

    def read_json(self) -> Any:
        raw = self.read_body()
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(f"the request body is not valid JSON: {e}") from None

    def send_json(self, status: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except DISCONNECTED:
            self.close_connection = True

    def complete(self, request: dict, chat: bool) -> None:
        stream, include_usage = request.pop("stream"), request.pop("include_usage")
        self._streaming = False  # True once SSE headers are out: an error can then only end the stream
        completion = Completion(self.state, chat)
        with self.state.lock:  # batch 1: one generation at a time, the prompt cache is used by one request
            if self.state.group is not None:  # the other ranks run the same generation (`follow`)
                broadcast_json(self.state.group, {**request, "sampler": asdict(request["sampler"])})
            responses = stream_generate(self.state.bundle, num_draft_tokens=self.state.num_draft_tokens,
                                        prompt_cache=self.state.prompt_cache, **request)
            try:
                first = next(responses)  # errors in the prompt (template, ids) surface here, before headers
            except ValueError as e:
                self.send_json(400, error_body(str(e)))
                return
            except Exception as e:  # noqa: BLE001  a failed generation leaves the bundle intact: keep serving
                self.fail(e)
                return
            try:
                if stream:
                    self.stream(completion, first, responses, include_usage)
                else:
                    self.send_json(200, completion.whole([first, *responses]))
            except Exception as e:  # noqa: BLE001  (as above, once generating)
                self.fail(e)
            finally:
                if self.state.group is not None:  # the other ranks generate to the end: so must this one
                    _drain(responses)
                responses.close()

    def stream(self, completion: Completion, first: GenerationResponse,
               responses: Iterator[GenerationResponse], include_usage: bool) -> None:
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = self._streaming = True
            if completion.chat:
                self.send_event(completion.chunk({"role": "assistant", "content": ""}))
            last = first
            for last in _chain(first, responses):
                if last.text:
                    self.send_event(completion.chunk(delta_of(last, completion.chat)))
            # the usage (with MTP stats) rides on the finishing chunk too, for clients that do not ask
            self.send_event(completion.chunk({} if completion.chat else {"text": ""}, last.finish_reason,
                                             usage=usage(last)))
            if include_usage:
                self.send_event(completion.usage_chunk(last))
            self.wfile.write(b"data: [DONE]\n\n")
        except DISCONNECTED:
            self.state.disconnects += 1
            self.log_message("client went away mid-stream; generation stopped")

    def send_event(self, obj: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")

    def fail(self, e: Exception) -> None:
        self.log_message("generation failed: %s", "".join(traceback.format_exception(e)))
        if self._streaming:
            self.close_connection = True  # mid-stream: the client sees the stream end without [DONE]
            return
        self.send_json(500, error_body(f"generation failed: {type(e).__name__}: {e}", kind="server_error"))


def _drain(responses: Iterator[GenerationResponse]) -> None:
    with contextlib.suppress(Exception):  # a failure was reported already; the generator is closed after
        for _ in responses:
            pass


def follow(state: ServerState) -> None:
    """A rank other than 0 of a sharded server: run every generation rank 0 announces, to its end (a client's
    disconnect does not stop a sharded generation early: every rank must leave it at the same token)."""
    while True:
        request = broadcast_json(state.group)
        request["sampler"] = SamplerConfig(**request["sampler"])
        responses = stream_generate(state.bundle, num_draft_tokens=state.num_draft_tokens,
                                    prompt_cache=state.prompt_cache, **request)
        with contextlib.suppress(ValueError):  # a bad prompt fails on rank 0 alike, before any collective
            _drain(responses)


def _chain(first: GenerationResponse, rest: Iterator[GenerationResponse]) -> Iterator[GenerationResponse]:
    yield first
    for r in rest:  # noqa: UP028  `yield from` would close `rest` with a chain dropped when its client left
        yield r


class Server(ThreadingHTTPServer):
    """A thread per connection. Threads are not daemons, and `server_close()` hangs up on open connections and
    joins their threads: MLX aborts the process at exit if a thread that generated is killed, not ended."""

    daemon_threads = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()

    def process_request(self, request, client_address):
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def server_close(self):
        with self._open_lock:
            open_now = list(self._open)
        for sock in open_now:  # idle keep-alive readers wake up with EOF; a stream's next write fails
            with contextlib.suppress(OSError):  # the client may have closed it already
                sock.shutdown(socket.SHUT_RDWR)
        super().server_close()


def make_server(bundle: Bundle, host: str = "127.0.0.1", port: int = 8080, model_name: str | None = None,
                num_draft_tokens: int | str | None = None, max_tokens: int = 512) -> Server:
    """A server over `bundle` (not started: call `serve_forever()`, and `shutdown()` from another thread).

    Args:
        port: 0 picks a free port (read it back from `server.server_address[1]`).
        model_name: the id `/v1/models` reports (default: the checkpoint folder's name).
        num_draft_tokens: as in `stream_generate` (None = "auto" when the bundle has a drafter).
        max_tokens: used when a request gives neither `max_tokens` nor `max_completion_tokens`.
    """
    state = ServerState(bundle, model_name or bundle.path.name, num_draft_tokens, max_tokens)
    handler = type("BoundHandler", (Handler,), {"state": state})
    return Server((host, port), handler)


def add_serve_parser(sub) -> None:
    from .cli import _draft_tokens

    p = sub.add_parser("serve",
                       help="an OpenAI-compatible HTTP server (chat/completions, completions, models)")
    p.add_argument("--model", required=True, help="local folder or hub id of a Gemma 4 checkpoint or bundle")
    p.add_argument("--draft", default=None, help="folder or hub id of the matching gemma4_assistant drafter")
    p.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1 (this machine only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--num-draft-tokens", type=_draft_tokens, default=None,
                   help="draft length K, 0 for plain decoding, or 'auto' (default when a drafter is loaded)")
    p.add_argument("--max-tokens", type=int, default=512, help="for requests that give no max_tokens")
    p.set_defaults(func=run_serve)


def run_serve(args) -> None:
    from . import load

    group = distributed_group()  # under mlx.launch: rank 0 serves, the others follow its generations
    if group is None:
        bundle = load(args.model, draft=args.draft)
    else:
        from .distributed_load import load_sharded

        bundle = load_sharded(args.model, args.draft, group)
        if group.rank() != 0:
            follow(ServerState(bundle, args.model, args.num_draft_tokens, args.max_tokens, group=group))
    server = make_server(bundle, args.host, args.port, args.model, args.num_draft_tokens, args.max_tokens)
    server.RequestHandlerClass.state.group = group
    host, port = server.server_address[:2]
    print(f"serving {args.model} on http://{host}:{port}/v1 (Ctrl-C stops)", file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        server.server_close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mlx-gemma-mtp serve")
    add_serve_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    args.func(args)


if __name__ == "__main__":
    main()
