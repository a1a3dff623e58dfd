"""Drafting K tokens with the Gemma 4 assistant: what it may see each round, and its step compiled.

A drafter step is ~100 small ops (4 layers of norms, projections, RoPE, attention, the clustered head); launching
them one by one costs more than their arithmetic on both CPU and Metal. `mx.compile` fuses them, but a compiled
graph is specialised to its input shapes and the full-attention K/V grows every round. So the drafter reads
fixed-size *windows* over the producer caches' buffers: views of a `cache.bucket_size`, with the visible entries
given as a [lo, hi) range that becomes the attention mask. The sizes grow geometrically, so a context of n tokens
costs O(log n) retraces (a few ms each; 20 up to 32k tokens, 26 up to 128k), and a long-running process keeps
that many traced graphs (one step, called K times per round, for every K), not one per few hundred tokens.

Visibility (spec §4.3, pitfall 23): the entries up to the hidden state's position, never a rejected draft's; on
sliding layers only the last `window + 1` of them (HF's flipped bidirectional window).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx

from .cache import KVCache, bucket_size
from .models.config import SLIDING
from .models.gemma4_assistant import Drafter
from .models.gemma4_text import KV, Model
from .sampling import SamplerConfig, candidate_log_probs, sample, scatter_log_probs

MAX_GRAPHS = 32  # compiled draft steps kept per pair (one per sampling setting and grammar use), oldest first
ALTERNATIVES = 16  # under a grammar, greedy: the drafter's next choices kept per draft, to replace a forbidden one


@dataclass
class KVWindow:
    """A view over one producer cache's buffers; entries [lo, hi) of it are visible to the drafter."""

    keys: mx.array  # (B, n_kv_heads, S, head_dim), S = bucket_size(hi - lo)
    values: mx.array
    lo: int
    hi: int

    def exact(self) -> KV:
        """Only the visible entries (the eager drafter call and the parity tests take these)."""
        return self.keys[..., self.lo : self.hi, :], self.values[..., self.lo : self.hi, :]


def _visible_start(layer_type: str, end: int, window: int) -> int:
    """First visible entry when entries [0, end) are held: all of them, or on sliding layers the last
    `window + 1` (HF's flipped bidirectional window)."""
    return max(0, end - window - 1) if layer_type == SLIDING else 0


def visible_kv(shared_kv: dict[str, KV], drop: int, window: int) -> dict[str, KV]:
    """From a target forward's producer K/V: the last `drop` entries (rejected drafts) removed and, on sliding
    layers, the last `window + 1` entries kept."""
    out = {}
    for layer_type, (k, v) in shared_kv.items():
        end = k.shape[2] - drop
        start = _visible_start(layer_type, end, window)
        out[layer_type] = (k[..., start:end, :], v[..., start:end, :])
    return out


def cache_windows(target: Model, cache: list[KVCache]) -> dict[str, KVWindow]:
    """What the drafter may see after the cache was rolled back to the accepted tokens."""
    window = target.args.sliding_window
    out = {}
    for layer_type, producer in target.producers.items():
        c = cache[producer]  # producers never share K/V, so each owns a cache
        lo, hi = _visible_start(layer_type, c.length, window), c.length
        size = bucket_size(hi - lo)
        # buffers are bucket sizes >= length, so the view fits (a capped view would be one more shape to trace)
        assert size <= c.keys.shape[2], (size, c.keys.shape)
        start = max(0, hi - size)
        view = slice(start, start + size)
        out[layer_type] = KVWindow(c.keys[..., view, :], c.values[..., view, :], lo - start, hi - start)
    return out


