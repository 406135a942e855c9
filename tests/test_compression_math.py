"""EarlyTom stages I-III, array level: JAX (static shapes, padded frame axis) vs the PyTorch
reference in tests/references/earlytom_ref.py on seeded random cases."""

from __future__ import annotations

import collections
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from earlytom_jax.compression import llm_merge as lm
from earlytom_jax.compression import segments as sg
from earlytom_jax.compression import select as sel
from earlytom_jax.models.llava_onevision import bilinear_matrix

from tests.helpers import segments  # noqa: E402
from tests.references import earlytom_ref as ref  # noqa: E402

TC = 48  # static frame capacity of the random cases (T0 <= 40 < TC)
N_POS, C_DIM, HEADS = 16, 8, 2
N_CASES = 200
RATIOS = (0.1, 0.15, 0.2, 0.25, 0.5, 1.0)

# ------------------------------------------------------------------------------------------
# jitted entry points
# ------------------------------------------------------------------------------------------

_STATIC = ("alpha", "max_window", "quirks")


def _jitted(wrap=lambda fn: fn):
    """The stages' jitted entry points, each function first passed through `wrap`."""
    return (
        jax.jit(wrap(sg.frame_similarity)),
        jax.jit(wrap(sg.segment_starts), static_argnames=_STATIC),
        jax.jit(wrap(sg.mixing_matrix), static_argnames=_STATIC),
        jax.jit(wrap(sg.apply_mixing)),
        jax.jit(wrap(sg.final_segments), static_argnames=_STATIC),
        jax.jit(wrap(sel.select_tokens), static_argnames=("quirks",)),
        jax.jit(wrap(sel.compact), static_argnames=("capacity",)),
        jax.jit(wrap(lm.merge_visual_span)),
    )


j_sim, j_starts, j_mix, j_apply, j_final, j_select, j_compact, j_merge3 = _jitted()


# ------------------------------------------------------------------------------------------
# case generation
# ------------------------------------------------------------------------------------------


def make_frames(rng, T, n_pos=N_POS, c=C_DIM):
    """[T, n_pos, c] float32 with runs of near-identical frames built from a few patterns, so
    that segments form and merges happen."""
    n_pat = int(rng.integers(1, 5))
    pats = rng.normal(size=(n_pat, n_pos, c))
    labels = []
    while len(labels) < T:
        labels += [int(rng.integers(n_pat))] * int(rng.integers(1, 9))
    labels = np.array(labels[:T])
    noise = rng.uniform(0.02, 0.8)
    x = pats[labels] + noise * rng.normal(size=(T, n_pos, c))
    return x.astype(np.float32)


def pad(a, cap, rng):
    """Pad axis 0 to cap with finite garbage."""
    extra = rng.normal(size=(cap - a.shape[0],) + a.shape[1:]).astype(a.dtype) * 3.0
    return np.concatenate([a, extra], axis=0)


def random_attention(rng, T, heads=HEADS, n_pos=N_POS):
    logits = rng.normal(size=(T, heads, n_pos, n_pos)) * 2.0
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)).astype(np.float32)


def case_params(seed):
    rng = np.random.default_rng(seed)
    T0 = int(rng.integers(1, 41))
    tau = float(rng.uniform(0.2, 0.95))
    r = float(RATIOS[int(rng.integers(len(RATIOS)))])
    quirks = bool(seed % 4 != 3)  # mostly the official behaviour, some paper-prose cases
    return rng, T0, tau, r, quirks


# ------------------------------------------------------------------------------------------
# helpers: JAX results as Python structures
# ------------------------------------------------------------------------------------------


def starts_to_segments(starts, n):
    starts = np.asarray(starts)
    assert not starts[n:].any(), "padding must never start a segment"
    return segments(starts, n)


def as_np(t):
    return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


def colmean(attn):
    """[T, heads, N, N] -> [T, N]: attention received per token, mean over heads and queries."""
    return attn.mean(axis=(1, 2))


