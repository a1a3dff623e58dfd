"""What real clients hit: browsers (CORS), clients that give up, unknown models, fields we do not implement,
prompts past the context, usage counted once, a server stopped mid-generation, and zero-setup serving."""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import mlx.core as mx
import pytest
from live_server import start, stop

import mlx_gemma_mtp
from mlx_gemma_mtp.cli.options import DEMO_NAME, load_model, model_name

openai = pytest.importorskip("openai")

MESSAGES = [{"role": "user", "content": "def speculative(draft, verify):"}]
PROMPT = "for i in range(10):\n"
# the demo pair continues code for thousands of tokens before an EOS: a generation that runs long
LONG = {"prompt": "import os\n\n\ndef walk(top):\n", "max_tokens": 4000, "temperature": 0}


@pytest.fixture(scope="module")
def served(pair_dir):
    bundle = mlx_gemma_mtp.load(pair_dir("e2b")[0])
    server, thread = start(bundle, model_name="tiny", num_draft_tokens=2, aliases=("/some/path/tiny",),
                           allowed_origins=("http://app.example:3000",))
    yield server, bundle
    stop(server, thread)


@pytest.fixture(scope="module")
def demo():
    from mlx_gemma_mtp.demo import demo_dtype, demo_path

    return mlx_gemma_mtp.load(demo_path(), dtype=demo_dtype())


@pytest.fixture(scope="module")
def client(served):
    port = served[0].server_address[1]
    with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=60) as c:
        yield c


def request(served, method: str, path: str, body=None, headers=None) -> tuple[int, dict, dict]:
    """(status, headers, JSON body or {}) of one request on its own connection."""
    conn = http.client.HTTPConnection("127.0.0.1", served[0].server_address[1], timeout=60)
    try:
        data = json.dumps(body) if isinstance(body, dict) else body
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, dict(resp.headers), json.loads(raw) if raw else {}
    finally:
        conn.close()


def hang_up_after_sending(served, body: dict) -> None:
    """Send a non-streaming request and close the connection at once, as a client that timed out does."""
    data = json.dumps(body)
    sock = socket.create_connection(("127.0.0.1", served[0].server_address[1]), timeout=30)
    sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n{data}".encode())
    time.sleep(0.3)  # the generation has started
    sock.close()


def wait_for(predicate, seconds: float) -> float:
    """Seconds until `predicate()` held (fails the test after `seconds`)."""
    tic = time.monotonic()
    while not predicate():
        assert time.monotonic() - tic < seconds, "timed out"
        time.sleep(0.02)
    return time.monotonic() - tic


# ---- usage ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("include_usage", [True, False])
def test_usage_comes_once_per_stream(client, include_usage):
    options = {"include_usage": True} if include_usage else None
    chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, temperature=0,
                                                 stream=True, stream_options=options))
    with_usage = [c for c in chunks if c.usage is not None]
    assert len(with_usage) == 1 and with_usage[0].usage.completion_tokens <= 6
    assert (with_usage[0].choices == []) == include_usage  # its own chunk when asked for, else the finishing one


# ---- CORS -------------------------------------------------------------------------------------------------------

def test_cors_preflight_and_headers_for_allowed_origins(served):
    asked = {"Origin": "http://app.example:3000", "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization, content-type"}
    status, headers, _ = request(served, "OPTIONS", "/v1/chat/completions", headers=asked)
    assert status == 204 and headers["Access-Control-Allow-Origin"] == "http://app.example:3000"
    assert "POST" in headers["Access-Control-Allow-Methods"]
    assert headers["Access-Control-Allow-Headers"] == "authorization, content-type"
    status, headers, body = request(served, "POST", "/v1/chat/completions",
                                    {"messages": MESSAGES, "max_tokens": 2}, {"Origin": "http://app.example:3000"})
    assert status == 200 and headers["Access-Control-Allow-Origin"] == "http://app.example:3000"
    status, headers, _ = request(served, "GET", "/v1/models", headers={"Origin": "http://localhost:5173"})
    assert headers["Access-Control-Allow-Origin"] == "http://localhost:5173"  # this machine's pages: always


