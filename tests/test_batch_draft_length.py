"""`auto` for a batch (`BatchDraftLength`): its regret against the best fixed K on the simulated machines of
`bench.batch_auto_regret`, and the behaviours it rests on."""

from __future__ import annotations

import numpy as np

from mlx_gemma_mtp.batch_draft_length import BatchDraftLength
from mlx_gemma_mtp.bench import batch_auto_regret as sim


def test_auto_is_near_the_best_fixed_k_for_the_batch():
    """Every landscape x batch (code-like, prose-like, mixed rows) x batch size 1, 2, 4, 8, worst of three seeds:
    every cell within 0.88 of the best fixed K, their mean within 0.95 (today 0.90 and 0.97; the design before
    scored 0.77 and 0.87)."""
    table = sim.regret_table()
    worst = {cell: ratio for cell, (ratio, _) in table.items()}
    assert min(worst.values()) >= 0.88, sorted(worst.items(), key=lambda kv: kv[1])[:3]
    assert np.mean(list(worst.values())) >= 0.95, np.mean(list(worst.values()))
    assert {k for _, k in table.values()} >= {0, 2, 3}  # the landscapes want different K: the test can tell


def test_auto_falls_to_plain_steps_when_drafts_never_pay():
    policy = BatchDraftLength("auto", 8)
    chosen = []
    for _ in range(40):
        k = policy.choose(4)
        chosen.append(k)
        # drafting costs more per round and every draft is rejected
        policy.timed(k, 4, 0.01 * (1 + k), {b: [1] for b in range(4)})
    assert chosen[-30:] == [0] * 30
    assert len(set(chosen)) <= 3  # it did not try every K to learn that
    good = BatchDraftLength("auto", 8)
    for _ in range(40):
        k = good.choose(1)
        good.timed(k, 1, 0.01 * (1 + 0.1 * k), {0: [1] * (k + 1)})  # cheap drafts, all accepted
    assert good.choose(1) == 8


def test_each_rows_acceptance_counts_for_its_own_expected_tokens():
    policy = BatchDraftLength("auto", 8)
    for _ in range(50):  # row 0 accepts every draft, row 1 none
        policy.timed(4, 2, 0.01, {0: [1] * 5, 1: [1]})
    assert policy.tokens(4, {0: 4}) > 4.0
    assert policy.tokens(4, {1: 4}) < 1.5
    policy.forget(0)  # a new sequence in row 0 starts from the batch's acceptance
    assert 1.5 < policy.tokens(4, {0: 4}) < 4.0
    # a row near its budget drafts only what it can use
    assert policy.tokens(4, {1: 0}) == 1.0
