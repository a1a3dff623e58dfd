"""`auto` for a batch (`BatchDraftLength`) on simulated machines: `python -m mlx_gemma_mtp.bench.batch_auto_regret`.

B rows decode on a virtual clock whose round costs t(K, B) come from a cost landscape, each row accepting drafts by
its own acceptance profile, each row's sequence followed at once by another (a busy server). The batch's
aggregate tokens per second is compared with the best fixed K's (K = 0 included) on the same landscape, rows and
random draws: the regret a batch pays for not knowing the machine. Deterministic, a few seconds; the test
(tests/test_batch_draft_length.py) asserts its bounds. The single-sequence policy has its own, finer simulator
(`bench.auto_regret`: pipelining, compiles, drifting texts); a batch round is neither pipelined nor compiled.
"""

from __future__ import annotations

import argparse

import numpy as np

from ..batch_draft_length import CANDIDATES, BatchDraftLength
from .auto_regret import METAL

# round milliseconds (the engine's own fastest round per K, all rows running) measured by bench.batching on the
# demo pair on a 2-core x86 CPU (docs/benchmarks.md); K = 5 and 7 interpolated
CPU_DEMO = {1: [11, 17, 17, 22, 26, 33, 40, 42, 43], 2: [11, 22, 22, 29, 32, 37, 43, 52, 62],
            4: [13, 25, 29, 44, 46, 53, 60, 68, 76], 8: [18, 35, 43, 54, 67, 83, 100, 117, 134]}


def cpu_demo(k: int, rows: int) -> float:
    return CPU_DEMO[rows][k] / 1000


def memory_bound(k: int, rows: int) -> float:
    """A target whose weights' reads dominate (a Mac, 4-bit): extra rows nearly free, a draft step 8%."""
    return 0.020 * (1 + 0.02 * rows * (k + 1)) + 0.0016 * k


def metal_cliff(k: int, rows: int) -> float:
    """MLX's 4-bit qmv_wide on Apple GPUs (issue 23's curve, `bench.auto_regret.METAL`) over the round's
    B (K + 1) verify rows; past 9 rows its last step extended at 0.15 of a 1-row forward per row (assumed, not
    measured), a draft step 5%."""
    t = rows * (k + 1)
    ratio = METAL[t - 1] if t <= len(METAL) else METAL[-1] + 0.15 * METAL[0] * (t - len(METAL))
    return ratio + 0.05 * METAL[0] * k * (1 + 0.05 * rows)


def compute_bound(k: int, rows: int) -> float:
    """Every verified row costs its share: drafts never pay."""
    return 0.002 * rows * (k + 1) + 0.0005 * k


CODE = (0.92, 0.82, 0.76, 0.71, 0.68, 0.66, 0.64, 0.62)
PROSE = (0.67, 0.47, 0.42, 0.38, 0.35, 0.33, 0.31, 0.30)
NONE = (0.0,) * 8


def simulate(policy: BatchDraftLength | int, landscape, profiles, max_tokens: int, seed: int = 0) -> float:
    """Aggregate tokens per second of a server's batch: one row per acceptance profile, each row's sequence
    `max_tokens` long and followed at once by another with the same profile, until the rows have generated
    `max_tokens` each on average (so that a row that accepts nothing does not decide the run's length alone)."""
    rng, noise = np.random.default_rng(seed), np.random.default_rng(seed + 1)
    rows = range(len(profiles))
    generated = [1] * len(profiles)  # the first token comes with the prompt
    clock = tokens = 0.0
    while tokens < max_tokens * len(profiles):
        limits = {b: max_tokens - generated[b] - 1 for b in rows}
        k = policy if isinstance(policy, int) else policy.choose(len(profiles), limits)
        k = min(k, max(limits.values()))
        seconds = landscape(k, len(profiles)) * float(noise.lognormal(0, 0.05))
        emitted = {}
        for b in rows:
            n = 0
            while n < min(k, limits[b]) and rng.random() < profiles[b][n]:
                n += 1
            emitted[b] = [0] * (n + 1)
            generated[b] += n + 1
            tokens += n + 1
        clock += seconds
        if not isinstance(policy, int):
            policy.timed(k, len(profiles), seconds, emitted, limits)
        for b in rows:
            if generated[b] >= max_tokens:  # the sequence ends; the next one takes its row
                generated[b] = 1
                if not isinstance(policy, int):
                    policy.forget(b)
    return tokens / clock


def regret(landscape, profiles, max_tokens: int, seed: int = 0) -> tuple[float, dict[int, float]]:
    fixed = {k: simulate(k, landscape, profiles, max_tokens, seed) for k in CANDIDATES}
    auto = simulate(BatchDraftLength("auto", 8), landscape, profiles, max_tokens, seed)
    return auto / max(fixed.values()), fixed


LANDSCAPES = {"cpu-demo": cpu_demo, "memory-bound": memory_bound, "metal-cliff": metal_cliff,
              "compute-bound": compute_bound}
BATCHES = {"code": CODE, "prose": PROSE, "mixed": None}


def rows_of(batch: str, rows: int):
    return [(CODE, PROSE, NONE)[b % 3] for b in range(rows)] if batch == "mixed" else [BATCHES[batch]] * rows


ROWS = (1, 2, 4, 8)
SEEDS = 3
MAX_TOKENS = 96


def regret_table(seeds: int = SEEDS, max_tokens: int = MAX_TOKENS) -> dict[tuple, tuple[float, int]]:
    """(landscape, batch, rows) -> (auto over the best fixed K, worst of `seeds` runs; that best K)."""
    table = {}
    for name, landscape in LANDSCAPES.items():
        for batch in BATCHES:
            for rows in ROWS:
                runs = [regret(landscape, rows_of(batch, rows), max_tokens, seed) for seed in range(seeds)]
                fixed = runs[0][1]
                table[name, batch, rows] = min(r for r, _ in runs), max(fixed, key=fixed.get)
    return table


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m mlx_gemma_mtp.bench.batch_auto_regret",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=SEEDS)
    p.add_argument("--max-tokens", type=int, default=MAX_TOKENS, help="tokens per sequence")
    args = p.parse_args(argv)
    table = regret_table(args.seeds, args.max_tokens)
    print(f"auto over the best fixed K (worst of {args.seeds} seeds; best K in brackets), {args.max_tokens} tokens "
          "per sequence")
    print(f"{'landscape':14s} {'rows':6s}" + "".join(f"{'B=' + str(b):>12s}" for b in ROWS))
    for name in LANDSCAPES:
        for batch in BATCHES:
            cells = "".join(f"{table[name, batch, b][0]:>7.2f} (K{table[name, batch, b][1]})" for b in ROWS)
            print(f"{name:14s} {batch:6s}{cells}")
    values = [r for r, _ in table.values()]
    print(f"worst {min(values):.2f}, mean {np.mean(values):.2f} over {len(values)} cells")
    return table


if __name__ == "__main__":
    main()