def test_cors_refuses_other_origins(served):
    status, _, body = request(served, "OPTIONS", "/v1/chat/completions",
                              headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert status == 403 and "--allowed-origins" in body["error"]["message"]
    status, headers, _ = request(served, "GET", "/v1/models", headers={"Origin": "http://evil.example"})
    assert status == 200 and "Access-Control-Allow-Origin" not in headers  # the browser hides the answer


# ---- models and fields ----------------------------------------------------------------------------------------------

def test_unknown_model_is_a_404_like_openai(served, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=2)
    assert e.value.body["code"] == "model_not_found" and "'tiny'" in e.value.body["message"]
    for name in ("tiny", "/some/path/tiny"):  # the served name and the path the server was started with
        assert client.completions.create(model=name, prompt=PROMPT, max_tokens=2).usage.completion_tokens <= 2
    assert request(served, "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 2})[0] == 200  # no model


@pytest.mark.parametrize("field, value", [
    ("functions", [{"name": "f", "parameters": {}}]),  # the deprecated form of `tools`
    ("function_call", {"name": "f"}),
    ("response_format", {"type": "grammar"}),
    ("frequency_penalty", 0.5),
    ("presence_penalty", -1),
    ("logit_bias", {"5": 10}),
])
def test_unsupported_fields_are_a_400_naming_them(served, field, value):
    status, _, body = request(served, "POST", "/v1/chat/completions",
                              {"messages": MESSAGES, "max_tokens": 2, field: value})
    assert status == 400 and body["error"]["param"] == field and body["error"]["message"]


def test_tools_need_gemma4_tool_support_and_neutral_values_are_accepted(served):
    tool = [*MESSAGES, {"role": "tool", "tool_call_id": "1", "content": "42"}]  # answers no call
    status, _, body = request(served, "POST", "/v1/chat/completions", {"messages": tool})
    assert status == 400 and body["error"]["param"] == "messages[1].tool_call_id"
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]  # this tokenizer has no tool tokens
    status, _, body = request(served, "POST", "/v1/chat/completions", {"messages": MESSAGES, "tools": tools})
    assert status == 400 and body["error"]["param"] == "tools" and "tool tokens" in body["error"]["message"]
    neutral = {"messages": MESSAGES, "max_tokens": 2, "frequency_penalty": 0, "tools": [],
               "tool_choice": "none", "response_format": {"type": "text"}, "presence_penalty": 0.0}
    assert request(served, "POST", "/v1/chat/completions", neutral)[0] == 200


def test_prompt_past_the_context_is_a_400_naming_the_limit(served):
    limit = served[1].target.args.max_position_embeddings
    status, _, body = request(served, "POST", "/v1/completions", {"prompt": [5] * (limit + 3), "max_tokens": 1})
    assert status == 400 and body["error"]["param"] == "prompt" and f"context is {limit} tokens" in \
        body["error"]["message"]
    status, _, body = request(served, "POST", "/v1/completions", {"prompt": [5] * (limit - 10), "max_tokens": 20})
    assert status == 400 and body["error"]["param"] == "max_tokens" and "leave 10" in body["error"]["message"]
    status, _, body = request(served, "POST", "/v1/completions", {"prompt": [5] * (limit - 3)})  # default: cut
    assert status == 200 and body["usage"]["completion_tokens"] <= 3


# ---- clients that leave, servers that stop -----------------------------------------------------------------------

def test_a_non_streaming_client_that_hangs_up_stops_its_generation(demo):
    server, thread = start(demo)
    try:
        state = server.RequestHandlerClass.state
        hang_up_after_sending((server,), LONG)
        assert wait_for(lambda: state.disconnects == 1, 30) < 2.0  # within a round, not after 4000 tokens
        wait_for(lambda: not state.lock.locked(), 5)
        status, _, body = request((server,), "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 2})
        assert status == 200 and body["usage"]["completion_tokens"] <= 2
    finally:
        stop(server, thread)


def test_closing_the_server_ends_a_running_generation(demo):
    server, thread = start(demo)
    port = server.server_address[1]
    result = {}

    def ask():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        try:
            conn.request("POST", "/v1/completions", json.dumps(LONG), {"Content-Type": "application/json"})
            result["status"] = conn.getresponse().status
        except (ConnectionError, http.client.HTTPException) as e:
            result["error"] = e
        finally:
            conn.close()

    asking = threading.Thread(target=ask)
    asking.start()
    state = server.RequestHandlerClass.state
    wait_for(state.lock.locked, 30)
    time.sleep(0.2)
    tic = time.monotonic()
    stop(server, thread)
    assert time.monotonic() - tic < 2.0  # within a round, not after 4000 tokens
    asking.join(timeout=10)
    assert not asking.is_alive() and result.get("status") != 200


def test_sigterm_stops_serve_mid_generation():
    """`serve` with no setup (the demo pair), stopped by SIGTERM while it generates."""
    command = [sys.executable, "-m", "mlx_gemma_mtp", "serve", "--port", "0"]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=os.environ | {"PYTHONUNBUFFERED": "1"})
    try:
        line = ""
        for _ in range(50):
            line = proc.stderr.readline()
            if line.startswith("serving") or not line:
                break
        assert line.startswith(f"serving {DEMO_NAME} on"), line
        port = int(line.rsplit(":", 1)[1].split("/")[0])
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        data = json.dumps(LONG)
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n\r\n{data}"
                     .encode())
        time.sleep(1.0)  # generating
        tic = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert time.monotonic() - tic < 3.0
        sock.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---- zero setup, names, dtype -----------------------------------------------------------------------------------

def test_the_demo_pair_serves_completions_and_says_why_chat_is_refused(demo):
    bundle = demo
    server, thread = start(bundle, model_name=DEMO_NAME)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        with openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=60) as c:
            r = c.completions.create(model=DEMO_NAME, prompt="import os\n", max_tokens=8, temperature=0)
            assert r.choices[0].text == mlx_gemma_mtp.generate(bundle, "import os\n", max_tokens=8)
            with pytest.raises(openai.BadRequestError, match="no chat template"):
                c.chat.completions.create(model=DEMO_NAME, messages=MESSAGES, max_tokens=2)
    finally:
        stop(server, thread)