def mix_to_dense(mix, n_out, T, cap=TC):
    W = np.zeros((cap, cap), np.float64)
    for k, row in enumerate(mix):
        for j, w in row:
            W[k, j] += w
    return W


# fixed capacity for compact() across all random cases: one static shape, one trace
CAPACITY = max(sel.visual_capacity(T0, r) for T0 in range(1, 41) for r in RATIOS)


# ------------------------------------------------------------------------------------------
# stage I: one compression layer against merge_layer
# ------------------------------------------------------------------------------------------


def check_layer(x, attn, tau, quirks, rng, stats, cap=TC):
    """Run one layer in the reference and in JAX on identical inputs; compare everything.
    Returns (reference result, W, n_out)."""
    T = x.shape[0]
    res = ref.merge_layer(torch.from_numpy(x), None if attn is None else torch.from_numpy(attn),
                          tau, quirks=quirks)
    xp = pad(x, cap, rng)
    S = j_sim(xp)
    n = jnp.int32(T)
    tau32 = jnp.float32(tau)

    starts = j_starts(S, n, tau32, quirks=quirks)
    assert starts_to_segments(starts, T) == res["segments"]

    W, n_out, starts_out = j_mix(S, n, tau32, quirks=quirks)
    W, n_out, starts_out = np.asarray(W), int(n_out), np.asarray(starts_out)
    assert n_out == len(res["mix"]) == res["x"].shape[0]
    Wr = mix_to_dense(res["mix"], n_out, T, cap)
    np.testing.assert_allclose(W, Wr, atol=1e-6, rtol=0)
    assert not W[n_out:].any() and not W[:, T:].any()
    # starts_out marks the output row of every input segment's first frame
    rows_of = {}
    for k, row in enumerate(res["mix"]):
        if len(row) == 1 and row[0][1] == 1.0:
            rows_of.setdefault(row[0][0], k)
    expect = np.zeros(cap, bool)
    expect[[rows_of[s] for s, _ in res["segments"]]] = True
    np.testing.assert_array_equal(starts_out, expect)

    x_out = np.asarray(j_apply(jnp.asarray(W), xp))
    np.testing.assert_allclose(x_out[:n_out], as_np(res["x"]), atol=1e-5, rtol=0)
    assert not x_out[n_out:].any()
    if attn is not None:
        # importance = W . colmean(A) equals the colmean of the reference's merged attention
        ap = pad(colmean(attn), cap, rng)
        imp = np.asarray(j_apply(jnp.asarray(W), ap))
        np.testing.assert_allclose(imp[:n_out], colmean(as_np(res["attn"])), atol=1e-6, rtol=0)

    stats["frames_in"] += T
    stats["frames_out"] += n_out
    stats["blends"] += sum(len(row) == 2 and row[1][1] > 0 for row in res["mix"])
    stats["dropped_last_middle"] += (T - n_out) - sum(len(row) == 2 for row in res["mix"])
    return res, W, n_out


