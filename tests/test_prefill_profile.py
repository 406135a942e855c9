"""benchmarks/prefill_profile.py: self time per op kind from a profiler trace, and the script
end to end on the tiny architecture."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers import BENCHMARKS, load_benchmark

ROOT = os.path.dirname(BENCHMARKS)
SCRIPT = os.path.join(BENCHMARKS, "prefill_profile.py")


def _x(tid, name, ts, dur):
    return {"ph": "X", "pid": 1, "tid": tid, "name": name, "ts": ts, "dur": dur}


def test_self_time_subtracts_children_and_skips_the_caller():
    trace = {"traceEvents": [
        {"ph": "M", "pid": 1, "tid": 1, "name": "thread_name", "args": {"name": "tf_XLAEigen/a"}},
        {"ph": "M", "pid": 1, "tid": 2, "name": "thread_name", "args": {"name": "tf_XLAEigen/b"}},
        {"ph": "M", "pid": 1, "tid": 3, "name": "thread_name", "args": {"name": "python"}},
        _x(3, "np.asarray(jax.Array)", 0, 1000),  # the caller's wait: not an op
        _x(1, "ThunkExecutor::Execute", 0, 100),  # thread a: one product inside, then a loop fusion
        _x(1, "ynn_fusion.3", 10, 60),
        _x(1, "add_convert_fusion.12", 70, 20),
        _x(2, "ThunkExecutor::Execute", 40, 50),  # thread b: a product overlapping a's by 30 µs
        _x(2, "ynn_fusion.7.clone", 40, 40),
    ]}
    s = load_benchmark("prefill_profile").summarise(trace)
    assert s["self_s"] == pytest.approx({"ynn_fusion": 100e-6, "add_convert_fusion": 20e-6,
                                         "ThunkExecutor::Execute": 30e-6})
    assert s["total_self_s"] == pytest.approx(150e-6)
    assert s["thread_busy_s"] == pytest.approx({"tf_XLAEigen/a": 100e-6, "tf_XLAEigen/b": 50e-6})
    assert s["dot_overlap"] == pytest.approx(30e-6)


def test_the_script_profiles_a_tiny_prefill(tmp_path):
    p = subprocess.run([sys.executable, SCRIPT, "--arch", "tiny", "--frames", "2", "--method", "earlytom",
                        "--ratio", "0.25", "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "tiny float32, 2 frames, earlytom r=0.25: TTFT" in p.stdout and "self time by op kind" in p.stdout
    rows = [line for line in p.stdout.splitlines() if line.startswith("  ") and line.rstrip().endswith("%")]
    assert rows and all(float(r.split()[-1].rstrip("%")) <= 100 for r in rows)
