"""Full-token parity of the whole video path against transformers (fp32 and bf16)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from earlytom_jax import pipeline
from earlytom_jax.checkpoint.load import load_hf
from tests.helpers import hf_generate, hf_logits, random_pixels
from tests.tiny_models import build_tiny_model, save_tiny_checkpoint

PREFIX, SUFFIX = [1, 2, 3, 4, 5], [6, 7, 8]

CASES = [
    # tie, q_heads, kv_heads, image_size (grid), frames
    dict(tie=False, q_heads=4, kv_heads=2, image_size=56, frames=3),  # GQA 2, even grid 4 → 2
    dict(tie=True, q_heads=2, kv_heads=2, image_size=70, frames=2),  # GQA 1, odd grid 5 → 3
    dict(tie=False, q_heads=7, kv_heads=1, image_size=42, frames=1),  # GQA 7, odd grid 3 → 2
    dict(tie=True, q_heads=4, kv_heads=2, image_size=56, frames=5),
]


def _ids(x):
    return jnp.asarray(x, jnp.int32)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "tie{tie}-gqa{q_heads}x{kv_heads}-img{image_size}-T{frames}".format(**c))
def test_logits_every_position_and_greedy_tokens(case, tmp_path):
    case = dict(case)
    frames = case.pop("frames")
    model = build_tiny_model(seed=frames, text_hidden=case["q_heads"] * 16, **case)
    d = save_tiny_checkpoint(model, str(tmp_path / "ckpt"))
    cfg, params = load_hf(d)
    assert cfg.text.tie_word_embeddings == case["tie"]
    _assert_full_token_parity(model, cfg, params, random_pixels(frames, case["image_size"], seed=frames), 20)


def _assert_full_token_parity(model, cfg, params, pix, n_new: int):
    """fp32: our logits at every prompt position and the prefill's last ones within 1e-4 of
    transformers', and n_new greedy tokens identical. → transformers' logits [L, V], ids."""
    ref, ids = hf_logits(model, pix, PREFIX, SUFFIX)
    ours = jax.jit(pipeline.sequence_logits, static_argnames="cfg")(params, pix, _ids(PREFIX), _ids(SUFFIX), cfg)
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=0)

    logits, caches, pos, _ = pipeline.prefill_jit(params, pix, _ids(PREFIX), _ids(SUFFIX), cfg, pipeline.FULL, n_new)
    np.testing.assert_allclose(np.asarray(logits), ref[-1], atol=1e-4, rtol=0)
    toks, _ = pipeline.decode_loop(params, logits, pos, caches, cfg, n_new, _ids([-1]))
    assert np.asarray(toks).tolist() == hf_generate(model, pix, ids, n_new)
    return ref, ids


def test_sharded_checkpoint_loads_identically(tiny_dir, tmp_path):
    model, d = tiny_dir
    sharded = save_tiny_checkpoint(model, str(tmp_path / "sharded"), max_shard_size="20KB")
    import os

    assert os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))
    _, a = load_hf(d)
    _, b = load_hf(sharded)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def _kl(p_logits, q_logits):
    p = jax.nn.log_softmax(jnp.asarray(p_logits, jnp.float32), -1)
    q = jax.nn.log_softmax(jnp.asarray(q_logits, jnp.float32), -1)
    return float(jnp.max(jnp.sum(jnp.exp(p) * (p - q), -1)))


def test_long_video_logits_every_position(tmp_path):
    """The real token layout at length: a 27 x 27 patch grid (196 tokens a frame, as SigLIP-so400m
    at 384 px) and 16 frames, 3145 positions (25 key blocks of the blockwise attention, RoPE
    angles past 3000), fp32 against transformers at every position, 8 greedy tokens, and bf16
    by KL. The other cases stop at a few dozen positions."""
    model = build_tiny_model(seed=523, image_size=378, vision_layers=2, text_layers=2)
    with torch.no_grad():  # sharp attention, so that positions matter (at the init's scale a score is ~0.1)
        for name, w in model.named_parameters():
            if "language_model" in name and name.endswith(("q_proj.weight", "k_proj.weight")):
                w.mul_(8.0)
    d = save_tiny_checkpoint(model, str(tmp_path / "ckpt"))
    cfg, params = load_hf(d)
    assert cfg.tokens_per_frame == 196
    pix = random_pixels(16, 378, seed=1277)
    ref, ids = _assert_full_token_parity(model, cfg, params, pix, 8)
    assert len(ids) == 3145

    cfg16, p16 = load_hf(d, dtype="bfloat16")
    o16 = jax.jit(pipeline.sequence_logits, static_argnames="cfg")(
        p16, jnp.asarray(pix, jnp.bfloat16), _ids(PREFIX), _ids(SUFFIX), cfg16
    )
    assert _kl(ref, o16) <= 1e-2


def test_bf16_logits_close_by_kl(tiny_dir):
    model, d = tiny_dir
    cfg, params = load_hf(d, dtype="bfloat16")
    assert params["text"]["embed"].dtype == jnp.bfloat16
    pix = random_pixels(3, 56, seed=11)
    ref, _ = hf_logits(model, pix, PREFIX, SUFFIX)
    ours = jax.jit(pipeline.sequence_logits, static_argnames="cfg")(
        params, jnp.asarray(pix, jnp.bfloat16), _ids(PREFIX), _ids(SUFFIX), cfg
    )
    kl = _kl(ref, ours)
    assert kl <= 1e-2, kl


def test_compiles_once_per_shape(tiny_dir):
    """A second video of the same frame count and prompt length compiles nothing new; decoding
    N tokens compiles the step once."""
    _, d = tiny_dir
    cfg, params = load_hf(d)
    args = (_ids(PREFIX), _ids(SUFFIX))
    out = pipeline.prefill_jit(params, random_pixels(3, 56, 1), *args, cfg, pipeline.FULL, 8)
    before = pipeline.prefill_jit._cache_size()
    out = pipeline.prefill_jit(params, random_pixels(3, 56, 2), *args, cfg, pipeline.FULL, 8)
    assert pipeline.prefill_jit._cache_size() == before
    logits, caches, pos, _ = out
    step = pipeline.decode_step_jit
    tok = jnp.argmax(logits)[None].astype(jnp.int32)
    n0 = step._cache_size()
    for i in range(6):
        logits, caches = step(params, tok, pos + i, caches, jnp.asarray(i, jnp.int32), cfg)
        tok = jnp.argmax(logits)[None].astype(jnp.int32)
    assert step._cache_size() == n0 + 1
