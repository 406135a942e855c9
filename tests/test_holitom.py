"""HoliTom (baseline) against the PyTorch reference written from its official code
(tests/references/holitom_ref.py) on a tiny random LLaVA-OneVision with the real 27 x 27 →
14 x 14 layout: segments, kept tokens, clusters, merged features, first-token logits and
greedy tokens; plus its parts (DP segmentation, DPC-KNN, budget tables), compiles, FLOPs and
bad settings."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from earlytom_jax import flops, pipeline
from earlytom_jax.architectures import architecture
from earlytom_jax.compression import dpc_knn, registry
from earlytom_jax.compression import holitom_temporal as temporal
from earlytom_jax.errors import ConfigError
from earlytom_jax.generate import generate
from tests.helpers import random_pixels, visual_buffer
from tests.references import holitom_ref

PREFIX, SUFFIX = [1, 2, 3], [4, 5, 6, 7]
T0, K_LLM = 6, 2


@pytest.fixture(scope="module")
def real_layout(tmp_path_factory):
    from tests.tiny_models import real_layout_model

    return real_layout_model(str(tmp_path_factory.mktemp("tiny378h")), seed=1, vision_layers=2)


def _clip(name: str) -> np.ndarray:
    ind = random_pixels(T0, 378, seed=5)
    if name == "static":  # one frame and faint noise: one segment, every token static
        noise = random_pixels(T0, 378, seed=6)
        return ind[0][None] + 0.05 * noise
    if name == "singleton":  # frame 3 unlike the others: a segment of one frame
        ind[3] = -3.0 * ind[3]
    return ind


def _segments(starts):
    out = []
    for t, a in enumerate(starts):
        if t == a:
            out.append([t, t])
        else:
            out[-1][1] = t
    return [tuple(s) for s in out]


CASES = [("static", 0.1, None), ("varied", 0.1, 0.97), ("singleton", 0.25, 0.95)]


@pytest.mark.parametrize("clip,ratio,tau", CASES, ids=[f"{c}-r{r}-t{t}" for c, r, t in CASES])
def test_matches_reference(real_layout, clip, ratio, tau):
    model, cfg, params = real_layout
    pix = _clip(clip)
    kw = {} if tau is None else {"tau": tau}
    method = registry.build("holitom", ratio, cfg, llm_layer=K_LLM, **kw)
    gen = generate(params, cfg, pix, PREFIX, SUFFIX, method, 4)
    ref = holitom_ref.holitom_reference(model, torch.tensor(pix), PREFIX, SUFFIX, ratio=ratio, tau=method.tau,
                                        llm_layer=K_LLM, max_new_tokens=4)
    S = cfg.tokens_per_frame
    st = gen.stats
    assert _segments(st["segment_start"]) == ref["segments"]
    assert st["reduced"] == ref["saved"]
    assert [i for i in st["kept_index"] if i >= 0] == ref["kept"]
    assert st["count"] == len(ref["kept"]) <= method.capacity(T0, S)
    assert st["visual_tokens"] == st["count"] + 1
    for a, groups in ref["groups"].items():  # DPC-KNN clusters: centre → members
        row = st["cluster"][a]
        got = {c: [s for s in range(S) if row[s] == c and s != c] for c in groups}
        assert got == groups and sum(v >= 0 for v in row) == len(ref["static"][a])
    buf, valid, _ = visual_buffer(params, jnp.asarray(pix), cfg, method)
    n = st["count"]
    np.testing.assert_allclose(np.asarray(buf[:n]), ref["visual"].numpy(), atol=1e-5, rtol=0)
    assert [i for i, k in enumerate(st["llm_keep_mask"]) if k] == ref["llm_keep"]
    np.testing.assert_allclose(gen.first_logits, ref["first_logits"].numpy(), atol=1e-4, rtol=0)
    assert gen.tokens == ref["tokens"]


@pytest.mark.parametrize("clip", ["varied", "singleton"])
def test_contextual_tokens_match_reference(real_layout, clip):
    """D = 0.5: each dynamic frame keeps round(c/2) top-attention tokens and c minus that many
    DPC-KNN cluster tokens of its other dynamic tokens (one program for both clips)."""
    model, cfg, params = real_layout
    pix = _clip(clip)
    method = registry.build("holitom", 0.1, cfg, llm_layer=K_LLM, tau=0.97, d=0.5)
    gen = generate(params, cfg, pix, PREFIX, SUFFIX, method, 4)
    ref = holitom_ref.holitom_reference(model, torch.tensor(pix), PREFIX, SUFFIX, ratio=0.1, tau=0.97,
                                        llm_layer=K_LLM, max_new_tokens=4, D=0.5)
    S, st = cfg.tokens_per_frame, gen.stats
    assert _segments(st["segment_start"]) == ref["segments"] and len(ref["segments"]) > 1
    assert [i for i in st["kept_index"] if i >= 0] == ref["kept"]
    assert st["count"] == len(ref["kept"]) <= method.capacity(T0, S)
    members, kept = 0, list(st["kept_index"])
    for t, groups in ref["context"].items():  # contextual clusters of frame t: centre → members
        row = st["context_cluster"][t]
        assert groups and {c: [s for s in range(S) if row[s] == c and s != c] for c in groups} == groups
        members += sum(map(len, groups.values()))
        for c, ms in groups.items():  # a member's tokens went to its centre's slot
            assert {st["token_slot"][t * S + m] for m in [c, *ms]} == {kept.index(t * S + c)}
    assert members > 0
    buf, _, _ = visual_buffer(params, jnp.asarray(pix), cfg, method)
    np.testing.assert_allclose(np.asarray(buf[:st["count"]]), ref["visual"].numpy(), atol=1e-5, rtol=0)
    assert [i for i, k in enumerate(st["llm_keep_mask"]) if k] == ref["llm_keep"]
    np.testing.assert_allclose(gen.first_logits, ref["first_logits"].numpy(), atol=1e-4, rtol=0)
    assert gen.tokens == ref["tokens"]


def test_cases_cover_the_branches(real_layout):
    """The clips above exercise what they claim: one static segment, multi-frame segments with
    some static tokens, a segment of one frame, merges with members."""
    model, cfg, _ = real_layout
    from tests.references.baselines_ref import _encode

    seen = {}
    for clip, ratio, tau in CASES:
        pooled, attn, _ = _encode(model, torch.tensor(_clip(clip)))
        seen[(clip, tau)] = holitom_ref.holitom_tokens(pooled, attn, ratio, tau or 0.65)
    assert seen[("static", None)]["segments"] == [(0, T0 - 1)]
    varied = seen[("varied", 0.97)]
    assert len(varied["segments"]) > 1 and all(0 < len(p) < 196 for p in varied["static"].values())
    assert any(a == b for a, b in seen[("singleton", 0.95)]["segments"])
    assert any(len(m) > 0 for r in seen.values() for g in r["groups"].values() for m in g.values())


def test_compiles_once_per_shape(real_layout):
    _, cfg, params = real_layout
    method = registry.build("holitom", 0.1, cfg, llm_layer=K_LLM, tau=0.97)
    pre, suf = jnp.asarray(PREFIX, jnp.int32), jnp.asarray(SUFFIX, jnp.int32)
    counts = []
    for clip in ("varied", "static"):  # different segmentations, one program
        # called as `generate` calls it, so the program of the parity test above is reused
        out = pipeline.prefill_jit(params, jnp.asarray(_clip(clip)), pre, suf, cfg, method, 4, None, None)
        counts.append(int(out[3]["count"]))
        if clip == "varied":
            before = pipeline.prefill_jit._cache_size()
    assert pipeline.prefill_jit._cache_size() == before and counts[0] != counts[1]


# ------------------------------------------------------------------------------ parts


@pytest.mark.parametrize("seed,max_window", [(0, 1024), (1, 3), (2, 2), (3, 1)])
def test_segmentation_matches_the_official_dp(seed, max_window):
    rng = np.random.default_rng(seed)
    T, S, tau = 9, 12, 0.5
    sim = rng.uniform(0.2, 1.0, size=(T - 1, S)).astype(np.float32)
    sim[rng.integers(0, T - 1, 2)] = 0.9  # some pairs where every token is static
    got = jax.jit(temporal.segments, static_argnums=(1, 2))(jnp.asarray(sim), tau, max_window)
    segs, saved = holitom_ref.static_windows(torch.tensor(sim), tau, max_window)
    assert _segments(np.asarray(got["start"]).tolist()) == segs
    assert int(got["reduced"]) == int(got["saved_total"]) == saved


@pytest.mark.parametrize("dupes", [False, True])
def test_dpc_knn_matches_reference(dupes):
    """Centres, assignment and merged tokens on masked random sets; with duplicated rows the
    index tie-break decides, identically in both."""
    rng = np.random.default_rng(4)
    N, D = 40, 16
    x = rng.normal(size=(N, D)).astype(np.float32)
    if dupes:
        x[10:20] = x[0]
    valid = rng.uniform(size=N) < 0.8
    valid[:20] = True
    pos = [i for i in range(N) if valid[i]]
    n_cl = 9
    fn = jax.jit(lambda x, v, c, k: dpc_knn.dpc_knn(x, v, c, k))
    centre, assign, _ = fn(jnp.asarray(x), jnp.asarray(valid), n_cl, min(7, n_cl))
    merged = dpc_knn.merge_clusters(jnp.asarray(x), centre, assign, 0.6)
    rc, dist = holitom_ref.dpc_knn(torch.tensor(x[pos]), n_cl, min(7, n_cl))
    tokens, groups = holitom_ref.merge_clusters(torch.tensor(x[pos]), rc, dist, 0.6)
    assert [i for i in range(N) if centre[i]] == [pos[c] for c in rc]
    a = np.asarray(assign)
    assert {pos[c]: [i for i in range(N) if a[i] == pos[c] and i != pos[c]] for c in rc} == \
        {pos[c]: [pos[m] for m in ms] for c, ms in groups.items()}
    assert (a[~valid] == -1).all()
    np.testing.assert_allclose(np.asarray(merged)[[pos[c] for c in rc]], tokens.numpy(), atol=1e-6, rtol=0)


def test_budget_tables_follow_python_floats():
    """ceil/round of n · r' as Python computes them in float64: at R = 42, 135 · r' is
    14.000000000000002 and ceil gives 15 (fp32 arithmetic would give 14)."""
    t0, s, r = 6, 196, 0.1
    dom, ctx, cl = temporal.count_tables(t0, s, r)
    total = t0 * s
    for R in (0, 1, 42, 490, 980):
        rr = min(r / ((total - float(R)) / total), 1)
        assert [int(v) for v in dom[R]] == [math.ceil(n * rr) for n in range(s + 1)] and not ctx.any()
        assert [int(v) for v in cl[R]] == [round(n * rr) for n in range(s + 1)]
        for D in (0.3, 0.5, 0.9):  # dominant = round(c·(1 - D)) (half to even), contextual = c - dominant
            dd, cc, _ = temporal.count_tables(t0, s, r, D)
            c = [math.ceil(n * rr) for n in range(s + 1)]
            assert [int(v) for v in dd[R]] == [round(k * (1 - D)) for k in c]
            assert [int(a + b) for a, b in zip(dd[R], cc[R])] == c
    assert dom[42, 135] == 15 and int(np.ceil(np.float32(135) * np.float32(r / ((total - 42) / total)))) == 14
    assert temporal.capacity(32, 196, 0.1) == 627 + 32 + 8


def test_settings_and_errors(real_layout):
    _, tiny, _ = real_layout
    ov = architecture("llava-ov-0.5b")
    assert registry.build("holitom", 0.1, ov).tau == 0.65
    assert registry.build("holitom", 0.15, ov).tau == registry.build("holitom", 0.25, ov).tau == 0.80
    m = registry.build("holitom", 0.1, ov)
    assert (m.llm_layer, m.llm_ratio, m.beta, m.knn, m.d) == (18, 0.5, 0.6, 7, 0.0)
    assert registry.build("holitom", 0.1, tiny, llm_layer=-1).llm_layer is None
    with pytest.raises(ConfigError, match="llm layer 18 must be in 1..3"):
        registry.build("holitom", 0.1, tiny)
    with pytest.raises(ConfigError, match="below 1/196"):
        registry.build("holitom", 0.004, ov)
    with pytest.raises(ConfigError, match="tau"):
        registry.build("holitom", 0.1, ov, tau=1.5)
    for d in (1.0, -0.1):
        with pytest.raises(ConfigError, match=r"HoliTom D .* is outside \[0, 1\)"):
            registry.build("holitom", 0.1, ov, d=d)


def test_flops_count_selection_and_the_llm_merge():
    cfg = architecture("llava-ov-0.5b")
    m = registry.build("holitom", 0.1, cfg)
    t0, text, S, H = 32, 40, 196, cfg.text.hidden_size
    stats = {"frames": t0, "visual_tokens": 700, "llm_kept": 350}
    f = flops.prefill_flops(cfg, t0, text, stats, m)
    extra = m.select_flops(cfg, t0)
    assert extra > t0 * 2 * S * S * H  # DPC-KNN's Gram matrices on every row
    assert registry.build("holitom", 0.1, cfg, d=0.5).select_flops(cfg, t0) == extra + t0 * dpc_knn.flops(S, H)
    assert f.tokens == flops.projector_and_pool(cfg, t0) + extra
    assert f.llm == flops.llm_prefill(cfg, text + 700, text + 350, 18)


def test_llava_video_matches_reference(tmp_path):
    """LLaVA-Video (13 x 13 average-pooled tokens, grid newlines after each row that kept a
    token): kept tokens, in-LLM kept positions, first-token logits and greedy tokens."""
    from tests.test_llava_video import _video_checkpoint

    model, cfg, params = _video_checkpoint(str(tmp_path / "vid"), seed=2, image_size=378, vision_layers=2)
    assert cfg.pooled_grid == 13
    pix = _clip("singleton")[:4]
    method = registry.build("holitom", 0.25, cfg, llm_layer=K_LLM, tau=0.95)
    assert registry.build("holitom", 0.1, cfg, llm_layer=K_LLM).tau == 0.80  # the LLaVA-Video script's T at every ratio
    gen = generate(params, cfg, pix, PREFIX, SUFFIX, method, 3)
    ref = holitom_ref.holitom_reference(model, torch.tensor(pix), PREFIX, SUFFIX, ratio=0.25, tau=0.95,
                                        llm_layer=K_LLM, max_new_tokens=3, grid=True)
    assert len(ref["segments"]) > 1 and ref["groups"]
    assert sorted(i for i in gen.stats["kept_index"] if i >= 0) == sorted(ref["kept"])
    assert [i for i, k in enumerate(gen.stats["llm_keep_mask"]) if k] == ref["llm_keep"]
    np.testing.assert_allclose(gen.first_logits, ref["first_logits"].numpy(), atol=1e-4, rtol=0)
    assert gen.tokens == ref["tokens"]
