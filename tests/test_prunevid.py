"""PruneVid against the PyTorch reference written from the official code
(tests/references/prunevid_ref.py): DPC-KNN, the segment refinement, the whole merging (hook 2)
and the in-LLM selection (hook 3: kept tokens, pruned caches, logits, greedy decoding) on a tiny
random LLaVA-OneVision with the real 27 x 27 → 14 x 14 layout, whose projector is re-drawn with
unit-scale weights so that token distances are not all ~0 (with the usual 0.02 init every
DPC-KNN density rounds to 1.0 in fp32 and the centres are ties)."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from earlytom_jax import flops, pipeline
from earlytom_jax.bench.timing import FLOP_STATS
from earlytom_jax.architectures import architecture
from earlytom_jax.compression import defaults, registry
from earlytom_jax.compression import prunevid_ops as ops
from earlytom_jax.compression.prunevid import (PruneVid, PruneVidMerge, cluster_table, kept_capacity, merged_capacity,
                                               quota_table)
from earlytom_jax.errors import ConfigError
from earlytom_jax.generate import generate
from tests.helpers import visual_buffer
from tests.references import prunevid_ref as ref

PREFIX, SUFFIX = [1, 2, 3], [4, 5, 6, 7]


@pytest.fixture(scope="module")
def spread(tmp_path_factory):
    from earlytom_jax.checkpoint.load import load_hf
    from tests.tiny_models import build_tiny_model, save_tiny_checkpoint

    model = build_tiny_model(seed=1, image_size=378, vision_layers=2)
    g = torch.Generator().manual_seed(101)
    with torch.no_grad():
        for lin in (model.model.multi_modal_projector.linear_1, model.model.multi_modal_projector.linear_2):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) / lin.weight.shape[1] ** 0.5)
    cfg, params = load_hf(save_tiny_checkpoint(model, str(tmp_path_factory.mktemp("prunevid"))))
    assert cfg.tokens_per_frame == 196
    return model, cfg, params


def _clip(t0: int, seed: int, scenes: int, size: int) -> np.ndarray:
    """`scenes` scenes in order; in each the left half stays (small noise), the right half is
    new noise every frame: static and dynamic tokens, several segments."""
    rng = np.random.default_rng(seed)
    base = [rng.normal(size=(3, size, size)).astype(np.float32) for _ in range(scenes)]
    frames = []
    for t in range(t0):
        f = base[t * scenes // t0].copy()
        f[:, :, size // 2:] = rng.normal(size=(3, size, size - size // 2))
        frames.append(f + 0.05 * rng.normal(size=f.shape).astype(np.float32))
    return np.stack(frames)


# ------------------------------------------------------------------------------ pieces


@pytest.mark.parametrize("n_valid,clusters,k", [(40, 3, 7), (40, 20, 7), (15, 7, 7), (9, 4, 3)])
def test_dpc_knn_matches_reference(n_valid, clusters, k):
    """On a masked set of points (the valid ones scattered among 60 slots)."""
    rng = np.random.default_rng(n_valid + clusters)
    centres = rng.normal(size=(4, 8)) * 3
    pts = (centres[rng.integers(0, 4, n_valid)] + rng.normal(size=(n_valid, 8))).astype(np.float32)
    slots = np.sort(rng.choice(60, n_valid, replace=False))
    x = np.zeros((60, 8), np.float32)
    x[slots] = pts
    valid = np.zeros(60, bool)
    valid[slots] = True
    assign, rank = jax.jit(ops.dpc_knn, static_argnames="k")(jnp.asarray(x), jnp.asarray(valid), clusters, k=k)
    want, want_centres = ref.dpc_knn(torch.tensor(pts), clusters, k)
    assert np.asarray(assign)[slots].tolist() == want
    got_centres = sorted(range(n_valid), key=lambda i: int(rank[slots[i]]))[:clusters]
    assert got_centres == want_centres


def test_refine_labels_matches_reference():
    rng = np.random.default_rng(0)
    cases = [[0] * 8, [0, 1] * 4, [1, 0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1, 0, 0, 1, 2, 2, 2][:8],
             [2, 2, 0, 1, 1, 0, 0, 2]]
    cases += [rng.integers(0, rng.integers(1, 5), 8).tolist() for _ in range(300)]
    labels = jnp.asarray(np.array(cases, np.int32))
    got = np.asarray(jax.jit(jax.vmap(ops.refine_labels))(labels))
    wid = np.asarray(jax.jit(jax.vmap(lambda x: ops.window_ids(x)[0]))(jnp.asarray(got)))
    for case, g, w in zip(cases, got, wid):
        want = ref.refine(case)
        assert g.tolist() == want, case
        runs = ref._windows(want)
        assert w.tolist() == [i for i, (_, n) in enumerate(runs) for _ in range(n)]
        assert min(n for _, n in runs) >= 2  # why the window capacity is T // 2


def test_capacity_is_the_largest_count():
    """`merged_capacity` against every split into windows of >= 2 frames and every static
    count per window (s = 20 tokens per frame, so both sides of the 14-token rule occur)."""
    s, t0, cr = 20, 6, 0.5
    c = cluster_table(s, cr)
    assert c[14] == 14 and c[15] == 7 and c[20] == 10
    best = 0
    for cuts in itertools.product([0, 1], repeat=t0 - 1):
        sizes, run = [], 1
        for cut in cuts:
            if cut:
                sizes.append(run)
                run = 1
            else:
                run += 1
        sizes.append(run)
        if min(sizes) < 2:
            continue
        best = max(best, sum(max(c[m] + w * c[s - m] for m in range(s + 1)) for w in sizes))
    assert merged_capacity(t0, s, cr) == best


# ------------------------------------------------------------------------------ whole merging

CLIPS = [(8, 0, 2, 2, 0.2), (12, 1, 3, 3, 0.15)]  # t0, seed, scenes, llm_layer K, ratio (α = 2 · ratio)


def _check_merge(m, info, buf, valid, t0, S):
    """Hook 2's output against the reference's merge `m`."""
    count = int(info["count"])
    assert count == m["tokens"].shape[0] and int(valid.sum()) == count + 1  # and the newline
    # segments and the static/dynamic split
    assert np.asarray(info["segment"]).tolist() == [i for i, (_, n) in enumerate(m["windows"]) for _ in range(n)]
    static = np.asarray(info["static"])
    for (start, w), pos in zip(m["windows"], m["static"]):
        for t in range(start, start + w):
            assert np.nonzero(static[t])[0].tolist() == pos
    assert 0 < static.sum() < static.size
    # cluster assignments: the representative of every slot and the slot of every token
    assert np.asarray(info["kept_index"])[:count].tolist() == m["kept"]
    slot_of, base, sets = [-1] * (t0 * S), 0, iter(m["sets"])
    for (start, w), st in zip(m["windows"], m["static"]):
        dy = [s for s in range(S) if s not in set(st)]
        group = next(sets)
        for t in range(start, start + w):
            for i, s in enumerate(st):
                slot_of[t * S + s] = base + group["assign"][i]
        base += len(group["centres"])
        for t in range(start, start + w):
            group = next(sets)
            for i, s in enumerate(dy):
                slot_of[t * S + s] = base + group["assign"][i]
            base += len(group["centres"])
    assert np.asarray(info["token_slot"]).tolist() == slot_of
    assert any(len(g["centres"]) < len(g["assign"]) for g in m["sets"])  # clusters merge tokens
    # the groups hook 3 selects in: each reference group, in order
    gid = np.asarray(info["group"])[:count]
    runs = [len(list(g)) for _, g in itertools.groupby(gid)]
    assert [n for _, n in m["groups"] if n] == runs and (np.asarray(info["group"])[count:] == -1).all()
    np.testing.assert_allclose(np.asarray(buf[:count]), m["tokens"].numpy(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("t0,seed,scenes,layer,ratio", CLIPS, ids=["8f-2scenes", "12f-3scenes"])
def test_matches_reference(spread, t0, seed, scenes, layer, ratio):
    """Merging, then the selection before LLM layer K (the reference's selected_layer K - 1):
    kept slots, the pruned caches of layers 0..K-1, first-token and decode-step logits, tokens."""
    model, cfg, params = spread
    pix = _clip(t0, seed, scenes, cfg.vision.image_size)
    method = registry.build("prunevid", ratio, cfg, llm_layer=layer)
    alpha = method.retention_ratio
    want = ref.prunevid_reference(model, torch.tensor(pix), PREFIX, SUFFIX, selected_layer=layer - 1,
                                  retention_ratio=alpha, max_new_tokens=4)
    m = want["merge"]
    buf, valid, info = visual_buffer(params, jnp.asarray(pix), cfg, method)
    _check_merge(m, info, buf, valid, t0, cfg.tokens_per_frame)
    count = int(info["count"])
    assert len(want["llm_keep"]) == sum(int(n * alpha) for _, n in m["groups"])
    gen = generate(params, cfg, pix, PREFIX, SUFFIX, method, 4)
    keep = np.asarray(gen.stats["llm_keep_mask"])
    assert np.flatnonzero(keep).tolist() == want["llm_keep"] + [count]  # and the newline
    assert gen.stats["llm_kept"] == len(want["llm_keep"]) + 1 <= method.llm_capacity(keep.shape[0])
    assert gen.stats["llm_query_rows"] == len(SUFFIX)
    np.testing.assert_allclose(gen.first_logits, want["first_logits"].numpy(), atol=1e-4, rtol=0)
    assert gen.tokens == want["tokens"]
    out = pipeline.prefill_jit(params, jnp.asarray(pix), jnp.asarray(PREFIX, jnp.int32),
                               jnp.asarray(SUFFIX, jnp.int32), cfg, method, 4, None, None)  # generate's program
    caches, pos = out[1], out[2]
    a = len(PREFIX)
    assert [g.k.shape[0] for g in caches] == [layer, cfg.text.num_layers - layer]
    assert np.flatnonzero(np.asarray(caches[0].valid)[0, a:a + keep.shape[0]]).tolist() == np.flatnonzero(keep).tolist()
    # a decode step attends the pruned caches of every layer (the greedy tokens above: three more)
    logits, _ = pipeline.decode_step(params, jnp.asarray(want["tokens"][:1], jnp.int32), pos, caches,
                                     jnp.asarray(0, jnp.int32), cfg)
    np.testing.assert_allclose(np.asarray(logits), want["step_logits"][0].numpy(), atol=1e-4, rtol=0)


class _Unbucketed(PruneVid):
    def llm_span_buckets(self, span0):
        return (span0,)


def test_span_buckets_change_nothing(spread):
    """The LLM prefill on the smallest span bucket holding the merged tokens equals it on the whole
    static buffer: first-token logits, kept slots, cache layout and validity, greedy tokens; the
    bucket is smaller than the buffer, and the executed FLOPs count the bucket."""
    _, cfg, params = spread
    pix = _clip(8, 0, 2, cfg.vision.image_size)
    fields = dict(llm_layer=2, retention_ratio=0.4)
    got = generate(params, cfg, pix, PREFIX, SUFFIX, PruneVid(**fields), 4)
    want = generate(params, cfg, pix, PREFIX, SUFFIX, _Unbucketed(**fields), 4)
    span = PruneVid(**fields).capacity(8, cfg.tokens_per_frame) + 1
    bucket = int(got.stats["llm_span_bucket"])
    assert int(got.stats["visual_tokens"]) <= bucket < span and "llm_span_bucket" not in want.stats
    assert bucket in PruneVid(**fields).llm_span_buckets(span)
    np.testing.assert_allclose(got.first_logits, want.first_logits, atol=1e-5, rtol=0)
    assert got.tokens == want.tokens
    for k in ("llm_keep_mask", "llm_kept", "count"):
        np.testing.assert_array_equal(np.asarray(got.stats[k]), np.asarray(want.stats[k]))
    args = (params, jnp.asarray(pix), jnp.asarray(PREFIX, jnp.int32), jnp.asarray(SUFFIX, jnp.int32), cfg)
    c_got = pipeline.prefill_jit(*args, PruneVid(**fields), 4, None, None)[1]
    c_want = pipeline.prefill_jit(*args, _Unbucketed(**fields), 4, None, None)[1]
    for g, w in zip(c_got, c_want):
        assert g.length == w.length and g.k.shape == w.k.shape
        np.testing.assert_array_equal(np.asarray(g.valid), np.asarray(w.valid))
        ok = np.asarray(w.valid)[0]
        np.testing.assert_allclose(np.asarray(g.k)[:, 0, ok], np.asarray(w.k)[:, 0, ok], atol=1e-5, rtol=0)
    stats = {k: np.asarray(v) for k, v in got.stats.items()}
    run = flops.executed_prefill_flops(cfg, 8, len(PREFIX) + len(SUFFIX), stats, PruneVid(**fields))
    whole = flops.executed_prefill_flops(cfg, 8, len(PREFIX) + len(SUFFIX), stats, PruneVid(**fields), "largest")
    assert run["llm"] < whole["llm"]
    kept = {k: v for k, v in stats.items() if k in FLOP_STATS}  # what `bench` keeps of the stats
    assert flops.executed_prefill_flops(cfg, 8, len(PREFIX) + len(SUFFIX), kept, PruneVid(**fields)) == run


def test_merging_only_matches_reference(spread):
    """`prunevid_stage1` (the merging alone) end to end: the reference with no in-LLM stage."""
    model, cfg, params = spread
    pix = _clip(8, 0, 2, cfg.vision.image_size)
    want = ref.prunevid_reference(model, torch.tensor(pix), PREFIX, SUFFIX, max_new_tokens=3)
    gen = generate(params, cfg, pix, PREFIX, SUFFIX, registry.build("prunevid_stage1", None, cfg), 3)
    np.testing.assert_allclose(gen.first_logits, want["first_logits"].numpy(), atol=1e-4, rtol=0)
    assert gen.tokens == want["tokens"]
    assert gen.stats["visual_tokens"] == want["merge"]["tokens"].shape[0] + 1 and "llm_kept" not in gen.stats


def test_compiles_once(spread):
    _, cfg, params = spread
    method = PruneVid(llm_layer=2)
    pre, suf = jnp.asarray(PREFIX, jnp.int32), jnp.asarray(SUFFIX, jnp.int32)
    size = cfg.vision.image_size
    pipeline.prefill_jit(params, jnp.asarray(_clip(8, 5, 2, size)), pre, suf, cfg, method, 1, None)
    before = pipeline.prefill_jit._cache_size()
    out = pipeline.prefill_jit(params, jnp.asarray(_clip(8, 6, 4, size)), pre, suf, cfg, method, 1, None)
    assert pipeline.prefill_jit._cache_size() == before
    assert int(out[3]["count"]) <= method.capacity(8, cfg.tokens_per_frame)
    assert 0 < int(out[3]["llm_kept"]) <= method.llm_capacity(method.capacity(8, cfg.tokens_per_frame) + 1)


# ------------------------------------------------------------------------------ settings, FLOPs


def test_registry_and_settings(spread):
    cfg = architecture("llava-ov-0.5b")
    assert registry.build("prunevid_stage1", None, cfg) == PruneVidMerge()
    assert registry.label(PruneVidMerge()) == "PruneVid (merging only)"
    # the official setting: α 0.4 at ratio 0.2, selected_layer 10 (K = 11) where it fits the depth
    kw, notes = defaults.settings("prunevid", cfg)
    pv = registry.build("prunevid", 0.2, cfg, **kw)
    assert pv == PruneVid(llm_layer=11, retention_ratio=0.4) and registry.label(pv) == "PruneVid" and not notes
    assert pv.llm_layers == (11,) and pv.llm_capacity(8 * 98 + 1) == int(8 * 98 * 0.4) + 1
    tiny = spread[1]
    kw, notes = defaults.settings("prunevid", tiny)
    assert kw == {"llm_layer": 1} and "llm_layer 11 -> 1" in notes[0]  # round(11 · 4 / 32) of 4 layers
    for ratio, kw, match in [(0.6, {}, "at most ratio 0.5"), (0.2, {"llm_layer": 24}, "llm layer 24 must be in 1..23"),
                             (0.3, {"cluster_ratio": 0.25}, "at most ratio 0.25")]:
        with pytest.raises(ConfigError, match=match):
            registry.build("prunevid", ratio, cfg, **kw)
    assert registry.build("prunevid_stage1", None, cfg, cluster_ratio=0.3).cluster_ratio == 0.3
    for kw, match in [({"k": 16}, "PruneVid k 16"), ({"cluster_ratio": 0.0}, "cluster_ratio 0.0"),
                      ({"temporal_segment_ratio": 1.5}, "temporal_segment_ratio 1.5")]:
        with pytest.raises(ConfigError, match=match):
            registry.build("prunevid_stage1", None, cfg, **kw)


def test_select_flops_count_the_clustering():
    cfg = architecture("llava-ov-0.5b")
    m = PruneVidMerge()
    s, h = cfg.tokens_per_frame, cfg.text.hidden_size
    f32 = m.select_flops(cfg, 32)
    assert f32 > (16 + 32) * 2 * s * s * h  # a DPC-KNN distance matrix per set
    assert m.select_flops(cfg, 16) < f32
    stats = {"frames": 32, "visual_tokens": 32 * 98 + 1, "count": 32 * 98}
    full = flops.prefill_flops(cfg, 32, 20, stats, pipeline.FULL)
    pv = flops.prefill_flops(cfg, 32, 20, stats, m)
    assert pv.tokens - full.tokens == f32
    # the whole method: layers 0..K-1 on the merged tokens, K.. on those the stage kept
    whole = flops.prefill_flops(cfg, 32, 20, {**stats, "llm_kept": 1255, "llm_query_rows": 12}, PruneVid())
    head = 2 * h * cfg.text.vocab_size
    assert whole.tokens == pv.tokens
    assert whole.llm == 11 * flops.llm_layer(cfg, 20 + 32 * 98 + 1) + 13 * flops.llm_layer(cfg, 20 + 1255) + head


def test_in_llm_selection_matches_reference():
    """`keep_in_groups` (hook 3's selection) against the reference's `select_in_llm` on the groups
    of a merged layout, with score ties; and the kept count within `kept_capacity`."""
    from earlytom_jax.compression.prunevid import keep_in_groups

    groups = [("static", 49), ("dynamic", 37)] + [("dynamic", 37)] * 3 + [("static", 14), ("dynamic", 5), ("dynamic", 5)]
    v = sum(n for _, n in groups)
    rng = np.random.default_rng(3)
    score = rng.integers(0, 40, v).astype(np.float32) / 40  # many ties
    gid = np.concatenate([np.full(n, i) for i, (_, n) in enumerate(groups)]).astype(np.int32)
    span = v + 7  # then the newline (no group) and padding
    group = np.concatenate([gid, [-1], np.full(6, -1)]).astype(np.int32)
    valid = np.arange(span) <= v
    sc = np.concatenate([score, np.zeros(7, np.float32)])
    for ratio in (0.4, 0.25, 1.0):
        keep = np.asarray(jax.jit(keep_in_groups, static_argnames="retention_ratio")(
            jnp.asarray(sc), jnp.asarray(group), jnp.asarray(valid), retention_ratio=ratio))
        assert np.nonzero(keep[:v])[0].tolist() == ref.select_in_llm(torch.tensor(score), groups, ratio)
        assert keep[v] and not keep[v + 1:].any()
        assert keep[:v].sum() <= kept_capacity(v, ratio)
    q = quota_table(200, 0.7)  # int(n · 0.7) in float64: the capacity is the best quota per slot
    assert kept_capacity(200, 0.7) == max(q[n] * 200 // n for n in range(1, 201)) == 140
