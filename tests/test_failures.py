"""A failed request leaves the loaded bundle intact: an exception (or Ctrl-C) while the draft round is being
compiled used to leave MLX's trace placeholders in the target's embedding and the drafter's weights, and every
later generation, plain included, failed until a reload."""

from __future__ import annotations

import pytest

import mlx_gemma_mtp
from mlx_gemma_mtp.sampling import SamplerConfig

PROMPT = [2, 10, 11, 12, 13]


def tokens(bundle, **kw) -> list[int]:
    return [r.token for r in mlx_gemma_mtp.stream_generate(bundle, PROMPT, max_tokens=10, **kw)]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("where", ["top_token", "candidates"])
def test_exception_inside_the_compiled_round_does_not_poison_the_bundle(pair_dir, monkeypatch, error, where):
    bundle = mlx_gemma_mtp.load(pair_dir("e2b")[0])
    sampler = SamplerConfig() if where == "top_token" else SamplerConfig(temperature=1.0, seed=3)
    expected_plain = tokens(bundle, num_draft_tokens=0)
    fresh = mlx_gemma_mtp.load(pair_dir("e2b")[0])
    expected_mtp = tokens(fresh, num_draft_tokens=4, sampler=sampler)

    original = getattr(type(bundle.drafter), where)

    def fail(*args, **kwargs):
        raise error("injected while tracing the draft round")

    monkeypatch.setattr(type(bundle.drafter), where, fail)
    with pytest.raises(error, match="injected"):
        tokens(bundle, num_draft_tokens=4, sampler=sampler)
    monkeypatch.setattr(type(bundle.drafter), where, original)

    assert tokens(bundle, num_draft_tokens=0) == expected_plain
    assert tokens(bundle, num_draft_tokens=4, sampler=sampler) == expected_mtp
    assert tokens(bundle, num_draft_tokens=0) == expected_plain
