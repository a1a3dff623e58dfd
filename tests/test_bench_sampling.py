"""The sampling benchmark prints one row per filter and the acceptance of a round, and refuses to time a
sampler that breaks its invariants (tiny vocabulary)."""

import re

import mlx.core as mx
import pytest
from reference_sampling import reference_log_probs, reference_speculative_accept

from mlx_gemma_mtp.bench import sampling as bench_sampling
from mlx_gemma_mtp.sampling import SamplerConfig, log_probs
from mlx_gemma_mtp.speculative import accept

ARGS = ["--vocab", "4096", "--repeats", "1"]


def test_bench_sampling_prints_absolute_times_and_checks(capsys):
    bench_sampling.main(ARGS)
    out = capsys.readouterr().out
    assert re.search(r"^case\s+ms\s+x unfiltered\s+check$", out, re.MULTILINE), out
    kept = {}
    for name in bench_sampling.CASES:
        row = re.search(rf"^{re.escape(name)}\s+\d+\.\d\d\s+\d+\.\d\dx  kept (\d+)-(\d+) of 4096 per row$",
                        out, re.MULTILINE)
        assert row, name
        kept[name] = tuple(map(int, row.groups()))
    assert re.search(r"^unfiltered\s+\d+\.\d\d\s+1\.00x ", out, re.MULTILINE)
    assert kept["unfiltered"] == (4096, 4096) and kept["top-k 64"] == (64, 64)
    assert 1 <= kept["top-k 64 + top-p 0.95"][0] <= kept["top-k 64 + top-p 0.95"][1] <= 64
    accepted = r"^accept K=8, Gemma defaults\s+\d+\.\d\d\s+\d+\.\d\dx  accepted( \d){5} of 8 \(seeds 0-4\)$"
    assert re.search(accepted, out, re.MULTILINE), out


def test_bench_sampling_raises_on_a_filter_that_keeps_too_much(monkeypatch):
    def no_top_k(logits, cfg):
        return log_probs(logits, SamplerConfig(temperature=cfg.temperature, top_p=cfg.top_p, min_p=cfg.min_p))

    monkeypatch.setattr(bench_sampling, "log_probs", no_top_k)
    with pytest.raises(AssertionError, match="more than top_k = 64"):
        bench_sampling.main(ARGS)


def test_bench_sampling_raises_on_rows_that_are_not_distributions(monkeypatch):
    monkeypatch.setattr(bench_sampling, "log_probs", lambda logits, cfg: logits.astype(mx.float32))
    with pytest.raises(AssertionError, match="unfiltered: .* must keep a token and sum to 1"):
        bench_sampling.main(ARGS)


def test_bench_sampling_raises_on_an_acceptance_that_keeps_a_rejected_draft(monkeypatch):
    def all_accepted(out, drafts, q, cfg):  # claims all K, but its first token is not the first draft
        return mx.array(drafts.shape[0]), mx.concatenate([drafts[:1] + 1, drafts[1:], drafts[-1:]])

    monkeypatch.setattr(bench_sampling, "accept", all_accepted)
    with pytest.raises(AssertionError, match="speculative accept: n = 8 .* the first n tokens the drafts"):
        bench_sampling.main(ARGS)


@pytest.mark.parametrize("vocab", [4096, 262_144])
def test_bench_inputs_accept_like_the_pre_issue_10_reference(vocab):
    """The acceptance the script times agrees with the full-vocabulary reference on its own inputs: the same
    accepted count from the same random numbers (the resampled token's draws differ by design)."""
    logits = bench_sampling.gemma_like_logits(9, vocab, seed=0)
    cfg = SamplerConfig(**bench_sampling.GEMMA)
    q, drafts = bench_sampling.accept_inputs(logits, cfg, seed=0)
    for s in range(5):
        mx.random.seed(s)
        n_ref, _ = reference_speculative_accept(reference_log_probs(logits, cfg), q, drafts)
        mx.random.seed(s)
        n, tokens = accept(logits, drafts, q, cfg)
        assert n.item() == n_ref.item(), s
        assert tokens[: n.item()].tolist() == drafts[: n.item()].tolist()
