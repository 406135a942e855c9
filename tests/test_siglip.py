"""SigLIP blocks against transformers, block by block."""

from __future__ import annotations

import re

import jax
import numpy as np
import torch

from earlytom_jax.checkpoint.load import load_hf
from earlytom_jax.compression.earlytom import EarlyTom
from earlytom_jax.models import llava_onevision as lov
from earlytom_jax.models import params as params_lib
from earlytom_jax.models import siglip, stack
from tests.helpers import load_benchmark, random_pixels


def test_every_block_hidden_state(tiny_dir):
    model, d = tiny_dir
    cfg, params = load_hf(d)
    pix = random_pixels(3, 56, seed=5)
    with torch.no_grad():
        hs = model.model.vision_tower(torch.tensor(pix), output_hidden_states=True).hidden_states
    vision = lov.bind(cfg, params).vision
    x = vision.embed(pix)
    np.testing.assert_allclose(np.asarray(x), hs[0].numpy(), atol=1e-5, rtol=0)
    for i in range(cfg.vision.num_layers):
        x = vision.run_blocks(x, i, i + 1)
        np.testing.assert_allclose(np.asarray(x), hs[i + 1].numpy(), atol=1e-5, rtol=0)


def test_block_attention_colmean_matches_eager(tiny_dir):
    model, d = tiny_dir
    cfg, params = load_hf(d)
    pix = random_pixels(2, 56, seed=6)
    model.config.vision_config._attn_implementation = "eager"
    with torch.no_grad():
        out = model.model.vision_tower(torch.tensor(pix), output_attentions=True, output_hidden_states=True)
    vision = lov.bind(cfg, params).vision
    x = vision.run_blocks(vision.embed(pix), 0, 2)
    x, colmean = vision.block_with_attention(x, 2)
    ref = out.attentions[2].mean(dim=(1, 2)).numpy()
    np.testing.assert_allclose(np.asarray(colmean), ref, atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(x), out.hidden_states[3].numpy(), atol=1e-5, rtol=0)


def test_bf16_block_runs_frame_by_frame_on_cpu_with_the_same_result(tiny_dir):
    """bf16 on CPU: one frame at a time (a loop of B steps), equal bit for bit to the whole
    batch at these sizes, for the plain block and the hooks' variants (attention received,
    keys); fp32 keeps the batch."""
    import jax.numpy as jnp

    _, d = tiny_dir
    cfg, params = load_hf(d, dtype="bfloat16")
    x = lov.bind(cfg, params).vision.embed(jnp.asarray(random_pixels(3, 56, seed=7), jnp.bfloat16))
    p = jax.tree.map(lambda a: a[1], params["vision"]["blocks"])

    def block(p):
        return params_lib.bind(siglip.SiglipBlock, cfg.vision, p)

    for kw in ({}, {"with_attention": True}, {"with_attention": True, "with_keys": True}):
        got = jax.jit(lambda p, x: block(p)(x, **kw))(p, x)
        want = jax.jit(lambda p, x: block(p).batched(x, **kw))(p, x)
        assert len(got) == len(want) == 2 + kw.get("with_keys", False)
        for g, w in zip(got, want):
            if w is None:
                assert g is None
            else:
                assert g.shape == w.shape and g.dtype == w.dtype
                np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))
    loops = [e for e in jax.make_jaxpr(lambda p, x: block(p)(x))(p, x).jaxpr.eqns
             if e.primitive.name == "scan"]
    assert [e.params["length"] for e in loops] == [3]
    f32 = jax.make_jaxpr(lambda p, x: block(p)(x))(
        jax.tree.map(lambda a: a.astype(jnp.float32), p), x.astype(jnp.float32))
    assert not [e for e in f32.jaxpr.eqns if e.primitive.name == "scan"]


def test_encoder_frames_benchmark_prints_both_forms(capsys):
    assert load_benchmark("encoder_frames").main(["--frames", "2", "--layers", "1", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    # The two forms agree up to bf16 rounding: bit for bit where the CPU's dot kernels split the
    # sums alike (AVX512 hosts at 2 frames), within a few ulps of the largest value elsewhere.
    diff, peak = (float(v) for v in re.search(
        r"2 frames: max abs diff ([0-9.e+-]+), of max abs ([0-9.e+-]+);", out).groups())
    assert 0 < peak and diff <= 4 * 2.0**-8 * peak, out
    row = [line for line in out.splitlines() if line.startswith("| 2 |")]
    assert len(row) == 1 and len(row[0].split("|")) == 6, out


def test_bf16_earlytom_and_visionzip_prefill_frame_by_frame_as_batched(tiny_dir, monkeypatch):
    """The whole bf16 prefill with the frame loop (EarlyTom: attention received through the
    loop, merged frames one at a time; VisionZip: keys) gives the batched form's tokens, kept
    indices and logits bit for bit at the tiny sizes."""
    import jax.numpy as jnp

    from earlytom_jax.compression import registry
    from earlytom_jax.generate import generate

    _, d = tiny_dir
    cfg, params = load_hf(d, dtype="bfloat16")
    pix = jnp.asarray(random_pixels(6, cfg.vision.image_size, seed=8), jnp.bfloat16)
    methods = [EarlyTom(ratio=0.3, layers=(1, 2), llm_layer=2), registry.build("visionzip", 0.3, cfg)]
    seen, by_frame = [], stack.frame_by_frame
    monkeypatch.setattr(stack, "frame_by_frame", lambda x: seen.append((x.shape[0], by_frame(x))) or seen[-1][1])
    jax.clear_caches()  # traced afresh, so that every block asks
    loop = [generate(params, cfg, pix, [1, 2, 3], [4, 5, 6], m, 4) for m in methods]
    # every batch of several frames runs one at a time (a single frame, inside the loop, as it is)
    assert seen and all(looped for frames, looped in seen if frames > 1) and any(frames > 1 for frames, _ in seen)
    monkeypatch.setattr(stack, "frame_by_frame", lambda x: False)
    jax.clear_caches()
    batched = [generate(params, cfg, pix, [1, 2, 3], [4, 5, 6], m, 4) for m in methods]
    for a, b in zip(loop, batched):
        assert a.tokens == b.tokens
        assert a.stats.keys() == b.stats.keys() and "kept_index" in a.stats
        for k in a.stats:
            np.testing.assert_array_equal(np.asarray(a.stats[k]), np.asarray(b.stats[k]), err_msg=k)
        np.testing.assert_array_equal(np.asarray(a.first_logits), np.asarray(b.first_logits))
    jax.clear_caches()
