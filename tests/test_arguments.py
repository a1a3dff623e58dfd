"""Bad arguments to the API and the CLI get a clear ValueError (or the obviously intended behaviour) before
anything runs, and the bundle stays usable after them."""

from __future__ import annotations

import pytest

import mlx_gemma_mtp
from mlx_gemma_mtp import SamplerConfig, cli

PROMPT = [2, 10, 11, 12]


@pytest.fixture(scope="module")
def bundle(pair_dir):
    return mlx_gemma_mtp.load(pair_dir("e2b")[0])


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_tokens=2.5), r"max_tokens=2\.5: must be a positive integer"),
    (dict(max_tokens="8"), r"max_tokens='8': must be a positive integer"),
    (dict(max_tokens=0), r"max_tokens=0: must be a positive integer"),
    (dict(max_tokens=True), r"max_tokens=True: must be a positive integer"),
    (dict(prefill_step_size=-512), r"prefill_step_size=-512: must be a positive integer"),
    (dict(prefill_step_size=0), r"prefill_step_size=0: must be a positive integer"),
    (dict(sampler={"temperature": 0.7}), r"sampler must be a SamplerConfig"),
    (dict(num_draft_tokens=True), r"num_draft_tokens=True: use 'auto' or an int"),
    (dict(num_draft_tokens=2.0), r"num_draft_tokens=2\.0: use 'auto' or an int"),
    (dict(num_draft_tokens=99), r"num_draft_tokens=99: use 'auto' or an int"),
    (dict(stop=[1]), r"a string or a list of strings"),
    (dict(chat_template_kwargs=[("enable_thinking", True)]), r"chat_template_kwargs must be a dict"),
])
def test_bad_arguments_are_named_and_the_bundle_survives(bundle, kwargs, message):
    with pytest.raises(ValueError, match=message):
        next(mlx_gemma_mtp.stream_generate(bundle, PROMPT, **{"max_tokens": 4, **kwargs}))
    after = list(mlx_gemma_mtp.stream_generate(bundle, PROMPT, max_tokens=3, num_draft_tokens=2))
    assert 1 <= len(after) <= 3 and after[-1].finish_reason in ("stop", "length")


@pytest.mark.parametrize("field, value", [("top_k", 2.5), ("seed", -1), ("temperature", "0.7")])
def test_bad_sampler_values_are_named(field, value):
    with pytest.raises(ValueError, match=rf"SamplerConfig\.{field}="):
        SamplerConfig(**{"temperature": 1.0, field: value})


def test_cli_empty_prompt_is_an_error_not_the_default(pair_dir, capsys):
    path = str(pair_dir("e2b")[0])
    assert cli.main(["generate", "--model", path, "--prompt", "", "--no-chat-template", "--max-tokens", "2"]) == 1
    assert "empty string" in capsys.readouterr().err
