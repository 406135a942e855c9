"""SigLIP blocks against transformers, block by block."""

from __future__ import annotations

import jax
import numpy as np
import torch

from earlytom_jax.checkpoint.load import load_hf
from earlytom_jax.models import siglip
from tests.helpers import random_pixels


def test_every_block_hidden_state(tiny_dir):
    model, d = tiny_dir
    cfg, params = load_hf(d)
    pix = random_pixels(3, 56, seed=5)
    with torch.no_grad():
        hs = model.model.vision_tower(torch.tensor(pix), output_hidden_states=True).hidden_states
    x = siglip.embed(params["vision"], pix, cfg.vision)
    np.testing.assert_allclose(np.asarray(x), hs[0].numpy(), atol=1e-5, rtol=0)
    for i in range(cfg.vision.num_layers):
        x = siglip.run_blocks(params["vision"]["blocks"], x, i, i + 1, cfg.vision)
        np.testing.assert_allclose(np.asarray(x), hs[i + 1].numpy(), atol=1e-5, rtol=0)


def test_block_attention_colmean_matches_eager(tiny_dir):
    model, d = tiny_dir
    cfg, params = load_hf(d)
    pix = random_pixels(2, 56, seed=6)
    model.config.vision_config._attn_implementation = "eager"
    with torch.no_grad():
        out = model.model.vision_tower(torch.tensor(pix), output_attentions=True, output_hidden_states=True)
    x = siglip.embed(params["vision"], pix, cfg.vision)
    x = siglip.run_blocks(params["vision"]["blocks"], x, 0, 2, cfg.vision)
    x, colmean = siglip.run_block_with_attention(params["vision"]["blocks"], x, 2, cfg.vision)
    ref = out.attentions[2].mean(dim=(1, 2)).numpy()
    np.testing.assert_allclose(np.asarray(colmean), ref, atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(x), out.hidden_states[3].numpy(), atol=1e-5, rtol=0)
