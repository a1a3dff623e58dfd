"""Prompt and stop fidelity with a Gemma-4-like tokenizer (real special ids, `add_bos_token` false, the E2B-style
and 31B-style chat templates): exact token ids for raw text, chats and thinking; stopping at each of the three
released stop ids; the thought channel separated from the answer; bad prompts named."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from conftest import GEMMA4_EOS, write_gemma4_tokenizer, write_tokenizer

import mlx_gemma_mtp
from mlx_gemma_mtp import cli, decode
from mlx_gemma_mtp.textstream import ANSWER, TextStream

BOS, TURN, END_TURN, NL, THINK, CHANNEL, END_CHANNEL = 2, 105, 106, 107, 98, 100, 101


@pytest.fixture(scope="module")
def gemma_dir(target_dir, tmp_path_factory):
    """Factory: (style, template_file) -> the tiny E2B-like target with a Gemma 4 tokenizer and stop ids."""
    made = {}

    def get(style: str = "e2b", template_file: bool = True):
        if (style, template_file) not in made:
            path = tmp_path_factory.mktemp(f"gemma4-tok-{style}")
            shutil.copytree(target_dir("e2b"), path, dirs_exist_ok=True)
            write_gemma4_tokenizer(path, style, template_file)
            gen = json.loads((path / "generation_config.json").read_text())
            (path / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": GEMMA4_EOS}))
            made[style, template_file] = path
        return made[style, template_file]

    return get


@pytest.fixture(scope="module")
def gemma(gemma_dir):
    return mlx_gemma_mtp.load(gemma_dir("e2b"))


def piece_ids(tok, *pieces: str) -> list[int]:
    """Ids of vocabulary pieces looked up one by one (independent of the code under test)."""
    vocab = tok.get_vocab()
    return [vocab[p] for p in pieces]


def prompt_of(bundle, prompt, **kwargs) -> list[int]:
    return decode.encode_prompt(bundle, prompt, kwargs.get("chat_template_kwargs")).ids


def test_special_tokens_are_read_from_the_tokenizer(gemma):
    assert gemma.special.bos == BOS and gemma.special.channels == (CHANNEL, END_CHANNEL)
    assert gemma.tokenizer.encode("Hi")[:1] != [BOS], "the fixture must not add BOS itself, as Gemma 4's doesn't"


def test_raw_text_gets_bos_once(gemma):
    tok = gemma.tokenizer
    H, i, the, r, e = piece_ids(tok, "H", "i", "▁the", "r", "e")
    assert prompt_of(gemma, "Hi there") == [BOS, H, i, the, r, e]
    assert prompt_of(gemma, "<bos>Hi there") == [BOS, H, i, the, r, e]


def test_tokenizer_that_adds_bos_gets_no_second_one(target_dir, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(target_dir("e2b"), path)
    write_tokenizer(path)  # add_bos_token true
    bundle = mlx_gemma_mtp.load(path)
    ids = prompt_of(bundle, "The quick brown fox")
    assert ids[0] == bundle.special.bos and ids.count(bundle.special.bos) == 1
    assert prompt_of(bundle, "<bos>The quick brown fox") == ids


def test_token_id_prompts_are_used_as_given(gemma):
    assert prompt_of(gemma, [5, 6, 7]) == [5, 6, 7]
    assert prompt_of(gemma, np.array([5, 6, 7], dtype=np.int64)) == [5, 6, 7]
    assert prompt_of(gemma, mx.array([5, 6, 7])) == [5, 6, 7]


@pytest.mark.parametrize("style", ["e2b", "31b"])
@pytest.mark.parametrize("template_file", [True, False])
def test_chat_prompt_exact_ids(gemma_dir, style, template_file):
    bundle = mlx_gemma_mtp.load(gemma_dir(style, template_file))
    tok = bundle.tokenizer
    user, model, H, i = piece_ids(tok, "user", "model", "H", "i")
    expected = [BOS, TURN, user, NL, H, i, END_TURN, NL, TURN, model, NL]
    if style == "31b":  # the larger models' prompt closes an empty thought block when thinking is off
        expected += [CHANNEL, *piece_ids(tok, "th", "o", "u", "g", "h", "t"), NL, END_CHANNEL]
    assert prompt_of(bundle, [{"role": "user", "content": "Hi"}]) == expected


@pytest.mark.parametrize("style", ["e2b", "31b"])
def test_chat_prompt_with_thinking_exact_ids(gemma_dir, style):
    bundle = mlx_gemma_mtp.load(gemma_dir(style))
    tok = bundle.tokenizer
    system = piece_ids(tok, "s", "y", "s", "t", "e", "m")
    user, model, H, i = piece_ids(tok, "user", "model", "H", "i")
    expected = [BOS, TURN, *system, NL, THINK, NL, END_TURN, NL, TURN, user, NL, H, i, END_TURN, NL, TURN, model, NL]
    messages = [{"role": "user", "content": "Hi"}]
    assert prompt_of(bundle, messages, chat_template_kwargs={"enable_thinking": True}) == expected


def test_earlier_thoughts_are_stripped_by_the_template(gemma):
    messages = [{"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "<|channel>thought\nhmm<channel|>Hi"},
                {"role": "user", "content": "Hi"}]
    ids = prompt_of(gemma, messages)
    assert CHANNEL not in ids and END_CHANNEL not in ids
    assert ids.count(TURN) == 4


def test_chat_without_template_and_bad_kwargs_are_refused(gemma, target_dir, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(target_dir("e2b"), path)
    write_gemma4_tokenizer(path)
    (path / "chat_template.jinja").unlink()
    bundle = mlx_gemma_mtp.load(path)
    with pytest.raises(ValueError, match="has no chat template"):
        prompt_of(bundle, [{"role": "user", "content": "Hi"}])
    with pytest.raises(ValueError, match="may not set"):
        prompt_of(gemma, [{"role": "user", "content": "Hi"}], chat_template_kwargs={"add_generation_prompt": False})


@pytest.mark.parametrize("prompt, message", [
    ({"role": "user", "content": "Hi"}, "single chat message"),
    ([{"content": "Hi"}], "needs a string 'role'"),
    ([{"role": "user"}], "needs a string 'role' and a 'content'"),
    ([{"role": "user", "content": "Hi"}, "Hi"], "message 1 is a str"),
    ("", "empty string"),
    ([], "must be a non-empty string"),
    (np.zeros((1, 3), np.int32), "1-D array of integer token ids"),
    (np.zeros(3, np.float32), "1-D array of integer token ids"),
    ([[1, 2], [3, 4]], "batch size is 1"),
    (3.5, "must be a non-empty string"),
])
def test_bad_prompts_are_named(gemma, prompt, message):
    with pytest.raises(ValueError, match=message):
        next(mlx_gemma_mtp.stream_generate(gemma, prompt, max_tokens=2))


def swap_tokens(bundle, a: int, b: int) -> None:
    """Relabel tokens a <-> b in the target (embedding, tied head and per-layer table): an exactly equivalent
    model that writes b wherever the original wrote a."""
    model = bundle.target.model
    perm = mx.arange(bundle.target.args.vocab_size)
    perm[a], perm[b] = b, a
    for table in (model.embed_tokens, getattr(model, "embed_tokens_per_layer", None)):
        if table is not None:
            table.weight = table.weight[perm]
    mx.eval(bundle.target.parameters())


@pytest.mark.parametrize("stop_id", GEMMA4_EOS)
@pytest.mark.parametrize("k", [0, 3])
def test_generation_stops_at_each_released_stop_id(gemma_dir, stop_id, k):
    path = gemma_dir("e2b")
    prompt = [BOS, TURN, 120, 121, 122, NL]
    free_run = mlx_gemma_mtp.load(path)
    free_run.generation.eos_token_ids, free_run.tokenizer = [], None  # nothing stops it
    free = [r.token for r in mlx_gemma_mtp.stream_generate(free_run, prompt, max_tokens=16, num_draft_tokens=0)]
    # the first generated token that may be relabelled as the stop id: nothing before it stops generation
    j = next(j for j, t in enumerate(free) if t not in prompt + GEMMA4_EOS and t not in free[:j])
    assert not set(free[:j]) & set(GEMMA4_EOS)
    a = free[j]
    relabel = {a: stop_id, stop_id: a}
    expected = [relabel.get(t, t) for t in free[: j + 1]]

    bundle = mlx_gemma_mtp.load(path)
    assert set(GEMMA4_EOS) <= set(bundle.generation.eos_token_ids)  # generation_config's 50 joins config's 1, 106
    swap_tokens(bundle, a, stop_id)

    def oracle(last, hidden, windows, position, num):
        """Drafts = the expected continuation, so the stop id arrives inside an accepted block."""
        done = position - len(prompt)  # generated tokens before `last`
        nxt = (expected + [0] * 32)[done + 1 : done + 1 + num]
        return mx.array(nxt, mx.int32), None

    responses = list(mlx_gemma_mtp.stream_generate(bundle, prompt, max_tokens=16, num_draft_tokens=k,
                                                   proposer=oracle if k else None))
    assert [r.token for r in responses] == expected
    assert responses[-1].finish_reason == "stop" and responses[-1].text == ""
    if k:
        assert responses[-1].from_draft or j < 2


def test_thought_channel_is_separated_from_the_answer(gemma, monkeypatch):
    tok = gemma.tokenizer
    thought = tok.encode("the user", add_special_tokens=False)
    answer = tok.encode("Hi there", add_special_tokens=False)
    script = [CHANNEL, *tok.encode("thought", add_special_tokens=False), NL, *thought, END_CHANNEL, *answer, END_TURN]

    def scripted(*_args):
        yield from ((t, False, None) for t in script)  # (token, from_draft, logprobs)

    monkeypatch.setattr(decode, "_tokens", scripted)
    responses = list(mlx_gemma_mtp.stream_generate(gemma, [{"role": "user", "content": "Hi"}], max_tokens=50,
                                                   chat_template_kwargs={"enable_thinking": True}))
    by_channel = {}
    for r in responses:
        by_channel[r.channel] = by_channel.get(r.channel, "") + r.text
    assert by_channel == {"thought": "the user", ANSWER: "Hi there"}
    assert responses[-1].finish_reason == "stop"
    assert mlx_gemma_mtp.generate(gemma, [{"role": "user", "content": "Hi"}], max_tokens=50) == "Hi there"


def test_stop_strings_apply_to_the_answer_only(gemma):
    tok = gemma.tokenizer
    stream = TextStream(tok, ["the"], (CHANNEL, END_CHANNEL))
    out = []
    for t in [CHANNEL, *tok.encode("thought", add_special_tokens=False), NL,
              *tok.encode("the user", add_special_tokens=False), END_CHANNEL,
              *tok.encode("Hi there", add_special_tokens=False)]:
        channel, delta, stopped = stream.add(t)
        out.append((channel, delta))
        if stopped:
            break
    assert stopped
    out.append((ANSWER, stream.flush(stopped)))  # as stream_generate does at the end
    assert "".join(d for c, d in out if c == "thought") == "the user"
    assert "".join(d for c, d in out if c == ANSWER) == "Hi "


def test_a_string_stop_is_one_stop_string(gemma, monkeypatch):
    tok = gemma.tokenizer
    script = tok.encode("Hi there, the user", add_special_tokens=False)
    monkeypatch.setattr(decode, "_tokens", lambda *a: ((t, False, None) for t in script))
    text = mlx_gemma_mtp.generate(gemma, "Hi", max_tokens=50, stop="the user")
    assert text == "Hi there, "
    with pytest.raises(ValueError, match="a string or a list of strings"):
        mlx_gemma_mtp.generate(gemma, "Hi", max_tokens=5, stop=[1])


def test_cli_thinking_flag_and_template_kwargs(gemma_dir, capsys):
    path = str(gemma_dir("e2b"))
    base = ["generate", "--model", path, "--prompt", "Hi", "--max-tokens", "2", "--num-draft-tokens", "0"]
    lengths = {}
    for extra in ([], ["--thinking"], ["--chat-template-kwargs", '{"enable_thinking": true}']):
        assert cli.main(base + extra) == 0
        err = capsys.readouterr().err
        lengths[tuple(extra[:1])] = int(err.split("prompt: ")[1].split(" tokens")[0])
    # the system turn that carries <|think|>: <|turn>system\n<|think|>\n<turn|>\n
    assert lengths[("--thinking",)] == lengths[("--chat-template-kwargs",)] == lengths[()] + 12
    for bad in ("[1]", "{not json"):
        with pytest.raises(SystemExit):
            cli.main(base + ["--chat-template-kwargs", bad])
        assert "--chat-template-kwargs" in capsys.readouterr().err


def test_prompt_past_max_position_embeddings_warns(pair_dir):
    bundle = mlx_gemma_mtp.load(pair_dir("e2b")[0])
    limit = bundle.target.args.max_position_embeddings
    bundle.target.args.max_position_embeddings = 8
    try:
        with pytest.warns(UserWarning, match="exceeds the model's max_position_embeddings=8"):
            list(mlx_gemma_mtp.stream_generate(bundle, [2, 10, 11, 12, 13], max_tokens=5, num_draft_tokens=0))
    finally:
        bundle.target.args.max_position_embeddings = limit


def test_a_thought_the_prompt_opens_is_reported_as_thought(gemma, monkeypatch):
    """Gemma 4's template ends the prompt inside `<|channel>thought\n` after a tool result with thinking on: the
    first generated tokens are a thought, not the answer."""
    tok = gemma.tokenizer
    script = [*tok.encode("the user", add_special_tokens=False), END_CHANNEL,
              *tok.encode("Hi there", add_special_tokens=False), END_TURN]
    monkeypatch.setattr(decode, "_tokens", lambda *a: ((t, False, None) for t in script))
    for opened in ([CHANNEL, *tok.encode("thought", add_special_tokens=False), NL], [CHANNEL]):
        prompt = [BOS, TURN, *tok.encode("Hi", add_special_tokens=False), *opened]
        if opened == [CHANNEL]:  # the name and its newline come from the model
            script[:0] = [*tok.encode("thought", add_special_tokens=False), NL]
        by_channel = {}
        for r in mlx_gemma_mtp.stream_generate(gemma, prompt, max_tokens=50):
            by_channel[r.channel] = by_channel.get(r.channel, "") + r.text
        assert by_channel == {"thought": "the user", ANSWER: "Hi there"}, opened
    closed = [BOS, TURN, CHANNEL, *tok.encode("thought", add_special_tokens=False), NL, END_CHANNEL]
    answer = [*tok.encode("Hi", add_special_tokens=False), END_TURN]
    monkeypatch.setattr(decode, "_tokens", lambda *a: ((t, False, None) for t in answer))
    responses = list(mlx_gemma_mtp.stream_generate(gemma, closed, max_tokens=5))  # a closed thought: the answer
    assert {r.channel for r in responses} == {ANSWER} and "".join(r.text for r in responses) == "Hi"
