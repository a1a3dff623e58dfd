"""Command line: `mlx-gemma-mtp generate` through `cli.main` and `python -m mlx_gemma_mtp`."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import write_tokenizer

import mlx_gemma_mtp
from mlx_gemma_mtp.cli import main

STATS = re.compile(
    r"prompt: (\d+) tokens, [\d.]+ tokens/s \| generation: (\d+) tokens, [\d.]+ tokens/s \| "
    r"peak memory: [\d.]+ GB"
)


@pytest.fixture(scope="module")
def model_dir(target_dir, tmp_path_factory):
    """e2b target with a tokenizer and chat template, no drafter."""
    path = tmp_path_factory.mktemp("cli-model")
    shutil.copytree(target_dir("e2b"), path, dirs_exist_ok=True)
    write_tokenizer(path)
    return path


def expected_text(path, prompt: str, max_tokens: int) -> str:
    bundle = mlx_gemma_mtp.load(path)
    messages = [{"role": "user", "content": prompt}]
    return mlx_gemma_mtp.generate(bundle, messages, max_tokens=max_tokens, num_draft_tokens=0)


def test_generate_prints_text_and_stats(model_dir, capsys):
    assert main(["generate", "--model", str(model_dir), "--prompt", "hi", "--max-tokens", "8"]) == 0
    out, err = capsys.readouterr()
    # greedy by default, with the chat template: the same text as the Python API
    assert out.strip() and out == expected_text(model_dir, "hi", 8) + "\n"
    stats = STATS.search(err)
    assert stats, f"no stats line in stderr: {err!r}"
    bundle = mlx_gemma_mtp.load(model_dir)
    chat = bundle.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True
    )
    assert int(stats.group(1)) == len(chat) and 1 <= int(stats.group(2)) <= 8
    assert "MTP:" not in err  # no drafter, no speculative stats


def test_generate_raw_prompt_without_chat_template(model_dir, capsys):
    args = [
        "generate",
        "--model",
        str(model_dir),
        "--prompt",
        "The quick brown fox",
        "--max-tokens",
        "4",
        "--no-chat-template",
        "--num-draft-tokens",
        "0",
    ]
    assert main(args) == 0
    _, err = capsys.readouterr()
    bundle = mlx_gemma_mtp.load(model_dir)
    # the test tokenizer adds no BOS itself, so the raw prompt gets one
    assert int(STATS.search(err).group(1)) == 1 + len(bundle.tokenizer.encode("The quick brown fox"))


def test_generate_with_bundled_drafter_reports_mtp_stats(pair_dir, capsys):
    path = pair_dir("e2b")[0]
    assert (
        main(
            [
                "generate",
                "--model",
                str(path),
                "--prompt",
                "hi",
                "--max-tokens",
                "8",
                "--num-draft-tokens",
                "2",
            ]
        )
        == 0
    )
    out, err = capsys.readouterr()
    assert out == expected_text(path, "hi", 8) + "\n"  # speculative greedy == plain greedy
    assert STATS.search(err) and "MTP:" in err


def test_missing_model_is_an_error_not_a_traceback(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "hi"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing" in err and "Traceback" not in err


def test_bad_checkpoint_is_an_error(model_dir, tmp_path, capsys):
    path = tmp_path / "bad"
    shutil.copytree(model_dir, path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    assert main(["generate", "--model", str(path)]) == 1
    assert "error: " in capsys.readouterr().err


def test_bad_arguments_exit_with_usage(model_dir, capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(model_dir), "--num-draft-tokens", "many"])
    assert e.value.code == 2 and "expected an integer or 'auto'" in capsys.readouterr().err


def test_python_dash_m(model_dir):
    cmd = [
        sys.executable,
        "-m",
        "mlx_gemma_mtp",
        "generate",
        "--model",
        str(model_dir),
        "--prompt",
        "hi",
        "--max-tokens",
        "4",
    ]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected_text(model_dir, "hi", 4) + "\n"
    assert STATS.search(proc.stderr), proc.stderr


def test_stats_line_counts_plain_steps_apart_from_drafting_rounds():
    from mlx_gemma_mtp import DraftStats
    from mlx_gemma_mtp.cli.output import format_stats
    from mlx_gemma_mtp.decode import GenerationResponse

    stats = DraftStats()
    for k, n in [(3, 3), (3, 1), (0, 0), (0, 0), (0, 0)]:
        stats.record(k, n)
    r = GenerationResponse("", 0, False, "length", 5, 100.0, 12, 50.0, 0.01, stats)
    line = format_stats(r).splitlines()[1]
    assert line == ("MTP: 2 drafting rounds + 3 plain steps, 4/6 drafts accepted (66.7%), mean accepted length 2.00 "
                    "per drafting round, acceptance per position [1.00 0.50 0.50]")


def test_demo_shows_its_prompt_before_the_continuation(capsys):
    from mlx_gemma_mtp.cli.generate import DEMO_PROMPT

    assert main(["generate", "--max-tokens", "6", "--num-draft-tokens", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(DEMO_PROMPT) and len(out) > len(DEMO_PROMPT) + 1  # not a terminal: plain, no ANSI codes
    assert "\x1b[" not in out


def test_generate_imports_neither_the_converter_nor_the_trainer():
    """Subcommands load their modules only when run: `generate` (and `--help`) stay light."""
    code = ("import sys\nfrom mlx_gemma_mtp.cli import main\ntry:\n    main(['generate', '--help'])\n"
            "except SystemExit:\n    pass\nprint(' '.join(sorted(sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120)
    loaded = set(proc.stdout.split())
    assert "mlx_gemma_mtp.cli" in loaded
    assert not {m for m in loaded if m.startswith(("mlx_gemma_mtp.convert", "mlx_gemma_mtp.tuner"))}, loaded


def test_lazy_subcommands_list_the_help_of_their_real_parsers():
    import argparse
    import importlib

    from mlx_gemma_mtp.cli.main import LAZY_SUBCOMMANDS

    for name, (module, register, help_text) in LAZY_SUBCOMMANDS.items():
        sub = argparse.ArgumentParser().add_subparsers()
        getattr(importlib.import_module(module), register)(sub)
        assert [(a.dest, a.help) for a in sub._choices_actions] == [(name, help_text)]
