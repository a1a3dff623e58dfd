"""The batching benchmark prints its side-by-side rows on a tiny pair (the numbers themselves are not asserted),
and stops when a batched stream's greedy output differs from its serial one."""

import re

import mlx.core as mx
import pytest

from mlx_gemma_mtp import batched as batched_module
from mlx_gemma_mtp.bench import batching as bench

ARGS = ["--dtype", "float32", "--streams", "1,2", "--prompt-tokens", "12", "--max-tokens", "8", "--k", "2"]


def test_bench_batching_prints_every_row_with_exact_outputs(capsys, pair_dir):
    path = pair_dir("e2b")[0]
    summary = bench.main(["--model", str(path), *ARGS, "--forced-acceptance", "0.8", "--mlx-lm"])
    out = capsys.readouterr().out
    assert "prompts of [12, 6] tokens" in out and "forced acceptance 0.8" in out
    number = r"\s+\d+\.\d+"
    for s in (1, 2):
        assert re.search(rf"^ {s}  serial plain{number}\s+1\.00x{number}\s+1\.00x{number}{number}\s+=$", out,
                         re.MULTILINE), out
        for label in ("serial K=2 forced 0.8", "batched plain", "batched K=2 forced 0.8", "batched K=auto forced 0.8"):
            assert re.search(rf"^ {s}  {re.escape(label)}\s+({number}\s+\d+\.\d\dx){{2}}{number}{number}.*  =$", out,
                             re.MULTILINE), (s, label, out)
        assert re.search(rf"^ {s}  mlx-lm batched plain\s.*  (= |DIFFERS at \d+:\d+ )\(mlx-lm\)$", out, re.MULTILINE)
        assert re.search(rf"^  S={s}: batched plain, ours / mlx-lm: aggregate \d+\.\d\dx", out, re.MULTILINE)
    assert set(summary.runs) == {1, 2}
    assert all(at == "=" for label, at in summary.divergence[2].items() if not label.startswith("mlx-lm"))
    runs = summary.runs[2]
    assert [len(o) for o in runs["batched plain"].outputs] == [len(o) for o in runs["serial plain"].outputs]
    assert runs["batched K=2 forced 0.8"].stats.accepted > 0  # the oracle's drafts were accepted


def test_bench_batching_stops_when_a_batched_stream_differs(capsys, monkeypatch, pair_dir):
    """A broken verify (every draft accepted, right or wrong) gives a stream tokens its serial run never had."""
    real = batched_module.greedy_accept

    def accept_everything(logits, drafts):
        _, tokens = real(logits, drafts)
        k = drafts.shape[1]
        return mx.full((drafts.shape[0],), k, mx.int32), mx.concatenate([drafts, tokens[:, k:]], axis=1)

    monkeypatch.setattr(batched_module, "greedy_accept", accept_everything)
    path = pair_dir("e2b")[0]
    with pytest.raises(SystemExit, match=r"batched K=2 forced 0 with 1 streams: stream 0's output differs from "
                                         r"its serial plain decoding at token \d+ \(an exactness bug\)"):
        bench.main(["--model", str(path), *ARGS, "--forced-acceptance", "0", "--no-serial-mtp"])


def test_bench_batching_arguments(capsys):
    args = bench.parse_args(["--streams", "1,4,8", "--shape", "e2b", "--layers", "4"])
    assert args.streams == [1, 4, 8] and args.bits == 32 and args.k == [3]
    for argv, message in ((["--streams", "0,2"], "positive integers"), (["--layers", "2"], "--layers need --shape"),
                          (["--shape", "e2b", "--demo"], "choose one of"), (["--k", "9"], "1..8"),
                          (["--forced-acceptance", "1.5"], "[0, 1]")):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)
        assert message in capsys.readouterr().err, argv
