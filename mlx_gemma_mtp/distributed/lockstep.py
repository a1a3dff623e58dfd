"""Lock-step of a target sharded over several processes: every decision (a sampled token, the drafts, a round's
accepted count) is rank 0's, broadcast inside the graph the round already evaluates, so the ranks never take
different paths and there is still one host sync per round; rank 0's round timings ride along for `auto`."""

from __future__ import annotations

import os

import mlx.core as mx


class Lockstep:
    """What keeps the ranks of a sharded target making the same decisions.

    Every rank runs the same replicated drafter and sampling from the same seed, so decisions agree anyway on
    identical machines; `agree` still makes rank 0's decision everyone's (an all-sum where only rank 0 puts its
    values), inside the graph the round evaluates, so a bit of difference between two machines' kernels cannot
    make the ranks take different paths (a mismatch would desynchronise the collectives). The auto draft length
    runs on every rank on rank 0's round timings, which travel in the same all-sums
    (`draft_length.LockstepDraftLength`).
    """

    def __init__(self, group: mx.distributed.Group):
        self.group = group
        self._rank0 = mx.array(float(group.rank() == 0))
        self._outbox: list[float] = []  # this rank's round seconds, not sent yet (only rank 0's survive)
        self._ks: list[int] = []  # the K of each sent second, in order (equal on every rank)
        self._sent: list[tuple[mx.array, int, int]] = []  # (all-summed payload, values, seconds) carrying seconds
        self._newest: mx.array | None = None  # the newest agree's payload (maybe still computing)

    def agree(self, values: mx.array) -> mx.array:
        """`values` (integers < 2**24: token ids, counts) as rank 0 has them, on every rank; lazy."""
        seconds, self._outbox = self._outbox, []
        flat = values.reshape(-1).astype(mx.float32)
        packed = mx.concatenate([flat, mx.array(seconds, mx.float32)]) if seconds else flat
        total = mx.distributed.all_sum(packed * self._rank0, group=self.group)
        self._newest = total
        if seconds:
            self._sent.append((total, flat.size, len(seconds)))
        return total[: flat.size].astype(values.dtype).reshape(values.shape)

    def agree_round(self, n: mx.array, tokens: mx.array) -> tuple[mx.array, mx.array]:
        """A round's accepted count and tokens as rank 0 has them (one all-sum)."""
        both = self.agree(mx.concatenate([n.reshape(1).astype(tokens.dtype), tokens]))
        return both[0].astype(n.dtype), both[1:]

    def start_generation(self) -> None:
        """Forget timings in flight: they belong to the previous generation."""
        self._outbox, self._ks, self._sent = [], [], []

    def received(self) -> list[tuple[int, float]]:
        """(K, rank 0's seconds) of the rounds whose timings arrived: through `agree` calls already evaluated
        (all but the newest: a plain step's token may still be computing), i.e. one or two rounds late."""
        out = []
        while self._sent and self._sent[0][0] is not self._newest:
            total, offset, count = self._sent.pop(0)
            seconds = total.tolist()[offset:]  # evaluated with the tokens it carried: no host sync
            out += list(zip(self._ks[:count], seconds))
            del self._ks[:count]
        return out

    def send(self, k: int, seconds: float) -> None:
        """A finished round's seconds, sent with the next `agree` (only rank 0's arrive)."""
        self._outbox.append(seconds)
        self._ks.append(k)

    def shared_seed(self) -> int:
        """A fresh seed chosen by rank 0, the same on every rank (for sampling without a user seed)."""
        seed = int.from_bytes(os.urandom(3), "little")  # < 2**24: exact through the float all-sum
        return int(self.agree(mx.array([seed], mx.int32)).item())

    def same_float(self, value: float) -> float:
        """Rank 0's `value` on every rank (setup only: it syncs)."""
        total = mx.distributed.all_sum(mx.array([value], mx.float32) * self._rank0, group=self.group)
        return total.item()




def agreed(lockstep: Lockstep | None, values: mx.array) -> mx.array:
    """`values` decided on rank 0 for a sharded target (`lockstep`), `values` itself otherwise."""
    return values if lockstep is None else lockstep.agree(values)


def agreed_round(lockstep: Lockstep | None, n: mx.array, tokens: mx.array) -> tuple[mx.array, mx.array]:
    """A round's accepted count and tokens, decided on rank 0 for a sharded target."""
    return (n, tokens) if lockstep is None else lockstep.agree_round(n, tokens)
