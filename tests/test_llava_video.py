"""LLaVA-Video (docs/llava-video.md): config detection and checkpoint layouts, the video path
(2x2 average pooling, a newline per pooled row) against PyTorch references written from
LLaVA-NeXT's code, EarlyTom / VisionZip / FastV against the references extended to it, presets,
sampling and the prompt."""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from earlytom_jax import pipeline
from earlytom_jax.architectures import architecture
from earlytom_jax.checkpoint import table
from earlytom_jax.checkpoint.load import load_hf
from earlytom_jax.compression import defaults, registry
from earlytom_jax.compression.earlytom import EarlyTom
from earlytom_jax.compression.fastv import FastV
from earlytom_jax.compression.presets import preset
from earlytom_jax.config import LlavaOVConfig, LlavaVideoConfig, config_from_dict
from earlytom_jax.errors import CheckpointError, ConfigError
from earlytom_jax.generate import generate
from earlytom_jax.llava_video_torch import as_llava_video, placeholder_count
from earlytom_jax.models import llava_onevision as lov
from earlytom_jax.prompt import chat_prompt, time_instruction, with_time_instruction
from earlytom_jax.video import llava_vid_sampling
from tests.helpers import kept_per_frame, lmms_lab_name, random_pixels, segments
from tests.references.llava_video_ref import grid_sequence, llava_video_reference
from tests.tiny_models import build_tiny_model, random_video, save_tiny_checkpoint

PREFIX, SUFFIX = [1, 2, 3, 4], [5, 6, 7, 8, 9]


def _ids(x):
    return jnp.asarray(x, jnp.int32)


def _pixels(frames):
    return ((frames.astype(np.float32) / 255.0 - 0.5) / 0.5).transpose(0, 3, 1, 2).copy()


def _mark_video(directory: str) -> str:
    """Add LLaVA-NeXT's `mm_newline_position: grid` to a saved llava-hf directory's config."""
    path = os.path.join(directory, "config.json")
    d = json.load(open(path))
    d["mm_newline_position"] = "grid"
    json.dump(d, open(path, "w"))
    return directory


def _video_checkpoint(directory, seed=0, **kw):
    """(transformers model, our config, our params) of a tiny LLaVA-Video in the llava-hf layout."""
    model = build_tiny_model(seed=seed, **kw)
    cfg, params = load_hf(_mark_video(save_tiny_checkpoint(model, directory)))
    assert isinstance(cfg, LlavaVideoConfig) and cfg.family == "llava_video"
    return model, cfg, params


# ------------------------------------------------------------------------------ config


def _lmms_lab_config(**extra):
    return dict(
        architectures=["LlavaQwenForCausalLM"], model_type="llava_qwen",
        mm_vision_tower="google/siglip-so400m-patch14-384", mm_vision_select_layer=-2,
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, rope_theta=1000000.0, **extra)


def test_family_detected_from_the_config():
    video = config_from_dict(_lmms_lab_config(mm_newline_position="grid", mm_spatial_pool_mode="bilinear",
                                              mm_spatial_pool_stride=2, mm_patch_merge_type="spatial_unpad"))
    assert type(video) is LlavaVideoConfig and video.family == "llava_video"
    # the harness's average pooling, whatever the checkpoint's training default says
    assert (video.pool_mode, video.pooled_grid, video.tokens_per_frame) == ("average", 13, 169)
    assert video.vision.num_layers == 26 and video.visual_slots(64) == 64 * 182
    ov = config_from_dict(_lmms_lab_config(mm_newline_position="one_token"))
    assert type(ov) is LlavaOVConfig and (ov.pooled_grid, ov.visual_slots(32)) == (14, 32 * 196 + 1)
    assert type(config_from_dict(_lmms_lab_config())) is LlavaOVConfig
    with pytest.raises(CheckpointError, match="mm_newline_position='frame'") as e:
        config_from_dict(_lmms_lab_config(mm_newline_position="frame"))
    assert "\n" not in str(e.value)
    assert architecture("llava-video-7b") == video


