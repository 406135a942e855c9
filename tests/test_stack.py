"""Layer stacks: bf16 stacks held as uint16 bits on CPU read back bit for bit, answer exactly as
plain bf16, and keep XLA:CPU from converting whole stacks to f32 before the layer loop."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from earlytom_jax import pipeline
from earlytom_jax.architectures import architecture, random_params
from earlytom_jax.compression.earlytom import EarlyTom
from earlytom_jax.generate import generate
from earlytom_jax.models import stack
from tests.helpers import random_pixels


def _bf16_params(cfg):
    return random_params(cfg, dtype=jnp.bfloat16, seed=4)


def test_pack_round_trip_is_bit_exact():
    cfg = architecture("tiny")
    plain = _bf16_params(cfg)
    packed = stack.pack(_bf16_params(cfg), backend="cpu")
    assert packed["text"]["layers"]["q_w"].dtype == jnp.uint16
    assert packed["vision"]["blocks"]["fc1_w"].dtype == jnp.uint16
    assert packed["text"]["embed"].dtype == jnp.bfloat16  # only the stacks
    back = stack.unpack(packed)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), back, plain)
    assert jax.tree.map(lambda a: a.dtype, back) == jax.tree.map(lambda a: a.dtype, plain)
    f32 = random_params(cfg, seed=4)
    assert stack.pack(f32, backend="cpu") is f32 or jax.tree.all(
        jax.tree.map(lambda a, b: a is b, stack.pack(f32, backend="cpu"), f32))
    gpu = _bf16_params(cfg)
    assert stack.pack(gpu, backend="gpu") is gpu


def test_packed_answers_exactly_as_plain_bf16():
    cfg = architecture("tiny")
    pix = jnp.asarray(random_pixels(4, cfg.vision.image_size, seed=2), jnp.bfloat16)
    method = EarlyTom(ratio=0.5, layers=(1, 2), llm_layer=2)
    for m in (pipeline.FULL, method):
        ref = generate(_bf16_params(cfg), cfg, pix, [1, 2, 3], [4, 5, 6], m, 4)
        got = generate(stack.pack(_bf16_params(cfg), backend="cpu"), cfg, pix, [1, 2, 3], [4, 5, 6], m, 4)
        np.testing.assert_array_equal(np.asarray(got.first_logits), np.asarray(ref.first_logits))
        assert got.tokens == ref.tokens


def _f32_stacks(hlo: str, params) -> list[str]:
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
