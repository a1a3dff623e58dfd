"""Structured output: the target's distribution restricted to what a JSON schema allows, exact with MTP.

The grammar engine is llguidance (Microsoft's, used by mlx-vlm and vLLM): it compiles a JSON schema against the
tokenizer and gives, for the text so far, the set of tokens that may come next as a bitmask, in microseconds;
it can consume tokens and roll them back. Nothing here is hand-written grammar.

Exactness with drafts: the constraint is part of the target's distribution (its logits outside the mask are
-inf), so plain decoding and MTP sample from the same masked distribution. A round's drafts are one compiled
graph (no host work between draft tokens): the first is chosen among the tokens the grammar allows next (that
mask is known when the round is queued), the later ones unconstrained (their masks depend on the drafts before
them). Once the drafts are known (one extra host sync per round, not per draft token) the matcher walks them,
giving the mask at every verify position. The drafts the grammar allows in a row are kept; the first one it
forbids (target probability 0: it would be rejected) is replaced by a draw from the drafter's distribution at
that position restricted to the grammar (greedy: its best allowed choice, from the alternatives the draft graph
returns; sampled: a sample of its q row restricted, one more host sync on the rounds that need it), and the
drafts after it are dropped. A kept draft is thus distributed as if the drafter had drafted under the masks
(a draw from q that the grammar allows, or a redraw from q restricted after a forbidden one: both q restricted),
and whether the round goes on after it is independent of its value. Greedy: the masked argmax decides;
sampled: Leviathan's rule on the masked target distribution against q restricted (`kept_draft_log_probs`).
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np

from .distributed.lockstep import Lockstep, agreed

_NEG_INF = float("-inf")


def grammar_tokenizer(tokenizer, vocab_size: int, eos_token_ids: list[int]):
    """llguidance's view of `tokenizer` (each token's bytes; 1.5 s at 262,144 tokens: a bundle keeps it)."""
    import llguidance.hf

    backend = getattr(tokenizer, "_tokenizer", tokenizer)  # mlx-lm's wrapper holds the HF tokenizer
    try:
        return llguidance.hf.from_tokenizer(backend, n_vocab=vocab_size, eos_token=eos_token_ids)
    except (TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"this tokenizer cannot be used for structured output ({e})") from e


class Constraint:
    """The grammar state of one generation: which tokens may come next. Made by `Constraint.json`."""

    def __init__(self, matcher, vocab_size: int, eos_token_ids: list[int]):
        self.matcher, self.vocab_size = matcher, vocab_size
        self._shifts = mx.arange(32, dtype=mx.uint32)  # bit j of each mask word
        # once the answer is complete: an EOS only (as wide as the matcher's masks, which pad a word)
        self._end = np.zeros(len(matcher.compute_bitmask()) // 4, np.uint32)
        for t in eos_token_ids:
            self._end[t // 32] |= np.uint32(1 << (t % 32))

    @classmethod
    def json(cls, grammar_tokenizer, schema: dict, vocab_size: int, eos_token_ids: list[int]) -> Constraint:
        """Answers that are JSON following `schema` ({"type": "object"}: any JSON object), then an EOS id.

        Raises:
            ValueError: naming the schema's problem.
        """
        import llguidance

        if not isinstance(schema, dict):
            raise ValueError(f"the JSON schema must be an object, got {type(schema).__name__}")
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema))
        error = llguidance.LLMatcher.validate_grammar(grammar, grammar_tokenizer)  # "" when usable
        if error:
            raise ValueError(f"unsupported JSON schema: {error}")
        return cls(llguidance.LLMatcher(grammar_tokenizer, grammar), vocab_size, eos_token_ids)

    def _words(self) -> np.ndarray:
        """The allowed next tokens as 32-bit words (bit t % 32 of word t // 32)."""
        if self.matcher.is_stopped():  # the grammar is complete
            return self._end
        if self.matcher.is_error():
            raise RuntimeError(f"the grammar matcher failed: {self.matcher.get_error()}")
        return np.frombuffer(self.matcher.compute_bitmask(), np.uint32)

    def _masks(self, words: np.ndarray) -> mx.array:
        """(R, W) words -> (R, V) bool, unpacked on the device."""
        bits = (mx.array(words)[..., None] >> self._shifts) & 1  # (R, W, 32)
        return bits.reshape(words.shape[0], -1)[:, : self.vocab_size].astype(mx.bool_)

    def next_mask(self) -> mx.array:
        """(V,) bool: the tokens allowed next."""
        return self._masks(self._words()[None])[0]

    def restrict(self, logits: mx.array) -> mx.array:
        """(1, V) logits of the next position with the tokens the grammar forbids at -inf."""
        return mx.where(self.next_mask()[None], logits, _NEG_INF)

    def masks_along(self, drafts: list[int]) -> tuple[mx.array, int]:
        """The masks of a round's verify positions, (j + 1, V), and j: how many of `drafts` the grammar allows in
        a row (the drafts after them cannot be accepted, so they are not verified). The matcher is left as it
        was."""
        words, kept = self._walk(drafts, lambda i, allowed: None)
        return self._masks(np.stack(words)), len(kept)

    def kept_drafts(self, drafts: mx.array, q: mx.array | None, alternatives: mx.array | None,
                    lockstep: Lockstep | None = None) -> tuple[mx.array, mx.array | None, mx.array]:
        """What a round verifies under the grammar: (drafts (J,), their distributions (J, V) or None when greedy,
        the masks of the J + 1 verify rows). The drafts are read (a host sync, once per round) and walked: those
        the grammar allows in a row are kept; the first one it forbids is replaced by a draw from what the drafter
        proposed there restricted to what the grammar allows (greedy: its best allowed token among
        `alternatives` (K, M); sampling: a sample of that q row restricted, read in one more host sync on such
        rounds only), and the drafts after it are dropped (they were drafted after the forbidden token). So every
        kept draft is a draw from the drafter's distribution restricted to the grammar, as if it had drafted
        under the masks, and the acceptance rule is given that distribution (`kept_draft_log_probs`). The
        matcher is left as it was."""
        mx.eval(drafts, *([] if alternatives is None else [alternatives]))
        choices = None if alternatives is None else alternatives.tolist()

        def replacement(i: int, allowed: np.ndarray) -> int | None:
            if choices is not None:  # greedy: the drafter's best choice the grammar allows
                return next((t for t in choices[i] if _allows(allowed, t)), None)
            if q is None:  # a proposer that gave neither (tests, oracles): the drafts stop here
                return None
            row = kept_draft_log_probs(q[i : i + 1], self._masks(allowed[None]))[0]
            token = agreed(lockstep, mx.random.categorical(row).astype(mx.int32))
            possible = mx.isfinite(row[token])  # False when the grammar forbids all of q's support
            mx.eval(token, possible)
            return token.item() if possible.item() else None

        words, kept = self._walk(drafts.tolist(), replacement)
        masks = self._masks(np.stack(words))
        n = len(kept)
        kept_q = None if q is None else kept_draft_log_probs(q[:n], masks[:n])
        return mx.array(kept, mx.int32), kept_q, masks

    def _walk(self, drafts: list[int], replacement) -> tuple[list[np.ndarray], list[int]]:
        """(the allowed-token words before each kept draft and after the last, the kept drafts): the drafts the
        grammar allows in a row, then the first forbidden one's `replacement(i, words)` if it gives one (and
        nothing after it). The matcher is left as it was."""
        words, kept = [self._words()], []
        for i, token in enumerate(drafts):
            if self.matcher.is_stopped():
                break  # (after the end only an EOS, which ends generation: nothing is verified past it)
            replaced = not _allows(words[-1], token)
            if replaced and (token := replacement(i, words[-1])) is None:
                break
            self.matcher.consume_token(token)
            kept.append(token)
            words.append(self._words())
            if replaced:
                break
        self.matcher.rollback(len(kept))
        return words, kept

    def consume(self, tokens: list[int]) -> None:
        """The tokens emitted (each one allowed: they were chosen under the mask; an EOS after the end of the
        answer is not the grammar's)."""
        for token in tokens:
            if self.matcher.is_stopped():
                return
            self.matcher.consume_token(token)


def kept_draft_log_probs(q: mx.array, masks: mx.array) -> mx.array:
    """The distributions the verified drafts were drawn from, (K, V) log-probabilities: the drafter's q (K, V)
    restricted to the tokens `masks` (K, V) allows and renormalised. A draft the grammar forbids is dropped (with
    the drafts after it), so a kept one is a draw from q given that it is allowed; Leviathan's rule is exact only
    against that distribution (against q itself it accepts allowed drafts too often: with q = (.25, .25, .5), p =
    (.9, .1, 0) and the third token forbidden, the first token comes out with probability 0.85, not 0.9)."""
    if q.shape[0] == 0:  # no draft kept (MLX's logsumexp refuses an empty array)
        return q
    restricted = mx.where(masks, q, _NEG_INF)
    return restricted - mx.logsumexp(restricted, axis=-1, keepdims=True)


def _allows(words: np.ndarray, token: int) -> bool:
    return bool(words[token // 32] >> np.uint32(token % 32) & 1)
