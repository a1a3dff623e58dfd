"""Tool calling in `serve`, in Gemma 4's own format: the call parser against the strings the released template
writes (verbatim from ollama's golden renderings and parser tests), the template's renderings parsed back, and
the official client against a live server (tiny random pair, Google's E2B template): declarations in the
prompt, a forced call, a scripted well-formed call parsed into `tool_calls` (whole and streamed), the result sent
back and answered, and the errors that name their field."""

from __future__ import annotations

import http.client
import json
import shutil
import threading

import live_server
import pytest
from conftest import GEMMA4_EOS, write_gemma4_tokenizer

import mlx_gemma_mtp
from mlx_gemma_mtp.decode import GenerationResponse
from mlx_gemma_mtp.server import http as server_module
from mlx_gemma_mtp.server import make_server
from mlx_gemma_mtp.server.tools import ToolCalls, ToolRequest, parse_call
from mlx_gemma_mtp.textstream import TextStream

openai = pytest.importorskip("openai")

Q = '<|"|>'  # Gemma 4's string delimiter (one token, id 52)
TOOL_RESPONSE, CALL_END = 50, 49  # <|tool_response> ends the model's turn after its calls (a stop id)
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City"}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Get the time",
                                         "parameters": {"type": "object", "properties": {}}}}
# the declaration as Google's template renders WEATHER (compare ollama's `bashDeclRef` and `weatherDeclRef`)
WEATHER_DECLARATION = (f"<|tool>declaration:get_weather{{description:{Q}Get the weather{Q},parameters:{{properties:"
                       f"{{city:{{description:{Q}City{Q},type:{Q}STRING{Q}}}}},required:[{Q}city{Q}],"
                       f"type:{Q}OBJECT{Q}}}}}<tool|>")
MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]


# ---- the parser, on the strings Gemma 4 writes ------------------------------------------------------------------

@pytest.mark.parametrize("text, name, arguments", [  # ollama model/parsers/gemma4_test.go, verbatim
    ('call:get_weather{location:<|"|>Paris<|"|>,units:<|"|>metric<|"|>}', "get_weather",
     {"location": "Paris", "units": "metric"}),
    ("call:set_temp{value:42}", "set_temp", {"value": 42}),
    ("call:toggle{enabled:true}", "toggle", {"enabled": True}),
    ("call:set_optional{value:null,nested:{value:null}}", "set_optional", {"value": None, "nested": {"value": None}}),
    ('call:process{config:{enabled:true,name:<|"|>test<|"|>}}', "process", {"config": {"enabled": True, "name": "test"}}),
    ('call:process{items:[<|"|>a<|"|>,<|"|>b "quoted"<|"|>,<|"|>c<|"|>]}', "process", {"items": ["a", 'b "quoted"', "c"]}),
    ('call:bash{command:<|"|>date\n<|"|>}', "bash", {"command": "date\n"}),
    ('call:search{query:<|"|>say \\"hello\\"<|"|>}', "search", {"query": 'say \\"hello\\"'}),
    ('call:open_file{path:<|"|>C:\\users\\bob\\file.txt<|"|>}', "open_file", {"path": "C:\\users\\bob\\file.txt"}),
    ('call:plan{steps:[{title:<|"|>step "one"<|"|>,done:false},{title:<|"|>step \\"two\\"<|"|>,done:true}]}', "plan",
     {"steps": [{"title": 'step "one"', "done": False}, {"title": 'step \\"two\\"', "done": True}]}),
    ('call:search{query:"raw \\"quoted\\"",note:<|"|>gemma "quoted"<|"|>}', "search",
     {"query": 'raw "quoted"', "note": 'gemma "quoted"'}),
    ('call:get_current_temperature{detail_level:0,location:<|"|>Paris, France<|"|>,unit:<|"|>celsius<|"|>}',
     "get_current_temperature", {"detail_level": 0, "location": "Paris, France", "unit": "celsius"}),
    ('call:edit{edits:[\n  {newText:<|"|>a\n<|"|>,\n   oldText:<|"|>b<|"|>}\n]}', "edit",
     {"edits": [{"newText": "a\n", "oldText": "b"}]}),
    # ollama model/renderers/gemma4_reference_test.go: what the template writes for past calls
    ('call:configure{config:{db:{host:<|"|>localhost<|"|>,port:5432}}}', "configure",
     {"config": {"db": {"host": "localhost", "port": 5432}}}),
    ('call:batch{ids:[<|"|>a<|"|>,1,true]}', "batch", {"ids": ["a", 1, True]}),
    ("call:bash{}", "bash", {}),
    ("call:x{a:-1.5,b:2e-07,c:[],d:{}}", "x", {"a": -1.5, "b": 2e-07, "c": [], "d": {}}),
])
def test_calls_in_gemma4_format_parse(text, name, arguments):
    assert parse_call(text) == (name, arguments)


