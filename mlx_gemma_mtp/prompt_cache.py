"""A prompt cache across requests: a conversation's next turn prefills only what is new.

`stream_generate(..., prompt_cache=PromptCache())` (mlx-lm's name and habit) keeps the target's KV cache and the
tokens it holds. A new prompt reuses the longest common prefix and prefills the rest. Full-attention caches keep
every position, so they are simply trimmed back to the prefix. Sliding-window caches hold only the last
`window + 1 + max_rollback` positions: once a turn has wrapped the window they cannot be trimmed back to a prefix
that ends earlier (mlx-lm's and mlx-vlm's prefix caches broke here on Gemma 4). So the sliding caches are
snapshotted at the end of every prompt (before the model's turn), and a prefix that ends before what the live
cache can roll back to is restored from the latest snapshot at or before it; the tokens between the snapshot and
the end of the prefix are prefilled again. The restored state is the state a fresh prefill of those tokens
builds, so the output is a fresh run's.

Gemma 4's template re-renders earlier model turns with their thought spans stripped, so a conversation's new
prompt stops matching the cached tokens at the start of the previous model turn: exactly where the snapshot of the
previous prompt sits. The drafter needs nothing of its own: it reads the target's K/V.

A snapshot costs the sliding caches' held entries (E2B: a few MB; 31B: ~0.8 GB in bfloat16), so only the last
`max_snapshots` are kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx

from .cache import KVCache, SlidingKVCache, trim_cache


@dataclass
class _Snapshot:
    length: int  # tokens in the cache when it was taken
    sliding: list[tuple[mx.array, mx.array, int, int] | None]  # per cache: (keys, values, offset, length)


@dataclass
class PromptCache:
    """The target's KV cache of the previous request and the tokens it holds (one bundle, one conversation at a
    time; pass a fresh one, or call `reset()`, to start over)."""

    max_snapshots: int = 4
    tokens: list[int] = field(default_factory=list)
    cache: list[KVCache] | None = None
    reused: int = 0  # prompt tokens the last request did not have to prefill
    prompt_length: int = 0  # tokens of the last request's prompt
    _snapshots: list[_Snapshot] = field(default_factory=list)
    _owner: object = None  # the target the cache belongs to
    busy: bool = False  # a generation in a batch holds it (`batching.BatchGenerator`): not to be handed out

    def reset(self) -> None:
        self.tokens, self.cache, self._snapshots, self.reused, self.prompt_length = [], None, [], 0, 0

    @property
    def nbytes(self) -> int:
        """Memory held: the K/V buffers and the snapshots."""
        held = sum(c.keys.nbytes + c.values.nbytes for c in self.cache or [] if c.keys is not None)
        return held + sum(a.nbytes for s in self._snapshots for saved in s.sliding if saved for a in saved[:2])

    def common_prefix(self, ids: list[int]) -> int:
        """Tokens this cache shares with the start of `ids`."""
        return _common_prefix(self.tokens, ids, len(ids))

    def fetch(self, target, ids: list[int], max_rollback: int) -> tuple[list[KVCache], int]:
        """A cache holding exactly `ids[:start]` and `start`; at least the last prompt token is left to feed."""
        if self._owner is not target or self.cache is None:
            self.reset()
            self._owner, self.prompt_length = target, len(ids)
            self.cache = target.make_cache(max_rollback=max_rollback)
            return self.cache, 0
        prefix = _common_prefix(self.tokens, ids, len(ids) - 1)
        start = self._rewind(prefix)
        self.tokens, self.reused, self.prompt_length = self.tokens[:start], start, len(ids)
        return self.cache, start

    def _rewind(self, prefix: int) -> int:
        """Roll the cache back to at most `prefix` tokens; returns how many it holds."""
        held = len(self.tokens)
        self._snapshots = [s for s in self._snapshots if s.length <= prefix]  # later ones hold other tokens
        if all(c.trim_error(held - prefix) is None for c in self.cache):
            trim_cache(self.cache, held - prefix)
            return prefix
        if not self._snapshots:  # nothing to restore the sliding windows from: start afresh
            for c in self.cache:
                _clear(c)
            return 0
        snap = self._snapshots[-1]
        for c, saved in zip(self.cache, snap.sliding):
            if saved is None:
                c.trim(c.offset - snap.length)  # full attention: every position is held
            else:
                keys, values, c.offset, c.length = saved
                c.keys, c.values = mx.array(keys), mx.array(values)  # copies: updates must not reach the snapshot
        return snap.length

    def snapshot(self, cache: list[KVCache], length: int) -> None:
        """Remember the sliding caches as they are with `length` tokens fed (call before feeding more)."""
        sliding = []
        for c in cache:
            if isinstance(c, SlidingKVCache) and c.keys is not None:
                sliding.append((c.keys[..., : c.length, :], c.values[..., : c.length, :], c.offset, c.length))
            else:
                sliding.append(None)
        # evaluated now, on the generating thread's stream: the next request may run on another thread (a server
        # handles each connection on its own), where a lazy slice made on this thread's stream cannot be computed
        mx.eval([s[:2] for s in sliding if s is not None])
        self._snapshots = [s for s in self._snapshots if s.length < length][-(self.max_snapshots - 1):]
        self._snapshots.append(_Snapshot(length, sliding))

    def record(self, tokens: list[int]) -> None:
        """After a generation: `tokens` = the prompt and every token the caller received. The cache may hold a
        few more (accepted drafts not yet handed out when the caller stopped): those are rolled back."""
        extra = self.cache[0].offset - len(tokens)
        if extra > 0 and any(c.trim_error(extra) for c in self.cache):
            self.reset()  # more than the caches can roll back (a long draft cut short): start afresh next time
            return
        if extra > 0:
            trim_cache(self.cache, extra)
        mx.eval([(c.keys, c.values) for c in self.cache if c.keys is not None])  # usable from any thread (above)
        self.tokens = tokens[: self.cache[0].offset]
        self._snapshots = [s for s in self._snapshots if s.length <= len(self.tokens)]


def _common_prefix(a: list[int], b: list[int], limit: int) -> int:
    n = 0
    for x, y in zip(a[:limit], b[:limit]):
        if x != y:
            break
        n += 1
    return n


def _clear(c: KVCache) -> None:
    c.keys = c.values = None
    c.offset = c.length = 0


class PromptCaches:
    """Several conversations' prompt caches, for a server: a request continues the conversation whose cache holds
    its previous prompt, or starts a new entry; at most `max_entries` and `max_bytes` (None: no limit) are kept,
    the least recently used dropped first (mlx-lm's `--prompt-cache-size` / `--prompt-cache-bytes`)."""

    def __init__(self, max_entries: int = 4, max_bytes: int | None = None):
        if max_entries < 1:
            raise ValueError(f"max_entries={max_entries}: keep at least one prompt cache")
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_bytes={max_bytes}: pass a number of bytes >= 0, or None for no limit")
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self.entries: list[PromptCache] = []  # least recently used first

    def for_prompt(self, ids: list[int]) -> PromptCache:
        """The cache to generate `ids` with, marked most recently used. A conversation's next turn starts with its
        previous prompt (up to the last token, which the template may render differently once answered); any
        other request gets a fresh entry, or the least recently used one's place when full."""
        free = [e for e in self.entries if not e.busy]  # an entry a running generation holds is not shared
        shared = {id(e): e.common_prefix(ids) for e in free}
        same = [e for e in free if e.prompt_length and shared[id(e)] >= e.prompt_length - 1]
        if same:
            entry = max(same, key=lambda e: shared[id(e)])
        elif len(self.entries) < self.max_entries:
            entry = PromptCache()
        elif free:
            entry = free[0]
            entry.reset()
        else:  # every entry is in use: this request goes without one kept
            return PromptCache()
        if entry in self.entries:
            self.entries.remove(entry)
        self.entries.append(entry)
        return entry

    def trim(self) -> None:
        """Drop least recently used entries (never the newest, nor one in use) until the bytes fit."""
        while self.max_bytes is not None and len(self.entries) > 1 and self.nbytes > self.max_bytes:
            victim = next((e for e in self.entries[:-1] if not e.busy), None)
            if victim is None:
                return
            self.entries.remove(victim)
            victim.reset()

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    def reset(self) -> None:
        for e in self.entries:
            e.reset()
        self.entries = []
