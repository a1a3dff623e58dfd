"""The benchmark CLI prints its side-by-side table (tiny runs; the numbers themselves are not asserted)."""

import re

import pytest

from mlx_gemma_mtp import bench

ARGS = ["--demo", "--prompts", "1", "--prompt-tokens", "48", "--max-tokens", "12", "--k", "2", "--repeats", "1"]


def test_bench_prints_costs_rows_and_exactness(capsys):
    bench.main(ARGS)
    out = capsys.readouterr().out
    assert re.search(r"T_verify\(T\) for T=1\.\.9 \(ms\):( \d+\.\d\d){9}", out)
    assert re.search(r"T_draft\(K\)/K for K=1\.\.8", out)
    assert re.search(r"^plain\s+\d+\.\d\s+1\.00\s*$", out, re.MULTILINE)
    for label in ("plain", "K=2", "K=auto"):
        assert re.search(rf"^{re.escape(label)}\s+\d+\.\d", out, re.MULTILINE), label
    assert re.search(r"^K=2\s+\S+\s+\S+\s+\d\.\d\d\s+\d+\.\d\d", out, re.MULTILINE)  # mean acc and overhead columns
    assert "all MTP outputs are identical to plain greedy decoding" in out


def test_bench_sampling_compares_both_rules(capsys):
    bench.main([*ARGS, "--temp", "1.0"])
    out = capsys.readouterr().out
    assert re.search(r"^K=2 leviathan\s", out, re.MULTILINE) and re.search(r"^K=2 match\s", out, re.MULTILINE)
    assert "identical to plain greedy" not in out


def test_bench_runs_the_pair_through_mlx_vlm(capsys):
    pytest.importorskip("mlx_vlm")  # CI installs it (.ci/run); without it the bench says it skipped
    bench.main(ARGS)
    out = capsys.readouterr().out
    assert re.search(r"^mlx-vlm K=2\s+\d+\.\d+\s+\d+\.\d\d\s+\d\.\d\d\s.*\(output identical to plain\)$", out,
                     re.MULTILINE), out


def test_bench_says_when_mlx_vlm_is_missing(capsys, monkeypatch):
    from mlx_gemma_mtp import bench_mlx_vlm

    monkeypatch.setattr(bench_mlx_vlm, "version", lambda: None)
    bench.main(ARGS)
    assert "mlx-vlm: not installed, comparison skipped" in capsys.readouterr().out
