"""The benchmark CLI prints its side-by-side table (tiny runs; the numbers themselves are not asserted)."""

import re

import mlx.core as mx
import pytest

from mlx_gemma_mtp.bench import decoding as bench

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
    from mlx_gemma_mtp import calibration, load
    from mlx_gemma_mtp.demo import demo_dtype, demo_path

    monkeypatch.setenv("MLX_GEMMA_MTP_CACHE", str(tmp_path))
    bench.main([*ARGS, "--calibrate"])
    out = capsys.readouterr().out
    assert re.search(r"T_verify\(T\) for T=1\.\.9", out) and "saved to" in out and "mode" not in out
    pair = load(demo_path(), dtype=demo_dtype())
    costs = calibration.saved_costs(pair.target, pair.drafter, greedy=True)
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
    from mlx_gemma_mtp.bench import mlx_vlm as bench_mlx_vlm

    monkeypatch.setattr(bench_mlx_vlm, "version", lambda: None)
    bench.main(ARGS)
    assert "mlx-vlm: not installed, comparison skipped" in capsys.readouterr().out


# --- released shapes (bench_shape.py, costmodel.py, bench_gpu.py): tiny cuts of E2B, real layout -------------

SHAPE = ["--shape", "e2b", "--bits", "32", "--layers", "2", "--vocab", "2048", "--force-acceptance", "0.8",
         "--prompts", "1", "--prompt-tokens", "32", "--max-tokens", "12", "--k", "2", "--repeats", "1"]


def test_bench_shape_compares_mlx_lm_and_prints_the_cost_model(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("MLX_GEMMA_MTP_CACHE", str(tmp_path))
    summary = bench.main(SHAPE)
    out = capsys.readouterr().out
    assert "model: random e2b pair (float32, 2 layers, vocab 2048; V = 2048)" in out
    assert re.search(r"T_verify\(T\) for T=1\.\.9 \(ms\):( \d+\.\d\d){9}", out)
    assert re.search(r"T_draft\(K\)/K for K=1\.\.8", out)
    assert re.search(r"^K=2 forced\s+\d+\.\d\s+\d+\.\d\d\s+\d\.\d\d\s+\d+\.\d\d  \d\.\d\d \d\.\d\d$", out, re.MULTILINE)
    for label in ("K=auto forced", "auto stale (slow MTP) forced", "auto stale (free MTP) forced"):
        assert re.search(rf"^{re.escape(label)}\s+\d+\.\d\s+\d+\.\d\d", out, re.MULTILINE), label
    assert "all MTP outputs are identical to plain greedy decoding" in out
    assert re.search(r"^auto vs the best fixed K \((plain|K=2 forced)\): K=auto forced \d+\.\d\dx", out, re.MULTILINE)
    # mlx-lm's own model and loop on the same float32 weights: the same tokens (the run stops otherwise)
    assert re.search(r"^mlx-lm 0\.\d+\.\d+: its gemma4_text model", out, re.MULTILINE)
    assert re.search(r"^mlx-lm plain\s+\d+\.\d\s+\d+\.\d\d\s+\(output identical to ours\)$", out, re.MULTILINE)
    assert re.search(r"^plain decoding, ours / mlx-lm: \d+\.\d\dx$", out, re.MULTILINE)
    assert summary.mtp_same and summary.mlx_lm_same
    # the cost model: both profiles, K = 1..8 from the measured costs; at K = 4 the 31B profile gives 3.94 tokens
    assert "  published 31B: 0.92 0.78 0.67 0.57" in out and re.search(r"^  this run \(K=2 row\): \d\.\d\d \d\.\d\d$",
                                                                      out, re.MULTILINE)
    assert re.search(r"^2\s+\d+\.\d\s+2\.70\s+\d+\.\d\dx\s+\d\.\d\d\s+\d+\.\d\dx\s+\d+\.\d\dx$", out, re.MULTILINE)
    assert re.search(r"^4\s+\d+\.\d\s+3\.94\s+\d+\.\d\dx\s+\d\.\d\d\s+\d+\.\d\dx$", out, re.MULTILINE)
    assert re.search(r"^best K\s+K=\d\s+\d+\.\d\dx\s+K=\d\s+\d+\.\d\dx$", out, re.MULTILINE)
    assert "mlx-vlm: comparison skipped (--shape" in out


def test_bench_shape_profile_and_bad_arguments(capsys):
    args = bench.parse_args(["--shape", "31b", "--profile", "0.9,0.8"])
    assert args.profile == (0.9, 0.8) and args.bits == 4 and args.layers is None
    for argv, message in ((["--layers", "2"], "--layers need --shape"),
                          (["--shape", "e2b", "--demo"], "drop --model/--demo"),
                          (["--shape", "e2b", "--bits", "3"], "invalid choice"),
                          (["--shape", "e2b", "--profile", "0.5,0.9"], "cannot increase")):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)
        assert message in capsys.readouterr().err, argv
    if mx.default_device() == mx.cpu:  # refused before anything is built
        with pytest.raises(SystemExit, match="gather_mm in float32 only; use --bits 32"):
            bench.main(["--shape", "26b-a4b", "--bits", "16", "--layers", "2"])


