"""The model-cost benchmark prints one table per pair: T = 1..9 verify rows beside K = 1..8 draft rounds."""

import re

import pytest

from mlx_gemma_mtp.bench import forward as bench_forward

NUM = r"\d+\.\d{3}"


def _tables(out: str) -> list[tuple[str, str]]:
    """(title, body) of every pair's table."""
    return re.findall(r"^(.+), context 16: ms per call, min / median of \d+; ratios from the minima\n"
                      r"((?:.*\n)+?)drafter step \(one compiled step\): " + NUM + " / " + NUM + " ms$", out,
                      re.MULTILINE)


def test_bench_forward_prints_verify_and_draft_costs_side_by_side(capsys):
    bench_forward.main(["--context", "16", "--repeats", "1"])
    tables = _tables(capsys.readouterr().out)
    assert [title for title, _ in tables] == ["demo pair", "random E2B widths (4 layers, vocab 16384)"]
    for title, body in tables:
        head, *rows = body.splitlines()
        assert head.split() == ["T", "T_verify(T)", "ms", "T_v(T)/T_v(1)", "K", "T_draft(K)", "ms",
                                "T_draft(K)/K", "ms"], title
        assert re.fullmatch(rf"\s+1\s+{NUM} /\s+{NUM}\s+1\.00\s+0", rows[0]), rows[0]
        assert len(rows) == bench_forward.MAX_T == 9
        for t, line in enumerate(rows[1:], start=2):  # T = K + 1: the verify of K drafts beside drafting them
            cells = re.fullmatch(rf"\s+{t}\s+({NUM}) /\s+{NUM}\s+(\d+\.\d\d)\s+{t - 1}\s+({NUM}) /\s+{NUM}"
                                 rf"\s+({NUM})", line)
            assert cells, line
            verify, ratio, draft, per_draft = map(float, cells.groups())
            assert ratio == pytest.approx(verify / float(re.split(r"\s+", rows[0].strip())[1]), abs=0.01)
            assert per_draft == pytest.approx(draft / (t - 1), abs=2e-3)  # both rounded to 3 decimals


def test_bench_forward_refuses_an_e2b_cut_without_producers(capsys):
    with pytest.raises(SystemExit):
        bench_forward.main(["--e2b-layers", "2"])
    assert "--e2b-layers 2" in capsys.readouterr().err
