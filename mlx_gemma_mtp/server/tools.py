"""Tool calling (OpenAI function `tools`) in Gemma 4's own format: declarations and past calls rendered by the
checkpoint's chat template, the model's calls parsed back into OpenAI `tool_calls`.

The format, as Google's E2B/E4B chat template writes it (docs/real-checkpoints.md; the template is in
ollama/ollama `model/renderers/testdata/gemma4_e2b_chat_template.jinja2`, and ollama's `model/parsers/gemma4.go`
and mlx-lm's `tool_parsers/gemma4.py` parse the same strings):

- declarations, in the system turn: `<|tool>declaration:NAME{description:<|"|>…<|"|>,parameters:{…}}<tool|>`;
- a call: `<|tool_call>call:NAME{key:value,…}<tool_call|>`; keys bare (sorted by the template), strings wrapped
  in the escape token `<|"|>` with nothing escaped inside, numbers and `true`/`false`/`null` bare, objects
  `{k:v,…}`, arrays `[v,…]`. Several calls follow one another, then `<|tool_response>` (a stop id) hands the
  turn to the caller;
- results (`role: "tool"` messages) come back as `<|tool_response>response:NAME{value:<|"|>…<|"|>}
  <tool_response|>`, and the model goes on in the same turn.

The streaming detokenizer writes special tokens as their text, so calls are found in the answer's text.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from ..decode import GenerationResponse, encode_prompt
from ..load import Bundle
from ..prompt import EncodedPrompt

DECLARATION, CALL_START, CALL_END, STRING = "<|tool>", "<|tool_call>", "<tool_call|>", '<|"|>'
_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
_CALL_HEAD = re.compile(r"\s*call:([A-Za-z0-9_.-]+)\s*(?=\{)")
_KEY = re.compile(r"[^\s:,{}\[\]<\"]+")  # a bare key, as the template writes them
_NUMBER = re.compile(r"-?\d+(\.\d+)?([eE][+-]?\d+)?")
_SPACE = re.compile(r"\s*")
_WORDS = {"true": True, "false": False, "null": None}
MAX_DEPTH = 64  # nesting a call's arguments may have (a random model can open brackets for ever)


class ToolError(ValueError):
    """A bad tool request: the server answers 400 naming `param`."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ToolRequest:
    """A request's tools: the declarations and how the call is chosen."""

    tools: list[dict]  # OpenAI function tools, as the chat template reads them
    choice: str = "auto"  # "auto", "none", "required" or "function" (the function `name`)
    name: str | None = None
    parallel: bool = True  # False: at most one call per answer (later ones are dropped)

    @property
    def offered(self) -> bool:
        """Whether the model sees the tools. With "none" it does not: without constrained decoding nothing could
        stop a call it was shown a tool for, and a call the client will not run would leave the turn hanging."""
        return bool(self.tools) and self.choice != "none"

    @property
    def forced(self) -> str:
        """The call's opening, put at the start of the model's turn to force a call ("" when the model chooses)."""
        if self.choice == "required":
            return CALL_START + "call:"
        if self.choice == "function":
            return f"{CALL_START}call:{self.name}{{"
        return ""


# ------------------------------------------------------------------------------------------------------------
# Requests: the fields checked, tool calls and results kept in the messages for the template
# ------------------------------------------------------------------------------------------------------------

def tool_request_from(body: dict, messages: list[dict] | None) -> ToolRequest | None:
    """The request's `tools`, `tool_choice` and `parallel_tool_calls`, checked, with the tool calls and results
    of `body["messages"]` added to `messages` (what `messages_from` made of them; None for /v1/completions).

    Returns:
        None when no tools are given (a conversation may still hold earlier calls and results).

    Raises:
        ToolError: naming the field and what to send instead.
    """
    if messages is not None:
        _add_tool_fields(body["messages"], messages)
    tools = _tools_from(body.get("tools"))
    choice, name = _choice_from(body.get("tool_choice"), [t["function"]["name"] for t in tools])
    parallel = body.get("parallel_tool_calls")
    if parallel not in (None, True, False) or isinstance(parallel, int) and not isinstance(parallel, bool):
        raise ToolError(f"'parallel_tool_calls' must be a boolean, got {parallel!r:.40}", "parallel_tool_calls")
    if not tools:
        return None
    if messages is None:
        raise ToolError("'tools' need the chat API: send them to /v1/chat/completions", "tools")
    return ToolRequest(tools, choice, name, parallel is not False)


