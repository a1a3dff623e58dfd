"""Safetensors shards written tensor by tensor, each file written once, and source tensors read in row slices.

Format: https://github.com/huggingface/safetensors (8-byte little-endian header size, JSON header, then the
tensors' bytes back to back; the header may be padded with spaces). A shard is opened with a header slot big
enough for the largest header the tensors still to come could need; each tensor's bytes are written after it as
soon as they are computed, and the header goes into the slot (space-padded) when the shard is full. No tensor
byte is written twice and no spill file is copied. A tensor too big to hold with its output (the 4.7 GB
per-layer embedding table of E2B) is read and converted in row slices (`read_rows`, `ShardWriter.add_rows`).
Shards are named `model-0000i-of-0000n.safetensors` at the end, next to `model.safetensors.index.json`.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..load import DTYPE_NAMES, SAFETENSORS_DTYPES, data_start

INDEX = "model.safetensors.index.json"
# bytes of a header entry besides its name: {"dtype":"BF16","shape":[4 dims],"data_offsets":[a,b]} with
# 20-digit numbers, generously
ENTRY_BYTES = 200
METADATA_BYTES = 64


def header_bound(names: Iterable[str]) -> int:
    """Bytes a safetensors header with these tensor names can take at most (a multiple of 8)."""
    n = METADATA_BYTES + sum(len(json.dumps(name)) + ENTRY_BYTES for name in names)
    return -(-n // 8) * 8


def read_rows(file: Path, info: dict, start: int, stop: int, offset: int | None = None) -> mx.array:
    """Rows start..stop of one tensor (`info`: its header entry), read straight from the file: only those bytes
    are read and held, unlike a lazily loaded tensor, which is read whole however little of it is used."""
    shape, dtype = info["shape"], SAFETENSORS_DTYPES[info["dtype"]]
    row_bytes = math.prod(shape[1:]) * dtype.size
    begin = (data_start(file) if offset is None else offset) + info["data_offsets"][0] + start * row_bytes
    raw = np.fromfile(file, dtype=np.uint8, count=(stop - start) * row_bytes, offset=begin)
    return mx.array(raw).view(dtype).reshape(stop - start, *shape[1:])


class ShardWriter:
    """Streams tensors into shards of at most `max_bytes` each (a single larger tensor gets its own shard).

    `names` are all the tensor names that will be added: they bound the header a shard can need.
    """

    def __init__(self, folder: Path, max_bytes: int, names: Iterable[str]):
        self.folder, self.max_bytes = folder, max_bytes
        self.pending = set(names)  # names not written yet
        self.entries: dict[str, dict] = {}  # header of the open shard
        self.size = self.total = self.slot = 0
        self.file = None
        self.shards: list[tuple[str, list[str]]] = []

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        if self.file is not None:  # only on failure: the caller removes the folder
            self.file.close()

    def _name(self) -> str:
        return f"part-{len(self.shards) + 1:05d}.safetensors"

    def _make_room(self, nbytes: int) -> None:
        """Close the open shard if `nbytes` more would overflow it; open one if none is open."""
        if self.entries and self.size + nbytes > self.max_bytes:
            self._close_shard()
        if self.file is None:
            self.slot = header_bound(self.pending)
            self.file = open(self.folder / self._name(), "wb")
            self.file.seek(8 + self.slot)  # the header is written into the slot when the shard closes

    def _entry(self, name: str, t_dtype: mx.Dtype, shape: list[int], nbytes: int) -> None:
        assert name in self.pending, f"{name}: not announced, or written twice"
        self.pending.discard(name)
        self.entries[name] = {
            "dtype": DTYPE_NAMES[t_dtype],
            "shape": list(shape),
            "data_offsets": [self.size, self.size + nbytes],
        }
        self.size += nbytes

    def add(self, tensors: dict[str, mx.array]) -> None:
        for name, t in tensors.items():
            t = mx.contiguous(t)
            mx.eval(t)
            self._make_room(t.nbytes)
            self.file.write(memoryview(t))
            self._entry(name, t.dtype, t.shape, t.nbytes)

    def add_rows(self, slices: Iterator[dict[str, mx.array]], rows: int) -> None:
        """One tensor's outputs computed in row slices (each a dict name -> rows of that output, e.g. a quantized
        weight with its scales and biases). The first output is streamed into the shard slice by slice; the
        others (scales, biases: 1/8 of a 4-bit weight or less) are gathered and written after it."""
        first = next(slices)
        mx.eval(first)
        n = next(iter(first.values())).shape[0]
        sizes = {k: v.nbytes // n * rows for k, v in first.items()}
        meta = {k: (v.dtype, [rows, *v.shape[1:]]) for k, v in first.items()}
        self._make_room(sum(sizes.values()))
        main, written = next(iter(first)), 0
        rest: dict[str, list] = {k: [] for k in first if k != main}
        for part in _chain(first, slices):
            mx.eval(part)
            chunk = mx.contiguous(part[main])
            self.file.write(memoryview(chunk))
            written += chunk.nbytes
            for k, parts in rest.items():
                parts.append(part[k])
        assert written == sizes[main], f"{main}: {written} bytes streamed, {sizes[main]} expected"
        self._entry(main, *meta[main], sizes[main])
        for k, parts in rest.items():
            t = mx.contiguous(mx.concatenate(parts))  # (rows, ...) scales or biases
            mx.eval(t)
            parts.clear()
            self.file.write(memoryview(t))
            self._entry(k, *meta[k], t.nbytes)

    def _close_shard(self) -> None:
        header = json.dumps({"__metadata__": {"format": "mlx"}, **self.entries}, separators=(",", ":")).encode()
        assert len(header) <= self.slot, f"header of {len(header)} bytes overflows its {self.slot}-byte slot"
        self.file.seek(0)
        self.file.write(struct.pack("<Q", self.slot) + header + b" " * (self.slot - len(header)))
        self.file.close()
        self.file = None
        self.shards.append((self._name(), list(self.entries)))
        self.total += self.size
        self.entries, self.size = {}, 0

    def finish(self) -> int:
        """Close the last shard, name the shards `model-0000i-of-0000n`, write the index; return bytes."""
        if self.entries:
            self._close_shard()
        elif self.file is not None:  # opened for nothing (cannot happen: a shard opens for a tensor)
            self.file.close()
            (self.folder / self._name()).unlink()
        weight_map = {}
        for i, (name, keys) in enumerate(self.shards, start=1):
            final = f"model-{i:05d}-of-{len(self.shards):05d}.safetensors"
            (self.folder / name).rename(self.folder / final)
            weight_map.update(dict.fromkeys(keys, final))
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / INDEX).write_text(json.dumps(index, indent=2))
        return self.total


def _chain(first, rest):
    yield first
    yield from rest
