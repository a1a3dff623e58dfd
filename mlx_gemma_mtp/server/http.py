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

import contextlib
import json
import select
import socket
import threading
import traceback
from collections.abc import Iterator
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from ..batching import BatchGenerator
from ..decode import GenerationResponse, stream_generate
from ..distributed.group import broadcast_json
from ..load import Bundle
from ..prompt import EncodedPrompt
from ..prompt_cache import PromptCaches
from ..sampling import SamplerConfig
from .protocol import (
    MAX_BODY_BYTES,
    Completion,
    RequestError,
    ServerState,
    error_body,
    fit_context,
    parse_request,
    usage,
)
from .tools import encode_with_tools

DISCONNECTED = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)


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
        elif path == "":  # `/`: the web chat page, one static file (read per request: a few kB)
            from importlib.resources import files

            page = (files(__package__) / "static" / "chat.html").read_bytes()
            try:
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(page)))
                self.end_headers()
                self.wfile.write(page)
            except DISCONNECTED:
                self.close_connection = True
        else:
            self.not_found()

    def do_OPTIONS(self):
        """A browser's CORS preflight: allowed origins get the methods and headers they ask for."""
        origin = self.headers.get("Origin")
        if origin is None or self.allowed_origin(origin) is None:
            self.send_json(403, error_body(f"origin {origin!r} is not allowed: start the server with "
                                           f"--allowed-origins {origin or 'ORIGIN'} (or '*')"))
            return
        self.send_response(204)
        self.send_cors_headers()
        self.send_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
        asked = self.headers.get("Access-Control-Request-Headers")
        self.send_header("Access-Control-Allow-Headers", asked or "Authorization, Content-Type")
        self.send_header("Access-Control-Max-Age", "600")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def allowed_origin(self, origin: str) -> str | None:
        """The value of Access-Control-Allow-Origin for `origin`, None when it may not read our answers. Pages
        served from this machine (localhost, 127.0.0.1) always may; others as `--allowed-origins` says."""
        allowed = self.state.allowed_origins
        host = origin.split("://", 1)[-1].rsplit(":", 1)[0]
        if "*" in allowed:
            return "*"
        if origin in allowed or host in ("localhost", "127.0.0.1", "[::1]"):
            return origin
        return None

    def send_cors_headers(self) -> None:
        origin = self.headers.get("Origin")
        if origin is not None and (value := self.allowed_origin(origin)) is not None:
            self.send_header("Access-Control-Allow-Origin", value)
            self.send_header("Vary", "Origin")

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
            request["prompt"] = self.token_ids(request, chat)
        except RequestError as e:
            self.send_json(e.status, error_body(str(e), e.param, code=e.code))
            return
        self.complete(request, chat)

    def token_ids(self, request: dict, chat: bool) -> EncodedPrompt:
        """The encoded prompt (images and audio decoded and processed), counted against the model's context
        before the model is taken."""
        try:
            encoded = encode_with_tools(self.state.bundle, request["prompt"], request.pop("chat_template_kwargs"),
                                        request["tools"], self.state.allow_local_media)
        except ValueError as e:  # a ToolError names its field
            raise RequestError(str(e), getattr(e, "param", None) or ("messages" if chat else "prompt")) from None
        if encoded.spans and self.state.group is not None:
            raise RequestError("images and audio are not supported by a sharded (mlx.launch) server yet; serve "
                               "the model on one machine", "messages")
        fit_context(len(encoded), request, self.state, chat)
        return encoded

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
            self.send_cors_headers()
            self.end_headers()
            self.wfile.write(data)
        except DISCONNECTED:
            self.close_connection = True

    def complete(self, request: dict, chat: bool) -> None:
        stream, include_usage = request.pop("stream"), request.pop("include_usage")
        del request["max_tokens_given"]
        self._streaming = False  # True once SSE headers are out: an error can then only end the stream
        completion = Completion(self.state, chat, request.pop("tools"))
        # a batch takes every request but one under a JSON schema (its grammar needs the model to itself)
        batched = self.state.generator is not None and request["json_schema"] is None
        generator = self.state.generator
        alone = generator.hold() if generator is not None and not batched else contextlib.nullcontext()
        with alone, contextlib.nullcontext() if batched else self.state.lock:  # alone: one generation at a time
            if self.state.stopping.is_set():  # queued behind a generation while the server was stopping
                self.send_json(503, error_body("the server is shutting down", kind="server_error"))
                return
            if self.state.group is not None:  # the other ranks run the same generation (`follow`)
                broadcast_json(self.state.group, {**request, "prompt": request["prompt"].ids,
                                                  "sampler": asdict(request["sampler"])})
            with self.state.cache_lock:
                cache = self.state.prompt_caches.for_prompt(request["prompt"].keys())
            if batched:
                responses = self.state.generator.submit(request["prompt"], request["max_tokens"], request["sampler"],
                                                        request["stop"], prompt_cache=cache,
                                                        logprobs=request["logprobs"])
            else:
                responses = stream_generate(self.state.bundle, num_draft_tokens=self.state.num_draft_tokens,
                                            prompt_cache=cache, **request)
            try:
                first = next(responses)  # errors in the prompt (template, ids) surface here, before headers
                completion.cached = cache.reused
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
                    self.answer_whole(completion, first, responses)
            except Exception as e:  # noqa: BLE001  (as above, once generating)
                self.fail(e)
            finally:
                if self.state.group is not None:  # the other ranks generate to the end: so must this one
                    _drain(responses)
                responses.close()
                with self.state.cache_lock:
                    self.state.prompt_caches.trim()

    def answer_whole(self, completion: Completion, first: GenerationResponse,
                     responses: Iterator[GenerationResponse]) -> None:
        """A non-streaming answer; a client that hangs up (or a server that stops) ends the generation within a
        round instead of letting it run to max_tokens."""
        received = [first]
        for r in _chain(first, responses):
            if r is not first:
                received.append(r)
            if r.finish_reason is None and self.abandoned():
                self.state.disconnects += 1
                self.close_connection = True
                self.log_message("client went away (or the server is stopping); generation stopped")
                return
        self.send_json(200, completion.whole(received))

    def abandoned(self) -> bool:
        """Whether the client closed its connection (EOF is readable; a pipelined next request is not EOF) or the
        server is stopping: a non-blocking peek, a syscall per check."""
        if self.state.stopping.is_set():
            return True
        sock = self.connection
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False
        try:
            return sock.recv(1, socket.MSG_PEEK) == b""
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True

    def stream(self, completion: Completion, first: GenerationResponse,
               responses: Iterator[GenerationResponse], include_usage: bool) -> None:
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.send_cors_headers()
            self.end_headers()
            self.close_connection = self._streaming = True
            if completion.chat:
                self.send_event(completion.chunk({"role": "assistant", "content": ""}))
            last, pending = first, []  # pending: tokens not sent yet (no text of their own), for their logprobs
            for last in _chain(first, responses):
                if self.state.stopping.is_set():
                    raise BrokenPipeError("the server is stopping")
                pending.append(last)
                for delta in completion.deltas(last):  # none while text is held back (a tool call's)
                    self.send_event(completion.chunk(delta, tokens=pending))
                    pending = []
            # usage (with MTP stats) once: in its own chunk when asked for, else on the finishing chunk
            extra = {} if include_usage else {"usage": usage(last, completion.cached)}
            end = {} if completion.chat else {"text": ""}
            self.send_event(completion.chunk(end, last.finish_reason, tokens=pending, **extra))
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
                                    prompt_cache=state.prompt_caches.for_prompt(request["prompt"]), **request)
        with contextlib.suppress(ValueError):  # a bad prompt fails on rank 0 alike, before any collective
            _drain(responses)
        state.prompt_caches.trim()


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
        state = self.RequestHandlerClass.state
        state.stopping.set()  # running generations end within a round
        if state.generator is not None:
            state.generator.stop()
        with self._open_lock:
            open_now = list(self._open)
        for sock in open_now:  # idle keep-alive readers wake up with EOF; a stream's next write fails
            with contextlib.suppress(OSError):  # the client may have closed it already
                sock.shutdown(socket.SHUT_RDWR)
        super().server_close()


