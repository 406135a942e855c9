"""EarlyTom end to end (all three stages, under jit with static shapes) against the PyTorch
reference written from the spec with dynamic shapes (tests/references/earlytom_ref.py)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from earlytom_jax import pipeline
from earlytom_jax.checkpoint.load import load_hf
from earlytom_jax.compression.earlytom import EarlyTom
from earlytom_jax.errors import ConfigError
from earlytom_jax.generate import generate
from tests.helpers import kept_per_frame, segments
from tests.references.earlytom_ref import earlytom_reference
from tests.tiny_models import random_video

PREFIX, SUFFIX = [1, 2, 3, 4], [5, 6, 7, 8, 9]
N_NEW = 8


def _pixels(frames):
    return ((frames.astype(np.float32) / 255.0 - 0.5) / 0.5).transpose(0, 3, 1, 2).copy()


def _video(kind: str, t0: int, size: int, seed: int):
    if kind == "drift":
        return random_video(t0, size, size, seed=seed)
    if kind == "same":  # all frames identical
        return np.repeat(random_video(1, size, size, seed=seed), t0, axis=0)
    if kind == "noise":  # all frames different
        return np.random.default_rng(seed).integers(0, 256, (t0, size, size, 3), dtype=np.uint8)
    if kind == "scenes":  # runs of near-identical frames: merges happen
        base = np.random.default_rng(seed).integers(0, 256, (3, size, size, 3)).astype(np.float32)
        rng = np.random.default_rng(seed + 1)
        out = [base[min(2, (3 * t) // t0)] + rng.normal(0, 6, base[0].shape) for t in range(t0)]
        return np.clip(np.stack(out), 0, 255).astype(np.uint8)
    raise ValueError(kind)


CASES = [
    # kind, T0, method settings
    ("scenes", 12, dict(ratio=0.25, tau=0.6, layers=(1, 2, 3), llm_layer=2)),
    ("scenes", 9, dict(ratio=0.1, tau=0.8, layers=(0, 3), llm_layer=None)),  # first and last block
    ("drift", 16, dict(ratio=0.15, tau=0.3, layers=(2,), llm_layer=1)),  # one compression layer
    ("same", 10, dict(ratio=0.2, tau=0.5, layers=(1, 2), llm_layer=3)),  # all frames identical
    ("noise", 7, dict(ratio=0.25, tau=0.95, layers=(1, 3), llm_layer=2)),  # all frames different
    ("scenes", 12, dict(ratio=0.9, tau=0.6, layers=(0, 1, 2), llm_layer=2)),  # r' clips at 1
    ("drift", 1, dict(ratio=0.25, tau=0.6, layers=(1, 2), llm_layer=2)),  # T0 = 1
    ("drift", 2, dict(ratio=0.5, tau=0.6, layers=(1, 2), llm_layer=2)),  # T0 = 2
    ("scenes", 12, dict(ratio=0.25, tau=0.6, layers=(1, 2), llm_layer=2, llm_noncausal=True)),
    ("scenes", 12, dict(ratio=0.25, tau=0.6, layers=(1, 2), llm_layer=2, quirks=False)),
]


def _ref_cfg(m: EarlyTom) -> dict:
    return dict(tau=m.tau, alpha=m.alpha, max_window=m.max_window, layers=list(m.layers), r=m.ratio,
                quirks=m.quirks, llm_layer=m.llm_layer, llm_ratio=m.llm_ratio, llm_noncausal=m.llm_noncausal)


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    model, d = tiny_dir
    cfg, params = load_hf(d)
    return model, cfg, params


@pytest.mark.parametrize("kind,t0,settings", CASES, ids=[f"{c[0]}-T{c[1]}-{i}" for i, c in enumerate(CASES)])
def test_matches_reference(loaded, kind, t0, settings):
    model, cfg, params = loaded
    method = EarlyTom(buckets=2, **settings).check(cfg)
    pix = _pixels(_video(kind, t0, cfg.vision.image_size, seed=t0))
    ref = earlytom_reference(model, torch.tensor(pix), PREFIX, SUFFIX, method_cfg=_ref_cfg(method), max_new_tokens=N_NEW)
    gen = generate(params, cfg, pix, PREFIX, SUFFIX, method, N_NEW, eos_ids=())
    s, rs = gen.stats, ref["stats"]
    n = s["frames"]
    assert s["frames_after_layer"] == rs["frames_after_layer"]
    assert segments(s["segment_starts"], n) == [tuple(x) for x in rs["segments"]]
    assert s["dynamic"][:n] == list(rs["dynamic"])
    assert kept_per_frame(s["kept_index"], n, cfg.tokens_per_frame) == [sorted(k) for k in rs["kept"]]
    assert s["visual_tokens"] == rs["visual_tokens"]
    if method.llm_layer is not None:
        assert s["llm_kept"] == rs["visual_tokens_after_llm"]
        assert [i for i, k in enumerate(s["llm_keep_mask"]) if k] == list(rs["keep_llm"])
    np.testing.assert_allclose(gen.first_logits, ref["first_logits"].numpy(), atol=1e-4, rtol=0)
    assert gen.tokens == ref["tokens"]


def test_merges_really_happen(loaded):
    """Guard against a vacuous suite: the scene videos above do merge frames and tokens."""
    _, cfg, params = loaded
    pix = _pixels(_video("scenes", 12, cfg.vision.image_size, seed=12))
    gen = generate(params, cfg, pix, PREFIX, SUFFIX, EarlyTom(ratio=0.25, tau=0.6, layers=(1, 2, 3), llm_layer=2, buckets=2), 2)
    assert gen.stats["frames"] < 12
    assert gen.stats["llm_kept"] < gen.stats["visual_tokens"]


def test_compiles_once_per_frame_count_and_settings(loaded):
    """Different videos with the same T0 and settings reuse one compiled program, whatever T′
    they reach (the frame buckets are all inside it)."""
    _, cfg, params = loaded
    method = EarlyTom(ratio=0.25, tau=0.6, layers=(1, 2), llm_layer=2, buckets=3).check(cfg)
    pre, suf = jnp.asarray(PREFIX, jnp.int32), jnp.asarray(SUFFIX, jnp.int32)
    frames_seen = set()
    before = None
    for i, kind in enumerate(["scenes", "noise", "same", "drift"]):
        pix = jnp.asarray(_pixels(_video(kind, 12, cfg.vision.image_size, seed=i)))
        out = pipeline.prefill_jit(params, pix, pre, suf, cfg, method, 4)
        frames_seen.add(int(out[3]["frames"]))
        if before is None:
            before = pipeline.prefill_jit._cache_size()
    assert pipeline.prefill_jit._cache_size() == before
    assert len(frames_seen) >= 2  # the videos did reach different T′


def test_bad_settings_fail_clearly(loaded):
    _, cfg, _ = loaded
    with pytest.raises(ConfigError, match="beyond the encoder's depth"):
        EarlyTom(layers=(1, 4)).check(cfg)
    with pytest.raises(ConfigError, match="outside \\(0, 1\\]"):
        EarlyTom(ratio=0.0)
    with pytest.raises(ConfigError, match="tau"):
        EarlyTom(tau=1.5)
    with pytest.raises(ConfigError, match="llm merge layer"):
        EarlyTom(layers=(1,), llm_layer=4).check(cfg)


def test_ahead_of_time_compile_serves_every_video(loaded):
    """One AOT-compiled program handles videos that reach different T′ (no retrace)."""
    _, cfg, params = loaded
    method = EarlyTom(ratio=0.25, tau=0.6, layers=(1, 2), llm_layer=2, buckets=3).check(cfg)
    compiled = pipeline.compile_prefill(params, 12, len(PREFIX), len(SUFFIX), cfg, method, 4)
    pre, suf = jnp.asarray(PREFIX, jnp.int32), jnp.asarray(SUFFIX, jnp.int32)
    seen = {}
    for i, kind in enumerate(["scenes", "noise", "same"]):
        pix = jnp.asarray(_pixels(_video(kind, 12, cfg.vision.image_size, seed=i)))
        logits, _, _, stats = compiled(params, pix, pre, suf)
        ref_logits = pipeline.prefill_jit(params, pix, pre, suf, cfg, method, 4)[0]
        np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), atol=1e-5)
        seen[kind] = int(stats["frames"])
        assert int(stats["kept_per_frame"].sum()) == int(stats["count"])
    assert len(set(seen.values())) >= 2, seen
