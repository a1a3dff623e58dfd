"""The sampling benchmark CLI prints old and new side by side, and its exactness checks pass (tiny vocabulary)."""

import re

from mlx_gemma_mtp.bench import sampling as bench_sampling


def test_bench_sampling_prints_old_and_new_side_by_side(capsys):
    bench_sampling.main(["--vocab", "4096", "--repeats", "1"])
    out = capsys.readouterr().out
    for name in [*bench_sampling.CASES, "accept K=8, Gemma defaults"]:
        assert re.search(rf"^{re.escape(name)}\s+\d+\.\d\d\s+\d+\.\d\d\s+\d+\.\dx\s", out, re.MULTILINE), name
