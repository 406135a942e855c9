"""Prompt padding: prompts of different lengths share one program and answer as unpadded."""

from __future__ import annotations

import numpy as np
import pytest

from earlytom_jax import pipeline
from earlytom_jax.checkpoint.load import load_hf
from earlytom_jax.compression.earlytom import EarlyTom
from earlytom_jax.generate import generate
from tests.helpers import random_pixels


@pytest.mark.parametrize("method", [pipeline.FULL, EarlyTom(ratio=0.5, layers=(1, 2), llm_layer=2)], ids=["full", "earlytom"])
def test_padded_suffix_answers_like_unpadded(tiny_dir, method):
    _, d = tiny_dir
    cfg, params = load_hf(d)
    pix = random_pixels(4, cfg.vision.image_size, seed=3)
    prefix = [1, 2, 3]
    before = pipeline.prefill_jit._cache_size()
    for suffix in ([4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15, 16, 17]):
        ref = generate(params, cfg, pix, prefix, suffix, method, 5)
        ids, valid = pipeline.pad_suffix(suffix, multiple=16)
        assert ids.shape == (16,) and int(valid.sum()) == len(suffix)
        got = generate(params, cfg, pix, prefix, ids, method, 5, suffix_valid=valid)
        np.testing.assert_allclose(got.first_logits, ref.first_logits, atol=1e-5, rtol=0)
        assert got.tokens == ref.tokens
        assert got.stats["visual_tokens"] == ref.stats["visual_tokens"]
    # two unpadded lengths + one padded length
    assert pipeline.prefill_jit._cache_size() == before + 3


def test_pad_suffix_lengths():
    ids, valid = pipeline.pad_suffix(list(range(33)), multiple=32)
    assert ids.shape == (64,) and not bool(valid[:31].any()) and bool(valid[31:].all())
    assert int(ids[-1]) == 32
    ids, valid = pipeline.pad_suffix([], multiple=8)
    assert ids.shape == (8,) and not bool(valid.any())


def _weight_copies(hlo: str, stacks: dict, rows: set[int]) -> list[str]:
    """Lines of compiled HLO that write an array shaped like a part of a weight stack."""
    import re

    shapes = {",".join(map(str, (n,) + tuple(a.shape[1:]))) for a in stacks.values() for n in rows}
    return [l.strip()[:120] for l in hlo.splitlines()
            if (m := re.search(r"= f32\[([\d,]+)\]", l)) and m.group(1) in shapes and ("slice" in l or "copy" in l)]


def test_split_cache_decode_reads_weights_in_place():
    """With the KV cache in two layer groups (FastV, EarlyTom's stage III), a decode step
    must not copy each group's weights out of the stack: decoding is memory-bound, and the
    copies once cost 40% of decode throughput at the 0.5B shape."""
    import jax
    import jax.numpy as jnp

    from earlytom_jax.architectures import architecture, random_params

    cfg = architecture("tiny")
    params = random_params(cfg)
    tc, nl = cfg.text, cfg.text.num_layers

    def group(n, length):
        k = jnp.zeros((n, 1, length, tc.num_kv_heads, tc.head_dim))
        return pipeline.CacheGroup(k, k, jnp.ones((1, length), bool), length - 8)

    caches = (group(2, 40), group(nl - 2, 30))
    ids = jnp.zeros((1,), jnp.int32)
    hlo = jax.jit(pipeline.decode_step, static_argnames=("cfg",)).lower(
        params, ids, ids, caches, jnp.int32(0), cfg).compile().as_text()
    assert _weight_copies(hlo, params["text"]["layers"], {2, nl - 2}) == []
