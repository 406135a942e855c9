"""The original SigLIP's post-LayerNorm and attention-pooling head (models/siglip_head.py,
checkpoint/siglip_head.py: FastVID's official signals) against transformers' own
(`SiglipVisionModel`'s `post_layernorm` and `SiglipMultiheadAttentionPoolingHead`, tiny random,
fp32): pooled output and the probe's attention; loading from a saved directory, the ways it
refuses one (one ConfigError line each), and `VideoLLM.load(..., siglip_head=DIR)`."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from earlytom_jax.checkpoint.siglip_head import carries_head, load_siglip_head, model_head, random_head
from earlytom_jax.config import SiglipConfig
from earlytom_jax.errors import ConfigError
from earlytom_jax.models import siglip_head
from tests.tiny_models import build_tiny_model, save_tiny_checkpoint, tiny_siglip

N_FRAMES, N = 3, 729  # the real 27 x 27 patch grid


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(LLaVA-OV tiny model, its saved directory, the SigLIP beside it, that one's directory)."""
    model = build_tiny_model(seed=2, vision_layers=1, text_layers=1)
    llava_dir = save_tiny_checkpoint(model, str(tmp_path_factory.mktemp("llava")))
    sig, sig_dir = tiny_siglip(model.config.vision_config, str(tmp_path_factory.mktemp("siglip")))
    return model, llava_dir, sig, sig_dir


def _vcfg(sig) -> SiglipConfig:
    c = sig.config
    return SiglipConfig(hidden_size=c.hidden_size, intermediate_size=c.intermediate_size, num_layers=1,
                        num_heads=c.num_attention_heads, image_size=c.image_size, patch_size=c.patch_size,
                        layer_norm_eps=c.layer_norm_eps)


def test_head_matches_transformers(tiny):
    """Pooled output and the probe's attention (mean over heads) within 1e-5 of transformers'."""
    _, _, sig, sig_dir = tiny
    x = torch.randn(N_FRAMES, N, sig.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        xn = sig.post_layernorm(x)
        pooled = sig.head(xn)
        probe = sig.head.probe.repeat(N_FRAMES, 1, 1)
        _, weights = sig.head.attention(probe, xn, xn)  # [T, 1, N], averaged over heads
    head = siglip_head.bind(_vcfg(sig), load_siglip_head(sig_dir, _vcfg(sig)))
    ours, attn = head(jnp.asarray(x.numpy()))
    assert ours.shape == (N_FRAMES, sig.config.hidden_size) and attn.shape == (N_FRAMES, N)
    np.testing.assert_allclose(np.asarray(ours), pooled.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(attn), weights[:, 0].numpy(), rtol=0, atol=1e-5)
    assert float(weights.max()) > 5.0 / N  # the probe's attention is not near uniform


def test_loads_from_model_and_siglip_dirs(tiny):
    """A SigLIP directory gives the head; the LLaVA checkpoint itself does not carry one
    (vision_use_head=False), so with no --siglip-head there is none; a named architecture's
    random weights get a random head."""
    _, llava_dir, sig, sig_dir = tiny
    vcfg = _vcfg(sig)
    assert carries_head(sig_dir) and not carries_head(llava_dir)
    head = load_siglip_head(sig_dir, vcfg)
    np.testing.assert_array_equal(np.asarray(head["probe"]), sig.head.probe.detach().numpy().reshape(-1))
    np.testing.assert_array_equal(np.asarray(head["qkv_w"][:, 1]).reshape(vcfg.hidden_size, -1),
                                  sig.head.attention.in_proj_weight.detach().numpy()[vcfg.hidden_size:2 * vcfg.hidden_size].T)
    rand = random_head(vcfg)
    assert {k: v.shape for k, v in rand.items()} == {k: v.shape for k, v in head.items()}

    from earlytom_jax.api import VideoLLM

    llm = VideoLLM.load(llava_dir, siglip_head=sig_dir)
    np.testing.assert_array_equal(np.asarray(llm.params["siglip_head"]["fc2_w"]), np.asarray(head["fc2_w"]))
    assert model_head(llm.cfg, llava_dir, None) is None  # no --siglip-head, none in the checkpoint
    assert model_head(llm.cfg, None, None) is not None  # bench --arch: a random head


def _one_line_error(fn, match):
    with pytest.raises(ConfigError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)


def test_refuses_what_is_not_the_head(tiny, tmp_path):
    """Missing directory, no safetensors, a SigLIP saved without its head, another tower size:
    one ConfigError line each."""
    model, llava_dir, sig, sig_dir = tiny
    vcfg = _vcfg(sig)
    _one_line_error(lambda: load_siglip_head(str(tmp_path / "nowhere"), vcfg), "no such directory")
    os.makedirs(tmp_path / "empty")
    _one_line_error(lambda: load_siglip_head(str(tmp_path / "empty"), vcfg), "no model.safetensors")
    _, headless = tiny_siglip(model.config.vision_config, str(tmp_path / "headless"), use_head=False)
    _one_line_error(lambda: load_siglip_head(headless, vcfg), r"missing 11: vision\.head\.")
    _one_line_error(lambda: load_siglip_head(llava_dir, vcfg), r"missing 11: vision\.head\.")  # post-LN only
    other = tmp_path / "other"
    os.makedirs(other)
    for f in os.listdir(sig_dir):
        os.symlink(os.path.join(sig_dir, f), other / f)
    os.remove(other / "config.json")
    _one_line_error(lambda: load_siglip_head(str(other), SiglipConfig(hidden_size=48, intermediate_size=72,
                                                                      num_heads=4)), "mis-shaped")
    cfg = json.load(open(os.path.join(sig_dir, "config.json")))
    with open(other / "config.json", "w") as f:
        json.dump({**cfg, "num_attention_heads": 2}, f)
    _one_line_error(lambda: load_siglip_head(str(other), vcfg), "num_attention_heads 2 != 4")