@pytest.mark.parametrize("text", [
    'call:bash{command:<|"|>ls}',  # an unterminated string (ollama repairs this; we keep the text)
    "call:f{a:1", "call:f{a:1}}", "call:f", "call:{a:1}", "f{a:1}", "call:f{a 1}", "call:f{a:1,,b:2}",
    "call:f{a:tru}", "call:f{a:1}garbage", "call:f{" + "[" * 500, "call:f{a:" + "{a:" * 300 + "1" + "}" * 301,
    "", "call:f{a:<|\"|>x<|\"|>,b:\"unterminated}",
])
def test_malformed_calls_are_none_not_errors(text):
    assert parse_call(text) is None


def rendered_call(bundle, arguments: dict) -> str:
    """What Google's template writes for a past call with these arguments (between the call markers)."""
    messages = [{"role": "user", "content": "Go"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": arguments}}]}]
    text = bundle.tokenizer.apply_chat_template(messages, tokenize=False, enable_thinking=False)
    return text.split("<|tool_call>", 1)[1].split("<tool_call|>", 1)[0]


@pytest.mark.parametrize("arguments", [
    {"city": "Paris"},
    {"text": 'a "quoted", {braced}: [list] text\nwith lines', "empty": "", "unicode": "naïve café ☕"},
    {"n": 0, "neg": -7, "big": 12345678901234567890, "f": 2.5, "tiny": 1e-07, "huge": 1.5e300},
    {"yes": True, "no": False, "nothing": None},
    {"nested": {"deeper": {"list": [1, "two", [3.0, {"four": None}]]}}, "z": [], "o": {}},
])
def test_the_templates_renderings_parse_back(bundle, arguments):
    text = rendered_call(bundle, arguments)
    assert text.startswith("call:f{")
    assert parse_call(text) == ("f", arguments)


def split(text: str, request: ToolRequest, finish: str = "stop", by_char: bool = True):
    """(content pieces joined, calls) of `text` fed to ToolCalls one character at a time, or at once."""
    calls = ToolCalls(request)
    pieces = [p for ch in text for p in calls.feed(ch)] if by_char else calls.feed(text)
    pieces += calls.feed("", finish)
    content = "".join(p for p in pieces if isinstance(p, str))
    return content, [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls.calls], calls


AUTO = ToolRequest([WEATHER, TIME])
TWO_CALLS = (f"Let me check. \n<|tool_call>call:get_weather{{city:{Q}Paris{Q}}}<tool_call|>\n"
             f"<|tool_call>call:get_time{{zone:{Q}CET{Q},utc:true}}<tool_call|>")


def test_content_and_calls_are_split_the_same_streamed_or_whole():
    for by_char in (True, False):
        content, calls, stream = split(TWO_CALLS, AUTO, by_char=by_char)
        assert content == "Let me check."
        assert calls == [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET", "utc": True})]
        assert stream.finish_reason("stop") == "tool_calls"
    content, calls, _ = split("Plain <|tool text, no call < at all.  ", AUTO)  # a partial marker is text
    assert (content, calls) == ("Plain <|tool text, no call < at all.  ", [])
    content, calls, _ = split("<|tool_call>call:get_time{}<tool_call|>\n Done.", AUTO)  # space by calls is not
    assert (content, calls) == ("Done.", [("get_time", {})])


def test_cut_off_and_garbled_calls_stay_text():
    opened = f"Sure.<|tool_call>call:get_weather{{city:{Q}Par"
    content, calls, stream = split(opened, AUTO, finish="length")  # max_tokens ran out inside the call
    assert (content, calls, stream.finish_reason("length")) == ("Sure." + opened[5:], [], "length")
    garbled = f"<|tool_call>call:get_weather{{city:{Q}x}}<tool_call|> and on"
    content, calls, stream = split(garbled, AUTO)
    assert (content, calls, stream.finish_reason("stop")) == (garbled, [], "stop")
    # the model ended its turn (<|tool_response>) before closing the call: what it wrote is whole (ollama's case)
    unclosed = f'<|tool_call>call:search{{query:{Q}say "hello" and "bye"{Q}}}'
    assert split(unclosed, AUTO)[1] == [("search", {"query": 'say "hello" and "bye"'})]


def test_forced_opening_and_single_calls():
    named = ToolRequest([WEATHER], "function", "get_weather")
    assert named.forced == "<|tool_call>call:get_weather{"
    assert split(f"city:{Q}Oslo{Q}}}<tool_call|>", named)[1] == [("get_weather", {"city": "Oslo"})]
    assert ToolRequest([WEATHER], "required").forced == "<|tool_call>call:"
    assert not ToolRequest([WEATHER], "none").offered and ToolRequest([WEATHER], "none").forced == ""
    content, calls, _ = split(TWO_CALLS, ToolRequest([WEATHER, TIME], parallel=False))
    assert (content, calls) == ("Let me check.", [("get_weather", {"city": "Paris"})])


# ---- a live server: Google's E2B template over the tiny pair ----------------------------------------------------

@pytest.fixture(scope="module")
def bundle(pair_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("gemma4-tools")
    shutil.copytree(pair_dir("e2b")[0], path, dirs_exist_ok=True)
    write_gemma4_tokenizer(path, "upstream")
    generation = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**generation, "eos_token_id": GEMMA4_EOS}))
    return mlx_gemma_mtp.load(path)


@pytest.fixture(scope="module")
def served(bundle):
    yield from live_server.serving(bundle, model_name="tiny", num_draft_tokens=2)


@pytest.fixture(scope="module")
def client(served):
    yield from live_server.client_of(served)


@pytest.fixture
def prompts(monkeypatch):
    """The prompt ids of each generation the server runs (the real generation runs)."""
    seen, real = [], server_module.stream_generate

    def spy(bundle, prompt, **kwargs):
        seen.append(list(prompt.ids))  # the server passes the encoded prompt
        return real(bundle, prompt, **kwargs)

    monkeypatch.setattr(server_module, "stream_generate", spy)
    return seen


@pytest.fixture
def script(monkeypatch):
    """script(answer): the server's next generations write `answer`, then <|tool_response>, through the real
    detokenizer (special tokens' text as the real one gives it); returns the prompts they were given."""
    seen = []

    def install(answer: str):
        def generate(bundle, prompt, max_tokens, **_):
            seen.append(list(prompt.ids))
            ids = [*bundle.tokenizer.encode(answer, add_special_tokens=False), TOOL_RESPONSE]
            text = TextStream(bundle.tokenizer, [], bundle.special.channels)
            for n, token in enumerate(ids[:max_tokens], start=1):
                channel, delta, _ = text.add(None if token == TOOL_RESPONSE else token)
                finish = "stop" if token == TOOL_RESPONSE else "length" if n == max_tokens else None
                delta += text.flush(False) if finish else ""
                yield GenerationResponse(delta, token, False, finish, len(prompt), 0.0, n, 0.0, 0.0, None, channel)

        monkeypatch.setattr(server_module, "stream_generate", generate)
        return seen

    return install


def post(served, body: dict, path: str = "/v1/chat/completions") -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", served[0].server_address[1], timeout=60)
    try:
        conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def text_of(bundle, ids: list[int]) -> str:
    return bundle.tokenizer.decode(ids)


def test_declarations_are_rendered_by_the_template(served, client, prompts):
    bundle = served[1]
    client.chat.completions.create(model="tiny", messages=MESSAGES, tools=[WEATHER, TIME], max_tokens=1)
    prompt = text_of(bundle, prompts[-1])
    get_time = f"<|tool>declaration:get_time{{description:{Q}Get the time{Q},parameters:{{type:{Q}OBJECT{Q}}}}}<tool|>"
    assert prompt == (f"<bos><|turn>system\n{WEATHER_DECLARATION}{get_time}<turn|>\n"
                      f"<|turn>user\nWeather in Paris?<turn|>\n<|turn>model\n")
    assert bundle.tokenizer.encode(Q, add_special_tokens=False) == [52]
    client.chat.completions.create(model="tiny", messages=MESSAGES, tools=[WEATHER], tool_choice="none", max_tokens=1)
    assert "<|tool>" not in text_of(bundle, prompts[-1])  # "none": the model is not shown the tools


def test_a_forced_call_cut_by_max_tokens_comes_back_as_text(served, client, prompts):
    bundle = served[1]
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=[WEATHER], max_tokens=5,
                                       temperature=0, tool_choice={"type": "function",
                                                                   "function": {"name": "get_weather"}})
    prompt = prompts[-1]
    assert text_of(bundle, prompt).endswith("<|turn>model\n<|tool_call>call:get_weather{")
    want = list(mlx_gemma_mtp.stream_generate(bundle, prompt, max_tokens=5, num_draft_tokens=2))
    assert CALL_END not in [w.token for w in want], "the random model closed the call: pick another prompt"
    choice = r.choices[0]
    assert choice.finish_reason == want[-1].finish_reason == "length" and choice.message.tool_calls is None
    assert choice.message.content == "<|tool_call>call:get_weather{" + "".join(w.text for w in want)
    client.chat.completions.create(model="tiny", messages=MESSAGES, tools=[WEATHER], tool_choice="required",
                                   max_tokens=1)
    assert text_of(bundle, prompts[-1]).endswith("<|turn>model\n<|tool_call>call:")


