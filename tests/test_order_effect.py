"""benchmarks/order_effect.py end to end on the tiny architecture."""

from __future__ import annotations

import re

from tests.helpers import load_benchmark


def test_rounds_time_the_method_after_full_and_after_itself(capsys):
    argv = ["--arch", "tiny", "--frames", "4", "--method", "earlytom", "--rounds", "2", "--warmup", "1"]
    assert load_benchmark("order_effect").main(argv) == 0
    out = capsys.readouterr().out
    rows = [line.split("|")[1:-1] for line in out.splitlines() if re.match(r"\| \d+ \|", line)]
    assert [int(r[0]) for r in rows] == [1, 2]
    for r in rows:
        full, after_full, after_self, ratio = (float(x) for x in r[1:])
        assert full > 0 and after_full > 0 and after_self > 0
        assert abs(ratio / (after_full / after_self) - 1) < 0.005
    assert "per-round ratio median" in out
