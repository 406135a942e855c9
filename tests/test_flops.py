"""The analytic FLOP counts agree with XLA's cost analysis of the compiled stages (within 1%)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from earlytom_jax import flops
from earlytom_jax.architectures import architecture, param_shapes
from earlytom_jax.models import params as params_lib
from earlytom_jax.models import qwen2
from earlytom_jax.models.qwen2 import Qwen2Layer
from earlytom_jax.models.siglip import SiglipBlock


def _xla_flops(fn, *shapes) -> float:
    """XLA's count made loop-aware as the bench makes it (the CPU attention loops over heads)."""
    from earlytom_jax.bench.xla_flops import _LoopAwareCount

    closed = jax.make_jaxpr(fn)(*shapes)
    count = _LoopAwareCount(compile_parts=True)
    return count.part_flops(closed) + count.extra(closed)


@pytest.fixture(scope="module")
def real():
    cfg = architecture("llava-ov-0.5b")
    return cfg, param_shapes(cfg)


def test_siglip_block(real):
    cfg, shapes = real
    blk = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape[1:], s.dtype), shapes["vision"]["blocks"])
    x = jax.ShapeDtypeStruct((2, cfg.vision.num_patches, cfg.vision.hidden_size), jnp.float32)
    xla = _xla_flops(lambda p, x: params_lib.bind(SiglipBlock, cfg.vision, p)(x)[0], blk, x)
    assert abs(xla / flops.siglip_block(cfg, 2) - 1) < 0.01


def test_qwen2_layer(real):
    cfg, shapes = real
    lay = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape[1:], s.dtype), shapes["text"]["layers"])
    L = 96  # one attention block: XLA counts the masked square, we count the triangle
    h = jax.ShapeDtypeStruct((1, L, cfg.text.hidden_size), jnp.float32)
    pos, valid = jnp.arange(L)[None], jnp.ones((1, L), bool)
    cos, sin = qwen2.rope_tables(pos, cfg.text.head_dim, cfg.text.rope_theta)
    xla = _xla_flops(lambda p, h: params_lib.bind(Qwen2Layer, cfg.text, p)(h, cos, sin, valid)[0], lay, h)
    assert abs(xla / flops.llm_layer(cfg, L) - 1) < 0.01


def test_prefill_flops_follow_the_statistics():
    cfg = architecture("llava-ov-0.5b")
    from earlytom_jax.compression.earlytom import EarlyTom

    m = EarlyTom(ratio=0.1, layers=(6, 21, 23), llm_layer=18)
    stats = {"frames": 12, "frames_after_layer": [23, 17, 12], "visual_tokens": 631, "llm_kept": 316}
    f = flops.prefill_flops(cfg, 32, 39, stats, m)
    frame_blocks = 7 * 32 + 15 * 23 + 2 * 17 + 2 * 12
    assert f.vision == flops.vision(cfg, [32] * 7 + [23] * 15 + [17] * 2 + [12] * 2)
    assert abs(f.vision - frame_blocks * flops.siglip_block(cfg, 1)) / f.vision < 0.01  # embed is small
    n = 39 + 631
    assert f.llm == sum(flops.llm_layer(cfg, n if i < 18 else n - 631 + 316) for i in range(24)) + 2 * 896 * 152000


def test_executed_projector_runs_on_the_bucket_of_the_frames_left():
    """EarlyTom on 16 frames has frame buckets 4, 8, 12, 16: 3 frames left after its merges
    are projected and pooled as a bucket of 4 (XLA's count: the largest branch, 16)."""
    cfg = architecture("llava-ov-0.5b")
    from earlytom_jax.compression.earlytom import EarlyTom

    m = EarlyTom(ratio=0.1, layers=(6, 21, 23), llm_layer=18)
    assert m.frame_buckets(16) == (4, 8, 12, 16)
    stats = {"frames": 3, "frames_after_layer": [9, 5, 3], "visual_tokens": 314, "llm_kept": 157}
    sel = m.select_flops(cfg, 16)
    run = flops.executed_prefill_flops(cfg, 16, 39, stats, m)
    assert run["tokens"] == flops.projector_and_pool(cfg, 4) + sel
    largest = flops.executed_prefill_flops(cfg, 16, 39, stats, m, conditionals="largest")
    assert largest["tokens"] == flops.projector_and_pool(cfg, 16) + sel
    assert flops.prefill_flops(cfg, 16, 39, stats, m).tokens == flops.projector_and_pool(cfg, 3) + sel


def test_executed_frame_loop_runs_the_frames_left():
    """Where the encoder runs frames one at a time (bf16 on CPU), the blocks after a merge and
    the projector run on the frames left, no bucket: the executed count is the exact one."""
    cfg = architecture("llava-ov-0.5b")
    from earlytom_jax.compression.earlytom import EarlyTom

    m = EarlyTom(ratio=0.1, layers=(6, 21, 23), llm_layer=18)
    stats = {"frames": 3, "frames_after_layer": [9, 5, 3], "visual_tokens": 314, "llm_kept": 157}
    run = flops.executed_prefill_flops(cfg, 16, 39, stats, m, frame_loop=True)
    exact = flops.prefill_flops(cfg, 16, 39, stats, m)
    assert (run["vision"], run["tokens"]) == (exact.vision, exact.tokens)
    assert run["vision"] < flops.executed_prefill_flops(cfg, 16, 39, stats, m)["vision"]
    largest = flops.executed_prefill_flops(cfg, 16, 39, stats, m, conditionals="largest", frame_loop=True)
    assert largest == flops.executed_prefill_flops(cfg, 16, 39, stats, m, conditionals="largest")
