"""`earlytom bench`: the command-line contract (JSON keys, PNG chart, PyTorch reference) and
XLA's FLOP count of the compiled stages against the analytic count."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import jax.numpy as jnp
import pytest

from earlytom_jax import bench, flops, pipeline
from earlytom_jax.architectures import architecture, param_shapes
from earlytom_jax.config import LlavaOVConfig, Qwen2Config, SiglipConfig
from earlytom_jax.synthetic import make_clip
from earlytom_jax.video import write_test_video

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("vision", "tokens", "llm")


def test_cli_json_chart_and_torch_reference(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from PIL import Image

    from earlytom_jax import chart

    video = str(tmp_path / "clip.mp4")
    write_test_video(video, make_clip(8, 64, seed=1), fps=10)
    out, png = str(tmp_path / "bench.json"), str(tmp_path / "ttft.png")
    p = subprocess.run(
        [sys.executable, "-m", "earlytom_jax.cli", "bench", "--arch", "tiny", "--video", video, "--frames", "4",
         "--methods", "full,earlytom", "--ratios", "0.25", "--warmup", "0", "--runs", "1",
         "--json", out, "--chart", png, "--reference", "torch", "--timing", "interleaved"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert "transformers full (PyTorch)" in p.stdout and "JAX full / PyTorch full" in p.stdout
    d = json.load(open(out))
    assert d["meta"]["frames"] == 4 and d["meta"]["reference"] == "torch"
    assert d["meta"]["cpu"]["logical_cores"] == os.cpu_count()
    assert re.fullmatch("[0-9a-f]{40}", d["meta"]["commit"]) and isinstance(d["meta"]["commit_dirty"], bool)
    res = {(r["method"], r["ratio"]): r for r in d["results"]}
    assert set(res) == {("full", None), ("earlytom", 0.25)}
    for r in res.values():
        for k in ("ttft_mean_s", "ttft_median_s", "compile_s", "decode_tokens_per_s", "peak_memory_bytes",
                  "visual_tokens", "ttft_over_reference"):
            assert r[k] > 0, k
        assert set(STAGES) <= set(r["stages_s"])
        assert r["decode"]["new_tokens"] == 32  # EOS ignored: the count is fixed
        assert r["peak_memory"]["kind"] in ("host_vmhwm", "host_ru_maxrss", "device_peak_bytes_in_use")
        for key in ("flops", "flops_executed", "flops_xla"):
            assert all(r[key][s] > 0 for s in STAGES) and r[key]["total"] == pytest.approx(sum(r[key][s] for s in STAGES))
        assert r["flops"]["paper_llm"] > 0
        assert len(r["host_cpu_s"]) == 1 and 0 < r["host_cores_busy"] <= os.cpu_count() + 0.25
    assert "cores busy during the timed TTFT runs" in p.stdout
    assert res[("earlytom", 0.25)]["visual_tokens"] < res[("full", None)]["visual_tokens"] == 4 * 16 + 1
    assert res[("full", None)]["at_full_rates"] is None
    a = res[("earlytom", 0.25)]["at_full_rates"]
    assert a["flops_ratio"] == pytest.approx(res[("full", None)]["flops"]["total"] / res[("earlytom", 0.25)]["flops"]["total"])
    assert a["speedup"] > 0 and a["stage_efficiency"] > 0 and "by stage rates" in p.stdout
    assert d["meta"]["timing"] == "interleaved" and res[("full", None)]["paired"] is None
    paired = res[("earlytom", 0.25)]["paired"]
    assert paired["median"] == pytest.approx(res[("full", None)]["ttft_s"][0] / res[("earlytom", 0.25)]["ttft_s"][0])
    assert "speed-up per round" in p.stdout
    ref = d["reference"]
    assert ref["ttft_mean_s"] > 0 and ref["ttft_median_s"] > 0 and ref["visual_tokens"] == 65
    assert len(ref["host_cpu_s"]) == 1 and 0 < ref["host_cores_busy"] <= os.cpu_count() + 0.25
    assert f"PyTorch full {ref['host_cores_busy']:.2f}" in p.stdout
    assert ref["jax_full_over_torch_full"] == pytest.approx(res[("full", None)]["ttft_mean_s"] / ref["ttft_mean_s"])
    assert ref["same_first_token_as_jax_full"]  # the same weights and inputs on both sides
    # and the same greedy answer: PyTorch's timed decode (from the last timed call's cache) and JAX's
    assert ref["decode"]["new_tokens"] == 32 and len(ref["decode"]["tokens"]) == 32 and ref["decode"]["tokens_per_s"] > 0
    assert ref["decode"]["tokens"] == res[("full", None)]["decode"]["tokens"] and ref["same_tokens_as_jax_full"]
    assert ref["peak_memory"]["kind"] in ("host_vmhwm", "host_ru_maxrss") and ref["peak_memory_bytes"] > 1e8
    with Image.open(png) as img:
        assert img.format == "PNG" and img.size == chart.SIZE
    assert sorted(os.listdir(tmp_path)) == ["bench.json", "clip.mp4", "ttft.png"]  # no temporary left


def _result(method, stages, stage_flops):
    f = dict(stage_flops, total=sum(stage_flops.values()), paper_llm=0)
    return bench.BenchResult(method=method, ratio=None, compile_s=0.0, ttft_s=[sum(stages.values())], stages_s=stages,
                             frames=1, visual_tokens=1, llm_tokens_after_merge=None, flops=f)


def test_stage_rates_split_a_shortfall_into_stage_mix_and_efficiency():
    # full: vision 100 GFLOP in 1 s (100 GF/s), LLM 900 GFLOP in 3 s (300 GF/s); a method that
    # keeps the vision and cuts the LLM to 100 GFLOP: FLOPs ratio 1000 / 200 = 5x, but at full's
    # rates its stages take 1 + 1/3 s, a speed-up of 4 / (4/3) = 3x; it took 1 + 0.5 s
    full = _result("full", {"vision": 1.0, "tokens": 0.0, "llm": 3.0}, {"vision": 100e9, "tokens": 0.0, "llm": 900e9})
    m = _result("m", {"vision": 1.0, "tokens": 0.0, "llm": 0.5}, {"vision": 100e9, "tokens": 0.0, "llm": 100e9})
    a = bench.at_full_stage_rates(m, full)
    assert a["flops_ratio"] == pytest.approx(5.0)
    assert a["seconds"]["vision"] == pytest.approx(1.0) and a["seconds"]["llm"] == pytest.approx(1 / 3)
    assert a["speedup"] == pytest.approx(3.0)
    assert a["stage_efficiency"] == pytest.approx((4 / 3) / 1.5)
    assert bench.at_full_stage_rates(m, _result("full", {}, {"vision": 1, "tokens": 0, "llm": 1})) is None
    m.at_full_rates = a
    table = bench.markdown([full, m])
    assert "speed-up 2.67x = 0.53 of the FLOPs ratio 5.00x" in table and "give 3.00x (0.60 of it)" in table
    assert "at 0.89 of those rates" in table


def test_interleaved_timing_runs_rounds_after_every_method_is_ready():
    calls = []

    class Timer:
        def __init__(self, name):
            self.name = name

        def prepare(self, warmup, decode_tokens):
            calls.append(("prepare", self.name))

        def time_once(self):
            calls.append(("time", self.name))

        def finish(self, runs, staged, decode_tokens, xla):
            calls.append(("finish", self.name))
            return self.name

    done = []
    out = bench.measure_interleaved([Timer("a"), Timer("b")], warmup=2, runs=3, progress=done.append)
    assert out == done == ["a", "b"]
    assert calls == ([("prepare", "a"), ("prepare", "b")] + [("time", "a"), ("time", "b")] * 3
                     + [("finish", "a"), ("finish", "b")])


def test_paired_speedups_divide_round_by_round():
    full = _result("full", {"vision": 1.0, "tokens": 0.0, "llm": 1.0}, {"vision": 1, "tokens": 0, "llm": 1})
    fast = _result("x", {"vision": 1.0, "tokens": 0.0, "llm": 1.0}, {"vision": 1, "tokens": 0, "llm": 1})
    full.ttft_s, fast.ttft_s = [4.0, 8.0, 6.0], [2.0, 2.0, 4.0]  # the host slowed down in round 2
    p = bench.paired_speedups(fast, full)
    assert p["rounds"] == [2.0, 4.0, 1.5] and p["median"] == 2.0 and (p["min"], p["max"]) == (1.5, 4.0)
    assert bench.paired_speedups(full, full) is None
    fast.ttft_s = [1.0]
    assert bench.paired_speedups(fast, full) is None  # runs that cannot be paired


def test_per_round_ratios_only_for_interleaved_timing():
    full = _result("full", {"vision": 1.0, "tokens": 0.0, "llm": 3.0}, {"vision": 100e9, "tokens": 0.0, "llm": 900e9})
    m = _result("m", {"vision": 1.0, "tokens": 0.0, "llm": 0.5}, {"vision": 100e9, "tokens": 0.0, "llm": 100e9})
    bench.relate_to_full([full, m], interleaved=False)
    assert m.paired is None and m.at_full_rates["speedup"] == pytest.approx(3.0) and full.at_full_rates is None
    assert "per round" not in bench.markdown([full, m])
    bench.relate_to_full([full, m], interleaved=True)
    assert m.paired["median"] == pytest.approx(4.0 / 1.5) and full.paired is None
    assert "per round" in bench.markdown([full, m])


def test_cores_busy_is_cpu_time_over_wall_time():
    full = _result("full", {"vision": 1.0, "tokens": 0.0, "llm": 1.0}, {"vision": 1, "tokens": 0, "llm": 1})
    full.ttft_s, full.host_cpu_s = [2.0, 2.0], [4.0, 2.0]
    assert full.host_cores_busy == pytest.approx(1.5) and full.to_json()["host_cores_busy"] == pytest.approx(1.5)
    assert "full 1.50" in bench.markdown([full])
    assert _result("x", {}, {"vision": 1, "tokens": 0, "llm": 1}).host_cores_busy is None


def test_a_run_that_waits_shows_idle_cores():
    """time_once counts the process's CPU time, not the wall time: a prefill that mostly waits
    (here: sleeps, as a host round trip would) reports far less than one busy core."""
    timer = bench.MethodTimer(None, None, None, [1], [2], pipeline.FULL, "full")

    def waits(*_):
        time.sleep(0.3)
        return jnp.zeros(4), None, None, {}

    timer.compiled = waits
    timer.time_once()  # the first call also compiles the argmax
    timer.time_once()
    assert timer.times[1] >= 0.3 and timer.cpu[1] < 0.1


def test_code_commit_is_the_checkouts_head_or_none(tmp_path):
    """Every bench JSON records the commit its code ran at (`bench.host`): HEAD of the git
    checkout that holds the package and whether its tracked files differ; None when the
    package is not in a checkout of its own (a copy, or a copy inside another repository)."""
    head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    got = bench.code_commit()
    assert re.fullmatch("[0-9a-f]{40}", got["commit"]) and isinstance(got["commit_dirty"], bool)
    assert got["commit"] == head or not head  # (HEAD may move if someone commits in between)
    assert {"commit", "commit_dirty"} <= set(bench.host())
    copy = tmp_path / "site-packages" / "earlytom_jax"
    copy.mkdir(parents=True)
    assert bench.code_commit(str(copy)) == {"commit": None, "commit_dirty": None}
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    assert bench.code_commit(str(copy)) == {"commit": None, "commit_dirty": None}


def test_host_cpu_names_the_model_and_the_matmul_features():
    text = ("processor\t: 0\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n\n"
            "processor\t: 1\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n")
    cpu = bench.host_cpu(text)
    assert cpu["model"] == "AMD EPYC 9R14" and cpu["features"] == ["avx512_bf16", "avx512f", "avx2"]
    intel = bench.host_cpu("model name : Xeon\nflags : avx2 amx_tile amx_bf16 avx512f\n")
    assert intel["features"] == ["amx_bf16", "amx_tile", "avx512f", "avx2"]
    assert bench.host_cpu("")["model"] is None and bench.host_cpu("")["features"] == []


def _ratios(cfg, t0, method=pipeline.FULL, conditionals="largest"):
    x = bench.xla_stage_flops(param_shapes(cfg), cfg, t0, 14, 25, method)
    stats = {"frames": t0, "visual_tokens": t0 * cfg.tokens_per_frame + 1}
    a = flops.executed_prefill_flops(cfg, t0, 39, stats, method, conditionals=conditionals)
    return x, {k: x[k] / a[k] for k in (*STAGES, "total")}


def test_xla_count_agrees_with_the_analytic_count_tiny():
    """Full tokens, tiny arch, 4 frames (104 slots: dense attention, no conditional). XLA
    counts elementwise work the analytic count leaves out, a large share at widths 64/128:
    vision +4.3%, projector +17% (exact GELU's erf polynomial), LLM +1.8%, total +3.4%."""
    cfg = architecture("tiny")
    x, r = _ratios(cfg, 4)
    assert 1.0 <= r["total"] < 1.05, r
    assert 1.0 <= r["vision"] < 1.06 and 1.0 <= r["llm"] < 1.03 and 1.0 <= r["tokens"] < 1.2, r
    # as reported, XLA charges each layer loop's body once: about 1/8 of the encoder, 1/6 of the LLM
    assert x["as_reported"]["vision"] < 0.25 * x["vision"] and x["as_reported"]["llm"] < 0.25 * x["llm"]


def test_xla_count_agrees_within_one_percent_at_real_widths():
    """Full tokens, 2 SigLIP blocks of the real width (1152/4304) and 2 Qwen2 layers of the
    0.5B width (896/4864): the matmuls dominate and XLA agrees within 1% (projector 1.6%)."""
    cfg = LlavaOVConfig(vision=SiglipConfig(num_layers=2, image_size=112),
                        text=Qwen2Config(num_layers=2, vocab_size=1024), video_token_id=1021, image_token_id=1020)
    _, r = _ratios(cfg, 4)
    assert abs(r["total"] - 1) < 0.01 and abs(r["vision"] - 1) < 0.01 and abs(r["llm"] - 1) < 0.01, r
    assert abs(r["tokens"] - 1) < 0.02, r


def test_xla_charges_a_conditional_its_largest_branch():
    """16 frames: 296 slots, blockwise causal attention (3 key blocks of 128). XLA charges every
    key block (lax.cond at its largest branch); the program runs the 6 on and below the diagonal."""
    cfg = architecture("tiny")
    _, largest = _ratios(cfg, 16)
    _, executed = _ratios(cfg, 16, conditionals="executed")
    assert 1.0 <= largest["llm"] < 1.04, largest
    assert executed["llm"] > 1.15, executed


def test_missing_torch_is_one_clear_error(monkeypatch):
    from earlytom_jax import bench_torch
    from earlytom_jax.errors import ConfigError

    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ConfigError, match=r"pip install '\.\[test\]'"):
        bench_torch.require()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_reference_weights_move_into_our_tree(dtype):
    """`params_from_torch(release=True, held=True)` (how the bench fits the 7B shape next to
    nothing else) gives the tree the model would give unreleased and unsplit, tied weights
    included, and leaves the transformers model with no storage; the random model is built
    straight in `dtype`."""
    pytest.importorskip("transformers")
    import jax
    import numpy as np

    from earlytom_jax import bench_torch
    from earlytom_jax.models import stack

    cfg = architecture("tiny")
    model = bench_torch.build_random(cfg, dtype)
    assert {p.dtype for p in model.parameters()} == {getattr(__import__("torch"), dtype)}
    kept = bench_torch.params_from_torch(model, cfg, dtype)
    moved = bench_torch.params_from_torch(model, cfg, dtype, release=True, held=True)
    if dtype == "bfloat16":  # held: the LLM's stacks come split per layer, as `stack.pack` takes them
        assert isinstance(moved["text"]["layers"]["gate_w"], list)
        moved = stack.unpack(stack.pack(moved, backend="cpu"))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), moved, kept)
    assert sum(p.numel() for p in model.parameters()) == 0