def check_final_and_select(x, T0, tau, r, quirks, rng, cap=TC):
    """Final segmentation (2d) and stage II on the merged frames x [T', N, C]."""
    Tp = x.shape[0]
    segs = ref.segment_frames(torch.from_numpy(x), tau, quirks=quirks)
    S = j_sim(pad(x, cap, rng))
    starts, dynamic = j_final(S, jnp.int32(Tp), jnp.float32(tau), quirks=quirks)
    assert starts_to_segments(starts, Tp) == segs

    S_TOK = 196
    imp = (rng.permutation(Tp * S_TOK).reshape(Tp, S_TOK) / (Tp * S_TOK)).astype(np.float32)
    out = ref.stage2_select(torch.from_numpy(imp), segs, T0, r, quirks=quirks)
    np.testing.assert_array_equal(np.asarray(dynamic)[:Tp], out["dynamic"])
    assert not np.asarray(dynamic)[Tp:].any()

    k_tab, n_tab = sel.budget_tables(T0, r, S_TOK)
    keep = j_select(jnp.asarray(pad(imp, cap, rng)), jnp.int32(Tp), dynamic,
                    jnp.int32(k_tab[Tp]), jnp.int32(n_tab[Tp]), quirks=quirks)
    keep = np.asarray(keep)
    assert not keep[Tp:].any()
    assert [list(np.nonzero(keep[f])[0]) for f in range(Tp)] == out["kept"]

    # compaction: frame order then raster order, count within the static bound
    vals = pad(rng.normal(size=(Tp, S_TOK, 3)).astype(np.float32), cap, rng)
    buf, valid, src, count = j_compact(jnp.asarray(keep), jnp.asarray(vals), capacity=CAPACITY)
    count = int(count)
    expect_src = [f * S_TOK + s for f in range(Tp) for s in out["kept"][f]]
    assert count == len(expect_src) <= sel.visual_capacity(T0, r, S_TOK)
    np.testing.assert_array_equal(np.asarray(src)[:count], expect_src)
    assert (np.asarray(src)[count:] == -1).all() and np.asarray(valid).sum() == count
    np.testing.assert_array_equal(np.asarray(buf)[:count], vals.reshape(-1, 3)[expect_src])
    assert not np.asarray(buf)[count:].any()


def run_pipeline_case(seed, stats):
    rng, T0, tau, r, quirks = case_params(seed)
    x = make_frames(rng, T0)
    n_layers = 3
    for layer in range(n_layers):
        last = layer == n_layers - 1
        attn = random_attention(rng, x.shape[0]) if last else None
        res, _, _ = check_layer(x, attn, tau, quirks, rng, stats)
        x = as_np(res["x"]).astype(np.float32)
    check_final_and_select(x, T0, tau, r, quirks, rng)


@pytest.mark.parametrize("chunk", range(8))
def test_random_pipeline_vs_reference(chunk):
    """200 seeded cases (8 x 25): three compression layers, final segmentation, stage II."""
    stats = collections.Counter()
    per = N_CASES // 8
    for seed in range(chunk * per, (chunk + 1) * per):
        run_pipeline_case(seed, stats)
    # the cases must exercise the merge paths, not just keep every frame
    assert stats["frames_out"] < 0.95 * stats["frames_in"], stats
    assert stats["blends"] >= 10 and stats["dropped_last_middle"] >= 10, stats


