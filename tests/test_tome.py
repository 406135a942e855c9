"""ToMe in the encoder against a PyTorch reference written from its description
(tests/references/baselines_ref.py) on a tiny random LLaVA-OneVision with the real 27 x 27
patch layout; schedule, budget, one compile, FLOPs against XLA."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from earlytom_jax import flops, pipeline
from earlytom_jax.architectures import architecture, param_shapes
from earlytom_jax.compression import registry, tome
from earlytom_jax.config import LlavaOVConfig, Qwen2Config, SiglipConfig
from earlytom_jax.errors import ConfigError
from earlytom_jax.generate import generate
from tests.helpers import random_pixels, visual_buffer
from tests.references import baselines_ref

PREFIX, SUFFIX = [1, 2, 3], [4, 5, 6, 7]
T0 = 3


@pytest.fixture(scope="module")
def real_layout(tmp_path_factory):
    """378 px / 14 → 27 x 27 patches; 8 blocks, enough for ToMe to reach 20 tokens per frame."""
    from tests.tiny_models import real_layout_model

    return real_layout_model(str(tmp_path_factory.mktemp("tiny378x8")), seed=2, vision_layers=8)


@pytest.mark.parametrize("n,c,depth", [(729, 20, 26), (729, 49, 26), (729, 20, 8), (729, 20, 6), (36, 4, 4), (64, 8, 2 + 2)])
def test_schedule_is_the_smallest_constant_r(n, c, depth):
    got = tome.schedule(n, c, depth)
    assert list(got) == baselines_ref.tome_schedule(n, c, depth)
    assert n - sum(got) == c
    assert tome.schedule(729, 20, 26) == (28,) * 25 + (9,)  # 0.5B / 7B at r = 0.10


@pytest.mark.parametrize("n,c,depth", [(729, 20, 5), (36, 2, 4), (36, 0, 4)])
def test_schedule_rejects_what_halving_cannot_reach(n, c, depth):
    assert baselines_ref.tome_schedule(n, c, depth) is None
    with pytest.raises(ConfigError, match="ToMe"):
        tome.schedule(n, c, depth)


@pytest.mark.parametrize("ratio", [0.1, 0.25])
def test_tome_matches_reference(real_layout, ratio):
    model, cfg, params = real_layout
    method = registry.build("tome", ratio, cfg)
    pix = random_pixels(T0, cfg.vision.image_size, seed=11)
    ref = baselines_ref.tome_reference(model, torch.tensor(pix), PREFIX, SUFFIX, ratio)
    c = max(1, round(ratio * cfg.tokens_per_frame))
    assert list(method.schedule(cfg)) == ref["schedule"]
    buf, valid, info = visual_buffer(params, jnp.asarray(pix), cfg, method)
    assert buf.shape[0] == T0 * c + 1 and bool(valid.all()) and int(info["count"]) == T0 * c
    np.testing.assert_allclose(np.asarray(buf[:-1]), ref["visual"].numpy(), atol=1e-4, rtol=0)
    gen = generate(params, cfg, pix, PREFIX, SUFFIX, method, 3)
    assert gen.stats["visual_tokens"] == T0 * c + 1
    np.testing.assert_allclose(gen.first_logits, ref["first_logits"].numpy(), atol=1e-4, rtol=0)


def test_merging_changes_the_tokens(real_layout):
    """The reference's merged tokens are not a subset of unmerged patches: sizes > 1 exist and
    the kept patches are not the first c (a test that would pass with plain truncation fails)."""
    model, cfg, _ = real_layout
    pix = random_pixels(1, cfg.vision.image_size, seed=12)
    ref = baselines_ref.tome_reference(model, torch.tensor(pix), PREFIX, SUFFIX, 0.1)
    assert ref["patches"][0] != list(range(20))


def test_tome_compiles_once(real_layout):
    _, cfg, params = real_layout
    method = registry.build("tome", 0.1, cfg)
    pre, suf = jnp.asarray(PREFIX, jnp.int32), jnp.asarray(SUFFIX, jnp.int32)
    pipeline.prefill_jit(params, jnp.asarray(random_pixels(T0, cfg.vision.image_size, 7)), pre, suf, cfg, method, 1, None)
    before = pipeline.prefill_jit._cache_size()
    pipeline.prefill_jit(params, jnp.asarray(random_pixels(T0, cfg.vision.image_size, 8)), pre, suf, cfg, method, 1, None)
    assert pipeline.prefill_jit._cache_size() == before


def test_budget_is_per_frame_and_close_to_the_shared_one():
    cfg = architecture("llava-ov-0.5b")
    for ratio in (0.1, 0.25):
        m = registry.build("tome", ratio, cfg)
        for t0 in (1, 8, 32):
            assert m.capacity(t0, 196) == t0 * round(ratio * 196)
            assert abs(m.capacity(t0, 196) - registry.token_budget(t0, ratio, 196)) <= t0 / 2
    shallow = LlavaOVConfig(vision=SiglipConfig(num_layers=2, image_size=112), text=Qwen2Config(num_layers=2, vocab_size=1024),
                            video_token_id=1021, image_token_id=1020)
    with pytest.raises(ConfigError, match="ToMe merges at most half"):
        registry.build("tome", 0.1, shallow)  # 64 → 2 tokens per frame in 2 blocks
    assert registry.label(registry.build("tome", 0.5, architecture("tiny"))) == "ToMe"


def test_flops_agree_with_xla_at_real_widths():
    """2 SigLIP blocks of the real width would need 64 → 8 in 2 steps; 4 blocks: XLA's count of
    the compiled ToMe encoder and projector agree with the analytic one within 1% (2% for the
    projector, whose exact GELU XLA counts as a polynomial)."""
    from earlytom_jax import bench

    cfg = LlavaOVConfig(vision=SiglipConfig(num_layers=4, image_size=112),
                        text=Qwen2Config(num_layers=2, vocab_size=1024), video_token_id=1021, image_token_id=1020)
    method = registry.build("tome", 0.5, cfg)
    x = bench.xla_stage_flops(param_shapes(cfg), cfg, 4, 14, 25, method)
    stats = {"frames": 4, "visual_tokens": method.capacity(4, cfg.tokens_per_frame) + 1}
    a = flops.executed_prefill_flops(cfg, 4, 39, stats, method, conditionals="largest")
    assert abs(x["vision"] / a["vision"] - 1) < 0.01, (x["vision"], a["vision"])
    assert abs(x["tokens"] / a["tokens"] - 1) < 0.02, (x["tokens"], a["tokens"])
    assert abs(x["total"] / a["total"] - 1) < 0.01
    f = flops.prefill_flops(cfg, 4, 39, stats, method)
    assert f.vision == a["vision"] and f.tokens == a["tokens"]
    full = flops.prefill_flops(cfg, 4, 39, {"frames": 4, "visual_tokens": 4 * cfg.tokens_per_frame + 1}, pipeline.FULL)
    assert f.vision < full.vision