def test_sequential_timing_decodes_from_the_last_timed_run():
    """`measure` runs no prefill beyond the warm-ups and the timed runs: the decode continues
    from the last timed run's output, inside a peak-memory window opened before the timed runs
    (interleaved timing, where other methods run in between, needs one prefill more)."""
    import jax

    from earlytom_jax.architectures import random_params

    cfg = architecture("tiny")
    s = cfg.vision.image_size
    pixels = jax.random.normal(jax.random.key(0), (2, 3, s, s), jnp.float32)

    class Counting(bench.MethodTimer):
        calls = 0

        def _run(self):
            Counting.calls += 1
            return super()._run()

    def timer():
        return Counting(random_params(cfg), cfg, pixels, [1, 2], [3, 4, 5], pipeline.FULL, "full")

    r = bench.measure(timer(), warmup=1, runs=3, staged=False, decode_tokens=4, xla=False)
    assert Counting.calls == 1 + 3
    assert r.decode["new_tokens"] == 4 and "timed prefills and decodes" in r.peak_memory["scope"]
    assert r.peak_memory["bytes"] > 0

    Counting.calls = 0
    [r2] = bench.measure_interleaved([timer()], warmup=1, runs=3, staged=False, decode_tokens=4, xla=False)
    assert Counting.calls == 1 + 3 + 1 and "one untimed prefill" in r2.peak_memory["scope"]
    assert r2.decode["new_tokens"] == 4 and r2.first_token == r.first_token