class DraftStep:
    """The drafter's decoding step, compiled once and called K times per round (queued lazily: no host work sits
    between steps, the round's tokens are read at its one sync). Compiling the step rather than the whole round
    costs the same per round (measured on the demo pair: within noise at K = 1..8) and one trace per K/V window
    size instead of one per K and size: the first round at a new K costs nothing extra (a K = 8 round's trace
    was ~50 ms on a CPU), so `auto` may try a K without paying for it. Sampling draws from MLX's global RNG,
    whose state each step reads and advances. A loaded pair keeps one (`bundle.state.draft_step`)."""

    def __init__(self, target: Model, drafter: Drafter):
        self.target, self.drafter = target, drafter
        # `inputs`: the weights are read at each call, so a drafter being trained is never seen stale
        self._state = [drafter.state, target.model.embed_tokens.state]
        self._body = mx.compile(self._step, inputs=self._state)
        self._steps: dict[tuple, Callable] = {}

    def _step(self, token, hidden, keys, values, lo, hi, position):
        """(token (1,), hidden (1, 1, H)) -> (next hidden (1, 1, H), y (1, 1, Hd))."""
        kv, masks = {}, {}
        for layer_type in keys:
            idx = mx.arange(keys[layer_type].shape[2])
            masks[layer_type] = ((idx >= lo[layer_type]) & (idx < hi[layer_type]))[None]  # (1, S)
            kv[layer_type] = (keys[layer_type], values[layer_type])
        return self.drafter(self.target.model.embed(token[None]), hidden, kv, position, masks)

    def _compiled(self, sampler: SamplerConfig, first_mask: bool, alternatives: bool) -> Callable:
        """One step and its token: (token, hidden, [mask,] *context) -> (token (1,), hidden, extra): extra is
        q (V,) when sampling, the ALTERNATIVES best choices (M,) when greedy under a grammar, else empty."""

        def one(token, hidden, *inputs):
            mask, context = (inputs[0], inputs[1:]) if first_mask else (None, inputs)  # mask: the first draft's
            hidden, y = self._step(token, hidden, *context)
            if not sampler.greedy:
                token, q = _sampled_token(self.drafter, y, sampler, mask)
                return token, hidden, q
            token = self.drafter.top_token(y)[0] if mask is None else _masked_top(self.drafter, y, mask)
            extra = _top_choices(self.drafter, y, ALTERNATIVES) if alternatives else mx.zeros((0,), mx.int32)
            return token, hidden, extra

        # only what shapes the draft distribution: a new seed must not mean a new graph
        key = (first_mask, alternatives, None if sampler.greedy else (sampler.temperature, sampler.top_p,
                                                                      sampler.top_k, sampler.min_p))
        if key not in self._steps:
            if len(self._steps) >= MAX_GRAPHS:  # e.g. an app whose temperature slider keeps moving
                del self._steps[next(iter(self._steps))]
            rng = [mx.random.state]
            self._steps[key] = mx.compile(one, inputs=self._state + rng, outputs=rng)
        return self._steps[key]

    @staticmethod
    def context(windows: dict[str, KVWindow], position: int) -> tuple:
        """The per-round inputs: K/V windows, their visible ranges and the query position, as arrays (a Python
        int would be baked into the graph: a retrace every round)."""
        return (
            {t: w.keys for t, w in windows.items()}, {t: w.values for t, w in windows.items()},
            {t: mx.array(w.lo) for t, w in windows.items()}, {t: mx.array(w.hi) for t, w in windows.items()},
            mx.array(position),
        )

    def __call__(self, last: mx.array, hidden: mx.array, context: tuple, num_drafts: int,
                 sampler: SamplerConfig, first_mask: mx.array | None = None) -> tuple:
        """`num_drafts` draft tokens (K,) and, when sampling, their draft distributions q (K, V). `first_mask`
        (V,) bool: the tokens a grammar allows as the first draft (the later ones are not known before the
        round runs); with it, a third value: greedy, the drafter's ALTERNATIVES best choices per draft (K, M) ids,
        best first, from which a forbidden draft is replaced (`Constraint.kept_drafts`); sampling, None (q is
        enough)."""
        masked = first_mask is not None
        token, tokens, extras = last, [], []
        with _restored_on_error(self._state + [mx.random.state]):  # one walk of the weights per round
            for i in range(num_drafts):
                first = masked and i == 0
                inputs = (first_mask, *context) if first else context
                step = self._compiled(sampler, first, masked and sampler.greedy)
                token, hidden, extra = step(token, hidden, *inputs)
                tokens.append(token)
                extras.append(extra)
        tokens = mx.concatenate(tokens)
        q = None if sampler.greedy else mx.stack(extras)
        if not masked:
            return tokens, q
        return tokens, q, mx.stack(extras) if sampler.greedy else None

    def body(self, token: mx.array, hidden: mx.array, context: tuple) -> tuple[mx.array, mx.array]:
        """One step: (next hidden, y), for tests and tools that need the drafter's hidden output."""
        with _restored_on_error(self._state):
            return self._body(token, hidden, *context)