def test_video_config_round_trips(tmp_path):
    from earlytom_jax.checkpoint.converted import CONFIG_FILE, config_dict, config_from_json
    from earlytom_jax.checkpoint.export import hf_config

    cfg = architecture("llava-video-tiny")
    path = tmp_path / CONFIG_FILE
    path.write_text(json.dumps(config_dict(cfg, np.float32)))
    assert config_from_json(str(path)) == cfg
    assert config_from_dict(hf_config(cfg)) == cfg
    ov = architecture("tiny")
    path.write_text(json.dumps(config_dict(ov, np.float32)))
    assert config_from_json(str(path)) == ov
    with pytest.raises(CheckpointError, match="LLaVA-Video places its newlines per grid row"):
        LlavaVideoConfig(vision=cfg.vision, text=cfg.text, newline_position="one_token")


def test_arch_shapes_and_checkpoint_table():
    cfg = architecture("llava-video-7b")
    ov = architecture("llava-ov-7b")
    assert [r.source for r in table.rows(cfg)] == [r.source for r in table.rows(ov)]
    assert list(table.shapes(cfg)) == list(table.shapes(ov))


# ------------------------------------------------------------------------------ pooling, newlines


@pytest.mark.parametrize("grid", [2, 4, 5, 9, 27])
def test_average_pooling_is_avg_pool2d(grid):
    x = np.random.default_rng(grid).normal(size=(3, grid * grid, 7)).astype(np.float32)
    ours = lov.pool(jnp.asarray(x), grid, grid // 2, "average")
    ref = F.avg_pool2d(torch.tensor(x).view(3, grid, grid, 7).permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(ours), ref.reshape(3, -1, 7).numpy(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("every_row", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_grid_newlines_layout(every_row, seed):
    """`lov.grid_newlines` on scattered selections (slots in any order, padding between)
    equals the reference's per-frame, per-row layout."""
    rng = np.random.default_rng(seed)
    g, t0, h = 3, 4, 5
    s = g * g
    n = int(rng.integers(1, t0 + 1))
    keep = rng.random((t0, s)) < [0.0, 0.2, 0.5, 1.0][seed]
    keep[n:] = False
    tokens = rng.normal(size=(t0, s, h)).astype(np.float32)
    newline = rng.normal(size=(h,)).astype(np.float32)
    src = [t * s + j for t in range(t0) for j in range(s) if keep[t, j]]
    vc = t0 * s
    slots = rng.permutation(vc)[: len(src)]  # where each kept token sits in the method's buffer
    buf = np.zeros((vc, h), np.float32)
    valid = np.zeros(vc, bool)
    index = np.full(vc, -1, np.int32)
    for i, k in zip(slots, src):
        buf[i], valid[i], index[i] = tokens.reshape(-1, h)[k], True, k
    cap = vc + t0 * g
    out, ok = lov.grid_newlines(jnp.asarray(buf), jnp.asarray(valid), jnp.asarray(index), jnp.asarray(newline), g,
                                jnp.asarray(n, jnp.int32), cap, every_row)
    frames = [[(j, torch.tensor(tokens[t, j])) for j in range(s) if keep[t, j]] for t in range(n)]
    if not every_row:
        frames = [f for f in frames if f]
    want = grid_sequence(frames, g, torch.tensor(newline), every_row).numpy() if frames else np.zeros((0, h))
    ok = np.asarray(ok)
    assert ok[: len(want)].all() and not ok[len(want):].any()
    np.testing.assert_array_equal(np.asarray(out)[: len(want)], want)


# ------------------------------------------------------------------------------ full tokens

FULL_CASES = [
    # image size (grid → pooled), frames, tie, q / kv heads
    dict(image_size=70, frames=3, tie=False, q_heads=4, kv_heads=2),  # odd grid 5 → 2
    dict(image_size=56, frames=2, tie=True, q_heads=2, kv_heads=2),  # even grid 4 → 2
    dict(image_size=126, frames=2, tie=False, q_heads=4, kv_heads=1),  # 9 → 4
]


@pytest.mark.parametrize("case", FULL_CASES, ids=lambda c: "img{image_size}-T{frames}-tie{tie}".format(**c))
def test_full_tokens_match_llava_next_reference(case, tmp_path):
    """fp32 logits at every position within 1e-4 of the PyTorch reference (transformers'
    modules with LLaVA-NeXT's llava_vid video path, through transformers' own forward) and of
    the independent test reference; greedy tokens identical to transformers' generate."""
    case = dict(case)
    frames = case.pop("frames")
    model, cfg, params = _video_checkpoint(str(tmp_path / "ckpt"), seed=frames, text_hidden=case["q_heads"] * 16, **case)
    pix = random_pixels(frames, case["image_size"], seed=frames)
    ref_model = as_llava_video(model)
    ids = PREFIX + [cfg.video_token_id] * placeholder_count(cfg, frames) + SUFFIX
    with torch.no_grad():
        ref = ref_model(input_ids=torch.tensor([ids]), pixel_values_videos=torch.tensor(pix)[None]).logits[0].numpy()
    ours = jax.jit(pipeline.sequence_logits, static_argnames="cfg")(params, pix, _ids(PREFIX), _ids(SUFFIX), cfg)
    assert ours.shape[0] == len(ids) == len(PREFIX) + len(SUFFIX) + frames * cfg.pooled_grid * (cfg.pooled_grid + 1)
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=0)

    second = llava_video_reference(model, torch.tensor(pix), PREFIX, SUFFIX, max_new_tokens=6)
    np.testing.assert_allclose(np.asarray(ours)[-1], second["first_logits"].numpy(), atol=1e-4, rtol=0)

    n_new = 8
    logits, caches, pos, stats = pipeline.prefill_jit(params, pix, _ids(PREFIX), _ids(SUFFIX), cfg, pipeline.FULL, n_new)
    assert int(stats["visual_tokens"]) == placeholder_count(cfg, frames)
    toks, _ = pipeline.decode_loop(params, logits, pos, caches, cfg, n_new, _ids([-1]))
    with torch.no_grad():
        g = ref_model.generate(input_ids=torch.tensor([ids]), pixel_values_videos=torch.tensor(pix)[None],
                               max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
    assert np.asarray(toks).tolist() == g[0, len(ids):].tolist()
    assert np.asarray(toks).tolist()[:6] == second["tokens"]


def test_random_reference_for_the_bench():
    """`llava_video_torch.build_random` (what `bench --reference torch` is to time for
    LLaVA-Video) and our tree read from it (`bench_torch.params_from_torch`) agree."""
    from earlytom_jax import bench_torch, llava_video_torch

    cfg = architecture("llava-video-tiny")
    model = llava_video_torch.build_random(cfg, seed=1)
    assert model.llava_video_reference and type(model.model).__name__ == "LlavaVideoModel"
    params = bench_torch.params_from_torch(model, cfg)
    pix = random_pixels(2, cfg.vision.image_size, seed=1)
    ids = PREFIX + [cfg.video_token_id] * placeholder_count(cfg, 2) + SUFFIX
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([ids]), pixel_values_videos=torch.tensor(pix)[None]).logits[0, -1].numpy()
    logits, *_ = pipeline.prefill_jit(params, pix, _ids(PREFIX), _ids(SUFFIX), cfg, pipeline.FULL, 1)
    np.testing.assert_allclose(np.asarray(logits), ref, atol=1e-4, rtol=0)


def test_bf16_close_to_fp32_reference(tmp_path):
    model, cfg, params = _video_checkpoint(str(tmp_path / "ckpt"), seed=5, image_size=70)
    pix = random_pixels(2, 70, seed=5)
    ref = llava_video_reference(model, torch.tensor(pix), PREFIX, SUFFIX)["first_logits"].numpy()
    p16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    logits, *_ = pipeline.prefill_jit(p16, jnp.asarray(pix, jnp.bfloat16), _ids(PREFIX), _ids(SUFFIX), cfg,
                                      pipeline.FULL, 1)
    err = np.abs(np.asarray(logits, np.float32) - ref).max()
    assert err < 0.05 * np.abs(ref).max() + 0.05, err


# ------------------------------------------------------------------------------ checkpoint layouts


def test_lmms_lab_layout_loads_as_llava_video(tmp_path):
    """The original layout (an extra SigLIP block stored, hidden_states[-2] selected, a flat
    Qwen2 config with LLaVA-NeXT's keys) gives the llava-hf directory's tree, as LLaVA-Video."""
    from safetensors.numpy import load_file, save_file

    model = build_tiny_model(seed=2, image_size=70)
    hf = save_tiny_checkpoint(model, str(tmp_path / "hf"))
    d = json.load(open(os.path.join(hf, "config.json")))
    t, v = d["text_config"], d["vision_config"]
    n = v["num_hidden_layers"]
    tensors = load_file(os.path.join(hf, "model.safetensors"))
    out = {}
    for k, x in tensors.items():
        name = lmms_lab_name(k)
        out[name] = x
        if f"encoder.layers.{n - 1}." in name:
            out[name.replace(f"layers.{n - 1}.", f"layers.{n}.")] = x + 1.0
    lmms = tmp_path / "lmms"
    lmms.mkdir()
    save_file(out, str(lmms / "model.safetensors"))
    for f in ("tokenizer.json", "preprocessor_config.json"):
        shutil.copy(os.path.join(hf, f), lmms)
    cfg_lmms = dict(t, model_type="llava_qwen", architectures=["LlavaQwenForCausalLM"],
                    mm_vision_tower="google/siglip-so400m-patch14-384", mm_vision_select_layer=-2,
                    vision_config=dict(v, num_hidden_layers=n + 1), tie_word_embeddings=False,
                    mm_newline_position="grid", mm_spatial_pool_mode="bilinear", mm_spatial_pool_stride=2,
                    mm_patch_merge_type="spatial_unpad")
    (lmms / "config.json").write_text(json.dumps(cfg_lmms))
    cfg, p = load_hf(str(lmms))
    assert cfg.family == "llava_video" and cfg.vision.num_layers == n and cfg.pooled_grid == 2
    _, base = load_hf(_mark_video(hf))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), base, p)


# ------------------------------------------------------------------------------ EarlyTom


def _video(kind: str, t0: int, size: int, seed: int):
    if kind == "drift":
        return random_video(t0, size, size, seed=seed)
    if kind == "noise":
        return np.random.default_rng(seed).integers(0, 256, (t0, size, size, 3), dtype=np.uint8)
    base = np.random.default_rng(seed).integers(0, 256, (3, size, size, 3)).astype(np.float32)
    rng = np.random.default_rng(seed + 1)
    out = [base[min(2, (3 * t) // t0)] + rng.normal(0, 6, base[0].shape) for t in range(t0)]
    return np.clip(np.stack(out), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def video126(tmp_path_factory):
    """126 px / 14 → 9 x 9 patches, average-pooled to 4 x 4 = 16 tokens a frame (odd grid)."""
    return _video_checkpoint(str(tmp_path_factory.mktemp("video126")), seed=3, image_size=126, vision_layers=4)


ET_CASES = [
    ("scenes", 12, dict(ratio=0.25, tau=0.6, layers=(1, 2, 3), llm_layer=2)),
    ("scenes", 9, dict(ratio=0.1, tau=0.8, layers=(0, 3), llm_layer=None)),
    ("drift", 8, dict(ratio=0.15, tau=0.3, layers=(2,), llm_layer=1)),
    ("noise", 6, dict(ratio=0.25, tau=0.95, layers=(1, 3), llm_layer=3)),
    ("scenes", 10, dict(ratio=0.9, tau=0.6, layers=(0, 1, 2), llm_layer=2)),  # r' clips at 1
    ("scenes", 12, dict(ratio=0.25, tau=0.6, layers=(1, 2), llm_layer=2, quirks=False)),
    ("drift", 1, dict(ratio=0.25, tau=0.6, layers=(1, 2), llm_layer=2)),
]


@pytest.mark.parametrize("kind,t0,settings", ET_CASES, ids=[f"{c[0]}-T{c[1]}-{i}" for i, c in enumerate(ET_CASES)])
def test_earlytom_matches_reference(video126, kind, t0, settings):
    """Kept tokens, grid newlines and logits against the EarlyTom reference extended to
    LLaVA-Video (average-pooled importance, budget r of T0·16 here, a newline after each pooled
    row that kept a token, stage III over the span with its newlines)."""
    model, cfg, params = video126
    method = EarlyTom(buckets=2, **settings).check(cfg)
    pix = _pixels(_video(kind, t0, cfg.vision.image_size, seed=t0))
    ref = llava_video_reference(model, torch.tensor(pix), PREFIX, SUFFIX, method="earlytom",
                                settings=dict(settings), max_new_tokens=6)
    gen = generate(params, cfg, pix, PREFIX, SUFFIX, method, 6, eos_ids=())
    s, rs = gen.stats, ref["stats"]
    n = s["frames"]
    assert s["frames_after_layer"] == rs["frames_after_layer"]
    assert segments(s["segment_starts"], n) == [tuple(x) for x in rs["segments"]]
    assert s["dynamic"][:n] == list(rs["dynamic"])
    ours = kept_per_frame(s["kept_index"], n, cfg.tokens_per_frame)
    assert [sorted(k) for k in ours] == [sorted(k) for k in rs["kept"]]
    assert s["visual_tokens"] == rs["visual_tokens"]  # tokens and their newlines
    rows = sum(len({j // cfg.pooled_grid for j in k}) for k in rs["kept"])
    assert s["visual_tokens"] == s["count"] + rows
    assert s["visual_tokens"] <= pipeline.visual_span(cfg, method, t0, cfg.tokens_per_frame)
    if method.llm_layer is not None:
        assert s["llm_kept"] == rs["visual_tokens_after_llm"]
        assert [i for i, k in enumerate(s["llm_keep_mask"]) if k] == list(rs["keep_llm"])
    np.testing.assert_allclose(gen.first_logits, ref["first_logits"].numpy(), atol=1e-4, rtol=0)
    assert gen.tokens == ref["tokens"]


def test_merges_and_partial_rows_happen(video126):
    """Guard against a vacuous suite: the scene video merges frames, and selection leaves rows
    without a kept token (so fewer newlines than rows)."""
    _, cfg, params = video126
    pix = _pixels(_video("scenes", 12, cfg.vision.image_size, seed=12))
    gen = generate(params, cfg, pix, PREFIX, SUFFIX, EarlyTom(buckets=2, **ET_CASES[0][2]).check(cfg), 1)
    n = gen.stats["frames"]
    newlines = gen.stats["visual_tokens"] - gen.stats["count"]
    assert n < 12 and 0 < newlines < n * cfg.pooled_grid


def test_earlytom_budget_counts_pooled_tokens_only(video126):
    """At r' = 1 (r = 1, nothing merged) EarlyTom keeps every pooled token and the layout is
    the full model's: T0·g'·(g'+1) slots, the same logits."""
    _, cfg, params = video126
    pix = _pixels(_video("noise", 4, cfg.vision.image_size, seed=4))
    # max_window 2: every frame a segment of its own, so nothing merges and every frame is dynamic
    method = EarlyTom(ratio=1.0, tau=0.0, layers=(1,), max_window=2, llm_layer=None, buckets=1).check(cfg)
    gen = generate(params, cfg, pix, PREFIX, SUFFIX, method, 1)
    full = generate(params, cfg, pix, PREFIX, SUFFIX, pipeline.FULL, 1)
    assert gen.stats["count"] == 4 * cfg.tokens_per_frame
    assert gen.stats["visual_tokens"] == full.stats["visual_tokens"] == cfg.visual_slots(4)
    assert gen.stats["frames"] == 4
    np.testing.assert_allclose(gen.first_logits, full.first_logits, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------ baselines


@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_visionzip_matches_reference(video126, ratio):
    model, cfg, params = video126
    pix = random_pixels(4, cfg.vision.image_size, seed=7)
    method = registry.build("visionzip", ratio, cfg)
    ref = llava_video_reference(model, torch.tensor(pix), PREFIX, SUFFIX, method="visionzip",
                                settings=dict(ratio=ratio), max_new_tokens=4)
    gen = generate(params, cfg, pix, PREFIX, SUFFIX, method, 4, eos_ids=())
    ours = kept_per_frame(gen.stats["kept_index"], 4, cfg.tokens_per_frame)
    assert [sorted(k) for k in ours] == ref["stats"]["kept"]
    assert gen.stats["count"] == registry.token_budget(4, ratio, cfg.tokens_per_frame)
    assert gen.stats["visual_tokens"] == ref["stats"]["visual_tokens"] == gen.stats["count"] + 4 * cfg.pooled_grid
    np.testing.assert_allclose(gen.first_logits, ref["first_logits"].numpy(), atol=1e-4, rtol=0)
    assert gen.tokens == ref["tokens"]


@pytest.mark.parametrize("layer,drop", [(1, 0.5), (3, 0.85)])
def test_fastv_matches_reference(video126, layer, drop):
    model, cfg, params = video126
    pix = random_pixels(3, cfg.vision.image_size, seed=layer)
    ref = llava_video_reference(model, torch.tensor(pix), PREFIX, SUFFIX, method="fastv",
                                settings=dict(llm_layer=layer, drop=drop), max_new_tokens=5)
    gen = generate(params, cfg, pix, PREFIX, SUFFIX, FastV(layer, drop).check(cfg), 5, eos_ids=())
    assert gen.stats["visual_tokens"] == cfg.visual_slots(3)
    assert gen.stats["llm_kept"] == ref["stats"]["visual_tokens_after_llm"]
    assert [i for i, k in enumerate(gen.stats["llm_keep_mask"]) if k] == list(ref["stats"]["keep_llm"])
    np.testing.assert_allclose(gen.first_logits, ref["first_logits"].numpy(), atol=1e-4, rtol=0)
    assert gen.tokens == ref["tokens"]


def test_methods_not_adapted_are_refused():
    cfg = architecture("llava-video-tiny")
    for name in ("tome", "uniform_tokens", "uniform_frames"):
        with pytest.raises(ConfigError, match=f"'{name}' is not adapted to LLaVA-Video") as e:
            registry.build(name, 0.25, cfg)
        assert "\n" not in str(e.value)
    for name in ("earlytom", "earlytom_topk", "visionzip", "fastv"):
        registry.build(name, 0.25, cfg, **defaults.settings(name, cfg)[0])  # defaults scaled to the tiny depth


# ------------------------------------------------------------------------------ settings


def test_llava_video_presets():
    """EarlyTom's LLaVA-Video script: LLaVA-OV's table except VideoMME@0.25 (tau 0.6) and
    LongVideoBench@0.25 (layers 6,21,23)."""
    ov, vid = "llava_onevision", "llava_video"
    assert preset("videomme@0.25", family=ov)["tau"] == 0.7
    assert preset("videomme@0.25", family=vid)["tau"] == 0.6
    assert preset("longvideobench@0.25", family=ov)["layers"] == (4, 14, 24)
    assert preset("longvideobench@0.25", family=vid)["layers"] == (6, 21, 23)
    for task in ("mvbench", "videomme", "longvideobench", "egoschema"):
        for r in (0.1, 0.15, 0.2):
            assert preset(f"{task}@{r}", family=vid) == preset(f"{task}@{r}", family=ov)
    cfg = architecture("llava-video-7b")
    m = EarlyTom.from_ratio(0.25, cfg, preset="longvideobench")
    assert (m.layers, m.tau, m.llm_layer, m.max_window) == ((6, 21, 23), 0.8, 18, 6)
    assert EarlyTom.from_ratio(0.25, architecture("llava-ov-7b"), preset="longvideobench").layers == (4, 14, 24)


def test_llava_vid_sampling_and_time_instruction():
    idx, times, seconds = llava_vid_sampling(300, 30.0, max_frames=64)  # 10 s: 1 fps, 10 frames
    assert idx.tolist() == list(range(0, 300, 30)) and times[:3] == (0.0, 1.0, 2.0) and seconds == 10.0
    idx, times, seconds = llava_vid_sampling(3000, 25.0, max_frames=64)  # 120 s: uniform 64
    assert idx.tolist() == np.linspace(0, 2999, 64, dtype=int).tolist() and times[1] == idx[1] / 25.0
    idx, _, _ = llava_vid_sampling(300, 30.0, max_frames=64, force_sample=True)
    assert len(idx) == 64
    line = time_instruction(10.0, [0.0, 1.0])
    assert line == ("The video lasts for 10.00 seconds, and 2 frames are uniformly sampled from it. These frames "
                    "are located at 0.00s,1.00s.Please answer the following questions related to this video.")
    prompt = chat_prompt(with_time_instruction("What?", 10.0, [0.0, 1.0]))
    assert f"user\n<video>\n{line}\nWhat?<|im_end|>" in prompt


# ------------------------------------------------------------------------------ wiring


def test_run_samples_one_a_second_with_the_time_instruction(tmp_path):
    """`VideoLLM` on a LLaVA-Video checkpoint samples as lmms-eval's `llava_vid` (one frame a
    second, at most `num_frames`) and, with `time_instruction`, asks the question after the
    video's length and the frames' times; the context check counts the grid newlines
    (`pipeline.visual_span`); the option is refused on LLaVA-OneVision in one line."""
    from earlytom_jax.api import VideoLLM, check_frames
    from earlytom_jax.video import write_test_video

    _video_checkpoint(str(tmp_path / "ckpt"), seed=2, image_size=56)
    path = str(tmp_path / "clip.mp4")
    write_test_video(path, random_video(30, 56, 56, seed=2), fps=10)  # 3 s at 10 fps
    llm = VideoLLM.load(str(tmp_path / "ckpt"), time_instruction=True)
    vf = llm.load_video(path, 64)
    assert vf.indices.tolist() == [0, 10, 20] and vf.times == (0.0, 1.0, 2.0) and vf.seconds == 3.0
    asked = llm.question_for("What?", vf)
    assert asked == with_time_instruction("What?", 3.0, [0.0, 1.0, 2.0])
    ans = llm.ask(path, "What?", pipeline.FULL, num_frames=64, max_new_tokens=1)
    assert ans.video.frames.shape[0] == 3 and int(ans.stats["visual_tokens"]) == llm.cfg.visual_slots(3)
    cfg = llm.cfg
    span = cfg.visual_slots(3)
    check_frames(cfg, pipeline.FULL, 3, cfg.text.max_position_embeddings - span - 1, 1, memory=False)
    with pytest.raises(ConfigError, match="exceeds the model's context"):
        check_frames(cfg, pipeline.FULL, 3, cfg.text.max_position_embeddings - span, 1, memory=False)
    plain = VideoLLM.load(str(tmp_path / "ckpt"))
    assert plain.question_for("What?", vf) == "What?"
    save_tiny_checkpoint(build_tiny_model(seed=2, image_size=56), str(tmp_path / "ov"))
    with pytest.raises(ConfigError, match="--time-instruction is LLaVA-Video's"):
        VideoLLM.load(str(tmp_path / "ov"), time_instruction=True)


def test_bench_reference_torch_times_the_llava_next_path(tmp_path):
    """`bench --arch llava-video-tiny --reference torch` times LLaVA-NeXT's llava_vid path on
    the same random weights (labelled so), with the grid newlines' placeholders: its first
    token is ours; the executed FLOPs count the newline slots."""
    from earlytom_jax.cli.main import main
    from earlytom_jax.llava_video_torch import LABEL

    out = tmp_path / "bench.json"
    assert main(["bench", "--arch", "llava-video-tiny", "--frames", "3", "--methods", "full,earlytom",
                 "--ratios", "0.5", "--reference", "torch", "--warmup", "0", "--runs", "1", "--decode-tokens", "0",
                 "--no-stages", "--no-xla-flops", "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    cfg = architecture("llava-video-tiny")
    assert d["reference"]["label"] == LABEL and d["reference"]["visual_tokens"] == cfg.visual_slots(3)
    full = next(r for r in d["results"] if r["method"] == "full")
    assert full["first_token"] == d["reference"]["first_token"]
    assert full["visual_tokens"] == cfg.visual_slots(3)
