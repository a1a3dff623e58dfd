"""What a loaded target/drafter pair keeps between generations, in one object its `Bundle` owns (`bundle.state`).

- the drafter's compiled draft step (a JIT pass per sampling setting and K/V window size, for every draft length:
  built once, reused);
- what the "auto" draft length learned about the pair (`draft_length.AutoRecords`), started from this machine's
  saved calibration when there is one;
- for a target sharded over several processes, the `Lockstep` that keeps the ranks' decisions equal;
- the tokenizer as the grammar engine sees it, for structured output (built on first use: seconds at 262k tokens).
"""

from __future__ import annotations

from functools import cached_property

from .calibration import saved_costs
from .constraint import Constraint, grammar_tokenizer
from .distributed.lockstep import Lockstep
from .draft_length import (
    AutoRecords,
    DraftLength,
    FixedDraftLength,
    LockstepDraftLength,
    auto_draft_length,
)
from .drafting import DraftStep
from .models.gemma4_assistant import Drafter
from .models.gemma4_text import Model
from .round_cost import cost_model
from .sampling import SamplerConfig


class PairState:
    """Per-pair state that outlives a generation (see the module docstring)."""

    def __init__(self, target: Model, drafter: Drafter | None, lockstep: Lockstep | None = None):
        self.target, self.drafter, self.lockstep = target, drafter, lockstep
        self._grammar_tokenizer = None

    def constraint(self, tokenizer, schema: dict, eos_token_ids: list[int]) -> Constraint:
        """A fresh grammar state for one generation whose answer must be JSON following `schema`."""
        if tokenizer is None:
            raise ValueError("structured output needs the checkpoint's tokenizer files")
        vocab = self.target.args.vocab_size
        if self._grammar_tokenizer is None:
            self._grammar_tokenizer = grammar_tokenizer(tokenizer, vocab, eos_token_ids)
        return Constraint.json(self._grammar_tokenizer, schema, vocab, eos_token_ids)

    @cached_property
    def draft_step(self) -> DraftStep:
        """The drafter's compiled step (its graphs are kept for the next generations)."""
        if self.drafter is None:
            raise ValueError("this bundle has no drafter: load(model, draft=...)")
        return DraftStep(self.target, self.drafter)

    @cached_property
    def auto_records(self) -> AutoRecords:
        """What "auto" learned about this pair, per sampling setting."""
        if self.drafter is None:
            raise ValueError("this bundle has no drafter: load(model, draft=...)")
        return AutoRecords(cost_model(self.target, self.drafter, self.lockstep))

    def forget(self) -> None:
        """Drop everything "auto" learned about this pair."""
        self.__dict__.pop("auto_records", None)

    def draft_length(self, num_draft_tokens: int | str, sampler: SamplerConfig, max_k: int) -> DraftLength:
        """The policy of one generation: a fixed K for an int; for "auto" one that learns (this pair's record for
        the sampling setting), or with a seed at T > 0 one whose schedule depends on counts only."""
        if isinstance(num_draft_tokens, int):
            return FixedDraftLength(num_draft_tokens)
        # each host has its own saved calibration: a sharded target starts from the model
        prior = (lambda: None) if self.lockstep else (lambda: saved_costs(self.target, self.drafter, sampler.greedy))
        policy = auto_draft_length(self.auto_records, sampler, max_k, prior)
        return policy if self.lockstep is None or not policy.use_time else LockstepDraftLength(self.lockstep, policy)
