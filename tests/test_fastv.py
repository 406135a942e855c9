"""FastV (baseline) against the PyTorch reference pipeline with its in-LLM step replaced by
FastV's drop-only rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from earlytom_jax.checkpoint.load import load_hf
from earlytom_jax.compression.fastv import FastV
from earlytom_jax.errors import ConfigError
from earlytom_jax.generate import generate
from tests.helpers import random_pixels
from tests.references import earlytom_ref


@pytest.mark.parametrize("layer,drop,frames", [(1, 0.5, 3), (2, 0.75, 5), (3, 0.3, 2)])
def test_matches_reference(tiny_dir, monkeypatch, layer, drop, frames):
    model, d = tiny_dir
    cfg, params = load_hf(d)
    pix = random_pixels(frames, cfg.vision.image_size, seed=layer)
    monkeypatch.setattr(earlytom_ref, "stage3_merge", earlytom_ref.fastv_drop)
    ref = earlytom_ref.earlytom_reference(
        model, torch.tensor(pix), [1, 2, 3], [4, 5, 6, 7], max_new_tokens=6,
        method_cfg=dict(layers=[], llm_layer=layer, llm_ratio=drop, llm_noncausal=False),
    )
    gen = generate(params, cfg, pix, [1, 2, 3], [4, 5, 6, 7], FastV(layer, drop).check(cfg), 6)
    assert gen.stats["llm_kept"] == ref["stats"]["visual_tokens_after_llm"] < gen.stats["visual_tokens"]
    assert [i for i, k in enumerate(gen.stats["llm_keep_mask"]) if k] == list(ref["stats"]["keep_llm"])
    np.testing.assert_allclose(gen.first_logits, ref["first_logits"].numpy(), atol=1e-4, rtol=0)
    assert gen.tokens == ref["tokens"]


def test_bad_settings(tiny_dir):
    _, d = tiny_dir
    cfg, _ = load_hf(d)
    with pytest.raises(ConfigError, match="drop ratio"):
        FastV(2, 1.0)
    with pytest.raises(ConfigError, match="FastV layer 4"):
        FastV(4, 0.5).check(cfg)
