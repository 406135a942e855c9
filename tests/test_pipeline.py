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