def _leaves(tree, out: list) -> list:
    """(container, key, array) for every array in nested dicts / lists (modules are dicts)."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for key, value in items:
        if isinstance(value, mx.array):
            out.append((tree, key, value))
        else:
            _leaves(value, out)
    return out


@contextlib.contextmanager
def _restored_on_error(state: list):
    """Around calls of compiled functions whose `inputs` are `state`. While tracing, MLX swaps the arrays in
    `state` (the weights, the RNG key) for placeholders and swaps them back at the end; an exception in between (a
    bug, a Ctrl-C) would leave the placeholders in the live model, and every later generation would fail. Put the
    arrays back instead."""
    saved = _leaves(state, [])
    try:
        yield
    except BaseException:
        for container, key, value in saved:
            container[key] = value
        raise


def _allowed(candidates: mx.array | None, logits: mx.array, mask: mx.array) -> mx.array:
    """`logits` (C,) of `candidates` (C,) ids (None: the vocabulary) with the tokens `mask` (V,) forbids at -inf;
    unchanged when it forbids them all (the round's verify then stops at this draft)."""
    allowed = mask if candidates is None else mask[candidates]
    return mx.where(mx.any(allowed), mx.where(allowed, logits, float("-inf")), logits)


def _masked_top(drafter: Drafter, y: mx.array, mask: mx.array) -> mx.array:
    """The greedy draft token (1,) among those `mask` allows."""
    candidates, logits = drafter.candidates(y)  # (1, 1, C) ids or None, (1, 1, C or V)
    ids = None if candidates is None else candidates[0, 0]
    best = mx.argmax(_allowed(ids, logits[0, 0], mask))
    return (best if ids is None else ids[best]).reshape(1).astype(mx.int32)


def _top_choices(drafter: Drafter, y: mx.array, m: int) -> mx.array:
    """The drafter's `m` best tokens (m,) for one step, best first (among the clustered head's candidates)."""
    candidates, logits = drafter.candidates(y)  # (1, 1, C) ids or None, (1, 1, C or V)
    logits = logits[0, 0]
    m = min(m, logits.shape[-1])
    top = mx.argpartition(-logits, m - 1)[:m]  # O(V), no vocabulary-wide sort
    top = top[mx.argsort(-logits[top])]
    return top.astype(mx.int32) if candidates is None else candidates[0, 0][top].astype(mx.int32)


def _sampled_token(drafter: Drafter, y: mx.array, sampler: SamplerConfig, mask: mx.array | None = None,
                   key: mx.array | None = None) -> tuple[mx.array, mx.array]:
    """A draft token (1,) sampled from q, and q (V,) itself (log-probabilities; -inf outside the candidates).

    q is processed and sampled on the clustered head's candidates (of those `mask` allows, when given), and of
    those on the sampler's top-k only; it is spread over the vocabulary once, because the acceptance rule reads
    it there."""
    candidates, logits = drafter.candidates(y)  # (1, 1, C) ids or None for the vocabulary, (1, 1, C or V)
    logits = logits[0, 0] if mask is None else _allowed(None if candidates is None else candidates[0, 0],
                                                        logits[0, 0], mask)
    kept, q = candidate_log_probs(logits, sampler)  # same processing as the target: Leviathan needs it
    ids = None if candidates is None else candidates[0, 0]
    if kept is not None:  # positions along `logits`: map them to token ids
        ids = kept if ids is None else ids[kept]
    choice = sample(q, key)
    if ids is None:
        return choice[None], q
    return ids[choice][None], scatter_log_probs(ids, q, drafter.args.text.vocab_size)


def draft(
    step: DraftStep, last: mx.array, hidden: mx.array, windows: dict[str, KVWindow], position: int,
    num_drafts: int, sampler: SamplerConfig, first_mask: mx.array | None = None,
) -> tuple:
    """`num_drafts` tokens (K,) from the drafter at one constant query position, and their q rows (K, V)
    (log-probabilities) when sampling; the first among the tokens `first_mask` (V,) allows, when given (then
    also the alternatives `DraftStep` returns)."""
    if num_drafts == 0:
        none = mx.zeros((0,), mx.int32), None
        return none if first_mask is None else (*none, None)
    return step(last, hidden, step.context(windows, position), num_drafts, sampler, first_mask)
