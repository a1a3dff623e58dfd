"""Load a Gemma 4 target sharded across the ranks of an `mx.distributed` group, reading only each rank's slices.

The model is built and quantized as `load.load_target` does, then `shard.shard` splits its layers (the
initial weights are lazy and never computed) and returns which range of each stored tensor this rank holds. Each
such tensor is read through a memory map of its safetensors file, sliced before anything is copied, so a rank reads
about its share of the bytes (whole pages: a column slice of a row-major matrix touches its rows' pages). Tensors
stored fused in the HF layout (the MoE `gate_up_proj`) are read whole, split by `sanitize`, then sliced. The
drafter is small and replicated: `load.load_drafter` reads it on every rank.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ..load import (
    SAFETENSORS_DTYPES,
    Bundle,
    _cast,
    _load_module,
    _quantize,
    bundle_of,
    data_start,
    read_config,
    resolve,
    safetensors_files,
    safetensors_header,
    target_args,
)
from ..models.gemma4_text import Model, canonical_key
from .lockstep import Lockstep
from .shard import Plan, shard


class SliceReader:
    """Reads tensors, or slices of them, from safetensors files through memory maps; counts the bytes asked for."""

    def __init__(self):
        self.bytes_read = 0

    def read(self, file: Path, header: dict, name: str, axis: int | None = None, start: int = 0,
             stop: int | None = None) -> mx.array:
        entry = header[name]
        if entry["dtype"] not in SAFETENSORS_DTYPES:
            raise ValueError(f"{file}: tensor {name} has dtype {entry['dtype']}, which this loader cannot read")
        dtype, shape = SAFETENSORS_DTYPES[entry["dtype"]], tuple(entry["shape"])
        begin, end = entry["data_offsets"]
        if begin == end:
            return mx.zeros(shape, dtype)
        # the bytes as (..., last dim x element size) uint8: any dtype (bfloat16 has no numpy twin), viewed back
        width = (shape[-1] if shape else 1) * dtype.size
        data = np.memmap(file, np.uint8, "r", data_start(file) + begin, (*shape[:-1], width))
        if axis is not None:
            scale = dtype.size if axis == len(shape) - 1 else 1
            data = data[(slice(None),) * axis + (slice(start * scale, None if stop is None else stop * scale),)]
        data = np.ascontiguousarray(data)  # only the pages of the slice are read
        self.bytes_read += data.nbytes
        array = mx.array(data).view(dtype)
        return array if shape else array.reshape(())


def _sliced(value: mx.array, cut: tuple[int, int, int] | None) -> mx.array:
    if cut is None:
        return value
    axis, start, stop = cut
    return mx.contiguous(value[(slice(None),) * axis + (slice(start, stop),)])


def read_target_weights(model: Model, plan: Plan, files: list[Path], dtype: mx.Dtype | None,
                        reader: SliceReader) -> dict[str, mx.array]:
    """This rank's tensors of the text model: sliced per `plan`, sanitized, cast to `dtype` when given."""
    expected = dict(tree_flatten(model.parameters()))
    weights = {}
    for file in files:
        header = safetensors_header(file)
        for name in header:
            key = canonical_key(name) if name != "__metadata__" else None
            if key is None or model._unused(key):
                continue
            if key in expected:  # stored as the model holds it: read the slice only
                weights[key] = reader.read(file, header, name, *(plan.get(key) or (None,)))
            else:  # another layout (fused experts): whole, then sanitized and sliced
                parts = {k: _sliced(v, plan.get(k)) for k, v in
                         model.sanitize({name: reader.read(file, header, name)}).items()}
                mx.eval(list(parts.values()))  # the whole tensor is freed here, not at the end
                weights.update(parts)
    return _cast(weights, dtype)


def load_sharded_target(path: Path, group: mx.distributed.Group, dtype: mx.Dtype | None = None
                        ) -> tuple[Model, dict, SliceReader]:
    """The target of `path` with its layers split across `group` (this rank's part only)."""
    config = read_config(path)
    model = Model(target_args(path, config))
    files = safetensors_files(path)
    names = {canonical_key(k) or k: None for f in files for k in safetensors_header(f)}
    _quantize(model, config, names, canonical=lambda k: canonical_key(k) or k)
    plan = shard(model, group)
    reader = SliceReader()
    weights = read_target_weights(model, plan, files, dtype, reader)
    _load_module(model, weights, path)
    return model, config, reader


def load_sharded(model: str | Path, draft: str | Path | None = None, group: mx.distributed.Group | None = None,
                 dtype: mx.Dtype | None = None) -> Bundle:
    """`load.load` for one rank of a tensor-parallel group: the target split across `group`, the drafter whole.

    Args:
        model, draft, dtype: as `load.load`.
        group: the ranks (default: `mx.distributed.init()`, i.e. the processes `mlx.launch` started).
    """
    group = group or mx.distributed.init()
    path = resolve(model, "model")
    target, config, _ = load_sharded_target(path, group, dtype)
    return bundle_of(path, target, config, draft, dtype, Lockstep(group))
