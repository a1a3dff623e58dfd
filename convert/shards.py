"""Safetensors shards written tensor by tensor, so the converter holds one tensor in memory, not one shard.

Format: https://github.com/huggingface/safetensors (8-byte little-endian header size, JSON header, then the
tensors' bytes back to back). A tensor's bytes are appended to a spill file as soon as it is computed; when
the shard is full the header is written and the spilled data streamed after it. Shards are named
`model-0000i-of-0000n.safetensors` at the end, next to `model.safetensors.index.json` (mlx-lm's layout).
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import mlx.core as mx

INDEX = "model.safetensors.index.json"
DTYPE_NAMES = {
    mx.bfloat16: "BF16",
    mx.float16: "F16",
    mx.float32: "F32",
    mx.float64: "F64",
    mx.bool_: "BOOL",
    mx.uint8: "U8",
    mx.uint16: "U16",
    mx.uint32: "U32",
    mx.uint64: "U64",
    mx.int8: "I8",
    mx.int16: "I16",
    mx.int32: "I32",
    mx.int64: "I64",
}
SAFETENSORS_DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}
COPY_CHUNK = 16 << 20


class ShardWriter:
    """Streams tensors into shards of at most `max_bytes` each (a single larger tensor gets its own shard)."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.entries: dict[str, dict] = {}  # header of the open shard
        self.size = self.total = 0
        self.spill = None
        self.shards: list[tuple[str, list[str]]] = []

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        if self.spill is not None:  # only on failure: the caller removes the folder
            self.spill.close()

    def _spill_path(self) -> Path:
        return self.folder / f"part-{len(self.shards) + 1:05d}.spill"

    def add(self, tensors: dict[str, mx.array]) -> None:
        for name, t in tensors.items():
            t = mx.contiguous(t)
            mx.eval(t)
            if self.entries and self.size + t.nbytes > self.max_bytes:
                self._close_shard()
            if self.spill is None:
                self.spill = open(self._spill_path(), "wb")
            self.spill.write(memoryview(t))
            self.entries[name] = {
                "dtype": DTYPE_NAMES[t.dtype],
                "shape": list(t.shape),
                "data_offsets": [self.size, self.size + t.nbytes],
            }
            self.size += t.nbytes

    def _close_shard(self) -> None:
        header = json.dumps(
            {"__metadata__": {"format": "mlx"}, **self.entries}, separators=(",", ":")
        ).encode()
        header += b" " * (-len(header) % 8)  # data starts 8-byte aligned
        spill = self._spill_path()
        self.spill.close()
        self.spill = None
        name = f"part-{len(self.shards) + 1:05d}.safetensors"
        with open(self.folder / name, "wb") as out, open(spill, "rb") as data:
            out.write(struct.pack("<Q", len(header)) + header)
            shutil.copyfileobj(data, out, COPY_CHUNK)
        spill.unlink()
        self.shards.append((name, list(self.entries)))
        self.total += self.size
        self.entries, self.size = {}, 0

    def finish(self) -> int:
        """Close the last shard, name the shards `model-0000i-of-0000n`, write the index; return bytes."""
        if self.entries:
            self._close_shard()
        weight_map = {}
        for i, (name, keys) in enumerate(self.shards, start=1):
            final = f"model-{i:05d}-of-{len(self.shards):05d}.safetensors"
            (self.folder / name).rename(self.folder / final)
            weight_map.update(dict.fromkeys(keys, final))
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / INDEX).write_text(json.dumps(index, indent=2))
        return self.total
