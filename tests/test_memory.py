"""Memory hygiene (mlx-lm's pattern): the wired limit is raised to the device's recommended working set while
generating and restored after, a model close to that size is warned about, and generation runs on its own
stream. The CPU backend reports no recommended size, so the device is faked here to exercise the Metal path."""

from __future__ import annotations

import mlx.core as mx
import pytest

import mlx_gemma_mtp
from mlx_gemma_mtp import memory


@pytest.fixture
def fake_metal(monkeypatch):
    """A device with a recommended working set of `size` bytes; records every set_wired_limit call."""
    calls = []
    state = {"size": 1 << 40, "limit": 0}

    def set_wired_limit(n):
        calls.append(n)
        old, state["limit"] = state["limit"], n
        return old

    monkeypatch.setattr(memory.mx, "device_info", lambda: {"max_recommended_working_set_size": state["size"]})
    monkeypatch.setattr(memory.mx, "set_wired_limit", set_wired_limit)
    return state, calls


def test_wired_limit_is_raised_while_generating_and_restored(pair_dir, fake_metal, capsys):
    state, calls = fake_metal
    bundle = mlx_gemma_mtp.load(pair_dir("e2b")[0])
    seen = []
    for r in mlx_gemma_mtp.stream_generate(bundle, [2, 10, 11, 12], max_tokens=5, num_draft_tokens=2):
        seen.append(state["limit"])
    assert seen and all(limit == state["size"] for limit in seen)
    assert calls == [state["size"], 0] and state["limit"] == 0
    assert "warning" not in capsys.readouterr().err


def test_model_close_to_the_working_set_is_warned_about(pair_dir, fake_metal, capsys):
    state, calls = fake_metal
    bundle = mlx_gemma_mtp.load(pair_dir("e2b")[0])
    size = memory.model_bytes(bundle.target, bundle.drafter)
    state["size"] = int(size / 0.95)  # the model is 95% of the recommended working set
    list(mlx_gemma_mtp.stream_generate(bundle, [2, 10, 11, 12], max_tokens=3, num_draft_tokens=0))
    err = capsys.readouterr().err
    assert "close to this device's recommended working set" in err
    assert calls[-1] == 0  # restored, even when warned


def test_limit_restored_when_the_caller_stops_early(pair_dir, fake_metal):
    state, _ = fake_metal
    bundle = mlx_gemma_mtp.load(pair_dir("e2b")[0])
    stream = mlx_gemma_mtp.stream_generate(bundle, [2, 10, 11, 12], max_tokens=50, num_draft_tokens=2)
    next(stream)
    assert state["limit"] == state["size"]
    stream.close()
    assert state["limit"] == 0


def test_generation_runs_on_its_own_stream(pair_dir, monkeypatch):
    bundle = mlx_gemma_mtp.load(pair_dir("e2b")[0])
    seen = []
    forward = bundle.target.forward

    def spy(*args, **kwargs):
        seen.append(mx.default_stream(mx.default_device()))
        return forward(*args, **kwargs)

    monkeypatch.setattr(bundle.target, "forward", spy)
    caller = mx.default_stream(mx.default_device())
    for _ in mlx_gemma_mtp.stream_generate(bundle, [2, 10, 11, 12], max_tokens=4, num_draft_tokens=2):
        assert mx.default_stream(mx.default_device()) == caller  # the caller's code keeps its stream
    assert seen and all(s != caller for s in seen)
