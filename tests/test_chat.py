"""`mlx-gemma-mtp chat`: scripted conversations through `run_chat` give, turn by turn, exactly what `generate`
gives for the messages so far (greedy), reuse the prompt cache, and survive /reset, Ctrl-C mid-answer
and EOF."""

from __future__ import annotations

import argparse
import dataclasses
import io
import re
import subprocess
import sys

import pytest

import mlx_gemma_mtp
from mlx_gemma_mtp.cli.chat import add_chat_parser, run_chat

MAX_TOKENS = 10
REUSED = re.compile(r"prompt cache: reused (\d+) of (\d+) tokens")


@pytest.fixture(scope="module")
def bundle(pair_dir):
    b = mlx_gemma_mtp.load(pair_dir("e2b")[0])
    b.generation.eos_token_ids = []  # answers of a few tokens, not cut short by a random model's EOS
    return b


def chat_args(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_chat_parser(parser.add_subparsers())
    return parser.parse_args(["chat", "--model", "unused", "--max-tokens", str(MAX_TOKENS), *flags])


class Out(io.StringIO):
    """A stream that raises KeyboardInterrupt (Ctrl-C) at its `interrupt_after`-th write, once armed."""

    interrupt_after: int | None = None

    def write(self, s: str) -> int:
        if self.interrupt_after is not None:
            self.interrupt_after -= 1
            if self.interrupt_after == 0:
                self.interrupt_after = None
                raise KeyboardInterrupt
        return super().write(s)


def scripted(lines: list, out: Out):
    """input() replacement: each item is a line, EOF ends; ("interrupt", n, line) arms `out` before `line`."""
    it = iter(lines)

    def input_fn(prompt: str) -> str:
        item = next(it, EOFError)
        if item is EOFError:
            raise EOFError
        if isinstance(item, tuple):
            out.interrupt_after, item = item[1], item[2]
        return item

    return input_fn


def fresh(bundle, messages, k) -> str:
    return mlx_gemma_mtp.generate(bundle, messages, max_tokens=MAX_TOKENS, num_draft_tokens=k)


def assert_exact(bundle, messages, k) -> None:
    """Every assistant message equals a fresh greedy run on the messages before it."""
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    assert answers
    for i in answers:
        assert messages[i]["content"] == fresh(bundle, messages[:i], k)


@pytest.mark.parametrize("k", ["0", "3", "auto"])
def test_three_turns_equal_fresh_runs_and_reuse_the_cache(bundle, k):
    out = Out()
    chat = run_chat(bundle, chat_args("--num-draft-tokens", k), scripted(["Hello world", "for i in range",
                                                                          "The quick brown fox"], out), out)
    k = int(k) if k != "auto" else k
    assert [m["role"] for m in chat.messages] == ["user", "assistant"] * 3
    assert_exact(bundle, chat.messages, k)
    reused = [int(m.group(1)) for m in REUSED.finditer(out.getvalue())]
    assert len(reused) == 3 and reused[0] == 0 and reused[1] > 0 and reused[2] > reused[1]
    if k != 0:
        assert "mean accepted length" in out.getvalue()


def test_system_prompt_leads_the_conversation_and_survives_reset(bundle):
    out = Out()
    script = scripted(["Hello", "/reset", "Hello"], out)
    chat = run_chat(bundle, chat_args("--system", "Be brief."), script, out)
    assert chat.messages[0] == {"role": "system", "content": "Be brief."}
    assert [m["role"] for m in chat.messages] == ["system", "user", "assistant"]
    assert_exact(bundle, chat.messages, None)


def test_reset_starts_a_new_conversation_with_nothing_reused(bundle):
    out = Out()
    script = scripted(["Hello world", "for i in range", "/reset", "Hello world"], out)
    chat = run_chat(bundle, chat_args(), script, out)
    assert [m["content"] for m in chat.messages if m["role"] == "user"] == ["Hello world"]
    assert_exact(bundle, chat.messages, None)
    reused = [int(m.group(1)) for m in REUSED.finditer(out.getvalue())]
    assert reused[1] > 0 and reused[2] == 0
    assert "new conversation" in out.getvalue()


def test_stats_prints_the_last_answers_stats(bundle):
    out = Out()
    script = scripted(["/stats", "Hello world", "/stats"], out)
    run_chat(bundle, chat_args("--num-draft-tokens", "2"), script, out)
    text = out.getvalue()
    assert "no answer yet" in text
    assert re.search(rf"prompt: \d+ tokens, [\d.]+ tokens/s \| generation: {MAX_TOKENS} tokens", text)
    assert "MTP: " in text and "drafting rounds" in text


@pytest.mark.parametrize("end", [[], ["/exit"], ["/quit"]])
def test_eof_exit_and_quit_end_cleanly(bundle, end):
    out = Out()
    chat = run_chat(bundle, chat_args(), scripted(["Hello", *end, "never read"], out) if end else
                    scripted(["Hello"], out), out)
    assert [m["content"] for m in chat.messages if m["role"] == "user"] == ["Hello"]


def test_ctrl_c_stops_an_answer_and_the_conversation_goes_on(bundle):
    out = Out()
    lines = ["Hello world", ("interrupt", 4, "for i in range"), "The quick brown fox"]
    chat = run_chat(bundle, chat_args("--num-draft-tokens", "3"), scripted(lines, out), out)
    assert [m["role"] for m in chat.messages] == ["user", "assistant"] * 3
    stopped = chat.messages[3]["content"]
    full = fresh(bundle, chat.messages[:3], 3)
    assert full.startswith(stopped) and len(stopped) < len(full)  # cut short, and what was shown is kept
    assert "(stopped)" in out.getvalue()
    assert chat.messages[1]["content"] == fresh(bundle, chat.messages[:1], 3)
    assert chat.messages[5]["content"] == fresh(bundle, chat.messages[:5], 3)  # the next turn is still exact
    reused = [int(m.group(1)) for m in REUSED.finditer(out.getvalue())]
    assert reused[2] > 0  # the stopped answer's cache was kept, not dropped


def test_ctrl_c_at_the_prompt_drops_the_line(bundle):
    out = Out()
    calls = iter([KeyboardInterrupt, "Hello", EOFError])

    def input_fn(prompt: str) -> str:
        item = next(calls)
        if isinstance(item, type):
            raise item
        return item

    chat = run_chat(bundle, chat_args(), input_fn, out)
    assert [m["content"] for m in chat.messages if m["role"] == "user"] == ["Hello"]


def test_a_checkpoint_without_a_tokenizer_is_refused(bundle):
    no_tokenizer = dataclasses.replace(bundle, tokenizer=None)
    with pytest.raises(ValueError, match="no tokenizer files"):
        run_chat(no_tokenizer, chat_args(), scripted([], Out()), Out())


def test_chat_runs_the_demo_pair_with_no_setup():
    """No --model: the demo pair, which has no chat template: the lines typed make one text the model continues,
    each answer equal to generating from that text."""
    from mlx_gemma_mtp.demo import demo_dtype, demo_path

    cmd = [sys.executable, "-m", "mlx_gemma_mtp", "chat", "--max-tokens", "6", "--num-draft-tokens", "2"]
    proc = subprocess.run(cmd, input="import os\ndef walk(top):\n", check=False, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "no chat template" in proc.stdout
    demo = mlx_gemma_mtp.load(demo_path(), dtype=demo_dtype())
    first = mlx_gemma_mtp.generate(demo, "import os\n", max_tokens=6, num_draft_tokens=2)
    second = mlx_gemma_mtp.generate(demo, "import os\n" + first + "def walk(top):\n", max_tokens=6,
                                    num_draft_tokens=2)
    assert first + "\n" in proc.stdout and second + "\n" in proc.stdout


def test_chat_help_runs_as_a_module():
    proc = subprocess.run([sys.executable, "-m", "mlx_gemma_mtp", "chat", "--help"], check=True,
                          capture_output=True, text=True, timeout=120)
    for flag in ("--model", "--draft", "--max-tokens", "--temp", "--top-p", "--top-k", "--min-p", "--seed",
                 "--num-draft-tokens", "--thinking", "--system"):
        assert flag in proc.stdout


def test_chat_command_reads_stdin_until_eof(pair_dir):
    model = pair_dir("e2b")[0]
    cmd = [sys.executable, "-m", "mlx_gemma_mtp", "chat", "--model", str(model), "--max-tokens", "4",
           "--num-draft-tokens", "2"]
    proc = subprocess.run(cmd, input="Hello world\n/stats\n", check=False,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    expected = mlx_gemma_mtp.generate(mlx_gemma_mtp.load(model), [{"role": "user", "content": "Hello world"}],
                                      max_tokens=4, num_draft_tokens=2)
    assert expected + "\n" in proc.stdout and REUSED.search(proc.stdout) and "MTP: " in proc.stdout
    assert "\x1b[" not in proc.stdout  # not a terminal: no ANSI codes
