"""The OpenAI-compatible server: the official client against a live server on 127.0.0.1 (tiny pair, no
network), and raw HTTP for what a client library would never send."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import live_server
import pytest

import mlx_gemma_mtp
from mlx_gemma_mtp.decode import GenerationResponse
from mlx_gemma_mtp.server import http as server_module
from mlx_gemma_mtp.server import make_server
from mlx_gemma_mtp.server.protocol import Completion, delta_of

openai = pytest.importorskip("openai")

MESSAGES = [{"role": "user", "content": "def speculative(draft, verify):"}]
PROMPT = "for i in range(10):\n"


@pytest.fixture(scope="module")
def served(pair_dir):
    bundle = mlx_gemma_mtp.load(pair_dir("e2b")[0])
    yield from live_server.serving(bundle, model_name="tiny", num_draft_tokens=2)


@pytest.fixture(scope="module")
def client(served):
    yield from live_server.client_of(served)


def expected(bundle, prompt, **kwargs) -> list[GenerationResponse]:
    return list(mlx_gemma_mtp.stream_generate(bundle, prompt, num_draft_tokens=2, **kwargs))


def raw(served, method: str, path: str, body: bytes | str | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", served[0].server_address[1], timeout=30)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_chat_greedy_equals_generate_with_usage_and_mtp_stats(served, client):
    bundle = served[1]
    want = expected(bundle, MESSAGES, max_tokens=12)
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == "".join(x.text for x in want)
    assert r.choices[0].message.content == mlx_gemma_mtp.generate(bundle, MESSAGES, max_tokens=12)
    assert r.choices[0].finish_reason == want[-1].finish_reason
    assert r.object == "chat.completion" and r.model == "tiny"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (want[-1].prompt_tokens, len(want))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    mtp = r.usage.model_extra["mtp"]
    assert set(mtp) == {"drafting_rounds", "plain_steps", "drafted", "accepted", "mean_accepted_length"}
    assert mtp["drafting_rounds"] >= 1
    assert 0 <= mtp["accepted"] <= mtp["drafted"] <= 2 * mtp["drafting_rounds"]  # K=2 (less at the end)


def test_chat_streaming_equals_generate(served, client):
    bundle = served[1]
    want = expected(bundle, MESSAGES, max_tokens=10)
    chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "".join(x.text for x in want)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == want[-1].finish_reason
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want)


def test_completions_greedy_streaming_and_not(served, client):
    bundle = served[1]
    want = expected(bundle, PROMPT, max_tokens=9)
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=9, temperature=0)
    assert r.choices[0].text == "".join(x.text for x in want) and r.object == "text_completion"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (want[-1].prompt_tokens, len(want))
    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=9, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason


def test_stop_string_and_max_completion_tokens(served, client):
    bundle = served[1]
    full = mlx_gemma_mtp.generate(bundle, MESSAGES, max_tokens=12)
    stop = full[3:5]
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_completion_tokens=12,
                                       temperature=0, stop=[stop])
    assert r.choices[0].message.content == mlx_gemma_mtp.generate(bundle, MESSAGES, max_tokens=12, stop=stop)
    assert r.choices[0].finish_reason == "stop" and stop not in r.choices[0].message.content


def test_seeded_sampling_is_reproducible(client):
    kwargs = {"model": "tiny", "messages": MESSAGES, "max_tokens": 8, "temperature": 1.0, "top_p": 0.9,
              "seed": 3}
    a, b = (client.chat.completions.create(**kwargs).choices[0].message.content for _ in range(2))
    assert a == b


def test_models_and_health(served, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert raw(served, "GET", "/health") == (200, {"status": "ok"})


def test_requests_from_two_threads_take_turns(served, client):
    want = mlx_gemma_mtp.generate(served[1], MESSAGES, max_tokens=6)
    results = []

    def ask():
        r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, temperature=0)
        results.append(r.choices[0].message.content)

    threads = [threading.Thread(target=ask) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == [want, want]


@pytest.mark.parametrize("body, param", [
    ("{not json", None),
    (json.dumps([1, 2]), None),
    (json.dumps({"messages": []}), "messages"),
    (json.dumps({"messages": "hi"}), "messages"),
    (json.dumps({"messages": [{"content": "no role"}]}), "messages[0]"),
    (json.dumps({"messages": MESSAGES, "temperature": "hot"}), "temperature"),
    (json.dumps({"messages": MESSAGES, "max_tokens": "3"}), "max_tokens"),
    (json.dumps({"messages": MESSAGES, "max_tokens": 0}), "max_tokens"),
    (json.dumps({"messages": MESSAGES, "max_tokens": 4097}), "max_tokens"),  # the tiny target has 4096
    (json.dumps({"messages": MESSAGES, "top_p": 1.5}), "top_p"),
    (json.dumps({"messages": MESSAGES, "stream": "yes"}), "stream"),
    (json.dumps({"messages": MESSAGES, "stop": 3}), "stop"),
    (json.dumps({"messages": MESSAGES, "n": 2}), "n"),
])
def test_bad_chat_requests_get_openai_errors(served, body, param):
    status, reply = raw(served, "POST", "/v1/chat/completions", body)
    assert status == 400
    assert reply["error"]["type"] == "invalid_request_error" and reply["error"]["param"] == param
    assert reply["error"]["code"] is None and reply["error"]["message"]


def test_bad_completion_prompt_and_unknown_paths(served):
    status, reply = raw(served, "POST", "/v1/completions", json.dumps({"prompt": 5}))
    assert status == 400 and reply["error"]["param"] == "prompt"
    for method, path in (("GET", "/v1/nothing"), ("POST", "/v1/embeddings")):
        status, reply = raw(served, method, path, json.dumps({}) if method == "POST" else None)
        assert status == 404 and reply["error"]["type"] == "invalid_request_error"


def test_errors_keep_the_connection_usable(served):
    conn = http.client.HTTPConnection("127.0.0.1", served[0].server_address[1], timeout=30)
    try:
        conn.request("POST", "/v1/chat/completions", body="{")
        resp = conn.getresponse()
        assert resp.status == 400 and json.loads(resp.read())["error"]["param"] is None
        conn.request("POST", "/v1/chat/completions", body=json.dumps({"messages": MESSAGES, "max_tokens": 2}))
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read())["usage"]["completion_tokens"] <= 2
    finally:
        conn.close()


def test_failed_generation_is_a_500_and_the_server_keeps_serving(served, client, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")
        yield  # a generator, like stream_generate

    monkeypatch.setattr(server_module, "stream_generate", broken)
    status, reply = raw(served, "POST", "/v1/chat/completions", json.dumps({"messages": MESSAGES}))
    assert status == 500 and "boom" in reply["error"]["message"] and reply["error"]["type"] == "server_error"
    monkeypatch.undo()
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, temperature=0)
    assert r.choices[0].message.content == mlx_gemma_mtp.generate(served[1], MESSAGES, max_tokens=5)


def test_client_disconnecting_mid_stream_stops_generation_and_frees_the_lock(served, client):
    state = served[0].RequestHandlerClass.state
    before = state.disconnects
    body = json.dumps({"prompt": PROMPT, "max_tokens": 4000, "temperature": 1.0, "seed": 0, "stream": True})
    sock = socket.create_connection(("127.0.0.1", served[0].server_address[1]), timeout=30)
    sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
    received = b""
    while b"data: " not in received:  # the headers and the first event, then hang up
        chunk = sock.recv(4096)
        assert chunk, "the server closed the stream before any event"
        received += chunk
    sock.close()
    deadline = time.monotonic() + 60
    while state.disconnects == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert state.disconnects == before + 1
    assert not state.lock.locked()
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0)
    assert r.usage.completion_tokens <= 4


def test_thoughts_go_to_reasoning_content(served):
    def resp(text, channel, finish=None):
        return GenerationResponse(text, 0, False, finish, 3, 0.0, 1, 0.0, 0.0, None, channel)

    responses = [resp("hm", "thought"), resp("m.", "thought"), resp("Yes", "answer"),
                 resp("!", "answer", "stop")]
    whole = Completion(served[0].RequestHandlerClass.state, chat=True).whole(responses)
    message = {"role": "assistant", "content": "Yes!", "reasoning_content": "hmm."}
    assert whole["choices"][0]["message"] == message
    assert delta_of(responses[0], chat=True) == {"reasoning_content": "hm"}


def test_cli_lists_serve():
    from mlx_gemma_mtp import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["serve", "--help"])
    assert e.value.code == 0


def test_serve_command_starts_answers_and_stops_on_ctrl_c(pair_dir):
    import os
    import signal
    import subprocess
    import sys

    model = str(pair_dir("e2b")[0])
    command = [sys.executable, "-m", "mlx_gemma_mtp", "serve", "--model", model, "--port", "0"]
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = ""
        for _ in range(50):  # warnings may come first; "serving ... on http://host:port/v1" gives the port
            line = proc.stderr.readline()
            if line.startswith("serving") or not line:
                break
        assert line.startswith("serving"), line
        port = int(line.rsplit(":", 1)[1].split("/")[0])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200
        conn.close()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        proc.stderr.close()


def test_requests_on_new_connections_after_a_window_wrapping_answer():
    """Each request on its own connection runs on its own handler thread: the prompt cache it restores (sliding
    window snapshots taken while another thread generated) must be usable there. The demo pair (window 128),
    answers that wrap the window: the same request three times, then the next turn, each through a new official
    client, each equal to a fresh run."""
    from mlx_gemma_mtp.demo import demo_dtype, demo_path

    bundle = mlx_gemma_mtp.load(demo_path(), dtype=demo_dtype())
    server = make_server(bundle, "127.0.0.1", 0, model_name="demo")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    long = 2 * bundle.target.args.sliding_window + 40
    prompt = open(mlx_gemma_mtp.__file__.replace("__init__.py", "cache.py")).read()[:1500]
    try:
        for turn in range(4):
            url = f"http://127.0.0.1:{server.server_address[1]}/v1"
            with openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=120) as c:
                r = c.completions.create(model="demo", prompt=prompt, max_tokens=long, temperature=0)
            assert r.choices[0].text == mlx_gemma_mtp.generate(bundle, prompt, max_tokens=long), turn
            assert r.usage.completion_tokens == long, "the answer must wrap the window"
            if turn == 2:
                prompt += r.choices[0].text + "\n\n\ndef "
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
