"""Tensor-parallel decoding cost, 1 rank against 2: `python -m mlx_gemma_mtp.bench_distributed`.

Run plainly, it measures one process, then launches itself on two local ranks (`mlx.launch -n 2 --backend ring`,
or `--hostfile` for real machines) and prints both. Under `mlx.launch` it measures that group and rank 0 prints.
Measured on a random float32 E2B-style pair (`presets.tiny_e2b_pair`): ms per token of plain decoding, of MTP
with the (random, so never accepted) drafter at K = 3, and of MTP whose K = 3 drafts are always right (an oracle
proposer: four tokens per verify); the time of one all-sum of a hidden-state row; and the all-sums a token costs
with their bytes. Those counts are exact for any model (2 per layer + 1 per MoE layer per forward, plus one tiny
all-sum per plain step or two per drafting round for the lock-step); `counts_for_presets` gives them for the
released sizes, so the cost on another link is (all-sums per token) x (its all-sum latency) + bytes / bandwidth.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx

from ..decode import stream_generate
from ..distributed.group import distributed_group
from ..distributed.lockstep import Lockstep
from ..distributed.shard import all_sum_count, shard, weight_bytes
from ..pair_state import PairState
from ..sampling import SamplerConfig
from ..testing.presets import preset_config, tiny_e2b_pair

PROMPT = list(range(3, 19))


def _ms_per_token(bundle, num_draft_tokens, tokens: int, proposer=None) -> tuple[float, list[int]]:
    """Decoding time per token after the first (best of two runs), and the tokens."""
    best, out = float("inf"), []
    for _ in range(2):
        responses = list(stream_generate(bundle, PROMPT, tokens, SamplerConfig(), num_draft_tokens,
                                         proposer=proposer))
        r = responses[-1]
        best = min(best, 1e3 * (r.generation_tokens - 1) / r.generation_tps / r.generation_tokens)
        out = [x.token for x in responses]
    return best, out


def _oracle(tokens: list[int]):
    def propose(last, hidden, windows, last_position, k):
        start = last_position - len(PROMPT) + 1
        return mx.array((tokens + [0] * k)[start : start + k], mx.int32), None

    return propose


def _all_sum_us(group, rows: int, hidden: int, repeats: int = 50) -> float:
    if group is None:
        return 0.0
    x = mx.ones((1, rows, hidden))
    mx.eval(mx.distributed.all_sum(x, group=group))
    tic = time.perf_counter()
    for _ in range(repeats):
        x = mx.distributed.all_sum(x, group=group) * 0.5
        mx.eval(x)
    return 1e6 * (time.perf_counter() - tic) / repeats


def measure(hidden: int, layers: int, vocab: int, tokens: int) -> dict:
    """This process's (or this group's) numbers."""
    group = distributed_group()
    bundle = tiny_e2b_pair(hidden, vocab, layers)
    whole = weight_bytes(bundle.target)
    if group is not None:
        shard(bundle.target, group)
        bundle.state = PairState(bundle.target, bundle.drafter, Lockstep(group))  # the ranks decide in lock-step
    plain, reference = _ms_per_token(bundle, 0, tokens)
    mtp, _ = _ms_per_token(bundle, 3, tokens)
    oracle, oracle_tokens = _ms_per_token(bundle, 3, tokens, _oracle(reference))
    assert oracle_tokens == reference, "MTP changed the greedy output"
    per_forward = all_sum_count(bundle.target)
    return {
        "ranks": 1 if group is None else group.size(), "hidden": hidden, "layers": layers, "vocab": vocab,
        "plain_ms": plain, "mtp3_ms": mtp, "mtp3_oracle_ms": oracle, "tokens": reference,
        "all_sum_us": _all_sum_us(group, 1, hidden), "all_sum_4rows_us": _all_sum_us(group, 4, hidden),
        "all_sums_per_forward": per_forward, "weight_bytes": weight_bytes(bundle.target), "whole_bytes": whole,
    }


def per_token(n_per_forward: int, hidden: int, element: int, accepted_per_round: float = 0.0
              ) -> tuple[float, float]:
    """(all-sums, bytes) per generated token: plain (accepted_per_round 0: one lock-step all-sum per token) or MTP
    rounds of K drafts with `accepted_per_round` accepted (two lock-step all-sums per round)."""
    if not accepted_per_round:
        return n_per_forward + 1, n_per_forward * hidden * element
    tokens = 1 + accepted_per_round
    rows = tokens  # a verify forward carries K + 1 rows; with all accepted, K + 1 = tokens
    return (n_per_forward + 2) / tokens, n_per_forward * rows * hidden * element / tokens


def counts_for_presets() -> list[tuple[str, int, int, float]]:
    """(preset, all-sums per forward, hidden size, KB per plain token in bfloat16) for the released sizes."""
    out = []
    for shape in ("e2b", "e4b", "26b-a4b", "31b"):
        text = preset_config(shape)[0]
        text = text.get("text_config", text)
        n = text["num_hidden_layers"] * (3 if text.get("enable_moe_block") else 2)
        out.append((shape, n, text["hidden_size"], n * text["hidden_size"] * 2 / 1024))
    return out


def _launch(args) -> dict:
    launcher = shutil.which("mlx.launch", path=str(Path(sys.executable).parent)) or "mlx.launch"
    where = ["--hostfile", args.hostfile] if args.hostfile else ["-n", "2", "--backend", "ring"]
    command = [launcher, *where, "--python", sys.executable, "-m", "mlx_gemma_mtp.bench_distributed",
               "--json", "--hidden", str(args.hidden), "--layers", str(args.layers), "--vocab", str(args.vocab),
               "--tokens", str(args.tokens)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}")
    return json.loads(next(line for line in done.stdout.splitlines() if line.startswith("{")))


def report(results: list[dict]) -> str:
    lines = [("ranks  weights/rank  plain ms/tok  MTP K=3 ms/tok  MTP K=3 all-accepted ms/tok  "
              "all-sum us (1 row, 4 rows)")]
    for r in results:
        sums = f"{r['all_sum_us']:8.0f}, {r['all_sum_4rows_us']:.0f}" if r["ranks"] > 1 else "       -"
        lines.append(f"{r['ranks']:>5}  {r['weight_bytes'] / 1e6:9.1f} MB  {r['plain_ms']:12.2f}  "
                     f"{r['mtp3_ms']:14.2f}  {r['mtp3_oracle_ms']:27.2f}  {sums}")
    r = results[-1]
    n, h = r["all_sums_per_forward"], r["hidden"]
    plain, mtp = per_token(n, h, 4), per_token(n, h, 4, 3)
    lines.append(f"all-sums per token ({r['layers']} layers, hidden {h}, float32): plain {plain[0]:.0f} "
                 f"({plain[1] / 1024:.1f} KB), MTP K=3 all accepted {mtp[0]:.1f} ({mtp[1] / 1024:.1f} KB)")
    lines.append("released sizes (bfloat16), per forward: " + ", ".join(
        f"{s} {n} all-sums x {h * 2 / 1024:.1f} KB = {kb:.0f} KB" for s, n, h, kb in counts_for_presets()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m mlx_gemma_mtp.bench_distributed", description=__doc__)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=10)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--hostfile", default=None, help="run the multi-rank part on these hosts (mlx.launch format)")
    p.add_argument("--json", action="store_true", help="print this group's numbers as JSON (rank 0)")
    args = p.parse_args(argv)
    result = measure(args.hidden, args.layers, args.vocab, args.tokens)
    group = distributed_group()
    if group is not None and group.rank() != 0:
        return
    if args.json:
        print(json.dumps(result), flush=True)
        return
    results = [result] if group is not None else [result, _launch(args)]
    if len(results) == 2 and results[0]["tokens"] != results[1]["tokens"]:
        raise RuntimeError("the sharded run generated other tokens than the single process")
    print(report(results))


if __name__ == "__main__":
    main()
