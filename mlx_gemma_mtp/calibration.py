"""Calibration of the draft length: the real draft and verify calls timed, and saved as `auto`'s prior.

`measure_costs` times drafting K tokens and verifying K + 1 (for the benchmark and for
`python -m mlx_gemma_mtp.bench --calibrate`); the result is saved in ~/.cache/mlx_gemma_mtp/draft_costs.json (or
$MLX_GEMMA_MTP_CACHE), keyed by shapes, dtypes, MLX version and device, and gives a new `auto` record its prior
shapes (`draft_length.new_record`). The online policy itself never reads the disk or times anything.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx

from .cache import trim_cache
from .drafting import DraftStep, cache_windows, draft
from .models.gemma4_assistant import Drafter
from .models.gemma4_text import Model
from .round_cost import DraftCosts
from .sampling import SamplerConfig
from .speculative import accept

COSTS_VERSION = 5  # bump when the drafter step or the verify changes cost: saved measurements become stale


def _timed_pair(first: Callable[[], mx.array], second: Callable[[], mx.array], reps: int = 5) -> tuple[float, float]:
    """Minimum times of `first` and `second`, run alternately as in a decoding round (each evicts the other's
    weights from the CPU caches; timing either alone in a tight loop would flatter it)."""
    mx.eval(first(), second())  # warm-up (kernel compilation, allocations)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        mx.eval(first())
        t1 = time.perf_counter()
        mx.eval(second())
        times.append((t1 - t0, time.perf_counter() - t1))
    # other processes only ever add time: the minimum is the machine's cost
    return min(t for t, _ in times), min(t for _, t in times)


def measure_costs(target: Model, drafter: Drafter, max_drafts: int, context: int = 128,
                  greedy: bool = True) -> DraftCosts:
    """Time drafting K = 0..max_drafts tokens (greedy or sampled) and the verify of K + 1 tokens that follows it
    (forward and acceptance rule), after a `context`-token prefix. For the benchmark and calibration only: it runs
    dozens of forwards, and sampling draws from MLX's global RNG."""
    ids = mx.arange(context + 1) % target.args.vocab_size
    cache = target.make_cache(max_rollback=max_drafts + 1)
    out = target.forward(ids[None], cache, return_hidden=True)
    mx.eval(out.hidden, [c.keys for c in cache])
    windows, step = cache_windows(target, cache), DraftStep(target, drafter)
    sampler = SamplerConfig() if greedy else SamplerConfig(temperature=1.0, seed=0)

    V = target.args.vocab_size
    uniform_q = mx.full((max_drafts, V), -math.log(V))

    def verify(T):
        """The target's side of a round: forward and the acceptance rule (sampled acceptance is not free)."""
        out = target.forward(ids[None, :T], cache, rows=T, return_hidden=True)
        drafts, q = ids[: T - 1], None if greedy else uniform_q[: T - 1]
        n, tokens = accept(out.logits[0], drafts, q, sampler)
        mx.eval(n, tokens)
        trim_cache(cache, T)  # keep the context fixed between timings
        return tokens

    def drafting(k):
        return draft(step, ids[-1:], out.hidden, windows, context, k, sampler)[0]

    costs = DraftCosts([0.0], [0.0], context)
    for k in range(max_drafts + 1):
        draft_time, verify_time = _timed_pair(lambda k=k: drafting(k), lambda k=k: verify(k + 1))
        costs.verify.append(verify_time)
        if k:
            costs.draft.append(draft_time)
    return costs


def _cache_file() -> Path:
    root = os.environ.get("MLX_GEMMA_MTP_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return Path(root) / "mlx_gemma_mtp" / "draft_costs.json"


def _disk_key(target: Model, drafter: Drafter, greedy: bool) -> str:
    """Costs depend on the shapes, dtypes, the MLX build and the device, not on the weights' values."""
    dtypes = (target.model.embed_tokens.weight.dtype, drafter.pre_projection.weight.dtype)
    info = mx.device_info()
    key = (COSTS_VERSION, repr(target.args), repr(drafter.args), str(dtypes), greedy, mx.__version__,
           str(mx.default_device()), info.get("device_name"), info.get("architecture"))
    return hashlib.sha256(repr(key).encode()).hexdigest()


def _read_disk_cache() -> dict:
    """Costs measured by earlier runs on this machine; a missing or unreadable file is an empty cache."""
    try:
        return json.loads(_cache_file().read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        warnings.warn(f"ignoring unreadable draft-cost cache {_cache_file()}: {e}", stacklevel=2)
        return {}


def saved_costs(target: Model, drafter: Drafter, greedy: bool) -> DraftCosts | None:
    """The calibration saved for this pair's shapes on this machine and MLX version, if any."""
    entry = _read_disk_cache().get(_disk_key(target, drafter, greedy))
    try:
        return None if entry is None else DraftCosts(entry["draft"], entry["verify"], int(entry["context"]))
    except (KeyError, TypeError, ValueError):  # an entry of another format: not a prior
        return None


def save_costs(target: Model, drafter: Drafter, greedy: bool, costs: DraftCosts) -> Path:
    """Save `costs` as the prior of new records for this pair's shapes on this machine; returns the file."""
    file = _cache_file()
    file.parent.mkdir(parents=True, exist_ok=True)
    entries = {**_read_disk_cache(), _disk_key(target, drafter, greedy): dataclasses.asdict(costs)}
    tmp = file.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(entries))
    tmp.replace(file)  # atomic: concurrent runs never see half a file
    return file