def test_converted_pairs_equal_random_pairs():
    from mlx.utils import tree_flatten

    from mlx_gemma_mtp.bench.shapes import converted
    from mlx_gemma_mtp.testing.presets import random_pair

    base = random_pair("e2b", bits=16, layers=2, vocab=512)
    made = random_pair("e2b", bits=4, layers=2, vocab=512)
    ours = dict(tree_flatten(converted(base, 4).target.parameters()))
    theirs = dict(tree_flatten(made.target.parameters()))
    assert ours.keys() == theirs.keys() and all(mx.array_equal(ours[k], theirs[k]) for k in ours)
    f32 = converted(base, 32)
    assert f32.target.model.embed_tokens.weight.dtype == mx.float32
    assert mx.array_equal(f32.drafter.pre_projection.weight, base.drafter.pre_projection.weight.astype(mx.float32))
    assert converted(base, 16) is base


def _flip_k2_at_token_3(monkeypatch):
    """Make every K=2 row's output differ from plain decoding at token 3, as a flipped near-tie would (greedy MTP's
    real outputs cannot differ: the target decides every token)."""
    real = bench.run

    def run(bundle, prompts, max_tokens, k, sampler, proposer=None):
        tps, stats, outputs = real(bundle, prompts, max_tokens, k, sampler, proposer)
        if k == 2:
            outputs = [[*out[:3], out[3] + 1, *out[4:]] for out in outputs]
        return tps, stats, outputs

    monkeypatch.setattr(bench, "run", run)


def test_first_divergence_names_the_first_differing_token():
    assert bench.first_divergence([[1, 2, 3]], [[1, 2, 3]]) == "="
    assert bench.first_divergence([[1, 5, 3, 4]], [[1, 2, 3, 9]]) == "1"
    assert bench.first_divergence([[1, 2]], [[1, 2, 3]]) == "2"  # stopped early: where the shorter one ends
    assert bench.first_divergence([[7], [1, 2, 0]], [[7], [1, 2, 3]]) == "1:2"  # several prompts: prompt:index


def test_bench_stops_on_a_float32_divergence(capsys, monkeypatch, tmp_path):
    """Run directly, `bench` keeps exactness a hard guarantee on float32 weights."""
    monkeypatch.setenv("MLX_GEMMA_MTP_CACHE", str(tmp_path))
    _flip_k2_at_token_3(monkeypatch)
    with pytest.raises(SystemExit, match=r"K=2 forced output differs from plain greedy decoding at token 3 "):
        bench.main(["--shape", "e2b", "--bits", "32", "--layers", "2", "--vocab", "2048", "--force-acceptance",
                    "0.8", "--prompts", "1", "--prompt-tokens", "24", "--max-tokens", "8", "--k", "2", "--repeats", "1"])