def _tools_from(value) -> list[dict]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ToolError(f"'tools' must be a list of {{\"type\": \"function\", \"function\": {{...}}}}, got "
                        f"{value!r:.60}", "tools")
    tools, names = [], set()
    for i, tool in enumerate(value):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise ToolError(f"{where} must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}} (function "
                            f"tools only), got {tool!r:.80}", where)
        function = tool["function"]
        name = function.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.fullmatch(name):
            raise ToolError(f"{where}.function.name must be 1 to 64 letters, digits, '_' or '-', got {name!r:.80}",
                            f"{where}.function.name")
        if name in names:
            raise ToolError(f"{where}.function.name: {name!r} is declared twice; give each tool its own name",
                            f"{where}.function.name")
        if not isinstance(function.get("description", ""), str):
            raise ToolError(f"{where}.function.description must be a string", f"{where}.function.description")
        if not isinstance(function.get("parameters", {}), dict):
            raise ToolError(f"{where}.function.parameters must be a JSON schema object, got "
                            f"{function['parameters']!r:.60}", f"{where}.function.parameters")
        if function.get("strict"):  # a schema the answer is not held to must not look enforced
            raise ToolError(f"{where}.function.strict: true is not supported (arguments are not constrained to the "
                            f"schema); leave it out", f"{where}.function.strict")
        names.add(name)
        tools.append({"type": "function", "function": {k: v for k, v in function.items() if k != "strict"}})
    return tools


def _choice_from(value, names: list[str]) -> tuple[str, str | None]:
    if value is None or value == "auto":
        return "auto", None
    if value == "none":
        return "none", None
    if value == "required" and names:
        return "required", None
    if isinstance(value, dict) and value.get("type") == "function" and isinstance(value.get("function"), dict):
        name = value["function"].get("name")
        if name not in names:
            raise ToolError(f"tool_choice names the function {name!r:.80}, which 'tools' does not declare "
                            f"(declared: {', '.join(names) or 'none'})", "tool_choice")
        return "function", name
    if value == "required":
        raise ToolError("tool_choice 'required' needs 'tools' to choose from", "tool_choice")
    raise ToolError(f"'tool_choice' must be \"auto\", \"none\", \"required\" or {{\"type\": \"function\", "
                    f"\"function\": {{\"name\": ...}}}}, got {value!r:.80}", "tool_choice")


def _add_tool_fields(raw: list, messages: list[dict]) -> None:
    """Assistant `tool_calls` (arguments parsed: the template writes them from an object) and tool results'
    `tool_call_id`; a result must answer a call of the assistant message before it (the template would
    silently drop one that does not)."""
    ids: set[str] = set()  # the calls the tool results that follow may answer
    for i, (m, out) in enumerate(zip(raw, messages)):
        calls = m.get("tool_calls")
        if calls:
            if out["role"] != "assistant" or not isinstance(calls, list):
                raise ToolError(f"messages[{i}].tool_calls must be a list, on an assistant message",
                                f"messages[{i}].tool_calls")
            out["tool_calls"] = [_call_from(c, f"messages[{i}].tool_calls[{j}]") for j, c in enumerate(calls)]
        if out["role"] != "tool":
            ids = {c["id"] for c in out.get("tool_calls", []) if "id" in c}
            continue
        answers = m.get("tool_call_id")
        if answers not in ids:
            raise ToolError(f"messages[{i}].tool_call_id={answers!r:.60} answers no call of the assistant message "
                            f"before it (its calls: {sorted(ids) or 'none'}); send each tool result after the "
                            f"assistant message with its tool_calls", f"messages[{i}].tool_call_id")
        out["tool_call_id"] = answers
        if isinstance(m.get("name"), str):
            out["name"] = m["name"]


def _call_from(call, where: str) -> dict:
    """An OpenAI tool call as the template reads it: `function.arguments` an object, not a JSON string."""
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        raise ToolError(f"{where} must be {{\"id\": ..., \"type\": \"function\", \"function\": {{\"name\": ..., "
                        f"\"arguments\": \"{{...}}\"}}}}, got {call!r:.80}", where)
    name, arguments = call["function"].get("name"), call["function"].get("arguments")
    if not isinstance(name, str) or not name:
        raise ToolError(f"{where}.function.name must be the called function's name", f"{where}.function.name")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as e:
            raise ToolError(f"{where}.function.arguments is not valid JSON ({e}); send back the arguments the call "
                            f"came with", f"{where}.function.arguments") from None
    if not isinstance(arguments, (dict, type(None))):
        raise ToolError(f"{where}.function.arguments must be a JSON object, got {arguments!r:.60}",
                        f"{where}.function.arguments")
    out = {"type": "function", "function": {"name": name, "arguments": arguments or {}}}
    if isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out


# ------------------------------------------------------------------------------------------------------------
# The prompt: tools declared by the checkpoint's template, a forced call's opening after the generation prompt
# ------------------------------------------------------------------------------------------------------------

