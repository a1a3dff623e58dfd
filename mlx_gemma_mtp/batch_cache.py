"""The KV caches of a batch: B sequences in one set of buffers, each slot tagged with the position it holds.

Rows advance at their own pace (different prompts, different MTP acceptance), so they are not kept aligned.
Every forward writes T slots for every row at the same slot index, and each slot records the absolute position
of what it holds (-1: nothing: an unused slot, an idle row, a rejected draft). Attention masks come from these
positions: a query at position q sees slot s of its row iff 0 <= pos[s] <= q (and pos[s] > q - window on
sliding layers). So a row sees the keys its batch-1 run sees, at the same RoPE positions, whatever the others
do; no padding shifts its positions (the RoPE skew that broke other batched MTP stacks). Rejected drafts become
holes instead of being trimmed (rows reject different counts); when a buffer fills, each row's live slots are
gathered to the front and what a sliding window no longer needs is dropped.

One `SlotLayout` per layer type holds the positions (a device array and its host mirror) and the write index;
each KV-producing layer has a `BatchKVCache` over its layout. The host mirror is updated from what the host
learns at each round's one sync (the accepted counts), so compaction needs no extra sync.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .cache import KVCache, bucket_size
from .models.config import SLIDING

EMPTY = -1
_HEADROOM = 256  # free slots after a compaction: holes accumulate between compactions


class SlotLayout:
    """Slot positions shared by the caches of one layer type."""

    def __init__(self, rows: int, window: int | None):
        self.window = window
        self.host = np.full((rows, 0), EMPTY, np.int32)  # (B, capacity) positions, mirrored on the device
        self.positions = mx.array(self.host)
        self.end = 0  # slots in use: the next forward writes at [end, end + T)
        self.caches: list[BatchKVCache] = []

    @property
    def capacity(self) -> int:
        return self.host.shape[1]

    def keep(self, lengths: np.ndarray) -> list[np.ndarray]:
        """Per row, the slot indices still needed (in position order): live slots, on sliding layers only those a
        query at the row's next position or the drafter (which sees `window + 1` entries) can reach."""
        out = []
        for b, length in enumerate(lengths):
            pos = self.host[b, : self.end]
            live = pos != EMPTY
            if self.window is not None:
                live &= pos >= length - self.window - 1
            slots = np.nonzero(live)[0]
            out.append(slots[np.argsort(pos[slots], kind="stable")])
        return out

    def reserve(self, T: int, lengths: np.ndarray) -> int:
        """Room for T more slots (compacting or growing the buffers if needed); returns the write index."""
        if self.end + T > self.capacity:
            self._repack(self.keep(lengths), T)
        return self.end

    def _repack(self, keep: list[np.ndarray], T: int) -> None:
        used = max((len(k) for k in keep), default=0)
        capacity = bucket_size(used + T + _HEADROOM)
        index = np.zeros((len(keep), capacity), np.int32)
        host = np.full((len(keep), capacity), EMPTY, np.int32)
        for b, slots in enumerate(keep):
            index[b, : len(slots)] = slots
            host[b, : len(slots)] = self.host[b, slots]
        index = mx.array(index)
        for cache in self.caches:
            cache.gather(index, capacity)
        self.host, self.positions, self.end = host, mx.array(host), used

    def tag(self, start: int, block: np.ndarray) -> None:
        """Slots [start, start + block.shape[1]) of every row now hold these positions (host and device)."""
        self.host[:, start : start + block.shape[1]] = block
        self.positions[:, start : start + block.shape[1]] = mx.array(block)


