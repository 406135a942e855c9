"""Layer stacks held on CPU in bf16 (the encoder's as uint16 bits, the LLM's per layer with its
MLP matrices transposed) read back bit for bit, answer as plain bf16, and keep XLA:CPU from
converting whole stacks, or any layer's weights, to f32."""

from __future__ import annotations

import dataclasses
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from earlytom_jax import pipeline
from earlytom_jax.architectures import architecture, random_params
from earlytom_jax.compression.earlytom import EarlyTom
from earlytom_jax.generate import generate
from earlytom_jax.models import llava_onevision as lov
from earlytom_jax.models import stack
from tests.helpers import random_pixels


def _bf16_params(cfg):
    return random_params(cfg, dtype=jnp.bfloat16, seed=4)


def _untied(cfg):
    return dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, tie_word_embeddings=False))


@pytest.mark.parametrize("tied", [True, False])
def test_pack_round_trip_is_bit_exact(tied):
    cfg = architecture("tiny") if tied else _untied(architecture("tiny"))
    plain = _bf16_params(cfg)
    packed = stack.pack(_bf16_params(cfg), backend="cpu")
    layers = packed["text"]["layers"]
    assert all(isinstance(a, stack.Layers) and len(a) == cfg.text.num_layers for a in layers.values())
    gate = plain["text"]["layers"]["gate_w"]  # [n, C, M], held per layer as OutIn [M, C]
    assert isinstance(layers["gate_w"][1], stack.OutIn) and layers["gate_w"][1].t.shape == gate.shape[:0:-1]
    np.testing.assert_array_equal(np.asarray(layers["gate_w"][1].t), np.asarray(gate[1]).T)
    assert layers["q_w"][0].dtype == jnp.bfloat16 and layers["q_w"][0].shape == plain["text"]["layers"]["q_w"].shape[1:]
    assert packed["vision"]["blocks"]["fc1_w"].dtype == jnp.uint16
    # the embedding as bits only when no tied head reads it (then it is only gathered from)
    assert packed["text"]["embed"].dtype == (jnp.bfloat16 if tied else jnp.uint16)
    back = stack.unpack(packed)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), back, plain)
    assert jax.tree.map(lambda a: a.dtype, back) == jax.tree.map(lambda a: a.dtype, plain)
    f32 = random_params(cfg, seed=4)
    assert stack.pack(f32, backend="cpu") is f32 or jax.tree.all(
        jax.tree.map(lambda a, b: a is b, stack.pack(f32, backend="cpu"), f32))
    gpu = _bf16_params(cfg)
    assert stack.pack(gpu, backend="gpu") is gpu


def test_per_layer_runs_as_the_stacked_scan():
    """The unrolled loop over a stack held per layer gives the scan's hidden states and caches
    (fp32, so only the order of XLA's fusions can differ)."""
    cfg = architecture("tiny")
    params = random_params(cfg, seed=5)
    layers = params["text"]["layers"]
    per = stack._held_per_layer(jax.tree.map(jnp.copy, layers))
    assert stack.per_layer(per) and not stack.per_layer(layers)
    text = lov.bind(cfg, params).text
    text_per = lov.bind(cfg, dict(params, text=dict(params["text"], layers=per))).text
    h = jax.random.normal(jax.random.PRNGKey(0), (1, 9, cfg.text.hidden_size))
    pos, valid = jnp.arange(9)[None], jnp.arange(9)[None] < 8
    for start, stop in ((0, cfg.text.num_layers), (1, 3), (2, 2)):
        want = text.run_layers(h, pos, valid, start, stop)
        got = text_per.run_layers(h, pos, valid, start, stop)
        for a, b in zip(got, want):
            assert a.shape == b.shape
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


def _kl(p_logits, q_logits):
    p, q = (jax.nn.log_softmax(jnp.asarray(x, jnp.float32)) for x in (p_logits, q_logits))
    return float(jnp.sum(jnp.exp(p) * (p - q)))


@pytest.mark.parametrize("tied", [True, False])
def test_packed_answers_as_plain_bf16(tied):
    """Same greedy tokens; first-token logits within bf16 rounding (the unrolled LLM loop
    rounds a few activations to bf16 at other points than the scan: one ulp here and there)."""
    cfg = architecture("tiny") if tied else _untied(architecture("tiny"))
    pix = jnp.asarray(random_pixels(4, cfg.vision.image_size, seed=2), jnp.bfloat16)
    method = EarlyTom(ratio=0.5, layers=(1, 2), llm_layer=2)
    for m in (pipeline.FULL, method):
        ref = generate(_bf16_params(cfg), cfg, pix, [1, 2, 3], [4, 5, 6], m, 4)
        got = generate(stack.pack(_bf16_params(cfg), backend="cpu"), cfg, pix, [1, 2, 3], [4, 5, 6], m, 4)
        assert got.tokens == ref.tokens
        assert _kl(ref.first_logits, got.first_logits) < 1e-5
        np.testing.assert_allclose(np.asarray(got.first_logits), np.asarray(ref.first_logits), atol=2e-2)