def make_server(bundle: Bundle, host: str = "127.0.0.1", port: int = 8080, model_name: str | None = None,
                num_draft_tokens: int | str | None = None, max_tokens: int = 512, aliases: tuple[str, ...] = (),
                allowed_origins: tuple[str, ...] = (), prompt_caches: PromptCaches | None = None,
                allow_local_media: bool = False, max_concurrency: int = 1) -> Server:
    """A server over `bundle` (not started: call `serve_forever()`, and `shutdown()` from another thread).

    Args:
        port: 0 picks a free port (read it back from `server.server_address[1]`).
        model_name: the id `/v1/models` reports (default: the checkpoint folder's name); requests naming another
            model (not in `aliases`) get a 404.
        num_draft_tokens: as in `stream_generate` (None = "auto" when the bundle has a drafter).
        max_tokens: used when a request gives neither `max_tokens` nor `max_completion_tokens`.
        allowed_origins: browser origins (e.g. "http://example.com:3000", or "*") whose pages may call the API;
            pages from this machine always may.
        prompt_caches: the conversations' K/V kept between requests (default: `PromptCaches()`, 4 entries).
        allow_local_media: let image/audio parts name files on this machine (default: data: URLs only).
        max_concurrency: requests decoded together (continuous batching, exact MTP per request); 1: one at a
            time. Requests with a JSON schema always run alone, between batches.
    """
    if not isinstance(max_concurrency, int) or max_concurrency < 1:
        raise ValueError(f"max_concurrency={max_concurrency!r}: must be a positive integer")
    state = ServerState(bundle, model_name or bundle.path.name, num_draft_tokens, max_tokens, aliases=aliases,
                        allowed_origins=allowed_origins, prompt_caches=prompt_caches or PromptCaches(),
                        allow_local_media=allow_local_media)
    if max_concurrency > 1:
        state.generator = BatchGenerator(bundle, max_concurrency, num_draft_tokens).start()
    handler = type("BoundHandler", (Handler,), {"state": state})
    return Server((host, port), handler)
