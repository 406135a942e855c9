"""PruneVid's merging (hook 2) against the PyTorch reference written from the official code
(tests/references/prunevid_ref.py): DPC-KNN, the segment refinement, and the whole merging on
a tiny random LLaVA-OneVision with the real 27 x 27 → 14 x 14 layout, whose projector is
re-drawn with unit-scale weights so that token distances are not all ~0 (with the usual
0.02 init every DPC-KNN density rounds to 1.0 in fp32 and the centres are ties)."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from earlytom_jax import flops, pipeline
from earlytom_jax.architectures import architecture
from earlytom_jax.compression import prunevid_ops as ops
from earlytom_jax.compression import registry
from earlytom_jax.compression.prunevid import PruneVidMerge, cluster_table, merged_capacity
from earlytom_jax.errors import ConfigError
from earlytom_jax.generate import generate
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


def _buffer(params, pix, cfg, method):
    feats, n, state = pipeline.encode_video(params, pix, cfg, method)
    return pipeline.visual_buffer(params, feats, n, state, cfg, method)


_buffer_jit = jax.jit(_buffer, static_argnames=("cfg", "method"))


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

CLIPS = [(8, 0, 2), (12, 1, 3)]


@pytest.mark.parametrize("t0,seed,scenes", CLIPS, ids=["8f-2scenes", "12f-3scenes"])
def test_merging_matches_reference(spread, t0, seed, scenes):
    model, cfg, params = spread
    pix = _clip(t0, seed, scenes, cfg.vision.image_size)
    method = registry.build("prunevid_stage1", None, cfg)
    want = ref.prunevid_reference(model, torch.tensor(pix), PREFIX, SUFFIX, max_new_tokens=3)
    m, S = want["merge"], cfg.tokens_per_frame
    buf, valid, info = _buffer_jit(params, jnp.asarray(pix), cfg, method)
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
    np.testing.assert_allclose(np.asarray(buf[:count]), m["tokens"].numpy(), atol=1e-5, rtol=0)
    gen = generate(params, cfg, pix, PREFIX, SUFFIX, method, 3)
    np.testing.assert_allclose(gen.first_logits, want["first_logits"].numpy(), atol=1e-4, rtol=0)
    assert gen.tokens == want["tokens"]
    assert gen.stats["visual_tokens"] == count + 1


def test_compiles_once(spread):
    _, cfg, params = spread
    method = PruneVidMerge()
    pre, suf = jnp.asarray(PREFIX, jnp.int32), jnp.asarray(SUFFIX, jnp.int32)
    size = cfg.vision.image_size
    pipeline.prefill_jit(params, jnp.asarray(_clip(8, 5, 2, size)), pre, suf, cfg, method, 1, None)
    before = pipeline.prefill_jit._cache_size()
    out = pipeline.prefill_jit(params, jnp.asarray(_clip(8, 6, 4, size)), pre, suf, cfg, method, 1, None)
    assert pipeline.prefill_jit._cache_size() == before
    assert int(out[3]["count"]) <= method.capacity(8, cfg.tokens_per_frame)


def test_in_llm_reference_keeps_everything_at_full_retention(spread):
    """The reference's in-LLM stage (not wired into the pipeline yet): with retention 1 it
    changes nothing; with 0.4 each group keeps int(0.4 · size)."""
    model, cfg, _ = spread
    pix = torch.tensor(_clip(8, 0, 2, cfg.vision.image_size))
    plain = ref.prunevid_reference(model, pix, PREFIX, SUFFIX, max_new_tokens=2)
    full = ref.prunevid_reference(model, pix, PREFIX, SUFFIX, selected_layer=1, retention_ratio=1.0, max_new_tokens=2)
    np.testing.assert_allclose(full["first_logits"].numpy(), plain["first_logits"].numpy(), atol=1e-5, rtol=0)
    assert full["tokens"] == plain["tokens"]
    part = ref.prunevid_reference(model, pix, PREFIX, SUFFIX, selected_layer=1, retention_ratio=0.4)
    assert len(part["llm_keep"]) == sum(int(n * 0.4) for _, n in part["merge"]["groups"])


# ------------------------------------------------------------------------------ settings, FLOPs


def test_registry_and_settings():
    cfg = architecture("llava-ov-0.5b")
    assert registry.build("prunevid_stage1", None, cfg) == PruneVidMerge()
    assert registry.label(PruneVidMerge()) == "PruneVid (merging only)"
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


def test_in_llm_selection_matches_reference():
    """`keep_in_groups` (the in-LLM stage's selection, for when hook 3 can run it) against the
    reference's `select_in_llm` on the groups of a merged layout, with score ties."""
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