def _f32_stacks(hlo: str, params) -> list[str]:
    """HLO lines making an f32 array shaped like a whole layer stack. (One layer's matrices may
    be converted at the tiny widths: XLA:CPU gives only larger bf16 products to YNNPACK.)"""
    shapes = {",".join(map(str, a.shape)) for part in ("vision", "text") for name in stack.STACKS
              for a in params[part].get(name, {}).values() if a.ndim > 1}
    return [l.strip()[:100] for l in hlo.splitlines() if (m := re.search(r"= f32\[([\d,]+)\]", l)) and m.group(1) in shapes]


def test_packed_stacks_are_not_converted_whole():
    """The compiled prefill of plain bf16 stacks holds f32 arrays of whole stacks (the failure
    this guards against); the packed one holds none."""
    cfg = architecture("tiny")
    pix = jnp.zeros((4, 3, cfg.vision.image_size, cfg.vision.image_size), jnp.bfloat16)
    ids = jnp.arange(3, dtype=jnp.int32)

    def hlo(params):
        return pipeline.prefill_jit.lower(params, pix, ids, ids, cfg, pipeline.FULL, 4).compile().as_text()

    plain = _bf16_params(cfg)
    assert _f32_stacks(hlo(plain), plain) != []
    packed = stack.pack(_bf16_params(cfg), backend="cpu")
    assert _f32_stacks(hlo(packed), plain) == []


def test_map_frames_upto_runs_only_the_frames_left():
    """fn on the first n frames (bf16 through the loop), zeros after; steps from n on never
    call fn."""
    calls = []

    def fn(x):
        jax.debug.callback(lambda: calls.append(1))
        return x * 2, x.astype(jnp.float32).sum(-1)

    x = jnp.arange(5 * 3, dtype=jnp.bfloat16).reshape(5, 3)
    y, s = jax.jit(stack.map_frames_upto, static_argnums=0)(fn, x, jnp.int32(3))
    jax.effects_barrier()
    assert y.dtype == jnp.bfloat16 and s.dtype == jnp.float32 and len(calls) == 3
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.where(np.arange(5)[:, None] < 3, 2 * np.asarray(x, np.float32), 0))
    np.testing.assert_array_equal(np.asarray(s), np.where(np.arange(5) < 3, np.asarray(x, np.float32).sum(-1), 0))


@pytest.mark.parametrize("arch, repeat", [("tiny", [0, 0, 0, 1, 1, 2, 2, 2]),
                                          ("qwen-tiny", [0, 1, 0, 1, 0, 1, 2, 3, 2, 3, 4, 5, 4, 5, 6, 7])])
def test_merged_frames_run_one_at_a_time_as_the_buckets_do(arch, repeat):
    """bf16 on CPU, the blocks after a frame merge run on exactly the frames left (a loop)
    instead of the smallest frame bucket holding them (`lax.switch`): the same frames, the same
    features bit for bit (each frame's blocks run alone either way), zeros after them. The
    counts reached (5 of 8 frames, 7 of 8 temporal patches) are not buckets (2, 4, 6, 8)."""
    cfg = architecture(arch)
    params = stack.pack(_bf16_params(cfg), backend="cpu")
    if arch == "tiny":
        pix = random_pixels(8, cfg.vision.image_size, seed=2)
    else:
        pix = np.random.default_rng(0).standard_normal((16, 3, 56, 84)).astype(np.float32)
    pix = jnp.asarray(pix[np.array(repeat)], jnp.bfloat16)
    method = EarlyTom(ratio=0.5, tau=0.0, layers=(1, 2), llm_layer=2)

    def encode(p, x):
        feats, n, state = pipeline.encode_video(p, x, cfg, method)
        return feats, n, state["frames_after_layer"]

    loop = jax.jit(encode)(params, pix)
    with pytest.MonkeyPatch.context() as mp:  # the pipeline's choice only: the blocks still run frame by frame
        mp.setattr(pipeline, "stack", types.SimpleNamespace(frame_by_frame=lambda x: False))
        switch = jax.jit(encode)(params, pix)
    n = int(loop[1])
    assert n < len(repeat) // (2 if arch == "qwen-tiny" else 1)
    assert n == int(switch[1]) and np.asarray(loop[2]).tolist() == np.asarray(switch[2]).tolist()
    assert n not in method.frame_buckets(loop[0].shape[0])
    a, b = np.asarray(loop[0], np.float32), np.asarray(switch[0], np.float32)
    np.testing.assert_array_equal(a[:n], b[:n])
    assert not a[n:].any()
