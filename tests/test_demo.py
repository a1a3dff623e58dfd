"""The shipped offline demo pair: loads without network, decodes exactly, and its drafter really drafts."""

from __future__ import annotations

import pytest

from mlx_gemma_mtp import load, stream_generate
from mlx_gemma_mtp.cli import main
from mlx_gemma_mtp.cli.generate import DEMO_PROMPT
from mlx_gemma_mtp.demo import demo_dtype, demo_path

# Measured on the shipped pair: mean accepted length 2.32 on this prompt at K=4 (64 tokens, float32). The
# floor is well below it but far above what a broken wiring gives (a drafter that sees the wrong hidden state,
# position or K/V accepts ~0), so a regression that kills acceptance fails here.
ACCEPTANCE_FLOOR = 1.5


@pytest.fixture(scope="module")
def demo():
    return load(demo_path(), dtype=demo_dtype())


def test_demo_pair_ships_and_loads_offline(demo, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert demo.drafter is not None and demo.tokenizer is not None
    assert "masked_embedding" in demo.drafter, "the demo drafter uses the cluster head"
    assert demo.target.args.hidden_size_per_layer_input > 0 and demo.target.args.num_kv_shared_layers > 0


def test_demo_mtp_is_exact_and_accepts(demo):
    plain = [r.token for r in stream_generate(demo, DEMO_PROMPT, max_tokens=64, num_draft_tokens=0)]
    responses = list(stream_generate(demo, DEMO_PROMPT, max_tokens=64, num_draft_tokens=4))
    assert [r.token for r in responses] == plain
    stats = responses[-1].draft
    assert stats.mean_accepted_length >= ACCEPTANCE_FLOOR, stats.acceptance_per_position


def test_generate_without_model_runs_the_demo(capsys):
    assert main(["generate", "--max-tokens", "24", "--num-draft-tokens", "4"]) == 0
    captured = capsys.readouterr()
    assert "offline demo pair" in captured.err and "--model google/gemma-4-E2B-it" in captured.err
    assert "MTP:" in captured.err and captured.out.strip()
