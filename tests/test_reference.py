"""Checks of the PyTorch reference in tests/references/earlytom_ref.py: full-token parity with
transformers, hand-worked tiny cases for every stage, and an end-to-end smoke run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.helpers import hf_generate, hf_logits, random_pixels
from tests.references import earlytom_ref as ref
from tests.tiny_models import build_tiny_model

PREFIX, SUFFIX = [1, 2, 3, 4, 5], [6, 7, 8]


def unit(deg, mag=1.0):
    r = math.radians(deg)
    return [mag * math.cos(r), mag * math.sin(r)]


def frames_at(*degs, n=1):
    """[T, n, 2] frames; every position of frame t is the unit vector at angle degs[t]."""
    return torch.tensor([[unit(d)] * n for d in degs], dtype=torch.float32)


# --------------------------------------------------------------------------------------------
# (a) full tokens == transformers
# --------------------------------------------------------------------------------------------

FULL_CASES = [
    dict(seed=0, frames=3, kw={}),
    dict(seed=1, frames=2, kw=dict(tie=True, q_heads=2, kv_heads=2, text_hidden=32, image_size=70)),
    dict(seed=2, frames=2, kw=dict(vision_feature_layer=-2)),
]


@pytest.mark.parametrize("case", FULL_CASES, ids=lambda c: f"seed{c['seed']}")
def test_full_tokens_match_transformers(case):
    model = build_tiny_model(seed=case["seed"], **case["kw"])
    size = model.config.vision_config.image_size
    pix = random_pixels(case["frames"], size, seed=case["seed"])
    want, ids = hf_logits(model, pix, PREFIX, SUFFIX)
    got = ref.earlytom_reference(model, torch.tensor(pix), PREFIX, SUFFIX, method_cfg=None, max_new_tokens=8)
    assert got["first_logits"].dtype == torch.float32
    np.testing.assert_allclose(got["first_logits"].numpy(), want[-1], atol=1e-5, rtol=0)
    assert got["tokens"] == hf_generate(model, pix, ids, 8)
    assert got["stats"]["visual_tokens"] == len(ids) - len(PREFIX) - len(SUFFIX)
    assert got["stats"]["visual_tokens_after_llm"] is None


# --------------------------------------------------------------------------------------------
# (b) hand-worked cases
# --------------------------------------------------------------------------------------------


def test_frame_similarity_hand():
    # frame 0: positions at 0 deg and 0 deg; frame 1: 0 deg and 90 deg -> cosines 1 and 0.
    x = torch.tensor([[unit(0), unit(0)], [unit(0, 3.0), unit(90, 2.0)]])
    S = ref.frame_similarity(x)
    np.testing.assert_allclose(S.numpy(), [[1.0, 0.5], [0.5, 1.0]], atol=1e-6)


def test_segment_frames_hand():
    # angles 0, 0, 60, 90, 90, 90; tau 0.6, alpha 0.9:
    # i=1: s=1 -> s_hat=1;  i=2: s=cos60=0.5 -> 0.45+0.1=0.55 < 0.6 -> cut (0,1)
    # i=3..5 vs frame 2: s=cos30=0.866 -> 0.879, 0.867, 0.866 -> one segment (2,5)
    x = frames_at(0, 0, 60, 90, 90, 90, n=2)
    assert ref.segment_frames(x, 0.6) == [(0, 1), (2, 5)]
    # gradual drift 0, 30, 60, 90: vs the first frame (quirks): i=1 0.879; i=2 s=0.5 ->
    # 0.45+0.0879=0.538 < 0.6 -> cut (0,1); i=3 vs frame 2 0.879 -> (2,3).
    # vs the previous frame (paper): every s = 0.866 -> s_hat >= 0.866, one segment.
    x = frames_at(0, 30, 60, 90)
    assert ref.segment_frames(x, 0.6, quirks=True) == [(0, 1), (2, 3)]
    assert ref.segment_frames(x, 0.6, quirks=False) == [(0, 3)]
    # max window 6: identical frames cut when i - start + 1 reaches 6 -> at most 5 frames.
    x = frames_at(*([10] * 8))
    assert ref.segment_frames(x, 0.6, max_window=6) == [(0, 4), (5, 7)]
    assert ref.segment_frames(x, 0.6, max_window=3) == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert ref.segment_frames(frames_at(5), 0.6) == [(0, 0)]
    assert ref.segment_frames(frames_at(5)[:0], 0.6) == []


def test_merge_middle_hand_blend_and_last_frame_quirk():
    # F0 = 3*u0, F1 = 6*u0, F2 = u60, F3 = u90: s0 = 1, s1 = cos60 = 0.5, s2 = cos30 = 0.866.
    # tau_merge 0.4: i=0: s0 > 0.4 and s0 > s1 -> w = 1/1.5 = 2/3: (2/3)*3 + (1/3)*6 = 4 -> [4, 0]
    # i=2: last pair, nxt = 0, s2 > 0.4 -> w = 1 -> F2; i=4 stop. F3 consumed with weight 0.
    F = [torch.tensor([unit(0, 3.0)]), torch.tensor([unit(0, 6.0)]), torch.tensor([unit(60)]), torch.tensor([unit(90)])]
    for quirks in (True, False):
        out, mix = ref.merge_middle(F, 0.4, quirks=quirks)
        assert len(out) == 2
        np.testing.assert_allclose(out[0].numpy(), [[4.0, 0.0]], atol=1e-5)
        np.testing.assert_allclose(out[1].numpy(), F[2].numpy(), atol=0)
        assert [i for i, _ in mix[0]] == [0, 1] and [i for i, _ in mix[1]] == [2, 3]
        np.testing.assert_allclose([w for _, w in mix[0]], [2 / 3, 1 / 3], atol=1e-6)
        assert [w for _, w in mix[1]] == [1.0, 0.0]

    # 0, 90, 180 deg: s0 = 0, s1 = -1; tau 0.5: no merge at i=0 (F0 out, i=1); i=1 last pair,
    # s1 <= 0.5 -> F1 out, i=2 stop: F2 lost with the quirk, appended without it.
    G = [torch.tensor([unit(0)]), torch.tensor([unit(90)]), torch.tensor([unit(180)])]
    out, mix = ref.merge_middle(G, 0.5, quirks=True)
    assert mix == [[(0, 1.0)], [(1, 1.0)]]
    assert torch.equal(torch.stack(out), torch.stack(G[:2]))
    out, mix = ref.merge_middle(G, 0.5, quirks=False)
    assert mix == [[(0, 1.0)], [(1, 1.0)], [(2, 1.0)]]
    # fewer than 2 middle frames: unchanged
    assert ref.merge_middle(G[:1], 0.5)[1] == [[(0, 1.0)]]
    assert ref.merge_middle([], 0.5) == ([], [])


def test_merge_layer_two_middle_frames_leave_three():
    # 0, 10, 20, 30 deg: vs frame 0 the cosines are 0.985, 0.940, 0.866 -> one segment (0,3).
    # tau_merge = sim(0,3) = 0.866; middles F0=u10, F1=u20, s0 = cos10 = 0.985 > 0.866 ->
    # last-pair merge with w = 1 -> one middle output: frames [0, 1, 3].
    x = frames_at(0, 10, 20, 30, n=3)
    attn = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 2, 3, 3).clone()
    for quirks in (True, False):
        res = ref.merge_layer(x, attn, tau=0.5, quirks=quirks)
        assert res["segments"] == [(0, 3)]
        assert res["x"].shape == (3, 3, 2)
        assert res["mix"] == [[(0, 1.0)], [(1, 1.0), (2, 0.0)], [(3, 1.0)]]
        torch.testing.assert_close(res["x"], x[[0, 1, 3]], atol=0, rtol=0)
        torch.testing.assert_close(res["attn"], attn[[0, 1, 3]], atol=0, rtol=0)


def test_merge_layer_blend_hand():
    # frames 0, 20, 20 (magnitude 2), 80, 30 deg. Vs frame 0 (quirks): cosines 0.940, 0.940,
    # 0.174, 0.866 -> s_hat 0.946, 0.941, 0.250, 0.804, all > tau 0.2: one segment (0,4).
    # tau_merge = cos30 = 0.866. Middles u20, 2*u20, u80: s0 = 1, s1 = cos60 = 0.5 ->
    # merge, w = 2/3: (2/3)*u20 + (1/3)*2*u20 = (4/3)*u20; i = 2 = m-1: u80 dropped (quirk).
    # Paper mode: previous-frame cosines 0.94, 1, 0.5, 0.766 -> one segment; tau_merge = 0.2,
    # same merge, then u80 is appended.
    x = torch.tensor([[unit(0)], [unit(20)], [unit(20, 2.0)], [unit(80)], [unit(30)]])
    attn = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]).view(5, 1, 1, 1)
    res = ref.merge_layer(x, attn, tau=0.2, quirks=True)
    assert res["segments"] == [(0, 4)]
    np.testing.assert_allclose(res["x"][:, 0].numpy(), [unit(0), unit(20, 4 / 3), unit(30)], atol=1e-5)
    np.testing.assert_allclose(res["attn"].flatten().numpy(), [1.0, 2 * 2 / 3 + 3 / 3, 5.0], atol=1e-5)
    assert [[i for i, _ in row] for row in res["mix"]] == [[0], [1, 2], [4]]
    res = ref.merge_layer(x, attn, tau=0.2, quirks=False)
    assert res["segments"] == [(0, 4)]
    np.testing.assert_allclose(res["x"][:, 0].numpy(), [unit(0), unit(20, 4 / 3), unit(80), unit(30)], atol=1e-5)
    np.testing.assert_allclose(res["attn"].flatten().numpy(), [1.0, 7 / 3, 4.0, 5.0], atol=1e-5)


def test_stage2_select_hand():
    # T0 = 6, T' = 3, S = 10, r = 0.16: r' = 0.16 / ((60 - 30) / 60) = 0.32.
    # dynamic: ceil(3.2) = 4 tokens; static: n = round(3.2) = 3 runs of 4, 3, 3 tokens.
    imp = torch.tensor(
        [
            [0.1, 0.9, 0.3, 0.8, 0.2, 0.7, 0.05, 0.6, 0.4, 0.0],  # top 4: 1, 3, 5, 7
            [0.5, 0.1, 0.5, 0.2, 0.3, 0.9, 0.9, 0.0, 0.0, 0.1],  # runs 0-3 | 4-6 | 7-9 -> 0, 5, 9
            [1.0] * 10,  # all tied: lower index first -> 0, 1, 2, 3
        ]
    )
    out = ref.stage2_select(imp, [(0, 2)], T0=6, r=0.16)
    assert out["dynamic"] == [True, False, True]
    assert out["kept"] == [[1, 3, 5, 7], [0, 5, 9], [0, 1, 2, 3]]
    # segments of <= 2 frames: all dynamic
    out = ref.stage2_select(imp, [(0, 1), (2, 2)], T0=6, r=0.16)
    assert out["dynamic"] == [True, True, True]
    assert out["kept"][1] == [0, 2, 5, 6]  # 0.9 (5), 0.9 (6), 0.5 (0), 0.5 (2)
    # budget capped at 1: T0 = 4, T' = 1, r = 0.5 -> r' = min(2, 1) = 1: everything kept
    out = ref.stage2_select(imp[:1], [(0, 0)], T0=4, r=0.5)
    assert out["kept"] == [list(range(10))]
    # remainder spread over the first runs: S = 10, n = round(10 * 0.4) = 4 -> 3, 3, 2, 2
    # (r' = 0.2 / 0.5 = 0.4); importance rising inside each run picks each run's last index
    imp4 = torch.tensor([[0.0] * 10, [0, 1, 2, 0, 1, 2, 0, 1, 0, 1.0], [0.0] * 10])
    out = ref.stage2_select(imp4, [(0, 2)], T0=6, r=0.2)
    assert out["kept"][1] == [2, 5, 7, 9]


def test_stage2_select_2d_blocks_paper_mode():
    # S = 16 (4x4 grid), T0 = 6, T' = 3, r = 0.125 -> r' = 0.25 -> n = 4 static blocks of 2x2.
    # grid of frame 1 (raster):  0 1 | 2 3        block TL {0,1,4,5}, TR {2,3,6,7},
    #                            4 5 | 6 7        BL {8,9,12,13}, BR {10,11,14,15}
    imp = torch.zeros(3, 16)
    imp[1, [5, 2, 12, 15]] = 1.0
    imp[1, 1] = 1.0  # tie with 5 inside TL -> 1 (first raster index)
    out = ref.stage2_select(imp, [(0, 2)], T0=6, r=0.125, quirks=False)
    assert out["kept"][1] == [1, 2, 12, 15]
    # the 1-D runs of the official code split the same frame into its 4 grid rows instead:
    # row 0 {1, 2 tied} -> 1; row 1 -> 5; row 2 all zero -> 8; row 3 {12, 15 tied} -> 12
    out = ref.stage2_select(imp, [(0, 2)], T0=6, r=0.125, quirks=True)
    assert out["kept"][1] == [1, 5, 8, 12]
    # n = 3 on a 4x4 grid: one band of all rows, columns split 2, 1, 1
    imp = torch.zeros(3, 16)
    imp[1, [13, 6, 11]] = 1.0  # column 1, column 2, column 3
    out = ref.stage2_select(imp, [(0, 2)], T0=6, r=0.1, quirks=False)  # r' = 0.2 -> round(3.2) = 3
    assert out["kept"][1] == [6, 11, 13]


def test_bilinear_pool_hand():
    # factor-2 bilinear with align_corners=False samples midway between pixel pairs: 2x2 means
    x = torch.arange(16, dtype=torch.float32).view(1, 4, 4, 1)
    y = ref.bilinear_pool(x, 2, 2)
    np.testing.assert_allclose(y[0, :, :, 0].numpy(), [[2.5, 4.5], [10.5, 12.5]], atol=1e-6)


def test_stage3_merge_hand():
    # L = 5, r_in = 0.5 -> round(2.5) = 2 kept (half to even): attention keeps rows 1 and 3.
    # kept h1 = [1, 0], h3 = [0, 1]; dropped (in order) h0 = [1, 2] -> cos .447 / .894 -> h3;
    # h2 = [1, .8] -> cos .781 / .625 -> h1 (after h3 moved to [.5, 1.5] it would be closer to
    # h3: .840, so similarities must come from the original rows); h4 = [.1, 2] -> h3.
    # h1 = (h1 + h2) / 2 = [1, .4]; h3 = ((h3 + h0) / 2 + h4) / 2 = ([.5, 1.5] + [.1, 2]) / 2
    # = [.3, 1.75]  (the other order would give [.525, 1.75]).
    h = torch.tensor([[1.0, 2.0], [1.0, 0.0], [1.0, 0.8], [0.0, 1.0], [0.1, 2.0]])
    row = torch.tensor([0.1, 0.5, 0.2, 0.4, 0.3])
    out = ref.stage3_merge(h, row, 0.5)
    assert out["keep"] == [1, 3] and out["drop"] == [0, 2, 4]
    np.testing.assert_allclose(out["h"].numpy(), [[1.0, 0.4], [0.3, 1.75]], atol=1e-6)
    assert torch.equal(h[1], torch.tensor([1.0, 0.0]))  # input not modified
    # L = 7 -> round(3.5) = 4 kept; r_in = 0 keeps everything unchanged
    h7 = torch.randn(7, 3)
    assert len(ref.stage3_merge(h7, torch.rand(7), 0.5)["keep"]) == 4
    out = ref.stage3_merge(h7, torch.rand(7), 0.0)
    assert out["drop"] == [] and torch.equal(out["h"], h7)


# --------------------------------------------------------------------------------------------
# (c) end to end with every stage
# --------------------------------------------------------------------------------------------


def similar_video(T0, size, seed=0, scenes=3):
    """[T0, 3, size, size]: `scenes` random scenes in equal runs, each frame with small noise."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(scenes, 3, size, size, generator=g)
    which = [scenes * t // T0 for t in range(T0)]
    return torch.stack([base[w] + 0.02 * torch.randn(3, size, size, generator=g) for w in which])


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_model(seed=0)


BASE_CFG = dict(tau=0.6, alpha=0.9, max_window=6, layers=[2, 1], r=0.25, quirks=True, llm_layer=2, llm_ratio=0.5, llm_noncausal=False)


@pytest.mark.parametrize("quirks", [True, False])
@pytest.mark.parametrize("noncausal", [False, True])
def test_end_to_end_all_stages(tiny, quirks, noncausal):
    T0 = 12
    pix = similar_video(T0, 56, scenes=2)  # runs of 6 similar frames
    cfg = dict(BASE_CFG, quirks=quirks, llm_noncausal=noncausal)
    out = ref.earlytom_reference(tiny, pix, PREFIX, SUFFIX, method_cfg=cfg, max_new_tokens=5)
    st = out["stats"]
    fal = st["frames_after_layer"]
    assert len(fal) == 2 and T0 >= fal[0] >= fal[1] and fal[1] < T0
    Tp = fal[-1]
    assert sum(e - s + 1 for s, e in st["segments"]) == Tp
    assert len(st["kept"]) == len(st["dynamic"]) == Tp
    assert all(k == sorted(k) and all(0 <= i < 4 for i in k) for k in st["kept"])
    assert st["visual_tokens"] == sum(len(k) for k in st["kept"]) + 1
    assert st["visual_tokens_after_llm"] == round(st["visual_tokens"] * 0.5) == len(st["keep_llm"])
    assert len(out["tokens"]) == 5 and torch.isfinite(out["first_logits"]).all()
    assert any(st["dynamic"]) and not all(st["dynamic"])  # some segment of >= 3 frames


def test_noncausal_flag_changes_layer_k_minus_1(tiny):
    pix = similar_video(6, 56)
    a = ref.earlytom_reference(tiny, pix, PREFIX, SUFFIX, method_cfg=dict(BASE_CFG, llm_ratio=0.0), max_new_tokens=1)
    b = ref.earlytom_reference(
        tiny, pix, PREFIX, SUFFIX, method_cfg=dict(BASE_CFG, llm_ratio=0.0, llm_noncausal=True), max_new_tokens=1
    )
    assert not torch.allclose(a["first_logits"], b["first_logits"], atol=1e-4)


def test_compression_block_matches_transformers_block(tiny):
    emb, blocks = ref._vision_parts(tiny)
    with torch.no_grad():
        h = emb(similar_video(3, 56))
        ours, probs = ref._siglip_block_with_probs(blocks[1], h)
        want = blocks[1](h, None)
    torch.testing.assert_close(ours, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]), atol=1e-5, rtol=0)