def test_model_names_and_dtype_flags(pair_dir, tmp_path):
    folder = pair_dir("e2b")[0]

    def args(**kw):
        return argparse.Namespace(**({"model": None, "draft": None, "dtype": None, "served_model_name": None}
                                     | kw))

    assert model_name(args(model=str(folder))) == folder.name
    assert model_name(args(model="google/gemma-4-E2B-it")) == "google/gemma-4-E2B-it"  # a hub id as given
    assert model_name(args(model=str(folder), served_model_name="mine")) == "mine"
    assert model_name(args()) == DEMO_NAME
    bundle = load_model(args(model=str(folder), dtype="float16"))
    assert bundle.target.model.embed_tokens.weight.dtype == mx.float16
    assert bundle.drafter.pre_projection.weight.dtype == mx.float16


# ---- many conversations -------------------------------------------------------------------------------------

def test_alternating_conversations_each_keep_their_cache(demo):
    """Two conversations take turns: each turn reuses its own conversation's K/V (cached_tokens), and every answer
    equals a fresh run. With one entry they push each other out."""
    from mlx_gemma_mtp.prompt_cache import PromptCaches

    source = open(mlx_gemma_mtp.__file__.replace("__init__.py", "sampling.py")).read()
    starts = [source[:900], source[3000:3900]]
    for entries, expect_reuse in ((2, True), (1, False)):
        server, thread = start(demo, prompt_caches=PromptCaches(entries))
        try:
            prompts, cached = list(starts), []
            for turn in range(4):
                i = turn % 2
                status, _, body = request((server,), "POST", "/v1/completions",
                                          {"prompt": prompts[i], "max_tokens": 24, "temperature": 0})
                assert status == 200
                assert body["choices"][0]["text"] == mlx_gemma_mtp.generate(demo, prompts[i], max_tokens=24)
                cached.append(body["usage"]["prompt_tokens_details"]["cached_tokens"])
                prompts[i] += body["choices"][0]["text"] + "\n# next\n"
            assert cached[:2] == [0, 0]
            if expect_reuse:
                assert all(c > 200 for c in cached[2:]), cached  # the conversation's previous prompt and answer
            else:
                assert cached[2:] == [0, 0], cached
        finally:
            stop(server, thread)


def test_prompt_caches_evict_the_least_recently_used_by_count_and_bytes(demo):
    from mlx_gemma_mtp.prompt_cache import PromptCaches

    caches = PromptCaches(max_entries=2)
    a, b, c = ([7 + i] * 50 for i in range(3))
    for ids in (a, b):
        mlx_gemma_mtp.generate(demo, ids, max_tokens=2, prompt_cache=caches.for_prompt(ids))
    first = caches.entries[0]
    mlx_gemma_mtp.generate(demo, a + [9], max_tokens=2, prompt_cache=caches.for_prompt(a + [9]))  # a continues
    assert caches.entries[-1] is first and len(caches.entries) == 2
    entry = caches.for_prompt(c)  # a third conversation: b's place (least recently used)
    assert entry is not first and len(caches.entries) == 2 and entry.tokens == []
    mlx_gemma_mtp.generate(demo, c, max_tokens=2, prompt_cache=entry)
    caches.max_bytes = entry.nbytes + 1  # room for one conversation only
    caches.trim()
    assert caches.entries == [entry] and entry.nbytes > 0
    with pytest.raises(ValueError, match="max_entries=0"):
        PromptCaches(0)


# ---- logprobs -------------------------------------------------------------------------------------------------

def test_chat_logprobs_equal_generates_and_stream_the_same(served, client):
    bundle = served[1]
    want = list(mlx_gemma_mtp.stream_generate(bundle, MESSAGES, 8, num_draft_tokens=2, logprobs=3))
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, temperature=0,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == len(want)
    for entry, w in zip(content, want):
        assert entry.logprob == pytest.approx(w.logprobs.logprob, abs=1e-6)
        assert entry.token == bundle.tokenizer.decode([w.token]) and entry.bytes == list(entry.token.encode())
        assert [t.token for t in entry.top_logprobs] == [bundle.tokenizer.decode([t]) for t, _ in w.logprobs.top]
    chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, temperature=0,
                                                 logprobs=True, top_logprobs=3, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    plain = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, temperature=0)
    assert plain.choices[0].logprobs is None


def test_completion_logprobs_in_the_legacy_shape(served, client):
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    assert all(len(top) <= 2 and max(top.values()) >= lp.token_logprobs[i] - 1e-6
               for i, top in enumerate(lp.top_logprobs))
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]


@pytest.mark.parametrize("body, param", [
    ({"logprobs": "yes"}, "logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
])
def test_bad_logprobs_requests(served, body, param):
    status, _, reply = request(served, "POST", "/v1/chat/completions", {"messages": MESSAGES, **body})
    assert status == 400 and reply["error"]["param"] == param