def test_methods_at_their_own_ratio():
    """`--methods NAME@R` times that method at R alone, the others at every --ratios; a
    repeat is timed once; a bad R or name is one line."""
    from earlytom_jax.bench.session import BenchSpec, spec_methods
    from earlytom_jax.errors import ConfigError

    spec = BenchSpec(arch="tiny", methods=("full", "earlytom", "fastv@0.5", "FastV@0.5"), ratios=(0.1, 0.25))
    assert spec_methods(spec) == [("full", None), ("earlytom", 0.1), ("earlytom", 0.25), ("fastv", 0.5)]
    with pytest.raises(ConfigError, match="outside"):
        spec_methods(BenchSpec(arch="tiny", methods=("fastv@2",)))
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        spec_methods(BenchSpec(arch="tiny", methods=("nope@0.5",)))


def test_bench_counts_a_staged_llm_method(tmp_path):
    """A method that drops tokens at several LLM layers (PyramidDrop) goes through `bench`: its
    per-stage kept counts reach the FLOP counter, which counts less LLM work than full tokens'."""
    from earlytom_jax.cli.main import main

    out = tmp_path / "b.json"
    assert main(["bench", "--arch", "tiny", "--frames", "2", "--methods", "full,pdrop@0.5", "--warmup", "0",
                 "--runs", "1", "--decode-tokens", "2", "--no-xla-flops", "--json", str(out)]) == 0
    rows = {r["method"]: r for r in json.loads(out.read_text())["results"]}
    assert rows["pdrop"]["flops"]["llm"] < rows["full"]["flops"]["llm"]
    assert rows["pdrop"]["flops_executed"]["llm"] < rows["full"]["flops_executed"]["llm"]


