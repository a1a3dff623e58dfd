"""The multimodal benchmark (`bench.multimodal`) on a tiny image pair: it prints its rows, checks that MTP gives
plain decoding's tokens (and stops when it does not), and says why when mlx-vlm cannot run (the numbers are not
asserted)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import hf_oracle as oracle
import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from mlx_gemma_mtp import speculative
from mlx_gemma_mtp.bench import multimodal as bench
from mlx_gemma_mtp.testing.presets import preset_config, tower_parameters
from mlx_gemma_mtp.testing.tokenizer import write_gemma4_tokenizer

TEMPLATE = (Path(__file__).parent / "data" / "gemma4_e2b_chat_template.jinja").read_text()
# the tiny towers: 4-pixel patches pooled 2 x 2 (the oracle's vision config)
PROCESSOR = {"image_processor": {"patch_size": 4, "pooling_kernel_size": 2, "max_soft_tokens": 70}}
FAST = ["--image-size", "32x24", "--max-tokens", "10", "--k", "2", "--repeats", "1", "--force-acceptance", "0.8"]


@pytest.fixture(scope="module")
def pair_dir(tmp_path_factory) -> Path:
    """A tiny e2b-style target with vision and audio towers, its drafter, a Gemma-4-like tokenizer."""
    path = tmp_path_factory.mktemp("mm-bench")
    target = oracle.make_target("e2b", seed=0, layout="multimodal")
    oracle.save_target(target, str(path))
    oracle.save_assistant(oracle.make_assistant(target, seed=1, ordered_embeddings=True), str(path / "drafter"))
    write_gemma4_tokenizer(path, 256, TEMPLATE, media=oracle.MEDIA_TOKENS)
    (path / "processor_config.json").write_text(json.dumps(PROCESSOR))
    return path


def test_bench_prints_ttft_mtp_rows_and_exactness(pair_dir, capsys, tmp_path):
    out_json = tmp_path / "result.json"
    result = bench.main(["--model", str(pair_dir), "--float32", *FAST, "--json", str(out_json)])
    out = capsys.readouterr().out
    assert "image: generated 32x24 PNG" in out and "forced acceptance 0.8" in out
    number = r"\d+\.\d\d"
    assert re.search(rf"^ours plain\s+\d+\s+{number}\s+{number}\s+1\.00\s+\(reference\)$", out, re.MULTILINE), out
    assert re.search(rf"^ours K=2 forced\s+\d+\s+{number}\s+{number}\s+{number}\s+{number}\s+= plain$", out,
                     re.MULTILINE), out
    # auto may settle on plain decoding for this pair (no rounds: no mean accepted length)
    assert re.search(rf"^ours K=auto forced\s+\d+\s+{number}\s+{number}\s+{number}(\s+{number})?\s+= plain$",
                     out, re.MULTILINE), out
    assert "all our MTP outputs are identical to plain greedy decoding (checked in every run)" in out
    assert "mlx-vlm: not compared (pass --mlx-vlm)" in out
    assert len(result.reference) == 10 and all(len(r.runs) == 1 for r in result.rows)
    data = json.loads(out_json.read_text())
    assert [r["mode"] for r in data["rows"]] == ["ours plain", "ours K=2 forced", "ours K=auto forced"]
    assert data["rows"][1]["vs_plain"] > 0 and data["versions"]["mlx"] == mx.__version__


def test_bench_stops_when_mtp_differs_from_plain(pair_dir, capsys, monkeypatch):
    """A verify that accepts every draft (a broken acceptance rule) must not pass as a fast MTP row."""

    def accept_everything(logits, drafts):
        return mx.array(drafts.size), mx.concatenate([drafts.astype(mx.int32), mx.argmax(logits[-1:], axis=-1)
                                                      .astype(mx.int32)])

    monkeypatch.setattr(speculative, "greedy_accept", accept_everything)
    with pytest.raises(SystemExit, match=r"ours K=2 output differs from plain greedy decoding at token \d+"):
        bench.main(["--model", str(pair_dir), "--float32", *FAST[:-2]])  # unforced: the drafter's own drafts


def test_bench_runs_mlx_vlm_or_says_why_not(pair_dir, capsys):
    result = bench.main(["--model", str(pair_dir), "--float32", *FAST, "--mlx-vlm"])
    out = capsys.readouterr().out
    if "ours ran alone" in result.mlx_vlm:  # e.g. not installed: the reason is printed, ours still ran
        assert re.search(r"^mlx-vlm.*: .*; ours ran alone$", out, re.MULTILINE)
        return
    assert re.search(r"^mlx-vlm plain\s+\d+\s+\d+\.\d\d\s+\d+\.\d\d\s+1\.00\s+(= ours|differs from ours at \d+)$",
                     out, re.MULTILINE), out
    assert re.search(r"^mlx-vlm K=2 forced\s+\d+\s+\d+\.\d\d\s+\d+\.\d\d\s+\d+\.\d\d\s+\d+\.\d\d\s+", out,
                     re.MULTILINE), out
    assert re.search(r"^  TTFT, \d+ soft tokens \(mlx-vlm's time / ours\): \d+\.\d\dx$", out, re.MULTILINE)


def test_bench_says_why_mlx_vlm_cannot_run(pair_dir, capsys, monkeypatch):
    monkeypatch.setattr(bench, "mlx_vlm_blocker", lambda bundle: "mlx-vlm 0.0: importing x failed (missing 'cv2')")
    result = bench.main(["--model", str(pair_dir), "--float32", *FAST, "--mlx-vlm"])
    out = capsys.readouterr().out
    assert "mlx-vlm 0.0: importing x failed (missing 'cv2'); ours ran alone" in out
    assert {r.impl for r in result.rows} == {"ours"}


def test_tower_memory_counts_the_released_towers(capsys):
    bench.main(["--tower-memory"])
    out = capsys.readouterr().out
    assert re.search(r"^e2b\s+768 x 16\s+167\.4M\s+1\.2M\s+304\.8M\s+2\.4M\s+0\.337\s+0\.614\s+0\.951$", out,
                     re.MULTILINE), out
    assert re.search(r"^31b\s+1152 x 27\s+569\.6M\s+6\.2M\s+-\s+-\s+1\.151\s+-\s+1\.151$", out, re.MULTILINE), out
    config = preset_config("e4b")[0]
    assert tower_parameters(config, 2560)["embed_vision"] == 768 * 2560  # projection to the text width


def test_bad_arguments():
    for argv in (["--soft-tokens", "100"], ["--k", "0"], ["--draft", "x"], ["--force-acceptance", "2"]):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)


def test_preset_checkpoint_with_real_towers_takes_images(tmp_path):
    """`write_hf_checkpoint(towers=True)`: the released tower shapes load strictly, a cut vocabulary gets the
    placeholder ids at its end, and the tokenizer's template writes the image placeholder."""
    from mlx_gemma_mtp import load
    from mlx_gemma_mtp.decode import encode_prompt
    from mlx_gemma_mtp.testing.presets import media_token_ids, write_hf_checkpoint

    target, drafter = write_hf_checkpoint("e2b", tmp_path, layers=2, vocab=512, towers=True)
    ids = media_token_ids(512)
    assert ids["image_token_id"] == 507 and sorted(ids.values()) == list(range(505, 512))
    assert json.loads((target / "processor_config.json").read_text())["image_processor"]["max_soft_tokens"] == 280
    bundle = load(target, draft=drafter)
    encoded = encode_prompt(bundle, bench.chat(bench.sample_image(64, 48)))
    span = encoded.spans[0]
    assert encoded.ids[span.start - 1 : span.start + 1] == [ids["boi_token_id"], ids["image_token_id"]]
    assert span.length == 266 and encoded.ids[span.end] == ids["eoi_token_id"]  # 19 x 14 within 280 soft tokens
    towers = bundle.media.towers  # every released tower tensor present, by name and shape (strict load)
    counts = tower_parameters(bundle.config, 1536)
    assert sum(v.size for _, v in tree_flatten(towers.parameters())) == sum(counts.values())