class BatchKVCache:
    """One KV-producing layer's keys and values for a batch, laid out by its type's `SlotLayout`."""

    def __init__(self, layout: SlotLayout):
        self.layout = layout
        self.keys: mx.array | None = None  # (B, n_kv_heads, capacity, head_dim)
        self.values: mx.array | None = None
        layout.caches.append(self)
        self.offset: mx.array | None = None  # (B,) the RoPE position of each row's first new token (set per forward)
        self.start = 0  # slot 0 is the first the attention reads (positions live in the masks, not here)

    def gather(self, index: mx.array, capacity: int) -> None:
        """Row b's slots become its old slots `index[b]` (B, capacity)."""
        if self.keys is None:
            return
        idx = index[:, None, :, None]
        self.keys = mx.take_along_axis(self.keys, idx, axis=2)
        self.values = mx.take_along_axis(self.values, idx, axis=2)

    def ensure(self, like: mx.array, capacity: int) -> None:
        """Buffers for every row at the layout's capacity, heads and type after `like` (_, n_kv, T, d)."""
        if self.keys is None:
            B, (_, H, _, D) = self.layout.host.shape[0], like.shape
            self.keys = mx.zeros((B, H, capacity, D), like.dtype)
            self.values = mx.zeros((B, H, capacity, D), like.dtype)

    def update(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        """Write `k`, `v` (B, n_kv, T, d) at the reserved slots; return every slot in use (masks say which)."""
        layout = self.layout
        self.ensure(k, layout.capacity)
        start, T = layout.end - k.shape[2], k.shape[2]
        self.keys[..., start : start + T, :] = k
        self.values[..., start : start + T, :] = v
        return self.keys[..., : layout.end, :], self.values[..., : layout.end, :]

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


class BatchCache:
    """The producer caches of a batch of up to `rows` sequences, with each row's next position (`lengths`) and
    whether it is in use (`active`), as the host knows them."""

    def __init__(self, target, rows: int):
        a = target.args
        self.types = {t: SlotLayout(rows, a.sliding_window if t == SLIDING else None)
                      for t in dict.fromkeys(a.layer_types)}
        self.caches = [BatchKVCache(self.types[a.layer_types[i]]) for i in range(target.n_caches)]
        self.lengths = np.zeros(rows, np.int64)
        self.active = np.zeros(rows, bool)

    @property
    def rows(self) -> int:
        return len(self.lengths)

    def insert(self, row: int, solo: list[KVCache], length: int) -> None:
        """Row `row` (idle) takes a batch-1 cache holding `length` positions (a prefilled prompt)."""
        if self.active[row]:
            raise ValueError(f"row {row} is in use")
        for layout in self.types.values():
            layout.host[row], layout.positions[row] = EMPTY, EMPTY
        held = {}
        for c, batch in zip(solo, self.caches):
            held.setdefault(batch.layout, c)
        for layout, c in held.items():  # one cache per layout gives the slots' positions
            n = c.length
            if n > layout.capacity:
                layout._repack(layout.keep(self.lengths), n)  # compacts and grows; other rows keep their slots
            layout.end = max(layout.end, n)
            start = layout.end - n  # the row's entries end where the others' do
            block = np.full((self.rows, n), EMPTY, np.int32)
            block[row] = np.arange(c.start, c.offset)
            layout.host[row, start : start + n] = block[row]
            layout.positions[row, start : start + n] = mx.array(block[row])
            for solo_cache, batch in zip(solo, self.caches):
                if batch.layout is layout and n:
                    keys, values = solo_cache.state()
                    batch.ensure(keys, layout.capacity)
                    batch.keys[row, :, start : start + n, :] = keys[0]
                    batch.values[row, :, start : start + n, :] = values[0]
        self.lengths[row], self.active[row] = length, True

    def extract(self, row: int, solo: list[KVCache]) -> None:
        """Row `row`'s entries back into a batch-1 cache, in position order (a prompt cache keeps the
        conversation). A row's live positions are contiguous: holes are rejected drafts, compaction drops only
        what a window passed."""
        for batch, c in zip(self.caches, solo):
            pos = batch.layout.host[row, : batch.layout.end]
            slots = np.nonzero(pos != EMPTY)[0]
            slots = mx.array(slots[np.argsort(pos[slots], kind="stable")])
            c.keys, c.values = batch.keys[row : row + 1, :, slots, :], batch.values[row : row + 1, :, slots, :]
            c.offset, c.length = int(self.lengths[row]), int(slots.size)

    def remove(self, row: int) -> None:
        """The row's sequence left: its slots are free (their contents are never seen again)."""
        for layout in self.types.values():
            layout.host[row] = EMPTY
            layout.positions[row] = EMPTY
        self.active[row], self.lengths[row] = False, 0

    def append(self, T: int) -> tuple[mx.array, dict[str, mx.array]]:
        """Reserve T slots per row for the next forward (its tokens at each row's next T positions): returns the
        RoPE offsets (B,) and the attention mask of each layer type (B, 1, T, slots)."""
        query = self.lengths[:, None] + np.arange(T)[None]  # (B, T)
        block = np.where(self.active[:, None], query, EMPTY).astype(np.int32)
        masks = {}
        for layer_type, layout in self.types.items():
            start = layout.reserve(T, self.lengths)
            layout.end = start + T
            layout.tag(start, block)
            masks[layer_type] = _mask(layout, query, self.active)
        offsets = mx.array(self.lengths.astype(np.int32))
        for c in self.caches:
            c.offset = offsets
        return offsets, masks

    def accept(self, T: int, kept: np.ndarray) -> None:
        """After a forward of T tokens: row b keeps its first `kept[b]` (1..T; idle rows none), the rest become
        holes, and its next position moves on by that many."""
        keep = np.where(self.active, kept, 0)
        for layout in self.types.values():
            start = layout.end - T
            block = layout.host[:, start : layout.end].copy()
            block[np.arange(T)[None] >= keep[:, None]] = EMPTY
            layout.tag(start, block)
        self.lengths += keep

    def visible(self, window: int) -> dict[str, mx.array]:
        """What the drafter may see from each row (spec §4.3): entries up to the position before its newest token,
        on sliding layers the last `window + 1` of them; (B, 1, 1, slots) per layer type."""
        hp = mx.array(self.lengths.astype(np.int32) - 1)[:, None]  # the hidden state's position
        out = {}
        for layer_type, layout in self.types.items():
            pos = layout.positions[:, : layout.end]
            seen = (pos != EMPTY) & (pos <= hp)
            if layout.window is not None:
                seen &= pos >= hp - window
            out[layer_type] = (seen | mx.array(~self.active)[:, None])[:, None, None]
        return out

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.caches)


def _mask(layout: SlotLayout, query: np.ndarray, active: np.ndarray) -> mx.array:
    """(B, 1, T, slots) bool: slot s is visible to query t of row b. An idle row sees everything (its output is
    discarded; an all-masked row would be NaN)."""
    pos = layout.positions[:, None, : layout.end]  # (B, 1, S)
    q = mx.array(query.astype(np.int32))[:, :, None]  # (B, T, 1)
    seen = (pos != EMPTY) & (pos <= q)
    if layout.window is not None:
        seen &= pos > q - layout.window
    return (seen | mx.array(~active)[:, None, None])[:, None]