def encode_with_tools(bundle: Bundle, prompt, chat_template_kwargs: dict | None,
                      request: ToolRequest | None, local_files: bool = False) -> EncodedPrompt:
    """The encoded prompt (`decode.encode_prompt`; `local_files`: whether media parts may name local paths),
    with `request`'s tools declared by the chat template when offered and, when a call is forced, its opening
    (`<|tool_call>call:` or `<|tool_call>call:NAME{`) after the generation prompt.

    Raises:
        ToolError: the checkpoint cannot take tools (its tokenizer has no Gemma 4 tool tokens, or its template
            does not render `tools`), or the tools were passed in chat_template_kwargs.
        ValueError: from rendering the prompt.
    """
    kwargs = dict(chat_template_kwargs or {})
    if "tools" in kwargs:
        raise ToolError("pass tools in the request's 'tools' field, not in chat_template_kwargs",
                        "chat_template_kwargs")
    if request is None or not request.offered:
        return encode_prompt(bundle, prompt, chat_template_kwargs, local_files)
    encoded = encode_prompt(bundle, prompt, {**kwargs, "tools": request.tools}, local_files)
    ids = encoded.ids
    tokenizer = bundle.tokenizer
    declaration = _token_id(tokenizer, DECLARATION)
    if declaration is None or _token_id(tokenizer, CALL_START) is None:
        raise ToolError(f"this checkpoint's tokenizer has no Gemma 4 tool tokens ({DECLARATION}, {CALL_START}): it "
                        f"cannot be given tools; leave 'tools' out", "tools")
    if ids.count(declaration) < len(request.tools):
        raise ToolError(f"this checkpoint's chat template does not render 'tools' (no {DECLARATION}declaration:… "
                        f"in the prompt); tool calling needs Gemma 4's template with tool support", "tools")
    forced = request.forced
    opening = list(tokenizer.encode(forced, add_special_tokens=False)) if forced else []
    return EncodedPrompt(ids + opening, encoded.spans)


def _token_id(tokenizer, token: str) -> int | None:
    i = tokenizer.convert_tokens_to_ids(token)
    return i if isinstance(i, int) and tokenizer.convert_ids_to_tokens(i) == token else None


# ------------------------------------------------------------------------------------------------------------
# The model's calls: `call:NAME{...}` parsed into a name and a JSON object
# ------------------------------------------------------------------------------------------------------------

class _Malformed(ValueError):
    pass


def parse_call(text: str) -> tuple[str, dict] | None:
    """(name, arguments) of a call's text, `call:NAME{key:value,...}` (what stands between `<|tool_call>` and
    `<tool_call|>`), or None when it is not a whole call (cut off or garbled: the caller keeps it as text)."""
    head = _CALL_HEAD.match(text)
    if head is None:
        return None
    try:
        arguments, end = _value(text, head.end(), 0)
    except ValueError:  # _Malformed, or a JSON string the model wrote badly
        return None
    if text[end:].strip():
        return None
    return head.group(1), arguments


def _skip(s: str, i: int) -> int:
    return _SPACE.match(s, i).end()


def _value(s: str, i: int, depth: int):
    """(value, end) of the value at `s[i:]`: Gemma's strings, objects, arrays, numbers and words; a JSON string
    too (models sometimes write one)."""
    i = _skip(s, i)
    if depth > MAX_DEPTH:
        raise _Malformed("nested too deep")
    if s.startswith(STRING, i):
        end = s.find(STRING, i + len(STRING))
        if end < 0:
            raise _Malformed("an unterminated string")
        return s[i + len(STRING) : end], end + len(STRING)
    if s.startswith('"', i):
        return json.JSONDecoder().raw_decode(s, i)
    if s.startswith("{", i):
        return _items(s, i + 1, depth + 1, "}", keyed=True)
    if s.startswith("[", i):
        return _items(s, i + 1, depth + 1, "]", keyed=False)
    if number := _NUMBER.match(s, i):
        text = number.group()
        return (float(text) if number.group(1) or number.group(2) else int(text)), number.end()
    for word, value in _WORDS.items():
        if s.startswith(word, i):
            return value, i + len(word)
    raise _Malformed(f"unexpected {s[i : i + 12]!r}")


def _items(s: str, i: int, depth: int, close: str, keyed: bool):
    """(object or list, end) of the items after an opening bracket, up to `close`."""
    out = {} if keyed else []
    i = _skip(s, i)
    if s.startswith(close, i):
        return out, i + 1
    while True:
        if keyed:
            key, i = _key(s, i)
            i = _skip(s, i)
            if not s.startswith(":", i):
                raise _Malformed(f"no ':' after the key {key!r}")
            out[key], i = _value(s, i + 1, depth)
        else:
            value, i = _value(s, i, depth)
            out.append(value)
        i = _skip(s, i)
        if s.startswith(close, i):
            return out, i + 1
        if not s.startswith(",", i):
            raise _Malformed(f"expected ',' or {close!r} at {s[i : i + 12]!r}")
        i = _skip(s, i + 1)


