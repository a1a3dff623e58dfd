"""The benchmark CLI prints its side-by-side table (tiny runs; the numbers themselves are not asserted)."""

import re

import pytest

from mlx_gemma_mtp import bench

ARGS = ["--demo", "--prompts", "1", "--prompt-tokens", "48", "--max-tokens", "12", "--k", "2", "--repeats", "1"]


def test_bench_prints_costs_rows_and_exactness(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("MLX_GEMMA_MTP_CACHE", str(tmp_path))  # no saved calibration: auto starts from its model
    bench.main(ARGS)
    out = capsys.readouterr().out
    assert re.search(r"T_verify\(T\) for T=1\.\.9 \(ms\):( \d+\.\d\d){9}", out)
    assert re.search(r"T_draft\(K\)/K for K=1\.\.8", out)
    assert re.search(r"^plain\s+\d+\.\d\s+1\.00\s*$", out, re.MULTILINE)
    for label in ("plain", "K=2", "K=auto", "auto stale (slow MTP)", "auto stale (free MTP)"):
        assert re.search(rf"^{re.escape(label)}\s+\d+\.\d", out, re.MULTILINE), label
    assert re.search(r"^K=2\s+\S+\s+\S+\s+\d\.\d\d\s+\d+\.\d\d", out, re.MULTILINE)  # mean acc and overhead columns
    assert "all MTP outputs are identical to plain greedy decoding" in out  # the stale rows' too
    best = re.search(r"^auto vs the best fixed K \((plain|K=2)\): K=auto \d+\.\d\dx, auto stale \(slow MTP\) \d+\.\d\dx",
                     out, re.MULTILINE)
    assert best, out
    assert re.search(rf"^first generation on a freshly loaded pair .*prior: analytic\): auto \d+\.\d+ s, "
                     rf"K={0 if best.group(1) == 'plain' else 2} \d+\.\d+ s: auto takes \d+\.\d\dx the time$", out,
                     re.MULTILINE)


def test_bench_calibrate_saves_the_prior_of_auto(capsys, monkeypatch, tmp_path):
    from mlx_gemma_mtp import autodraft, load
    from mlx_gemma_mtp.demo import demo_dtype, demo_path

    monkeypatch.setenv("MLX_GEMMA_MTP_CACHE", str(tmp_path))
    bench.main([*ARGS, "--calibrate"])
    out = capsys.readouterr().out
    assert re.search(r"T_verify\(T\) for T=1\.\.9", out) and "saved to" in out and "mode" not in out
    pair = load(demo_path(), dtype=demo_dtype())
    costs = autodraft.saved_costs(pair.target, pair.drafter, greedy=True)
    assert costs is not None and costs.context == 48 + 12 // 2


def test_bench_sampling_compares_both_rules(capsys):
    bench.main([*ARGS, "--temp", "1.0", "--no-first-generation"])
    out = capsys.readouterr().out
    assert re.search(r"^K=2 leviathan\s", out, re.MULTILINE) and re.search(r"^K=2 match\s", out, re.MULTILINE)
    assert re.search(r"^K=auto seeded\s", out, re.MULTILINE) and "first generation" not in out
    assert re.search(r"^auto vs the best fixed K \((plain|K=2 leviathan)\): K=auto leviathan \d", out, re.MULTILINE)
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