def test_bench_gpu_dry_run_reports_each_rows_first_divergence_in_one_table(capsys, monkeypatch, tmp_path):
    """The GPU table never stops on a divergence (a GPU's multi-row kernels may flip a near-tie): the diverging K=2
    row gets its first differing token in its "div" column, the others "=", and the table completes."""
    from mlx_gemma_mtp.bench import gpu as bench_gpu

    monkeypatch.setenv("MLX_GEMMA_MTP_CACHE", str(tmp_path))
    _flip_k2_at_token_3(monkeypatch)
    bench_gpu.main(["--shapes", "e2b", "--bits", "32", "--layers", "2", "--vocab", "2048", "--prompt-tokens",
                    "24", "--max-tokens", "8", "--repeats", "1", "--k", "2", "4"])
    out = capsys.readouterr().out
    assert "=== e2b, float32 ===" in out
    assert "DIFFER from plain greedy decoding (first differing token): K=2 forced at 3 (" in out
    head = re.search(r"^\| shape \| weights \| build s \| plain tok/s \| mlx-lm tok/s \| ours/mlx-lm \| same \| "
                     r"K=2\s+\| K=4\s+\| auto\s+\| div K=2 \| div K=4 \| div auto \| T_v\(1\) ms \| "
                     r"T_v\(5\)/T_v\(1\) \| T_d\(4\) ms \| model \(31B profile\) \|$", out, re.MULTILINE)
    assert head, out
    assert re.search(r"^\| e2b\s+\| float32 \|( \d+\.?\d*\s+\|){3} \d+\.\d\dx\s+\| yes\s+\|"
                     r"( \d+\.\d\dx\s*\|){3} 3\s+\| =\s+\| =\s+\| \d+\.\d", out, re.MULTILINE), out


def test_bench_gpu_refuses_full_shapes_on_a_cpu_and_reports_failed_rows(capsys):
    from mlx_gemma_mtp.bench import gpu as bench_gpu

    if mx.default_device() != mx.cpu:
        pytest.skip("the refusal and the bf16-MoE failure are the CPU backend's")
    with pytest.raises(SystemExit):
        bench_gpu.main([])
    assert "full shapes would take hours" in capsys.readouterr().err
    bench_gpu.main(["--shapes", "26b-a4b", "--bits", "16", "--layers", "2", "--vocab", "512", "--experts", "2"])
    out = capsys.readouterr().out
    assert re.search(r"^\| 26b-a4b \| bfloat16 \| error: --shape 26b-a4b --bits 16: MLX's CPU backend", out,
                     re.MULTILINE), out


@pytest.mark.parametrize("shape", ["e2b", "e4b", "26b-a4b"])  # 31B's layer kinds are 26B-A4B's less the MoE
def test_mlx_lm_decodes_every_preset_like_ours(shape):
    """mlx-lm's gemma4_text given our arrays (no renaming) decodes the same tokens in float32; quantized modules
    are quantized alike."""
    from mlx_gemma_mtp.bench.shapes import MlxLmPlain, converted
    from mlx_gemma_mtp.sampling import SamplerConfig
    from mlx_gemma_mtp.testing.presets import random_pair

    base = random_pair(shape, layers=2, vocab=512, experts=2 if shape == "26b-a4b" else None)
    prompts = [[(i * 7919) % 512 for i in range(16)]]
    pair = converted(base, 32)
    ours = bench.run(pair, prompts, 8, 0, SamplerConfig())[2]
    assert MlxLmPlain(pair).run(prompts, 8)[2] == ours
    if shape == "e2b":
        quantized = converted(base, 4)
        assert MlxLmPlain(quantized).run(prompts, 4)[2] == bench.run(quantized, prompts, 4, 0, SamplerConfig())[2]
