"""benchmarks/order_effect.py end to end on the tiny architecture."""

from __future__ import annotations

import importlib.util
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "order_effect.py")


def test_rounds_time_the_method_after_full_and_after_itself(capsys):
    spec = importlib.util.spec_from_file_location("order_effect", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--arch", "tiny", "--frames", "4", "--method", "earlytom", "--rounds", "2", "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    rows = [line.split("|")[1:-1] for line in out.splitlines() if re.match(r"\| \d+ \|", line)]
    assert [int(r[0]) for r in rows] == [1, 2]
    for r in rows:
        full, after_full, after_self, ratio = (float(x) for x in r[1:])
        assert full > 0 and after_full > 0 and after_self > 0
        assert abs(ratio / (after_full / after_self) - 1) < 0.005
    assert "per-round ratio median" in out