def test_frame_similarity_matches_torch():
    rng = np.random.default_rng(1234)
    for T in (1, 2, 7, 19):
        x = make_frames(rng, T)
        x[0, 0] = 0.0  # a zero token: eps handling
        S = np.asarray(j_sim(pad(x, TC, rng)))[:T, :T]
        np.testing.assert_allclose(S, as_np(ref.frame_similarity(torch.from_numpy(x))), atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------
# edge cases
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quirks", [True, False])
@pytest.mark.parametrize("kind", ["T1", "T2", "identical", "different", "long_identical"])
def test_edge_cases(kind, quirks):
    rng = np.random.default_rng(["T1", "T2", "identical", "different", "long_identical"].index(kind))
    stats = collections.Counter()
    if kind == "T1":
        x = make_frames(rng, 1)
    elif kind == "T2":
        x = make_frames(rng, 2)
    elif kind == "identical":
        x = np.repeat(make_frames(rng, 1), 13, axis=0)
    elif kind == "long_identical":
        x = np.repeat(make_frames(rng, 1), 40, axis=0)
    else:  # all different: consecutive frames orthogonal (basis vector i mod C), plus noise
        x = np.eye(C_DIM)[np.arange(17) % C_DIM][:, None, :] * rng.uniform(0.5, 2.0, size=(17, N_POS, 1))
        x = (x + 0.01 * rng.normal(size=x.shape)).astype(np.float32)
    T0 = x.shape[0]
    for tau in (0.2, 0.6, 0.95):
        res, W, n_out = check_layer(x, random_attention(rng, T0), tau, quirks, rng, stats)
        check_final_and_select(as_np(res["x"]).astype(np.float32), T0, tau, 0.25, quirks, rng)
        if kind in ("T1", "T2"):
            assert n_out == T0
        if kind == "different":
            assert n_out == T0 and res["segments"] == [(i, i) for i in range(T0)]
        if kind == "identical":
            # windows of M-1 = 5 frames: 0-4, 5-9, 10-12
            assert res["segments"] == [(0, 4), (5, 9), (10, 12)]


def test_n_zero_is_all_padding():
    rng = np.random.default_rng(5)
    xp = pad(make_frames(rng, 1)[:0], TC, rng)
    S = j_sim(xp)
    W, n_out, starts_out = j_mix(S, jnp.int32(0), jnp.float32(0.5), quirks=True)
    assert int(n_out) == 0 and not np.asarray(W).any() and not np.asarray(starts_out).any()
    starts, dynamic = j_final(S, jnp.int32(0), jnp.float32(0.5), quirks=True)
    assert not np.asarray(starts).any() and not np.asarray(dynamic).any()


def test_budget_tables_and_clipping():
    S = 196
    for T0 in (1, 2, 7, 32, 40):
        for r in RATIOS:
            k, ns = sel.budget_tables(T0, r, S)
            assert k.shape == ns.shape == (T0 + 1,) and k.dtype == ns.dtype == np.int32
            for Tp in range(1, T0 + 1):
                re = min(r / ((T0 * S - (T0 - Tp) * S) / (T0 * S)), 1)
                assert k[Tp] == math.ceil(S * re) and ns[Tp] == max(1, round(S * re))
                assert 1 <= ns[Tp] <= k[Tp] <= S
            cap = sel.visual_capacity(T0, r, S)
            assert cap == max(Tp * int(k[Tp]) for Tp in range(1, T0 + 1))
    # r' clips at 1: few frames left keep every token of every frame
    k, ns = sel.budget_tables(32, 0.1, S)
    assert k[1] == k[3] == ns[3] == S and k[4] < S
    assert sel.budget_tables(5, 1.0, S)[0].tolist()[1:] == [S] * 5
    assert sel.visual_capacity(32, 1.0, S) == 32 * S


def test_select_clipped_budget_keeps_all():
    """r' = 1: dynamic frames keep all 196 tokens, static frames one per run = all 196."""
    rng = np.random.default_rng(3)
    Tp, T0, S = 3, 30, 196
    k, ns = sel.budget_tables(T0, 0.1, S)
    imp = rng.permutation(TC * S).reshape(TC, S).astype(np.float32)
    dyn = np.zeros(TC, bool)
    dyn[[0, 2]] = True
    for quirks in (True, False):
        keep = np.asarray(j_select(jnp.asarray(imp), jnp.int32(Tp), jnp.asarray(dyn),
                                   jnp.int32(k[Tp]), jnp.int32(ns[Tp]), quirks=quirks))
        assert keep[:Tp].all() and not keep[Tp:].any()


def test_static_groups_match_reference_splits():
    """1-D runs and 2-D blocks: every n in 1..S gives the reference's partition."""
    j_runs = jax.jit(sel.run_ids_1d, static_argnums=0)
    j_blocks = jax.jit(sel.block_ids_2d, static_argnums=0)
    for S in (196, 16, 4, 9):
        for n in range(1, S + 1):
            runs = np.asarray(j_runs(S, jnp.int32(n)))
            blocks = np.asarray(j_blocks(S, jnp.int32(n)))
            for ids, groups in ((runs, ref._static_runs_1d(S, n)), (blocks, ref._static_blocks_2d(S, n))):
                assert ids.max() == n - 1
                assert [sorted(np.nonzero(ids == b)[0].tolist()) for b in range(n)] == groups


def test_select_ties_lower_index_first():
    S = 196
    imp = np.zeros((TC, S), np.float32)
    imp[0, [5, 9, 100]] = 1.0
    dyn = np.ones(TC, bool)
    keep = np.asarray(j_select(jnp.asarray(imp), jnp.int32(1), jnp.asarray(dyn),
                               jnp.int32(5), jnp.int32(5), quirks=True))
    assert np.nonzero(keep[0])[0].tolist() == [0, 1, 5, 9, 100]
    dyn[:] = False
    keep = np.asarray(j_select(jnp.asarray(imp), jnp.int32(1), jnp.asarray(dyn),
                               jnp.int32(5), jnp.int32(2), quirks=True))
    assert np.nonzero(keep[0])[0].tolist() == [5, 100]  # runs [0, 98) and [98, 196)


# ------------------------------------------------------------------------------------------
# pooling weights
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("h,w,oh,ow", [(27, 27, 14, 14), (4, 4, 2, 2), (5, 7, 3, 2), (3, 3, 5, 7), (9, 8, 9, 8)])
def test_bilinear_pool_matches_torch(h, w, oh, ow):
    x = torch.randn(3, h, w, 5, generator=torch.Generator().manual_seed(h * 100 + w))
    expect = as_np(ref.bilinear_pool(x, oh, ow))
    R, C = bilinear_matrix(h, oh), bilinear_matrix(w, ow)
    assert R.shape == (oh, h) and C.shape == (ow, w)
    out = np.einsum("yi,tijc,xj->tyxc", R.astype(np.float64), x.numpy().astype(np.float64), C.astype(np.float64))
    np.testing.assert_allclose(out, expect, atol=2e-6, rtol=0)


def test_bilinear_weights_bit_exact():
    """One-hot inputs read torch's weights out: ours equal them bit for bit."""
    for n_in in range(1, 30):
        for n_out in (1, 2, 7, 14, 27, 31):
            x = torch.eye(n_in)[:, None, :, None].contiguous()
            tw = F.interpolate(x, size=(n_out, 1), mode="bilinear", align_corners=False)[:, 0, :, 0].T
            np.testing.assert_array_equal(bilinear_matrix(n_in, n_out), tw.numpy())


# ------------------------------------------------------------------------------------------
# stage III
# ------------------------------------------------------------------------------------------


VC = 64


def test_stage3_vs_reference():
    rng = np.random.default_rng(77)
    n_cases = 0
    for case in range(200):
        L = int(rng.integers(1, VC + 1))
        r_in = (0.5, 0.5, 0.25, 0.75)[case % 4]
        centres = rng.normal(size=(int(rng.integers(1, 6)), 12))
        h = (centres[rng.integers(len(centres), size=L)] + 0.4 * rng.normal(size=(L, 12))).astype(np.float32)
        attn = (rng.permutation(L) / L).astype(np.float32)
        out = ref.stage3_merge(torch.from_numpy(h), torch.from_numpy(attn), r_in)
        table = lm.keep_count_table(VC, r_in)
        assert table[L] == len(out["keep"])
        h_p = pad(h, VC, rng)
        a_p = np.concatenate([attn, rng.uniform(size=VC - L).astype(np.float32) + 5.0])  # padding attn is large
        valid = np.arange(VC) < L
        h_out, keep = j_merge3(jnp.asarray(h_p), jnp.asarray(a_p), jnp.asarray(valid), jnp.int32(table[L]))
        keep = np.asarray(keep)
        assert np.nonzero(keep)[0].tolist() == out["keep"]
        np.testing.assert_allclose(np.asarray(h_out)[keep], as_np(out["h"]), atol=1e-5, rtol=0)
        n_cases += len(out["drop"]) > 0 and len(out["keep"]) > 0
    assert n_cases > 150


def test_stage3_many_drops_into_one():
    """Sequential halving order: one kept token absorbing several dropped ones."""
    rng = np.random.default_rng(8)
    base = rng.normal(size=(1, 6))
    h = (base + 0.01 * rng.normal(size=(7, 6))).astype(np.float32)
    attn = np.array([0.1, 0.2, 0.9, 0.3, 0.05, 0.01, 0.02], np.float32)
    out = ref.stage3_merge(torch.from_numpy(h), torch.from_numpy(attn), 6 / 7)  # keep 1
    h_out, keep = j_merge3(jnp.asarray(h), jnp.asarray(attn), jnp.ones(7, bool), jnp.int32(1))
    assert np.nonzero(np.asarray(keep))[0].tolist() == out["keep"] == [2]
    np.testing.assert_allclose(np.asarray(h_out)[2], as_np(out["h"])[0], atol=1e-6, rtol=0)
    expect = h[2].astype(np.float64)
    for j in (0, 1, 3, 4, 5, 6):
        expect = (expect + h[j]) / 2
    np.testing.assert_allclose(np.asarray(h_out)[2], expect, atol=1e-6, rtol=0)


def test_dtypes_fp32_math_for_bf16_inputs():
    rng = np.random.default_rng(9)
    x = make_frames(rng, 9)
    xb = jnp.asarray(pad(x, TC, rng)).astype(jnp.bfloat16)
    S = j_sim(xb)
    assert S.dtype == jnp.float32
    W, n_out, _ = j_mix(S, jnp.int32(9), jnp.float32(0.6), quirks=True)
    assert W.dtype == jnp.float32
    out = j_apply(W, xb)
    assert out.dtype == jnp.bfloat16
    expect = np.asarray(W, np.float64) @ np.asarray(xb.astype(jnp.float32), np.float64).reshape(TC, -1)
    np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)).reshape(TC, -1), expect, rtol=1e-2, atol=1e-2)
    h_out, keep = j_merge3(jnp.asarray(rng.normal(size=(41, 5))).astype(jnp.bfloat16),
                           jnp.asarray(rng.uniform(size=41).astype(np.float32)), jnp.ones(41, bool), jnp.int32(20))
    assert h_out.dtype == jnp.bfloat16 and int(np.asarray(keep).sum()) == 20


