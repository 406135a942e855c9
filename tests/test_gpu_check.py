"""benchmarks/gpu_check.py: the prepared GPU check end to end at the tiny shape on CPU (the JSON's
contract), its one-line input errors, the weights drawn on the device against the host draw's
declarations, and its imports on a machine without PyAV or tqdm."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import BENCHMARKS, load_benchmark

ROOT = os.path.dirname(BENCHMARKS)
STAGES = ("vision", "tokens", "llm")


def test_tiny_check_end_to_end(tmp_path, capsys):
    pytest.importorskip("transformers")
    out = str(tmp_path / "gc.json")
    gc = load_benchmark("gpu_check")
    assert gc.main(["--arch", "tiny", "--frames", "4", "--warmup", "1", "--runs", "2", "--out", out]) == 0
    printed = capsys.readouterr().out
    assert "transformers full (PyTorch)" in printed and "TTFT speed-ups: full / earlytom" in printed
    d = json.load(open(out))
    assert d["complete"] and sorted(os.listdir(tmp_path)) == ["gc.json"]  # no temporary left
    assert d["settings"] == {**d["settings"], "arch": "tiny", "dtype": "bfloat16", "frames": 4, "warmup": 1,
                             "runs": 2, "ratio": 0.1, "methods": ["full", "earlytom", "visionzip"]}
    assert {"python", "jax", "jaxlib", "flax", "torch", "transformers"} <= set(d["versions"])
    assert d["versions"]["jax"] == jax.__version__
    assert d["device"]["jax"] == jax.devices()[0].device_kind and d["device"]["torch"] == "cpu"
    assert "commit" in d and "commit_dirty" in d and d["hostname"] and d["host"]["cpu"]["logical_cores"]
    assert {"transformers", "jax_setup", "jax_init", "full", "earlytom r=0.1", "visionzip r=0.1",
            "kernels", "total"} <= set(d["elapsed_s"])
    jx = d["jax"]
    assert jx["weights_bytes"] > 0 and jx["init_s"] > 0
    m = {x["label"]: x for x in jx["methods"]}
    assert list(m) == ["full", "earlytom r=0.1", "visionzip r=0.1"]
    for x in m.values():
        assert x["ttft_mean_s"] > 0 and len(x["ttft_s"]) == 2 and all(t > 0 for t in x["ttft_s"])
        assert x["ttft_std_s"] >= 0 and x["compile_s"] > 0
        assert all(x["stages_s"][s] > 0 for s in STAGES)
        assert "peak_bytes_in_use_after" in x  # null on CPU, which reports no device peak
        assert x["decode"] is None and x["flops_xla"] is None
    full = m["full"]
    assert full["visual_tokens"] == 4 * 16 + 1
    assert m["earlytom r=0.1"]["visual_tokens"] < full["visual_tokens"]
    assert m["visionzip r=0.1"]["visual_tokens"] < full["visual_tokens"]
    assert m["earlytom r=0.1"]["at_full_rates"]["flops_ratio"] > 1
    tr = d["transformers"]
    assert tr["ttft_mean_s"] > 0 and len(tr["ttft_s"]) == 2 and tr["visual_tokens"] == full["visual_tokens"]
    assert tr["attn_implementation"] == "sdpa" and tr["dtype"] == "bfloat16" and tr["device"] == "cpu"
    assert tr["peak_memory"]["kind"] in ("host_vmhwm", "host_ru_maxrss") and tr["same_pixels_as_jax"] and "forward passes" in tr["protocol"]
    kc = d["kernels"]
    assert kc["ok"] and kc["impl"] == "cpu" and "attention kernel 'cpu'" in printed
    assert all(kc[c]["finite"] and kc[c]["max_abs_err"] < 3e-2 for c in ("causal", "bidirectional", "segments"))
    sp = d["speedups"]
    assert sp["full_over_earlytom"] == pytest.approx(full["ttft_mean_s"] / m["earlytom r=0.1"]["ttft_mean_s"])
    assert sp["full_over_visionzip"] > 0
    assert sp["transformers_over_full"] == pytest.approx(tr["ttft_mean_s"] / full["ttft_mean_s"])


@pytest.mark.parametrize("argv, message", [
    (["--arch", "nope"], "unknown architecture 'nope'"),
    (["--frames", "0"], "need --frames >= 1"),
    (["--runs", "0"], "need --frames >= 1, --runs >= 1"),
    (["--out", "/no/such/folder/gc.json"], "--out /no/such/folder/gc.json: its folder"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    args = ["--arch", "tiny", "--out", str(tmp_path / "gc.json")] + argv
    assert load_benchmark("gpu_check").main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpu_check: error: ") and message in err and err.count("\n") == 1
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_device_draw_follows_the_declarations(dtype):
    """`random_params(on_device=True)`: the host draw's tree, shapes and dtypes; ones for norm
    scales, N(0, 0.02) elsewhere; other values than the host draw's, the same for a seed."""
    from earlytom_jax.architectures import architecture, random_params
    from earlytom_jax.models import params as model_params
    from earlytom_jax.models.llava_onevision import LlavaOneVision

    cfg = architecture("tiny")
    host = random_params(cfg, dtype)
    dev = random_params(cfg, dtype, on_device=True)
    assert jax.tree.structure(dev) == jax.tree.structure(host)
    jax.tree.map(lambda a, b: (a.shape, a.dtype) == (b.shape, b.dtype) or pytest.fail(f"{a.shape} {b.shape}"),
                 dev, host)
    inits = model_params.metadata(LlavaOneVision, cfg, "init")
    leaves = {model_params.key_path(p): np.asarray(a, np.float32) for p, a in jax.tree.leaves_with_path(dev)}
    assert set(leaves) == set(inits)
    normal = []
    for path, a in leaves.items():
        if inits[path] == "ones":
            assert (a == 1).all(), path
        else:
            assert a.std() > 0.015, path  # every leaf (every layer of a stack) drawn, none left zero
            normal.append(a.ravel())
    normal = np.concatenate(normal)
    assert normal.size > 1e5 and abs(normal.mean()) < 1e-3 and normal.std() == pytest.approx(0.02, rel=0.02)
    stacked = leaves[("text", "layers", "gate_w")]
    assert not np.array_equal(stacked[0], stacked[1])  # each layer its own draw
    again = random_params(cfg, dtype, on_device=True)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), again, dev)
    assert not np.array_equal(leaves[("text", "embed")], np.asarray(host["text"]["embed"], np.float32))


def test_imports_need_neither_pyav_nor_tqdm():
    """The lent GPU machine has neither PyAV nor tqdm: the check's imports, the bench's progress
    bars and the generated clip work without them; reading a video file says what is missing."""
    code = """
import sys
sys.modules["av"] = None
sys.modules["tqdm"] = None
from earlytom_jax import bench, bench_torch, progress
from earlytom_jax.architectures import random_params
from earlytom_jax.bench import session
from earlytom_jax.errors import ConfigError
from earlytom_jax.video import VideoError, load_video
assert list(bench.rounds(3, "runs", True)) == [0, 1, 2]
with progress.bar(4, "x") as b:
    b.update(2)
    b.set_postfix_str("y")
assert b.n == 2
progress.say("said")
assert bench.clip_frames(None, 3).shape[0] == 3
try:
    load_video("clip.mp4", 4)
except VideoError as e:
    assert "PyAV" in str(e), e
else:
    raise AssertionError("no error")
"""
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout == "said\n"
