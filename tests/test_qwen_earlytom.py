"""EarlyTom on Qwen2.5-VL (docs/qwen-earlytom.md): the PyTorch reference on transformers' own
modules (tests/references/qwen_earlytom_ref.py) checked against transformers, then our JAX
pipeline held to the reference on tiny random models and several clips."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests import tiny_qwen
from tests.references import earlytom_ref
from tests.references.qwen_earlytom_ref import _encode, qwen_earlytom_reference

PREFIX = [5, 6, 7, tiny_qwen.VSTART]
SUFFIX = [tiny_qwen.VEND, 8, 9, 10, 11]

MODELS = {
    # 4 blocks, block 1 full; windows of 2x2 merged tokens
    "a": dict(seed=3, vision_layers=4, fullatt=(1,), window=56),
    # 5 blocks, blocks 0 and 3 full; 3 text layers, GQA 4
    "b": dict(seed=4, vision_layers=5, fullatt=(0, 3), window=56, text_layers=3, heads=4, kv_heads=1),
    # 4 blocks, block 2 full; 5 vision heads of 8, tied head
    "c": dict(seed=5, vision_layers=4, fullatt=(2,), window=56, vision_hidden=40, vision_heads=5, tie=True,
              mrope=(2, 4, 2)),
}


def clip(frames: int, h: int, w: int, seed: int, cut: int | None, drift: float = 0.2) -> np.ndarray:
    """A normalised video [frames, 3, h, w]: a spatially smooth random scene drifting a little
    from frame to frame (so consecutive temporal patches are similar and merge), and a new
    scene from frame `cut` on (None: no cut)."""
    rng = np.random.default_rng(seed)

    def scene():
        low = rng.normal(size=(3, h // 14 + 1, w // 14 + 1)).astype(np.float32)
        x = np.kron(low, np.ones((14, 14), np.float32))[:, :h, :w]
        return x + 0.3 * rng.normal(size=(3, h, w)).astype(np.float32)

    a, out = scene(), []
    for t in range(frames):
        if t == cut:
            a = scene()
        a = a + drift * rng.normal(size=a.shape).astype(np.float32)
        out.append(a.copy())
    return np.stack(out)


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = tiny_qwen.build(**MODELS[name])
        return cache[name]

    return get


# --------------------------------------------------------------------------------------------
# The reference alone
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,frames,h,w,spt", [("a", 8, 56, 84, 0.75), ("b", 6, 84, 56, 1.25),
                                                  ("c", 4, 112, 112, 2.0)])
def test_reference_full_tokens_equal_transformers(models, name, frames, h, w, spt):
    """Without compression the reference is transformers' own forward (logits, greedy tokens)
    with Qwen's positions (`tiny_qwen.reference_positions`)."""
    model = models(name)
    pix = clip(frames, h, w, seed=frames, cut=None, drift=1.0)
    ref = qwen_earlytom_reference(model, pix, PREFIX, SUFFIX, spt, method_cfg=None, max_new_tokens=4)
    hf, ids = tiny_qwen.logits(model, pix, PREFIX, SUFFIX, spt)
    np.testing.assert_allclose(ref["logits"].numpy(), hf[-1], atol=1e-5, rtol=0)
    assert ref["tokens"] == tiny_qwen.greedy(model, pix, PREFIX, SUFFIX, 4, spt)
    tps = model.config.vision_config.tokens_per_second
    _, _, _, pos = tiny_qwen.inputs(pix, PREFIX, SUFFIX, spt, tps)
    video = pos[:, len(PREFIX): len(ids) - len(SUFFIX)] - len(PREFIX)
    assert ref["positions"] == [tuple(int(v) for v in video[:, j]) for j in range(video.shape[1])]
    assert ref["next_position"] == int(pos.max()) + 1
    assert ref["sources"] == list(range(frames // 2)) and ref["llm_keep"] is None


def test_reference_written_out_blocks_equal_transformers(models):
    """Every block written out (all in P) on two temporal patches (segments of <= 2 frames: no
    merge) with r = 1 (everything kept): the encoder's output equals transformers' visual
    forward; each temporal patch's importance sums to 1 over its N patches (1/4 over the
    merged tokens' means)."""
    for name, (h, w) in [("a", (56, 84)), ("b", (84, 56)), ("c", (112, 112))]:
        model = models(name)
        pix = clip(4, h, w, seed=1, cut=None)
        flat, grid = tiny_qwen.flatten(pix)
        depth = model.config.vision_config.depth
        with torch.no_grad():
            want = model.model.visual(torch.from_numpy(flat), grid_thw=torch.tensor([grid])).pooler_output
            got, stats, _ = _encode(model, pix, dict(layers=list(range(depth)), tau=0.5, r=1.0))
        assert stats["frames_after_layer"] == [2] * depth
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-5, rtol=0)
        np.testing.assert_allclose(stats["importance"].sum(-1).numpy(), [0.25, 0.25], atol=1e-6)


def test_static_blocks_grid():
    """Non-square 2-D static blocks partition the grid; on a square grid they are the LLaVA-OV
    reference's `_static_blocks_2d`."""
    for g in range(1, 7):
        for n in range(1, g * g + 1):
            assert earlytom_ref._static_blocks_grid(g, g, n) == earlytom_ref._static_blocks_2d(g * g, n)
    for rows, cols in [(2, 3), (3, 2), (1, 5), (5, 1), (2, 7), (4, 3)]:
        for n in range(1, rows * cols + 1):
            blocks = earlytom_ref._static_blocks_grid(rows, cols, n)
            assert len(blocks) == n and sorted(i for b in blocks for i in b) == list(range(rows * cols))
    assert earlytom_ref._static_blocks_grid(2, 3, 4) == [[0, 1], [2], [3, 4], [5]]
    # 3 x 2 with 3 blocks: 2 bands (rows 0-1, row 2), the first holding 2 blocks
    assert earlytom_ref._static_blocks_grid(3, 2, 3) == [[0, 2], [1, 3], [4, 5]]
    # 2 x 8 with 9 blocks: floor(sqrt(9)) = 3 bands would exceed the 2 rows
    assert earlytom_ref._static_blocks_grid(2, 8, 9)[:5] == [[0, 1], [2, 3], [4, 5], [6], [7]]


def test_weighted_off_and_decoupled_off():
    """weighted=False blends every merged pair 1/2 + 1/2 (the last pair's merge included);
    decoupled=False makes every frame dynamic."""
    base = torch.randn(5, 8)
    frames = [base + 0.01 * i * torch.ones(5, 8) for i in range(4)]
    out_w, mix_w = earlytom_ref.merge_middle(frames, -1.0, quirks=False)
    out_u, mix_u = earlytom_ref.merge_middle(frames, -1.0, quirks=False, weighted=False)
    assert [[i for i, _ in r] for r in mix_w] == [[i for i, _ in r] for r in mix_u]
    assert all(w == 0.5 for r in mix_u for _, w in r if len(r) == 2)
    assert any(len(r) == 2 for r in mix_u)
    for o, r in zip(out_u, mix_u):
        if len(r) == 2:
            torch.testing.assert_close(o, 0.5 * frames[r[0][0]] + 0.5 * frames[r[1][0]])
    imp = torch.rand(5, 6)
    segs = [(0, 4)]
    assert earlytom_ref.stage2_select(imp, segs, 5, 0.5)["dynamic"] == [True, False, False, False, True]
    sel = earlytom_ref.stage2_select(imp, segs, 5, 0.5, decoupled=False)
    assert sel["dynamic"] == [True] * 5 and all(len(k) == 3 for k in sel["kept"])


def test_reference_merge_path_is_consistent(models):
    """A compressed run: frames merge, sources are increasing, every kept token sits at its
    source temporal patch's temporal position and its own row and column."""
    model = models("a")
    pix = clip(16, 56, 84, seed=0, cut=9, drift=0.1)
    spt = 1.25
    ref = qwen_earlytom_reference(model, pix, PREFIX, SUFFIX, spt,
                                  method_cfg=dict(layers=[1, 3], tau=0.8, r=0.3, llm_layer=1), max_new_tokens=1)
    assert ref["frames_after_layer"][-1] < 8
    src = ref["sources"]
    assert len(src) == ref["frames_after_layer"][-1] and src == sorted(set(src)) and src[0] == 0
    mw = 84 // 28
    interval = np.float32(spt) * np.float32(2.0)
    want = [(int(np.float32(src[t]) * interval), s // mw, s % mw) for t, ks in enumerate(ref["kept"]) for s in ks]
    assert ref["positions"] == want
    assert len(ref["llm_keep"]) == round(ref["visual_tokens"] * 0.5)
    # the budget: r' = min(r·T/T', 1) of S per dynamic frame
    S = (56 // 28) * mw
    r_eff = min(0.3 * 8 / len(src), 1)
    for d, k in zip(ref["dynamic"], ref["kept"]):
        assert len(k) == (math.ceil(S * r_eff) if d else max(1, round(S * r_eff)))


# --------------------------------------------------------------------------------------------
# Parity: our JAX pipeline against the reference
# --------------------------------------------------------------------------------------------

N_NEW = 3

PARITY = [
    # model, frames, h, w, cut, drift, spt, settings, a merge must happen
    ("a", 16, 56, 84, 9, 0.1, 1.0, dict(ratio=0.3, tau=0.8, layers=(1, 3), llm_layer=1), True),  # full, then window
    ("a", 14, 56, 84, 6, 0.2, 0.5, dict(ratio=0.25, tau=0.6, layers=(2,), llm_layer=None, quirks=False), True),
    ("b", 12, 84, 56, 4, 0.1, 1.25, dict(ratio=0.4, tau=0.7, layers=(1, 3), llm_layer=2, weighted=False,
                                        quirks=False), True),
    ("b", 16, 84, 56, 10, 0.2, 2.0, dict(ratio=0.2, tau=0.6, layers=(0, 2), llm_layer=1, decoupled=False,
                                         quirks=False), True),
    ("c", 12, 112, 112, 9, 0.1, 0.75, dict(ratio=0.3, tau=0.5, layers=(0, 2), llm_layer=1), True),
    ("c", 8, 112, 112, None, 0.6, 1.0, dict(ratio=0.5, tau=0.9, layers=(3,), llm_layer=None, quirks=False,
                                            weighted=False), False),
]


def _segments(starts, n):
    s = [i for i in range(n) if starts[i]]
    return [(a, b - 1) for a, b in zip(s, s[1:] + [n])]


@pytest.fixture(scope="module")
def loaded(models, tmp_path_factory):
    from earlytom_jax.checkpoint.load import load_hf

    cache = {}

    def get(name):
        if name not in cache:
            model = models(name)
            cfg, params = load_hf(tiny_qwen.save(model, str(tmp_path_factory.mktemp(f"qwen-{name}"))))
            cache[name] = model, cfg, params
        return cache[name]

    return get


@pytest.mark.parametrize("case", PARITY, ids=[f"{c[0]}-T{c[1]}-{c[2]}x{c[3]}-{i}" for i, c in enumerate(PARITY)])
def test_matches_reference(loaded, case):
    import jax.numpy as jnp

    from earlytom_jax import pipeline
    from earlytom_jax.compression.earlytom import EarlyTom

    name, frames, h, w, cut, drift, spt, settings, must_merge = case
    model, cfg, params = loaded(name)
    method = EarlyTom(**settings)
    pix = clip(frames, h, w, seed=frames + h, cut=cut, drift=drift)
    rcfg = dict(r=method.ratio, layers=list(method.layers), tau=method.tau, alpha=method.alpha,
                max_window=method.max_window, quirks=method.quirks, llm_layer=method.llm_layer,
                llm_ratio=method.llm_ratio, decoupled=method.decoupled, weighted=method.weighted)
    ref = qwen_earlytom_reference(model, pix, PREFIX, SUFFIX, spt, method_cfg=rcfg, max_new_tokens=N_NEW)
    T = frames // 2
    if must_merge:
        assert ref["frames_after_layer"][-1] < T, "the clip does not merge: the case tests nothing"

    logits, caches, next_pos, stats = pipeline.prefill_jit(
        params, jnp.asarray(pix), jnp.asarray(PREFIX, jnp.int32), jnp.asarray(SUFFIX, jnp.int32), cfg, method,
        N_NEW, None, jnp.float32(spt))
    st = {k: np.asarray(v) for k, v in stats.items()}
    n = int(st["frames"])
    assert st["frames_after_layer"].tolist() == ref["frames_after_layer"]
    assert n == len(ref["sources"])
    assert _segments(st["segment_starts"].tolist(), n) == [tuple(s) for s in ref["segments"]]
    assert st["dynamic"][:n].tolist() == list(ref["dynamic"])
    assert st["frame_sources"][:n].tolist() == ref["sources"]
    if "importance" in st:  # per merged token, raster order (fp32 sums in another order)
        np.testing.assert_allclose(st["importance"][:n], ref["importance"].numpy(), atol=1e-6, rtol=1e-4)

    S = (h // 28) * (w // 28)
    kept_index = st["kept_index"]
    valid = kept_index >= 0
    want_flat = [t * S + s for t, ks in enumerate(ref["kept"]) for s in ks]
    assert kept_index[valid].tolist() == want_flat
    assert int(st["count"]) == len(want_flat)
    assert [tuple(p) for p in st["visual_positions"][valid].tolist()] == ref["positions"]
    if method.llm_layer is not None:
        mask = st["llm_keep_mask"]
        assert not (mask & ~valid[: mask.shape[0]]).any(), "stage III keeps a padding slot"
        rank = np.cumsum(valid) - 1
        assert [int(rank[j]) for j in np.flatnonzero(mask)] == ref["llm_keep"]
    else:
        assert ref["llm_keep"] is None

    want = ref["logits"].numpy()
    got = np.asarray(logits)
    np.testing.assert_allclose(got, want, atol=1e-4 * max(1.0, float(np.abs(want).max())), rtol=0)
    assert int(np.argmax(got)) == ref["first_token"]
    assert np.asarray(next_pos).reshape(-1).tolist() == [ref["next_position"]]
    toks, _ = pipeline.decode_loop(params, logits, next_pos, caches, cfg, N_NEW, jnp.asarray([-1], jnp.int32))
    assert np.asarray(toks).tolist() == ref["tokens"]


def test_compiles_once_per_clip_shape(loaded):
    """One program serves clips of one shape whatever their merges and their seconds per
    temporal patch: the frame buckets are branches inside it, positions are traced."""
    import jax.numpy as jnp

    from earlytom_jax import pipeline
    from earlytom_jax.compression.earlytom import EarlyTom

    _, cfg, params = loaded("a")
    method = EarlyTom(ratio=0.3, tau=0.5, layers=(1, 2), llm_layer=1)
    pre, suf = jnp.asarray(PREFIX, jnp.int32), jnp.asarray(SUFFIX, jnp.int32)
    frames_left = set()
    before = None
    for i, (cut, drift, spt) in enumerate([(None, 0.05, 1.0), (4, 0.3, 0.5), (2, 1.0, 2.0), (6, 0.1, 1.5)]):
        pix = clip(16, 56, 84, seed=40 + i, cut=cut, drift=drift)
        _, _, _, stats = pipeline.prefill_jit(params, jnp.asarray(pix), pre, suf, cfg, method, 4, None,
                                              jnp.float32(spt))
        frames_left.add(int(stats["frames"]))
        if before is None:
            before = pipeline.prefill_jit._cache_size()
    assert pipeline.prefill_jit._cache_size() == before
    assert len(frames_left) > 1, "the clips all merge alike: the test shows nothing"