def test_keep_count_table_rounds_half_to_even():
    t = lm.keep_count_table(9, 0.5)
    assert t.dtype == np.int32 and t.tolist() == [0, 0, 1, 2, 2, 2, 3, 4, 4, 4]


# ------------------------------------------------------------------------------------------
# static shapes: one trace per static configuration across data-dependent counts
# ------------------------------------------------------------------------------------------


def test_one_trace_per_capacity():
    """Data-dependent counts (n, tau) never retrace: chex fails the second trace of any stage."""
    tc = 23
    rng = np.random.default_rng(0)
    j_sim, _, j_mix, j_apply, j_final, j_select, j_compact, j_merge3 = _jitted(
        lambda fn: chex.assert_max_traces(fn, n=1))
    for n in (0, 1, 2, 5, 11, 23):
        for tau in (0.3, 0.9):
            xp = pad(make_frames(rng, max(n, 1))[:n], tc, rng)
            S = j_sim(xp)
            W, n_out, _ = j_mix(S, jnp.int32(n), jnp.float32(tau), quirks=True)
            j_apply(W, jnp.asarray(xp))
            starts, dyn = j_final(S, jnp.int32(n), jnp.float32(tau), quirks=True)
            imp = jnp.asarray(rng.uniform(size=(tc, 196)).astype(np.float32))
            keep = j_select(imp, jnp.int32(n), dyn, jnp.int32(7 + n), jnp.int32(3 + n), quirks=True)
            j_compact(keep, jnp.asarray(rng.normal(size=(tc, 196, 2)).astype(np.float32)), capacity=999)
            h = jnp.asarray(rng.normal(size=(41, 5)).astype(np.float32))
            j_merge3(h, jnp.asarray(rng.uniform(size=41).astype(np.float32)),
                     jnp.arange(41) < 2 * n, jnp.int32(n))
