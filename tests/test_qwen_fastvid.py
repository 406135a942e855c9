"""FastVID on Qwen2.5-VL (its official port's variant, compression/fastvid_qwen.py): our JAX
pipeline against the PyTorch reference written from the port on transformers' own Qwen2.5-VL
(tests/references/qwen_fastvid_ref.py) on tiny random models: the ATS signal, segments,
sub-segments, per-patch budgets, kept indices, 3-D positions, first-token logits (fp32) and
greedy tokens; the budget arithmetic over many segmentations; registry, errors and FLOPs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from earlytom_jax import pipeline
from earlytom_jax.architectures import architecture
from earlytom_jax.compression import fastvid_qwen as fq
from earlytom_jax.compression import registry
from earlytom_jax.compression.fastvid import FastVID
from earlytom_jax.errors import ConfigError
from tests import tiny_qwen
from tests.references import qwen_fastvid_ref as ref_mod

PREFIX = [5, 6, 7, tiny_qwen.VSTART]
SUFFIX = [tiny_qwen.VEND, 8, 9, 10, 11]


def _clip(bases, noise, h, w, seed):
    """Temporal patches (2 equal frames each) of base image `bases[t]` plus noise `noise[t]`:
    repeated bases give near-static stretches (segments), noise spreads the similarities."""
    rng = np.random.default_rng(seed)
    imgs = [rng.normal(size=(3, h, w)).astype(np.float32) for _ in range(max(bases) + 1)]
    frames = []
    for b, nz in zip(bases, noise):
        x = imgs[b] + np.float32(nz) * rng.normal(size=(3, h, w)).astype(np.float32)
        frames += [x, x]
    return np.stack(frames)


def _ours(params, cfg, method, pix, spt, n_new):
    ids = lambda x: jnp.asarray(x, jnp.int32)  # noqa: E731
    logits, caches, nxt, stats = pipeline.prefill_jit(params, jnp.asarray(pix), ids(PREFIX), ids(SUFFIX), cfg, method,
                                                      n_new, None, jnp.float32(spt))
    toks, _ = pipeline.decode_loop(params, logits, nxt, caches, cfg, n_new, jnp.asarray([-1], jnp.int32))
    st = {k: np.asarray(v) for k, v in stats.items()}
    return np.asarray(logits), np.asarray(toks).tolist(), int(np.asarray(nxt).reshape(-1)[0]), st


def _sizes(starts):
    idx = list(np.flatnonzero(starts)) + [len(starts)]
    return [int(b - a) for a, b in zip(idx[:-1], idx[1:])]


# case: (model, clip bases, noise, h, w, seconds per temporal patch, settings)
CASES = {
    # segments [3, 2, 1] (tau), the first cut into sub-segments [2, 1] by dyseg_ignore; p = 1:
    # both sub-segments' last patches (1, 2) get context tokens and each merges the other's
    # anchors; patches 0 and 3 keep nothing (merged into the anchors)
    "segments": ("win", [0, 0, 0, 1, 1, 2], [0, 0.3, 0.6, 0, 0.2, 0], 112, 168, 1.5,
                 dict(ratio=0.5, dyseg_c=1, tau=0.92, dyseg_ignore=0.98, p=1)),
    # the port's defaults (c = 8 >= T: every boundary cut, one-patch segments), non-square
    "default": ("full", [0, 1, 2, 3], [0, 0, 0, 0], 84, 112, 0.75, dict(ratio=0.5)),
    # a static scene and a moving one: c = 2 cuts their boundary; the static segment of 4 is
    # one sub-segment whose last patch keeps S // 2 salient and S // 2 context tokens (the
    # caps); the moving one has sub-segments [1, 1], p = 2: the first gets salient tokens only
    "static": ("full", [0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0.4], 112, 112, 1.0,
               dict(ratio=0.5, dyseg_c=2, dyseg_ignore=0.99, p=2)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fastvid_qwen_matches_reference(qwen_win_full, case):
    name, bases, noise, h, w, spt, kw = CASES[case]
    model, cfg, params = qwen_win_full(name)
    pix = _clip(bases, noise, h, w, seed=len(bases) + h)
    method = registry.build("fastvid", kw["ratio"], cfg, **{k: v for k, v in kw.items() if k != "ratio"})
    assert isinstance(method, fq.FastVIDQwen)
    ref = ref_mod.qwen_fastvid_reference(model, pix, PREFIX, SUFFIX, spt, max_new_tokens=3, **kw)
    before = pipeline.prefill_jit._cache_size()
    logits, toks, nxt, st = _ours(params, cfg, method, pix, spt, 3)
    np.testing.assert_allclose(st["importance"], ref["importance"].numpy(), atol=1e-6, rtol=1e-4)
    assert _sizes(st["segment_starts"]) == ref["segments"]
    assert st["sub_segment_starts"].tolist() == ref["sub_starts"]
    assert st["salient_per_frame"].tolist() == ref["salient_per_frame"]
    assert st["context_per_frame"].tolist() == ref["context_per_frame"]
    kept = st["kept_index"][st["kept_index"] >= 0].tolist()
    assert kept == ref["keep"] and int(st["count"]) == int(st["visual_tokens"]) == ref["visual_tokens"]
    assert [tuple(p) for p in st["visual_positions"][: len(kept)].tolist()] == ref["positions"]
    np.testing.assert_allclose(logits, ref["logits"].numpy(), atol=1e-4, rtol=0)
    assert int(np.argmax(logits)) == ref["first_token"]
    assert nxt == ref["next_position"]
    assert toks == ref["tokens"]
    T, S = len(bases), (h // 28) * (w // 28)
    assert len(kept) <= method.capacity(T, S) == T * int(S * kw["ratio"])
    if case == "segments":
        assert ref["segments"] == [3, 2, 1] and ref["sub_starts"] == [True, False, True, True, False, True]
        assert ref["context_per_frame"][1] > 0 and ref["context_per_frame"][2] > 0
        assert [ref["salient_per_frame"][t] + ref["context_per_frame"][t] for t in (0, 3)] == [0, 0]
        # a second clip of the same shape, other segments: the same compiled program
        pix2 = _clip([0, 1, 2, 3, 3, 3], [0, 0, 0, 0, 0.2, 0.4], h, w, seed=5)
        _ours(params, cfg, method, pix2, spt, 3)
        assert pipeline.prefill_jit._cache_size() == before + 1
    if case == "static":
        assert ref["segments"] == [4, 2] and ref["sub_starts"] == [True, False, False, False, True, True]
        assert ref["context_per_frame"][3] == S // 2 == ref["salient_per_frame"][3]
        assert ref["salient_per_frame"][:3] == [0, 0, 0] and ref["context_per_frame"][4] == 0
        assert ref["salient_per_frame"][4] > 0 and ref["context_per_frame"][5] > 0
    if case == "default":
        assert ref["segments"] == [1] * T


@pytest.mark.parametrize("s,r_ratio,d,p", [(24, 0.5, 0.4, 1), (24, 0.25, 0.4, 2), (40, 0.27, 0.4, 4),
                                           (12, 0.5, 0.6, 3), (96, 0.9, 0.2, 2)])
def test_patch_budgets_match_reference(s, r_ratio, d, p):
    """The per-patch salient and context counts over random segmentations and sub-segmentations
    (every branch of the port's l. 1926-1989: one-patch segments, V sub-segments with and
    without context, the S // 2 and S - ctx caps)."""
    rng = np.random.default_rng(s + p)
    r = int(s * r_ratio)
    budgets = jax.jit(fq.patch_budgets, static_argnums=(2, 3, 4, 5))
    for t, p_cut in ((1, 0.3), (12, 0.1), (12, 0.3), (12, 0.5), (12, 0.3), (12, 0.7)):
        starts = np.concatenate([[True], rng.random(t - 1) < p_cut])
        cut = rng.random(t - 1) < 0.4  # sub-segment boundaries (similarity below dyseg_ignore)
        sub = starts | np.concatenate([[False], cut])
        sal, ctx = budgets(jnp.asarray(starts), jnp.asarray(sub), s, r, d, p)
        sims = np.where(cut, 0.5, 0.99)
        want_sal, want_ctx, start = [], [], 0
        for L in _sizes(starts):
            a, b = ref_mod.segment_budgets(L, list(sims[start:start + L - 1]), s, r, d, p, 0.95)
            assert sum(a) + sum(b) <= r * L  # the capacity T·R holds
            want_sal, want_ctx, start = want_sal + a, want_ctx + b, start + L
        assert np.asarray(sal).tolist() == want_sal and np.asarray(ctx).tolist() == want_ctx


def test_fastvid_qwen_registry_errors_and_flops():
    cfg, llava = architecture("qwen-tiny"), architecture("llava-ov-0.5b")
    m = registry.build("fastvid", 0.27, cfg)
    assert m == fq.FastVIDQwen(ratio=0.27, tau=0.84, dyseg_ignore=0.95, dyseg_c=8, d=0.4, p=4, beta=0.6)
    assert m.families == ("qwen2_5_vl",) and m.encoder_keys == "heads"
    assert registry.name(m) == "fastvid" and registry.label(m) == "FastVID"
    assert type(registry.build("fastvid", 0.27, llava)) is FastVID
    pipeline.check_family(cfg, m)
    with pytest.raises(ConfigError, match="Qwen2.5-VL port only"):
        registry.build("fastvid", 0.25, llava, dyseg_ignore=0.9)
    with pytest.raises(ConfigError, match="keep_positions=False"):
        registry.build("fastvid", 0.25, cfg, keep_positions=False)
    if "signals" in registry.SETTINGS["fastvid"]:  # LLaVA-OV's SigLIP-head switch
        with pytest.raises(ConfigError, match="Qwen2.5-VL uses its port's signals"):
            registry.build("fastvid", 0.25, cfg, signals="head")
    with pytest.raises(ConfigError, match="dyseg_ignore 1.5"):
        registry.build("fastvid", 0.25, cfg, dyseg_ignore=1.5)
    with pytest.raises(ConfigError, match="no salient token"):
        fq.FastVIDQwen(ratio=0.05).capacity(4, 24)  # R = 1: a one-patch segment keeps 0 salient
    with pytest.raises(ConfigError, match="from_ratio"):
        FastVID(0.25).select(jnp.zeros((2, 6, 4)), 2, {}, cfg, grid=(2, 3))
    T, S = 8, 24
    assert m.capacity(T, S) == T * int(S * 0.27) and m.budget(T, S) == (6, 12)
    assert m.select_flops(cfg, T, s=S) > 4 * T * T * S * 12 * cfg.text.hidden_size
    with pytest.raises(ValueError, match="pass s"):
        m.select_flops(cfg, T)