def _key(s: str, i: int) -> tuple[str, int]:
    """A key: bare, as the template writes arguments, or quoted (`<|"|>k<|"|>`, as it writes nested schemas)."""
    if s.startswith(STRING, i) or s.startswith('"', i):
        key, end = _value(s, i, 0)
        if isinstance(key, str):
            return key, end
    if bare := _KEY.match(s, i):
        return bare.group(), bare.end()
    raise _Malformed(f"expected a key at {s[i : i + 12]!r}")


# ------------------------------------------------------------------------------------------------------------
# An answer split into content and calls, as it streams
# ------------------------------------------------------------------------------------------------------------

def _held(text: str) -> int:
    """How much of the end of `text` to hold back: what may begin `<|tool_call>`, and the space before it (the
    space between text and a call is not content)."""
    partial = next((n for n in range(min(len(CALL_START) - 1, len(text)), 0, -1)
                    if CALL_START.startswith(text[-n:])), 0)
    before = text[: len(text) - partial]
    return partial + len(before) - len(before.rstrip())


class ToolCalls:
    """Splits a generation's answer into content and tool calls as its text arrives; a whole answer is the same
    text fed at once, so streamed and non-streamed answers agree.

    A call is taken when `<tool_call|>` closes it, or at the end of a generation that stopped (the model ended
    its turn) if what it wrote parses. A call cut off by `max_tokens`, or one that does not parse, is kept as
    content, the way the model wrote it: nothing the model said is lost, and the finish reason stays "length"
    (or "stop").
    """

    def __init__(self, request: ToolRequest):
        self.parallel = request.parallel
        self.buffer, self.in_call, self.after_call = "", False, False
        self.calls: list[dict] = []
        self.feed(request.forced)  # the forced opening is in the prompt: the answer starts inside the call

    def feed(self, text: str, finish_reason: str | None = None) -> list[str | dict]:
        """Content (str) and calls (OpenAI dicts) now complete; `finish_reason`: the generation ended here."""
        self.buffer += text
        out = []
        while self.buffer:
            if self.in_call:
                end = self.buffer.find(CALL_END)
                if end < 0 and not finish_reason:
                    break
                body = self.buffer if end < 0 else self.buffer[:end]
                out.append(self._close(body, closed=end >= 0, stopped=finish_reason == "stop"))
                self.buffer, self.in_call = "" if end < 0 else self.buffer[end + len(CALL_END) :], False
                continue
            if self.after_call:  # the space between calls, or after them, is not content
                self.buffer = self.buffer.lstrip()
                self.after_call = not self.buffer
                continue
            start = self.buffer.find(CALL_START)
            if start >= 0:
                out.append(self.buffer[:start].rstrip())
                self.buffer, self.in_call = self.buffer[start + len(CALL_START) :], True
                continue
            keep = 0 if finish_reason else _held(self.buffer)
            out.append(self.buffer[: len(self.buffer) - keep])
            self.buffer = self.buffer[len(self.buffer) - keep :]
            break
        return [piece for piece in out if piece]

    def _close(self, body: str, closed: bool, stopped: bool) -> str | dict | None:
        """The call `body` makes, or its text as content; None for a call past the first when calls may not be
        parallel."""
        parsed = parse_call(body) if closed or stopped else None
        if parsed is None:
            return CALL_START + body + (CALL_END if closed else "")
        self.after_call = True
        if self.calls and not self.parallel:
            return None
        name, arguments = parsed
        call = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}
        self.calls.append(call)
        return call

    def finish_reason(self, reason: str | None) -> str | None:
        """OpenAI's "tool_calls" when the model ended its turn after calling."""
        return "tool_calls" if reason == "stop" and self.calls else reason

    def message(self, answer: str, finish_reason: str | None) -> dict:
        """The fields of a whole answer's message: `content` (None when there is none besides calls) and
        `tool_calls` when there are any."""
        pieces = self.feed(answer, finish_reason or "stop")
        content = "".join(p for p in pieces if isinstance(p, str))
        if not self.calls:
            return {"content": content}
        return {"content": content or None, "tool_calls": self.calls}

    def deltas(self, r: GenerationResponse) -> list[dict]:
        """The stream deltas of one response: thought and content text, and each call once it is complete."""
        thought = r.channel == "thought"
        out = [{"reasoning_content": r.text}] if thought and r.text else []
        for piece in self.feed("" if thought else r.text, r.finish_reason):
            if isinstance(piece, str):
                out.append({"content": piece})
            else:
                out.append({"tool_calls": [{"index": self.calls.index(piece), **piece}]})
        return out
