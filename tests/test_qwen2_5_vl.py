"""Qwen2.5-VL: the vision encoder and the whole video path against transformers (fp32 and bf16)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from earlytom_jax import pipeline
from earlytom_jax.checkpoint.load import load_hf
from earlytom_jax.models import family
from tests import tiny_qwen

PREFIX = [5, 6, 7, tiny_qwen.VSTART]
SUFFIX = [tiny_qwen.VEND, 8, 9, 10, 11]


def _ids(x):
    return jnp.asarray(x, jnp.int32)


def _pixels(frames: int, h: int, w: int, seed: int) -> np.ndarray:
    """Normalised pixels [T', 3, h, w], an odd frame count padded with its last frame as the
    processor pads it to the temporal patch."""
    x = np.random.default_rng(seed).normal(size=(frames, 3, h, w)).astype(np.float32)
    return np.concatenate([x, x[-1:]]) if frames % 2 else x


CASES = [
    # windows of 2x2 merged tokens on a 5 x 6 merged grid (edge windows smaller), block 1 full
    dict(frames=3, h=140, w=168, model=dict(window=56, fullatt=(1,)), spt=1.0),
    # windows of 4x4 on 3 x 7 (one window row, a ragged last column), blocks 0 and 3 full, tied head
    dict(frames=6, h=84, w=196, model=dict(window=112, fullatt=(0, 3), tie=True, vision_hidden=40, vision_heads=5,
                                           heads=2, kv_heads=1, text_hidden=48, mrope=(2, 4, 6)), spt=0.75),
    # one window per frame (window larger than the frame), no full-attention block, GQA 4
    dict(frames=4, h=56, w=56, model=dict(window=224, fullatt=(), heads=8, kv_heads=2, text_hidden=64,
                                           mrope=(1, 1, 2)), spt=2.0),
]


def _case_id(c):
    return f"T{c['frames']}-{c['h']}x{c['w']}-win{c['model']['window']}-full{''.join(map(str, c['model']['fullatt']))}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_logits_every_position_and_greedy_tokens(case, tmp_path):
    model = tiny_qwen.build(seed=case["frames"], **case["model"])
    cfg, params = load_hf(tiny_qwen.save(model, str(tmp_path / "ckpt")))
    pix = _pixels(case["frames"], case["h"], case["w"], seed=case["frames"] + 10)
    spt = case["spt"]

    flat, grid = tiny_qwen.flatten(pix)
    with torch.no_grad():
        ref_vis = model.model.visual(torch.from_numpy(flat), grid_thw=torch.tensor([grid])).pooler_output.numpy()
    vis = jax.jit(lambda p, x: family.bind(cfg, p).vision(x))(params, jnp.asarray(pix))
    np.testing.assert_allclose(np.asarray(vis).reshape(ref_vis.shape), ref_vis, atol=1e-5, rtol=0)

    ref, ids = tiny_qwen.logits(model, pix, PREFIX, SUFFIX, spt)
    f = jax.jit(pipeline.sequence_logits, static_argnames="cfg")
    ours = f(params, jnp.asarray(pix), _ids(PREFIX), _ids(SUFFIX), cfg, jnp.float32(spt))
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=0)

    n_new = 16
    logits, caches, pos, stats = pipeline.prefill_jit(params, jnp.asarray(pix), _ids(PREFIX), _ids(SUFFIX), cfg,
                                                      pipeline.FULL, n_new, None, jnp.float32(spt))
    np.testing.assert_allclose(np.asarray(logits), ref[-1], atol=1e-4, rtol=0)
    assert int(stats["visual_tokens"]) == len(ids) - len(PREFIX) - len(SUFFIX)
    toks, _ = pipeline.decode_loop(params, logits, pos, caches, cfg, n_new, _ids([-1]))
    assert np.asarray(toks).tolist() == tiny_qwen.greedy(model, pix, PREFIX, SUFFIX, n_new, spt)


def test_positions_equal_transformers_where_its_rule_agrees(tmp_path):
    """Our splice's positions equal transformers 5's `get_rope_index` for a clip no longer than
    it is wide (where its rule for the text after the video coincides with Qwen's), and the
    reference (Qwen's rule) everywhere; fractional intervals truncate the same way."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    model = tiny_qwen.build(seed=1, text_layers=1, vision_layers=1, fullatt=(0,))
    cfg, params = load_hf(tiny_qwen.save(model, str(tmp_path / "ckpt")))
    for gt, gh, gw, spt in [(2, 8, 12, 1.0), (3, 6, 10, 0.5), (5, 4, 6, 1.25), (4, 4, 4, 0.7)]:
        pix = np.zeros((gt * 2, 3, gh * 14, gw * 14), np.float32)
        feats, n, state = pipeline.encode_video(params, jnp.asarray(pix), cfg, pipeline.FULL, jnp.float32(spt))
        buf, valid, info = pipeline.visual_buffer(params, feats, n, state, cfg)
        _, _, pos, _ = pipeline.splice(params, buf, valid, info, _ids(PREFIX), _ids(SUFFIX), cfg)
        pos = np.asarray(pos)[0].T
        ref = tiny_qwen.reference_positions(len(PREFIX), (gt, gh, gw), len(SUFFIX), spt, 2.0)
        np.testing.assert_array_equal(pos, ref)
        ids, _, grid, _ = tiny_qwen.inputs(pix, PREFIX, SUFFIX, spt, 2.0)
        types = torch.tensor([[2 if i == tiny_qwen.VIDEO else 0 for i in ids]])
        hf, _ = Qwen2_5_VLModel.get_rope_index(model.model, torch.tensor([ids]), types, None, torch.tensor([grid]),
                                               torch.tensor([spt]))
        hf = hf[:, 0].numpy()
        video_end = len(PREFIX) + gt * gh * gw // 4
        np.testing.assert_array_equal(pos[:, :video_end], hf[:, :video_end])
        if (gt - 1) * int(2 * spt) < max(gh, gw) // 2:
            np.testing.assert_array_equal(pos, hf)


def _kl(p_logits, q_logits):
    p = jax.nn.log_softmax(jnp.asarray(p_logits, jnp.float32), -1)
    q = jax.nn.log_softmax(jnp.asarray(q_logits, jnp.float32), -1)
    return float(jnp.max(jnp.sum(jnp.exp(p) * (p - q), -1)))


def test_bf16_logits_close_by_kl_and_one_compile_per_shape(tmp_path):
    model = tiny_qwen.build(seed=7)
    d = tiny_qwen.save(model, str(tmp_path / "ckpt"))
    cfg, params = load_hf(d, dtype="bfloat16")
    assert params["text"]["embed"].dtype == jnp.bfloat16
    pix = _pixels(4, 112, 140, seed=3)
    ref, _ = tiny_qwen.logits(model, pix, PREFIX, SUFFIX)
    f = jax.jit(pipeline.sequence_logits, static_argnames="cfg")
    ours = f(params, jnp.asarray(pix, jnp.bfloat16), _ids(PREFIX), _ids(SUFFIX), cfg)
    assert _kl(ref, ours) <= 1e-2

    cfg, params = load_hf(d)
    args = (_ids(PREFIX), _ids(SUFFIX), cfg, pipeline.FULL, 4, None)
    pipeline.prefill_jit(params, jnp.asarray(pix), *args, jnp.float32(1.0))
    before = pipeline.prefill_jit._cache_size()
    pipeline.prefill_jit(params, jnp.asarray(_pixels(4, 112, 140, seed=4)), *args, jnp.float32(0.5))
    assert pipeline.prefill_jit._cache_size() == before  # another clip and another fps: the same program


def test_meshes_match_single_device(tmp_path):
    """Sharded over 8 host devices (data x model), the logits within 1e-5 of one device and
    the same 6 greedy tokens (tests/sharding_check.py, in a subprocess)."""
    import json
    import os
    import subprocess
    import sys

    model = tiny_qwen.build(seed=9, vision_heads=4, vision_hidden=64, heads=4, kv_heads=2)
    d = tiny_qwen.save(model, str(tmp_path / "ckpt"))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    meshes = ["data=2,model=2", "data=4", "model=4"]
    proc = subprocess.run([sys.executable, "-m", "tests.sharding_check", d, *meshes], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for spec in meshes:
        assert out[spec]["max_abs"]["full"] <= 1e-5, (spec, out[spec])
        assert out[spec]["same_tokens"]["full"], spec
    assert out["data=2,model=2"]["sharded_leaves"] > 0 and out["model=4"]["sharded_leaves"] > 0