def test_end_to_end_llm_part_matches_transformers(tiny):
    """Stage III off: the LLM part equals transformers' language model on the same embeddings;
    stage III with r_in = 0 (nothing dropped, causal) changes nothing."""
    pix = similar_video(8, 56, seed=1)
    cfg = dict(BASE_CFG, llm_layer=None)
    off = ref.earlytom_reference(tiny, pix, PREFIX, SUFFIX, method_cfg=cfg, max_new_tokens=6)
    visual, _ = ref._visual_tokens(tiny, pix, cfg)
    assert visual.shape[0] == off["stats"]["visual_tokens"]
    emb = tiny.model.language_model.embed_tokens
    embeds = torch.cat([emb(torch.tensor(PREFIX)), visual, emb(torch.tensor(SUFFIX))])[None]
    with torch.no_grad():
        h = tiny.model.language_model(inputs_embeds=embeds).last_hidden_state
        want = tiny.lm_head(h)[0, -1]
    np.testing.assert_allclose(off["first_logits"].numpy(), want.numpy(), atol=1e-5, rtol=0)

    same = ref.earlytom_reference(tiny, pix, PREFIX, SUFFIX, method_cfg=dict(BASE_CFG, llm_ratio=0.0), max_new_tokens=6)
    assert same["stats"]["visual_tokens_after_llm"] == off["stats"]["visual_tokens"]
    np.testing.assert_allclose(same["first_logits"].numpy(), off["first_logits"].numpy(), atol=1e-5, rtol=0)
    assert same["tokens"] == off["tokens"]


def test_end_to_end_rejects_bad_layers(tiny):
    pix = similar_video(4, 56)
    with pytest.raises(ValueError):
        ref.earlytom_reference(tiny, pix, PREFIX, SUFFIX, method_cfg=dict(BASE_CFG, layers=[1, 4]), max_new_tokens=1)