def test_bench_batch_times_each_batch_size(tmp_path, capsys):
    """`bench --batch 1,3`: one row per (method, B) with the batch's prefill, prefill / B and
    samples/s beside batch 1; sample i's frames are rolled by i, so the samples compress
    differently and each reports its own counts; --batch 0 is one line."""
    from earlytom_jax.bench.batching import batch_pixels
    from earlytom_jax.cli.main import main

    out = tmp_path / "b.json"
    assert main(["bench", "--arch", "tiny", "--frames", "4", "--methods", "full,earlytom", "--ratios", "0.5",
                 "--warmup", "0", "--runs", "1", "--decode-tokens", "3", "--no-xla-flops", "--no-stages",
                 "--batch", "1,3", "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    assert d["meta"]["batches"] == [1, 3]
    rows = {(r["method"], r["batch"]): r for r in d["batching"]}
    assert set(rows) == {("full", 1), ("full", 3), ("earlytom", 1), ("earlytom", 3)}
    for (m, b), r in rows.items():
        assert len(r["prefill_s"]) == 1 and r["decode_tokens"] == 3 and len(r["visual_tokens"]) == b
        assert r["prefill_per_sample_s"] == pytest.approx(r["prefill_median_s"] / b)
        assert r["samples_per_s"] == pytest.approx(b / (r["prefill_median_s"] + r["decode_median_s"]))
        assert r["samples_per_s_over_batch1"] == pytest.approx(r["samples_per_s"] / rows[(m, 1)]["samples_per_s"])
    assert rows[("earlytom", 1)]["visual_tokens"] == [d["results"][1]["visual_tokens"]]
    assert "| earlytom | 0.5 | 3 |" in capsys.readouterr().out
    pix = jnp.arange(4.0).reshape(4, 1)
    assert batch_pixels(pix, 2)[1].ravel().tolist() == [3.0, 0.0, 1.0, 2.0]
    assert main(["bench", "--arch", "tiny", "--batch", "0"]) != 0
    assert "--batch 0: every batch size needs to be at least 1" in capsys.readouterr().err
