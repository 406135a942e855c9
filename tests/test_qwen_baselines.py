"""The baselines on Qwen2.5-VL (uniform tokens, uniform frames, FastV, VisionZip): our JAX
pipeline against PyTorch references on transformers' own Qwen2.5-VL
(tests/references/qwen_baselines_ref.py) on tiny random models: kept indices, 3-D positions,
first token and logits (fp32); budgets, FLOPs and the registry on this family."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from earlytom_jax import pipeline
from earlytom_jax.architectures import architecture
from earlytom_jax.compression import registry
from earlytom_jax.compression.fastv import FastV
from earlytom_jax.compression.uniform import UniformFrames, UniformTokens
from earlytom_jax.compression.visionzip import VisionZip
from earlytom_jax.errors import ConfigError
from tests import tiny_qwen
from tests.references import qwen_baselines_ref as ref_mod

PREFIX = [5, 6, 7, tiny_qwen.VSTART]
SUFFIX = [tiny_qwen.VEND, 8, 9, 10, 11]


_pixels = tiny_qwen.random_pixels



def _ours(params, cfg, method, pix, spt, n_new):
    ids = lambda x: jnp.asarray(x, jnp.int32)  # noqa: E731
    logits, caches, nxt, stats = pipeline.prefill_jit(params, jnp.asarray(pix), ids(PREFIX), ids(SUFFIX), cfg, method,
                                                      n_new, None, jnp.float32(spt))
    toks, _ = pipeline.decode_loop(params, logits, nxt, caches, cfg, n_new, jnp.asarray([-1], jnp.int32))
    st = {k: np.asarray(v) for k, v in stats.items()}
    return np.asarray(logits), np.asarray(toks).tolist(), int(np.asarray(nxt).reshape(-1)[0]), st


def _check_common(ref, logits, toks, nxt, st):
    """Positions of every slot, the first token, the logits (fp32) and the greedy tokens."""
    assert [tuple(p) for p in st["visual_positions"].tolist()] == ref["positions"]
    want = ref["logits"].numpy()
    np.testing.assert_allclose(logits, want, atol=1e-4, rtol=0)
    assert int(np.argmax(logits)) == ref["first_token"]
    assert nxt == ref["next_position"]
    assert toks == ref["tokens"]


# --------------------------------------------------------------------------------------------
# the reference alone
# --------------------------------------------------------------------------------------------


def test_reference_full_tokens_equal_transformers(qwen_win_full):
    """The reference's layer-by-layer LLM with all tokens is transformers' own forward (logits,
    greedy tokens); its VisionZip signals come from the same forward (merged tokens equal) and
    each temporal patch's attention sums to 1 over its patches (1/4 over merged-token means)."""
    model, _, _ = qwen_win_full("full")
    pix = _pixels(4, 56, 84, seed=1)
    ref = ref_mod.qwen_baseline_reference(model, pix, PREFIX, SUFFIX, 1.25, method="full", max_new_tokens=3)
    hf, _ = tiny_qwen.logits(model, pix, PREFIX, SUFFIX, 1.25)
    np.testing.assert_allclose(ref["logits"].numpy(), hf[-1], atol=1e-5, rtol=0)
    assert ref["tokens"] == tiny_qwen.greedy(model, pix, PREFIX, SUFFIX, 3, 1.25)
    for name in ("win", "full"):
        model, _, _ = qwen_win_full(name)
        with torch.no_grad():
            toks, imp, keys, grid = ref_mod.merged_tokens_and_signals(model, pix)
            plain, _ = ref_mod.merged_tokens(model, pix)
        assert torch.equal(toks, plain) and grid == (2, 4, 6) and keys.shape[:2] == imp.shape == (2, 6)
        np.testing.assert_allclose(imp.sum(-1).numpy(), [0.25, 0.25], atol=1e-6)