def test_round_trip_call_result_answer(served, client, script, monkeypatch):
    bundle = served[1]
    scripted = script(f"city:{Q}Paris{Q}}}<tool_call|>")  # the model's side of a forced call
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=[WEATHER], temperature=0,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert text_of(bundle, scripted[-1]).endswith("<|turn>model\n<|tool_call>call:get_weather{")
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}

    monkeypatch.undo()  # the real model answers the result
    seen, real = [], server_module.stream_generate
    monkeypatch.setattr(server_module, "stream_generate",
                        lambda b, prompt, **kw: seen.append(list(prompt.ids)) or real(b, prompt, **kw))
    result = {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C"}
    answer = client.chat.completions.create(model="tiny", messages=[*MESSAGES, choice.message, result],
                                            tools=[WEATHER], max_tokens=4, temperature=0)
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert isinstance(answer.choices[0].message.content, str) and answer.choices[0].message.tool_calls is None
    # the template's own rendering: the call, its result, and the model goes on in the same turn
    assert text_of(bundle, seen[-1]).endswith(
        f"<|turn>user\nWeather in Paris?<turn|>\n<|turn>model\n<|tool_call>call:get_weather{{city:{Q}Paris{Q}}}"
        f"<tool_call|><|tool_response>response:get_weather{{value:{Q}Sunny, 21 C{Q}}}<tool_response|>")


def test_streamed_calls_come_as_tool_call_deltas(served, client, script):
    script(TWO_CALLS)
    kwargs = {"model": "tiny", "messages": MESSAGES, "tools": [WEATHER, TIME]}
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == "Let me check."
    assert not any("<|" in (d.content or "") for d in deltas)
    calls = [tc for d in deltas for tc in d.tool_calls or []]
    assert [(c.index, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        (0, "get_weather", {"city": "Paris"}), (1, "get_time", {"zone": "CET", "utc": True})]
    assert len({c.id for c in calls}) == 2 and all(c.type == "function" for c in calls)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    whole = client.chat.completions.create(**kwargs).choices[0]
    assert whole.message.content == "Let me check." and whole.finish_reason == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in whole.message.tool_calls] == [
        (c.function.name, c.function.arguments) for c in calls]
    one = client.chat.completions.create(**kwargs, parallel_tool_calls=False).choices[0]
    assert [c.function.name for c in one.message.tool_calls] == ["get_weather"]
    none = client.chat.completions.create(**kwargs, tool_choice="none").choices[0]  # calls not taken: text
    assert none.message.tool_calls is None and none.message.content == TWO_CALLS
    assert none.finish_reason == "stop"


CALLED = {"role": "assistant", "content": None, "tool_calls": [
    {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]}


@pytest.mark.parametrize("extra, param", [
    ({"tool_choice": "required"}, "tool_choice"),  # no tools to choose from
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "code_interpreter"}]}, "tools[0]"),
    ({"tools": {"name": "f"}}, "tools"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "{}"}}]}, "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "strict": True}}]}, "tools[0].function.strict"),
    ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"tools": [WEATHER], "chat_template_kwargs": {"tools": [WEATHER]}}, "chat_template_kwargs"),
    ({"messages": [*MESSAGES, {"role": "tool", "tool_call_id": "c1", "content": "42"}]}, "messages[1].tool_call_id"),
    ({"messages": [*MESSAGES, CALLED, {"role": "tool", "tool_call_id": "c2", "content": "9"}]},
     "messages[2].tool_call_id"),
    ({"messages": [*MESSAGES, {**CALLED, "tool_calls": [{"id": "c1", "type": "function", "function": {
        "name": "get_weather", "arguments": "{city: Oslo"}}]}]}, "messages[1].tool_calls[0].function.arguments"),
    ({"messages": [{**MESSAGES[0], "tool_calls": CALLED["tool_calls"]}]}, "messages[0].tool_calls"),
])
def test_bad_tool_requests_are_a_400_naming_the_field(served, extra, param):
    status, body = post(served, {"messages": MESSAGES, "max_tokens": 1, **extra})
    assert status == 400 and body["error"]["param"] == param, body


def test_tools_need_the_chat_api_and_a_template_that_renders_them(served, bundle, tmp_path, client):
    status, body = post(served, {"prompt": "Hi", "tools": [WEATHER], "max_tokens": 1}, "/v1/completions")
    assert status == 400 and body["error"]["param"] == "tools" and "chat/completions" in body["error"]["message"]
    with pytest.raises(openai.BadRequestError) as e:  # the official client's view of the same kind of 400
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=1, tools=[WEATHER],
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    assert e.value.body["param"] == "tool_choice" and "'nope'" in e.value.body["message"]
    path = tmp_path / "ckpt"
    shutil.copytree(bundle.path, path)
    write_gemma4_tokenizer(path, "e2b")  # Gemma 4's tokens, but a template that ignores tools
    server = make_server(mlx_gemma_mtp.load(path), "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        status, body = post((server,), {"messages": MESSAGES, "tools": [WEATHER], "max_tokens": 1})
        assert status == 400 and body["error"]["param"] == "tools" and "does not render" in body["error"]["message"]
        assert post((server,), {"messages": MESSAGES, "tools": [WEATHER], "tool_choice": "none",
                                "max_tokens": 1})[0] == 200
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
