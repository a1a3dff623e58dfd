"""KV caches for the Gemma 4 target, with exact rollback.

Only KV *producer* layers own a cache (KV-sharing consumers read their producer's tensors, spec §2.9). Full
attention layers keep every position; sliding-window layers keep the window plus slack so that the last `n`
tokens can be rolled back exactly even after the window has wrapped (spec §5.1, pitfall 22): a plain ring buffer
of size W cannot do that. A rollback that would need evicted entries raises instead of silently doing nothing.

Layout of stored keys/values: (B, n_kv_heads, S, head_dim), temporal order, first entry at absolute position
`start`.
"""

from __future__ import annotations

import mlx.core as mx

_STEP = 256  # buffer sizes are multiples of this (as mlx-lm's KVCache): amortises the copies of preallocation
_LINEAR_STEPS = 8  # sizes up to 8 * _STEP go up in _STEP steps, larger ones by about _RATIO
_RATIO = 1.25


def bucket_size(n: int) -> int:
    """The smallest buffer size that holds `n` entries: a multiple of `_STEP`, at most ~30% above `n` once
    past `_LINEAR_STEPS * _STEP`.

    The drafter's compiled graph is specialised to its K/V window sizes, which are these sizes
    (`drafting.cache_windows`), and a process keeps one trace per size: geometric sizes make that O(log context)
    traces instead of one per `_STEP` tokens. Full-attention buffers grow through the same sizes (a window must
    fit inside its buffer), which also makes the copies on growth O(context) in total; the price is up to ~30%
    unused buffer on full-attention layers.
    """
    size = _STEP * max(1, min(-(-n // _STEP), _LINEAR_STEPS))
    while size < n:
        size = -(-int(size * _RATIO) // _STEP) * _STEP
    return size


class KVCache:
    """Grows without bound: full-attention layers see every past position."""

    def __init__(self):
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0  # absolute position of the next token
        self.length = 0  # entries held, ending at offset - 1

    @property
    def start(self) -> int:
        """Absolute position of the first held entry."""
        return self.offset - self.length

    def _grow(self, k: mx.array, v: mx.array, keep: int) -> None:
        # Keep the last `keep` held entries at the front of a fresh buffer with room for the new ones.
        capacity = bucket_size(keep + k.shape[2] + _STEP)  # at least _STEP free slots: no regrow every token
        new_k = mx.zeros((*k.shape[:2], capacity, k.shape[3]), k.dtype)
        new_v = mx.zeros((*v.shape[:2], capacity, v.shape[3]), v.dtype)
        if keep:
            new_k[..., :keep, :] = self.keys[..., self.length - keep : self.length, :]
            new_v[..., :keep, :] = self.values[..., self.length - keep : self.length, :]
        self.keys, self.values, self.length = new_k, new_v, keep

    def _keep_on_grow(self) -> int:
        return self.length

    def update(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        """Append `k`, `v` (B, n_kv, T, d); return every held entry including the new ones."""
        T = k.shape[2]
        if self.keys is None or self.length + T > self.keys.shape[2]:
            self._grow(k, v, 0 if self.keys is None else self._keep_on_grow())
        self.keys[..., self.length : self.length + T, :] = k
        self.values[..., self.length : self.length + T, :] = v
        self.length += T
        self.offset += T
        return self.keys[..., : self.length, :], self.values[..., : self.length, :]

    def state(self) -> tuple[mx.array, mx.array]:
        """The held entries, (B, n_kv, length, d) each."""
        return self.keys[..., : self.length, :], self.values[..., : self.length, :]

    def _min_length_after_trim(self, new_offset: int) -> int:
        return new_offset

    def trim_error(self, n: int) -> str | None:
        """Why the last `n` tokens cannot be rolled back, or None if they can."""
        if n < 0 or n > self.offset:
            return f"cannot roll back {n} tokens from a cache holding {self.offset}"
        needed = self._min_length_after_trim(self.offset - n)
        if self.length - n < needed:
            return (
                f"cannot roll back {n} tokens: only {self.length} of {self.offset} positions are held and "
                f"{needed} must remain; build the cache with a larger max_rollback"
            )
        return None

    def trim(self, n: int) -> None:
        """Forget the last `n` tokens exactly, or raise ValueError if that is impossible."""
        if (error := self.trim_error(n)) is not None:
            raise ValueError(error)
        self.offset -= n
        self.length -= n

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


class SlidingKVCache(KVCache):
    """Keeps the last `window + 1 + max_rollback` positions (plus growth room).

    `window + 1`: the target needs the last W-1 keys before a query, the drafter the last W+1 entries up to the
    hidden state's position (spec §4.3); `max_rollback` more make rolling back that many tokens exact.
    """

    def __init__(self, window: int, max_rollback: int):
        super().__init__()
        self.window = window
        self.max_rollback = max_rollback

    def _keep_on_grow(self) -> int:
        return min(self.length, self.window + 1 + self.max_rollback)

    def _min_length_after_trim(self, new_offset: int) -> int:
        return min(new_offset, self.window + 1)


def trim_cache(cache: list[KVCache], n: int) -> None:
    """Roll back the last `n` tokens in every layer's cache; all layers or none (raises ValueError)."""
    for c in cache:
        if (error := c.trim_error(n)) is not None:
            raise ValueError(error)
    for c in cache:
        c.trim(n)