# --------------------------------------------------------------------------------------------
# parity
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,frames,h,w,ratio,mode,spt", [
    ("win", 6, 112, 168, 0.1, "pool", 1.0),     # 4 x 6 merged grid, 2/2/3 cells (one band of 4 rows)
    ("full", 4, 168, 84, 0.25, "sample", 0.5),  # 6 x 3 (taller than wide), 4/5 cells (two bands)
])
def test_uniform_tokens_match_reference(qwen_win_full, name, frames, h, w, ratio, mode, spt):
    model, cfg, params = qwen_win_full(name)
    pix = _pixels(frames, h, w, seed=frames + h)
    method = registry.build("uniform_tokens", ratio, cfg, mode=mode)
    ref = ref_mod.qwen_baseline_reference(model, pix, PREFIX, SUFFIX, spt, method="uniform_tokens", ratio=ratio,
                                          mode=mode, max_new_tokens=2)
    logits, toks, nxt, st = _ours(params, cfg, method, pix, spt, 2)
    T, S = frames // 2, (h // 28) * (w // 28)
    assert st["kept_index"].tolist() == ref["kept_index"]
    assert int(st["count"]) == int(st["visual_tokens"]) == ref["visual_tokens"] == round(ratio * T * S)
    slot_of, base = [-1] * (T * S), 0
    for t, f in enumerate(ref["frames"]):
        for i, cell in enumerate(f["cells"]):
            for j in cell if mode == "pool" else [f["centres"][i]]:
                slot_of[t * S + j] = base + i
        base += len(f["cells"])
    assert st["token_slot"].tolist() == slot_of
    mw = w // 28
    assert any(min(c) // mw != max(c) // mw for f in ref["frames"] for c in f["cells"])  # 2-D cells
    # a slot's position is its cell's centre's, not its first token's: the case tells them apart
    assert any(centre != cell[0] for f in ref["frames"] for cell, centre in zip(f["cells"], f["centres"]))
    _check_common(ref, logits, toks, nxt, st)


@pytest.mark.parametrize("name,frames,h,w,ratio,picked,spt", [
    ("win", 10, 56, 84, 0.4, [0, 4], 1.5),
    ("full", 8, 84, 112, 0.2, [0], 0.75),
])
def test_uniform_frames_match_reference(qwen_win_full, name, frames, h, w, ratio, picked, spt):
    """Only the picked temporal patches are encoded, each at its ORIGINAL temporal position;
    the text after the video starts one past the full video's largest position."""
    model, cfg, params = qwen_win_full(name)
    pix = _pixels(frames, h, w, seed=frames + w)
    method = registry.build("uniform_frames", ratio, cfg)
    T, S, mw = frames // 2, (h // 28) * (w // 28), w // 28
    assert list(method.input_frames(T)) == ref_mod.picked_patches(T, ratio) == picked
    ref = ref_mod.qwen_baseline_reference(model, pix, PREFIX, SUFFIX, spt, method="uniform_frames", ratio=ratio,
                                          max_new_tokens=2)
    logits, toks, nxt, st = _ours(params, cfg, method, pix, spt, 2)
    assert int(st["frames"]) == len(picked) and ref["picked"] == picked
    assert st["kept_index"].tolist() == ref["kept_index"] == list(range(len(picked) * S))
    assert int(st["count"]) == int(st["visual_tokens"]) == len(picked) * S
    interval = np.float32(spt) * np.float32(2.0)
    want = [(int(np.float32(p) * interval), s // mw, s % mw) for p in picked for s in range(S)]
    assert ref["positions"] == want
    if len(picked) > 1:  # a later patch is not moved up to the slot it now occupies
        assert want[S][0] == int(np.float32(picked[1]) * interval) > int(interval)
    assert ref["next_position"] == len(PREFIX) + int(np.float32(T - 1) * interval) + 1 + len(SUFFIX)
    _check_common(ref, logits, toks, nxt, st)


@pytest.mark.parametrize("name,frames,h,w,layer,drop,spt", [
    ("win", 4, 56, 84, 1, 0.5, 1.0),
    ("full", 6, 84, 112, 2, 0.75, 1.25),
])
def test_fastv_matches_reference(qwen_win_full, name, frames, h, w, layer, drop, spt):
    """Dropped inside the LLM, the survivors keep their 3-D positions (no newline in the span)."""
    model, cfg, params = qwen_win_full(name)
    pix = _pixels(frames, h, w, seed=frames * 3)
    method = FastV(layer, drop).check(cfg)
    ref = ref_mod.qwen_baseline_reference(model, pix, PREFIX, SUFFIX, spt, method="fastv", layer=layer, drop=drop,
                                          max_new_tokens=3)
    logits, toks, nxt, st = _ours(params, cfg, method, pix, spt, 3)
    V = (frames // 2) * (h // 28) * (w // 28)
    assert int(st["visual_tokens"]) == ref["visual_tokens"] == V
    assert np.flatnonzero(st["llm_keep_mask"]).tolist() == ref["llm_keep"]
    assert int(st["llm_kept"]) == len(ref["llm_keep"]) == round(V * (1 - drop))
    _check_common(ref, logits, toks, nxt, st)


@pytest.mark.parametrize("name,frames,h,w,ratio,kw,spt", [
    ("win", 6, 112, 168, 0.5, dict(dominant_ratio=0.5), 1.0),             # last block: windows; K/C 6/6
    ("full", 4, 112, 112, 0.4, dict(quirks=False), 0.5),                   # last block: full; K/C 5/1, 5/2
])
def test_visionzip_matches_reference(qwen_win_full, name, frames, h, w, ratio, kw, spt):
    model, cfg, params = qwen_win_full(name)
    pix = _pixels(frames, h, w, seed=frames + h + w)
    method = registry.build("visionzip", ratio, cfg, **kw)
    ref = ref_mod.qwen_baseline_reference(model, pix, PREFIX, SUFFIX, spt, method="visionzip", ratio=ratio,
                                          max_new_tokens=2, **kw)
    logits, toks, nxt, st = _ours(params, cfg, method, pix, spt, 2)
    T, S = frames // 2, (h // 28) * (w // 28)
    np.testing.assert_allclose(st["importance"], ref["importance"].numpy(), atol=1e-6, rtol=1e-4)
    assert st["kept_index"].tolist() == ref["kept_index"]
    assert int(st["count"]) == int(st["visual_tokens"]) == ref["visual_tokens"] == round(ratio * T * S)
    slot_of, base = [-1] * (T * S), 0
    for t, f in enumerate(ref["frames"]):
        for i, j in enumerate(f["dominant"] + f["targets"]):
            slot_of[t * S + j] = base + i
        for tgt, group in f["groups"].items():
            for j in group:
                slot_of[t * S + j] = slot_of[t * S + tgt]
        base += len(f["dominant"]) + len(f["targets"])
    assert st["token_slot"].tolist() == slot_of
    assert any(len(g) > 1 for f in ref["frames"] for g in f["groups"].values())  # merges happen
    _check_common(ref, logits, toks, nxt, st)


# --------------------------------------------------------------------------------------------
# budgets, FLOPs, registry
# --------------------------------------------------------------------------------------------


def test_registry_budgets_and_flops_on_qwen():
    cfg = architecture("qwen-tiny")
    T, S, H = 8, 24, cfg.text.hidden_size
    for name in ("uniform_tokens", "uniform_frames", "fastv", "visionzip"):
        assert registry.build(name, 0.25, cfg) is not None, name
    with pytest.raises(ConfigError, match="'tome' is not adapted"):
        registry.build("tome", 0.25, cfg)
    assert registry.build("visionzip", 0.1, cfg, per_frame=20) == VisionZip(per_frame=20)
    with pytest.raises(ConfigError, match="exceeds the 24 tokens"):
        VisionZip(per_frame=30).budgets(T, S)
    budget = round(0.25 * T * S)
    assert UniformTokens(0.25).capacity(T, S) == VisionZip(0.25).capacity(T, S) == budget
    assert UniformFrames(0.25).capacity(T, S) == 2 * S and UniformFrames(0.25).input_frames(T) == (0, 7)
    assert FastV(2, 0.75).llm_capacity(T * S) == round(T * S * 0.25)
    # hook 2's FLOPs need the tokens per temporal patch on this family
    assert UniformTokens(0.25).select_flops(cfg, T, s=S) == (T * S + budget) * H
    assert UniformTokens(0.25, mode="sample").select_flops(cfg, T, s=S) == 0
    d = cfg.vision.head_dim
    assert VisionZip(0.25).select_flops(cfg, T, s=S) == T * (S * 4 * (d + 1) + 2 * S * S * d + 2 * S * H)
    for m in (UniformTokens(0.25), VisionZip(0.25)):
        with pytest.raises(ValueError, match="pass s"):
            m.select_flops(cfg, T)
    assert pipeline.FULL.select_flops(cfg, T, s=S) == 0
    llava = architecture("llava-ov-0.5b")
    assert UniformTokens(0.25).select_flops(llava, T) == UniformTokens(0.25).select_flops(llava, T, s=196)
