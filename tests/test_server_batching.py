"""`serve --max-concurrency N`: concurrent requests decode together, each answer equal to its solo answer at
temperature 0, each stream independent of the others (a disconnect, an error, a stop string); requests with a
JSON schema or log-probabilities run alone between batches."""

from __future__ import annotations

import json
import threading

import pytest
from live_server import client_of, serving

import mlx_gemma_mtp

QUESTIONS = ["Hello there", "the quick brown fox", "for i in range", "def walk(top):", "abc abc abc", "one two"]


@pytest.fixture(scope="module")
def served(pair_dir):
    bundle = mlx_gemma_mtp.load(pair_dir("e2b")[0])
    yield from serving(bundle, model_name="tiny", num_draft_tokens=2, max_concurrency=4)


@pytest.fixture(scope="module")
def client(served):
    yield from client_of(served)


def messages(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


def solo(bundle, question: str, max_tokens: int) -> str:
    return mlx_gemma_mtp.generate(bundle, messages(question), max_tokens=max_tokens, num_draft_tokens=2)


def concurrently(fn, n: int) -> list:
    results, errors = [None] * n, []

    def run(i):
        try:
            results[i] = fn(i)
        except Exception as e:  # noqa: BLE001  reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    return results


def test_four_concurrent_streams_each_equal_their_solo_answer(served, client):
    server, bundle = served

    def ask(i):
        stream = client.chat.completions.create(model="tiny", messages=messages(QUESTIONS[i]), max_tokens=12,
                                                temperature=0, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    answers = concurrently(ask, 4)
    assert answers == [solo(bundle, q, 12) for q in QUESTIONS[:4]]
    times = server.RequestHandlerClass.state.generator.draft_length.times
    assert any(rows > 1 for _, rows in times), "the requests never decoded together"


def test_more_requests_than_rows_and_a_disconnect(served, client):
    server, bundle = served
    import http.client

    def ask(i):
        if i == 0:  # opens a stream, reads a little, hangs up
            conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=60)
            body = {"messages": messages(QUESTIONS[0]), "max_tokens": 200, "stream": True, "temperature": 0}
            conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                         headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            response.fp.readline()
            conn.close()
            return None
        r = client.chat.completions.create(model="tiny", messages=messages(QUESTIONS[i]), max_tokens=10,
                                           temperature=0)
        return r.choices[0].message.content

    answers = concurrently(ask, 6)
    assert answers[1:] == [solo(bundle, q, 10) for q in QUESTIONS[1:6]]


def test_a_json_schema_request_runs_alone_between_batches(served, client):
    _, bundle = served
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}

    def ask(i):
        if i == 0:
            r = client.chat.completions.create(
                model="tiny", messages=messages("json"), max_tokens=30, temperature=0,
                response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
            return r.choices[0].message.content
        r = client.chat.completions.create(model="tiny", messages=messages(QUESTIONS[i]), max_tokens=8,
                                           temperature=0)
        return r.choices[0].message.content

    answers = concurrently(ask, 3)
    assert answers[1:] == [solo(bundle, q, 8) for q in QUESTIONS[1:3]]
    expected = mlx_gemma_mtp.generate(bundle, messages("json"), max_tokens=30, num_draft_tokens=2,
                                      json_schema=schema)
    assert answers[0] == expected


def test_a_bad_request_among_good_ones_fails_alone(served, client):
    import openai

    _, bundle = served

    def ask(i):
        if i == 0:
            with pytest.raises(openai.BadRequestError):
                client.chat.completions.create(model="tiny", max_tokens=4, messages=[
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}])
            return None
        r = client.chat.completions.create(model="tiny", messages=messages(QUESTIONS[i]), max_tokens=6,
                                           temperature=0, stop=["e"] if i == 1 else None)
        return r.choices[0].message.content

    answers = concurrently(ask, 3)
    assert answers[1] == mlx_gemma_mtp.generate(bundle, messages(QUESTIONS[1]), max_tokens=6, num_draft_tokens=2,
                                                stop=["e"])
    assert answers[2] == solo(bundle, QUESTIONS[2], 6)


def test_max_concurrency_is_checked(pair_dir):
    from mlx_gemma_mtp.server import make_server

    bundle = mlx_gemma_mtp.load(pair_dir("e2b")[0])
    with pytest.raises(ValueError, match="max_concurrency"):
        make_server(bundle, port=0, max_concurrency=0)


def test_logprobs_come_from_the_batch_too(served, client):
    _, bundle = served

    def ask(i):
        r = client.chat.completions.create(model="tiny", messages=messages(QUESTIONS[i]), max_tokens=6,
                                           temperature=0, logprobs=True, top_logprobs=2)
        return [t.logprob for t in r.choices[0].logprobs.content]

    got = concurrently(ask, 2)
    for i, logprobs in enumerate(got):
        want = list(mlx_gemma_mtp.stream_generate(bundle, messages(QUESTIONS[i]), max_tokens=6, num_draft_tokens=2,
                                                  logprobs=2))
        assert len(want) == len(logprobs)
        assert all(abs(w.logprobs.logprob - lp) < 1e-4 for w, lp in zip(want, logprobs))
