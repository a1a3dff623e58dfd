"""One rank of the tensor-parallel test (run by tests/test_distributed.py through `mlx.launch -n 2`).

For each bundle folder given: load it whole (the single-process reference, computed locally on every rank) and
sharded across the ranks, generate with both, and write this rank's tokens, logit differences and weight bytes to
OUT/rank{r}.json for the test to compare.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlx.core as mx
from distributed_models import PROMPT
from mlx.utils import tree_flatten

from mlx_gemma_mtp import load
from mlx_gemma_mtp.decode import stream_generate
from mlx_gemma_mtp.distributed.load import load_sharded_target
from mlx_gemma_mtp.distributed.lockstep import Lockstep
from mlx_gemma_mtp.distributed.shard import weight_bytes
from mlx_gemma_mtp.load import Bundle
from mlx_gemma_mtp.pair_state import PairState
from mlx_gemma_mtp.sampling import SamplerConfig

TOKENS = 20
GREEDY, SAMPLED = SamplerConfig(), SamplerConfig(temperature=1.0, seed=7)
UNSEEDED = SamplerConfig(temperature=1.0)
RUNS = {  # name -> (num_draft_tokens, sampler, oracle proposer)
    "plain": (0, GREEDY, False), "mtp3": (3, GREEDY, False), "auto": ("auto", GREEDY, False),
    "oracle4": (4, GREEDY, True), "sampled_plain": (0, SAMPLED, False), "sampled_mtp2": (2, SAMPLED, False),
    "sampled_auto": ("auto", SAMPLED, False), "unseeded_mtp2": (2, UNSEEDED, False),
}


def oracle(reference: list[int]):
    """Drafts the reference continuation with every third draft wrong: partial acceptance each round."""

    def propose(last, hidden, windows, last_position, k):
        start = last_position - len(PROMPT) + 1  # index in `reference` of the token after `last`
        drafts = [reference[i] if i < len(reference) and (i % 3) != 2 else 0 for i in range(start, start + k)]
        return mx.array(drafts, mx.int32), None

    return propose


def tokens(bundle, name: str, reference: list[int], schedules: dict | None = None) -> list[int]:
    """The run's tokens; its draft-length schedule (drafting rounds, plain steps, drafts per position) goes to
    `schedules`."""
    k, sampler, use_oracle = RUNS[name]
    proposer = oracle(reference) if use_oracle else None
    responses = list(stream_generate(bundle, PROMPT, TOKENS, sampler, k, proposer=proposer))
    if schedules is not None and (d := responses[-1].draft) is not None:
        schedules[name] = [d.rounds, d.plain_rounds, d.drafted_per_position]
    return [r.token for r in responses]


def main(out: Path, folders: list[Path]) -> None:
    group = mx.distributed.init()
    rank, report = group.rank(), {}
    for folder in folders:
        whole = load(folder)
        target, _, reader = load_sharded_target(folder, group)
        state = PairState(target, whole.drafter, Lockstep(group))  # the ranks decide in lock-step
        sharded = Bundle(target, whole.drafter, None, whole.config, whole.generation, folder, state=state)
        prompt = mx.array(PROMPT)[None]
        diff = mx.abs(whole.target(prompt) - sharded.target(prompt)).max().item()
        ref = {name: tokens(whole, name, []) for name in ("plain", "sampled_plain", "sampled_mtp2")}
        mine, theirs = dict(tree_flatten(target.parameters())), dict(tree_flatten(whole.target.parameters()))
        replicated = sum(v.nbytes for k, v in mine.items() if v.shape == theirs[k].shape)
        schedules = {}
        got = {name: tokens(sharded, name, ref["plain"], schedules) for name in RUNS}
        report[folder.name] = {
            "ref": ref, "got": got, "schedules": schedules, "max_logit_diff": diff, "bytes_read": reader.bytes_read,
            "weight_bytes": weight_bytes(target), "whole_bytes": weight_bytes(whole.target),
            "replicated_bytes": replicated,
        }
    (out / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]])
