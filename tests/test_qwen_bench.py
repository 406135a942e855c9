"""`earlytom bench` on Qwen2.5-VL: the encoder's FLOP count (against every matmul counted one
by one, and against XLA's cost analysis), the bench on a named tiny arch and on a tiny
checkpoint with transformers' model as the reference, and its one-line refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest

from earlytom_jax import bench, flops
from earlytom_jax.architectures import architecture, param_shapes
from earlytom_jax.bench import session
from earlytom_jax.config import Qwen2Config, Qwen25VLConfig, QwenVisionConfig
from earlytom_jax.errors import ConfigError
from earlytom_jax.models.qwen_vision import WindowLayout

STAGES = ("vision", "tokens", "llm")


def _window_patches(v: QwenVisionConfig, gh: int, gw: int) -> list[int]:
    """Patches in each window of one temporal patch from the geometry alone: windows of
    `window_merged` merged tokens a side, row-major, cut at the merged grid's edges."""
    m, w = v.spatial_merge_size, v.window_merged
    mh, mw = gh // m, gw // m
    return [min(w, mh - r) * min(w, mw - c) * m * m for r in range(0, mh, w) for c in range(0, mw, w)]


def _matmuls(cfg: Qwen25VLConfig, grid, padded: bool) -> list[tuple[int, int, int]]:
    """Every matmul (rows, inner, columns) the encoder runs on `grid`, one per window and head
    for attention (padded: each window as wide as the widest)."""
    v = cfg.vision
    t, gh, gw = grid
    n, c, f, d, unit = gh * gw, v.hidden_size, v.intermediate_size, v.head_dim, v.merge_unit
    windows = _window_patches(v, gh, gw)
    if padded:
        windows = [max(windows)] * len(windows)
    out = []
    for _ in range(t):
        out.append((n, 3 * v.temporal_patch_size * v.patch_size**2, c))
        for block in range(v.num_layers):
            out += [(n, c, 3 * c), (n, c, c), (n, c, f), (n, c, f), (n, f, c)]
            for length in ([n] if block in v.fullatt_block_indexes else windows):
                out += [(length, d, length), (length, length, d)] * v.num_heads
        out += [(n // unit, unit * c, unit * c), (n // unit, unit * c, v.out_hidden_size)]
    return out


GRIDS = [
    ("qwen2.5-vl-7b", (4, 42, 24)),  # jobs.mp4, 8 frames at the official bounds: 15 windows of 64 patches, 3 of 16
    ("qwen2.5-vl-3b", (1, 16, 20)),  # a ragged column of windows
    ("qwen-tiny", (2, 14, 14)),  # windows of 2 x 2 merged tokens on 7 x 7: ragged both ways
    ("qwen-tiny", (3, 4, 4)),  # one window, smaller than the window size
]


@pytest.mark.parametrize("arch,grid", GRIDS, ids=[f"{a}-{'x'.join(map(str, g))}" for a, g in GRIDS])
def test_vision_flops_are_every_matmul_counted_one_by_one(arch, grid):
    cfg = architecture(arch)
    v = cfg.vision
    lengths = WindowLayout.of(grid[1], grid[2], v.spatial_merge_size, v.window_merged).segments.valid.sum(1)
    assert lengths.tolist() == _window_patches(v, grid[1], grid[2])
    for padded in (False, True):
        brute = sum(2 * m * k * n for m, k, n in _matmuls(cfg, grid, padded))
        assert flops.qwen_vision(cfg, grid, padded=padded) == brute
    ragged = len(set(lengths.tolist())) > 1
    assert (flops.qwen_vision(cfg, grid, padded=True) > flops.qwen_vision(cfg, grid)) == ragged


def test_prefill_counts_follow_the_grid_and_the_statistics():
    cfg = architecture("qwen2.5-vl-7b")
    from earlytom_jax import pipeline

    grid = flops.qwen_grid(cfg.vision, (8, 3, 588, 336))
    assert grid == (4, 42, 24)
    stats = {"frames": 4, "visual_tokens": 1008}
    f = flops.qwen_prefill_flops(cfg, grid, 39, stats, pipeline.FULL)
    assert (f.vision, f.tokens) == (flops.qwen_vision(cfg, grid), 0)
    assert f.llm == sum(flops.llm_layer(cfg, 1047) for _ in range(28)) + 2 * 3584 * 152064
    ex = flops.qwen_executed_prefill_flops(cfg, grid, 39, stats, pipeline.FULL)
    assert ex["vision"] == flops.qwen_vision(cfg, grid, padded=True)
    per_layer = flops.llm_layer_executed(cfg, 1047, flops.attention_entries(1047))
    assert ex["llm"] == 28 * per_layer + 2 * 3584 * 152064 and ex["total"] == sum(ex[k] for k in STAGES)


def test_vision_count_agrees_with_xla_at_real_width():
    """Two encoder blocks of the 7B's width (1280 / 3420, 16 heads), one window block and one
    full-attention block, on one temporal patch of 16 x 20 patches (windows of 64, 64 and 32
    patches per row, padded to 64): XLA's loop-aware count of the compiled vision stage agrees
    with the executed count within 1% (the rest: norms, RoPE, SiLU, softmax)."""
    cfg = Qwen25VLConfig(
        vision=QwenVisionConfig(num_layers=2, fullatt_block_indexes=(1,), out_hidden_size=256),
        text=Qwen2Config(hidden_size=256, intermediate_size=512, num_layers=1, num_heads=4, num_kv_heads=2,
                         head_dim=64, vocab_size=512, mrope_section=(8, 12, 12)),
        video_token_id=509, image_token_id=508, vision_start_token_id=505, vision_end_token_id=506)
    from earlytom_jax import pipeline

    shape = (2, 3, 16 * 14, 20 * 14)
    x = bench.xla_stage_flops(param_shapes(cfg), cfg, 2, 14, 25, pipeline.FULL, pixel_shape=shape)
    grid = flops.qwen_grid(cfg.vision, shape)
    stats = {"frames": 1, "visual_tokens": 80}
    ex = flops.qwen_executed_prefill_flops(cfg, grid, 39, stats, pipeline.FULL, conditionals="largest")
    assert abs(x["vision"] / ex["vision"] - 1) < 0.01, (x["vision"], ex["vision"])
    assert 1.0 <= x["llm"] / ex["llm"] < 1.1, (x["llm"], ex["llm"])


def _check_against_reference(d: dict, visual: int) -> None:
    """The JSON of a Qwen bench with the PyTorch reference: the same answer on both sides,
    FLOPs positive and consistent, the clip's description in the meta."""
    (r,) = d["results"]
    ref = d["reference"]
    assert r["method"] == "full" and r["visual_tokens"] == ref["visual_tokens"] == visual
    assert d["meta"]["video_input"]["visual_tokens"] == visual
    assert r["frames"] == ref["frames"] == d["meta"]["video_input"]["grid_thw"][0]
    assert ref["first_token"] == r["first_token"] and ref["same_first_token_as_jax_full"]
    assert ref["decode"]["tokens"] == r["decode"]["tokens"] and ref["same_tokens_as_jax_full"]
    assert "explicit 3-D positions" in ref["protocol"]
    for key in ("flops", "flops_executed"):
        assert r[key]["vision"] > 0 and r[key]["llm"] > 0 and r[key]["tokens"] == 0
        assert r[key]["total"] == sum(r[key][s] for s in STAGES)
    assert r["flops_executed"]["vision"] >= r["flops"]["vision"] and r["flops_executed"]["llm"] >= r["flops"]["llm"]


def test_bench_of_a_named_arch_with_the_torch_reference():
    """qwen-tiny with random weights (the reference's, moved into our tree), 4 generated frames
    of 112 pixels resized to 196 x 196 at the official bounds: 2 temporal patches of 7 x 7
    merged tokens; the stages' XLA counts agree with the executed counts."""
    pytest.importorskip("transformers")
    spec = session.BenchSpec(arch="qwen-tiny", frames=4, methods=("full",), warmup=0, runs=1, decode_tokens=4,
                             reference="torch")
    run = session.run(spec, lambda cfg, name, r: bench.named_method(name, r, cfg), log=lambda line: None)
    d = json.loads(json.dumps({"meta": run.meta, "results": [r.to_json() for r in run.results],
                               "reference": run.reference}))
    _check_against_reference(d, visual=2 * 49)
    assert d["meta"]["video_input"]["frame_size"] == [196, 196] and d["meta"]["video_input"]["grid_thw"] == [2, 14, 14]
    (r,) = d["results"]
    cfg = architecture("qwen-tiny")
    assert r["flops"]["vision"] == flops.qwen_vision(cfg, (2, 14, 14))
    assert r["flops"]["llm"] == flops.llm_prefill(cfg, 39 + 98)
    ratio = r["flops_xla"]["xla_over_analytic"]
    assert 1.0 <= ratio["vision"] < 1.06 and 1.0 <= ratio["llm"] < 1.05, ratio
    assert set(STAGES) <= set(r["stages_s"]) and r["ttft_mean_s"] > 0


def test_cli_bench_of_a_checkpoint_with_the_torch_reference(tmp_path, capsys):
    """`earlytom bench --model DIR --reference torch` on a tiny Qwen2.5-VL checkpoint and a video
    file: frames sampled as qwen-vl-utils and lmms-eval sample them, sized within --min-pixels,
    the same first token in transformers (run here on our inputs by the tests' own helper) and
    in JAX, and the run described in the JSON."""
    pytest.importorskip("transformers")
    from earlytom_jax.checkpoint.load import load_config
    from earlytom_jax.cli import main
    from earlytom_jax.synthetic import make_clip
    from earlytom_jax.video import write_test_video
    from earlytom_jax.video_qwen import QwenPreprocessor, QwenVideoSettings, load_video_qwen
    from tests import tiny_qwen

    model = tiny_qwen.build(seed=3)
    ckpt = tiny_qwen.write_assets(tiny_qwen.save(model, str(tmp_path / "ckpt")))
    video = str(tmp_path / "clip.mp4")
    write_test_video(video, make_clip(24, 96, seed=1), fps=8)
    out = str(tmp_path / "bench.json")
    rc = main(["bench", "--model", ckpt, "--video", video, "--frames", "4", "--runs", "1", "--warmup", "0",
               "--methods", "full", "--reference", "torch", "--decode-tokens", "4", "--min-pixels", "20000", "--no-xla-flops",
               "--no-stages", "--json", out])
    assert rc == 0, capsys.readouterr().err
    d = json.load(open(out))
    settings = QwenVideoSettings(frames=4, min_pixels=20000)
    clip = load_video_qwen(video, settings)
    inputs = QwenPreprocessor.from_dir(ckpt, settings)(clip.frames)
    meta = d["meta"]["video_input"]
    assert meta["frame_indices"] == clip.indices.tolist() and meta["sampled_frames"] == 4
    assert (meta["min_pixels"], meta["max_pixels"]) == (20000, 200704) and meta["frame_size"] == [168, 168]
    _check_against_reference(d, visual=2 * 36)
    prefix, suffix = bench.prompt_ids(load_config(ckpt))
    assert prefix[-1] == tiny_qwen.VSTART and suffix[0] == tiny_qwen.VEND
    logits, _ = tiny_qwen.logits(model, inputs.pixels, prefix, suffix, inputs.second_per_grid_t)
    assert d["results"][0]["first_token"] == int(np.argmax(logits[-1]))
    assert "transformers full (PyTorch)" in capsys.readouterr().out


def test_reference_prefill_and_decode_are_transformers_with_qwens_positions():
    """`bench_torch.measure` feeds transformers what the parity tests feed it (tests/tiny_qwen.py):
    on a clip longer than it is wide, where transformers 5's own rule would start the text after
    the video elsewhere, and 0.75 s per temporal patch (truncated temporal positions), its first
    token and 8 greedy tokens are those of the tests' own run."""
    pytest.importorskip("transformers")
    from earlytom_jax import bench_torch
    from earlytom_jax.config import config_from_dict
    from tests import tiny_qwen

    model = tiny_qwen.build(seed=3)
    cfg = config_from_dict(model.config.to_dict())
    pixels = np.random.default_rng(3).normal(size=(8, 3, 56, 84)).astype(np.float32)
    prefix, suffix = [5, 6, 7, tiny_qwen.VSTART], [tiny_qwen.VEND, 8, 9, 10, 11]
    ref = bench_torch.measure(model, pixels, prefix, suffix, cfg, warmup=0, runs=1, decode_tokens=8, video_time=0.75)
    want = tiny_qwen.greedy(model, pixels, prefix, suffix, 8, 0.75)
    assert len(set(want)) > 2  # an answer that moves with the positions
    assert ref["first_token"] == want[0] and ref["decode"]["tokens"] == want
    assert (ref["frames"], ref["visual_tokens"], ref["video_grid_thw"]) == (4, 24, [4, 4, 6])


def test_prompt_ids_wrap_the_video_in_its_vision_tokens():
    cfg = architecture("qwen-tiny")
    prefix, suffix = bench.prompt_ids(cfg)
    assert (len(prefix), len(suffix)) == (14, 25) == tuple(map(len, bench.prompt_ids()))
    assert prefix[-1] == cfg.vision_start_token_id and suffix[0] == cfg.vision_end_token_id
    assert cfg.video_token_id not in prefix + suffix and bench.prompt_ids() == (list(range(14)), list(range(100, 125)))


def test_refusals_come_before_any_loading(monkeypatch):
    """A method not adapted to Qwen2.5-VL (ToMe) fails in one line before the clip is read or
    a weight loaded; contradictory pixel bounds too. Without --methods the CLI times full
    tokens and EarlyTom there as everywhere."""
    from earlytom_jax.cli import main

    def no_loading(*a, **k):
        raise AssertionError("loaded weights before refusing")

    monkeypatch.setattr(session, "_load", no_loading)
    monkeypatch.setattr(session, "bench_video", no_loading)
    spec = session.BenchSpec(arch="qwen-tiny", frames=4, methods=("full", "earlytom", "tome"), runs=1)
    with pytest.raises(ConfigError, match=r"^method 'tome' is not adapted to Qwen2\.5-VL") as e:
        session.run(spec, lambda cfg, name, r: bench.named_method(name, r, cfg))
    assert "\n" not in str(e.value)
    spec = session.BenchSpec(arch="qwen-tiny", frames=4, methods=("full",), min_pixels=50000, max_pixels=40000)
    with pytest.raises(ConfigError, match="--max-pixels 40000 is below --min-pixels 50000"):
        session.run(spec, lambda cfg, name, r: bench.named_method(name, r, cfg))
    assert session.default_methods(architecture("qwen-tiny")) == ("full", "earlytom")
    assert session.default_methods(architecture("tiny")) == ("full", "earlytom")

    class Ran(Exception):
        pass

    def record(spec, make_method):
        raise Ran(spec.methods)

    monkeypatch.setattr(session, "run", record)
    with pytest.raises(Ran, match=r"\('full', 'earlytom'\)"):
        main(["bench", "--arch", "qwen-tiny", "--frames", "2"])
