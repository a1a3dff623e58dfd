"""Memory hygiene for generation, as mlx-lm does it on Metal (`mlx_lm.generate.wired_limit`, `generation_stream`).

On Apple silicon the GPU's memory can be paged out under pressure, which makes decoding crawl; raising the wired
limit to the device's recommended working-set size while generating keeps the weights resident. A model close to
that size is warned about, since it will page anyway. Generation runs on its own (thread-local) stream, so the
caller's work on the default stream never interleaves with it. On the CPU backend the device reports no
recommended size and the wired limit is left alone.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_reduce

# thread-local: each thread that generates gets a stream of its own
generation_stream = mx.new_thread_local_stream(mx.default_device())
WARN_FRACTION = 0.9  # of the recommended working set, as mlx-lm


def model_bytes(*modules: nn.Module | None) -> int:
    """Bytes of the parameters of `modules` (None entries, e.g. a missing drafter, count 0)."""
    return sum(tree_reduce(lambda acc, x: acc + x.nbytes if isinstance(x, mx.array) else acc, m, 0)
               for m in modules if m is not None)


@contextlib.contextmanager
def wired_limit(*modules: nn.Module | None, streams: list | None = None) -> Iterator[None]:
    """Raise the wired limit to the recommended working set while generating, then restore it.

    `streams` are synchronised before the old limit is restored (changing it during an async eval is unsafe).
    """
    recommended = mx.device_info().get("max_recommended_working_set_size")
    old = None
    if recommended:
        if (size := model_bytes(*modules)) > WARN_FRACTION * recommended:
            print(f"[warning] the model needs {size / 2**30:.1f} GiB, close to this device's recommended working "
                  f"set of {recommended / 2**30:.1f} GiB: generation may be slow (a smaller or more quantized "
                  "model, or `sudo sysctl iogpu.wired_limit_mb=...`, helps)", file=sys.stderr)
        old = mx.set_wired_limit(recommended)
    try:
        yield
    finally:  # a pipelined step may still be queued: never leave work behind on a thread's stream
        _synchronize(streams)
        if old is not None:
            mx.set_wired_limit(old)


def _synchronize(streams: list | None) -> None:
    for s in streams or []:
        mx.synchronize(s)
    if not streams:
        mx.synchronize()


class _StreamsReaper:
    """Lives in a thread's local storage; CPython drops it on that thread as the thread ends."""

    def __del__(self):
        mx.clear_streams()


_thread_state = threading.local()


def release_streams_at_thread_exit() -> None:
    """MLX (0.32) aborts the whole process at exit ("terminate called without an active exception") when a
    thread other than the main one created streams and ended without `mx.clear_streams()`. Generating creates
    them (the thread's generation stream), so each generating thread gets them released when it ends."""
    if threading.current_thread() is not threading.main_thread() and not hasattr(_thread_state, "reaper"):
        _thread_state.reaper = _StreamsReaper()


def on_stream(tokens: Iterator, stream) -> Iterator:
    """Run each step of the generator `tokens` with `stream` as the default stream; the caller's code between
    steps runs on its own default stream."""
    while True:
        with mx.stream(stream):
            try:
                item = next(tokens)
            except StopIteration:
                return
        yield item
