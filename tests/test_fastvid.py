"""FastVID against its PyTorch reference (tests/references/fastvid_ref.py, written from the
official code) on a tiny random LLaVA-OneVision with the real 27 x 27 → 14 x 14 layout:
segments, kept indices, output tokens, first-token logits and greedy tokens on clips that
segment differently, with the tower's signals and with the original SigLIP head's (a tiny
random transformers `SiglipVisionModel` beside the tower, loaded from its saved directory);
compile counts, budgets, errors and FLOPs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from earlytom_jax import flops, pipeline
from earlytom_jax.bench.timing import FLOP_STATS
from earlytom_jax.compression import registry
from earlytom_jax.compression.fastvid import FastVID
from earlytom_jax.errors import ConfigError
from earlytom_jax.generate import generate
from earlytom_jax.checkpoint.siglip_head import load_siglip_head, with_head
from earlytom_jax.models import siglip_head
from tests.references import fastvid_ref

PREFIX, SUFFIX = [1, 2, 3], [4, 5, 6, 7]
T0, NEW = 12, 3


def _clip(kind: str, size: int) -> np.ndarray:
    """static: one frame with faint noise; varied: every frame random; scenes: three static
    scenes of 5, 4 and 3 frames."""
    rng = np.random.default_rng({"static": 0, "varied": 1, "scenes": 2}[kind])
    noise = 0.02 * rng.normal(size=(T0, 3, size, size))
    if kind == "varied":
        return rng.normal(size=(T0, 3, size, size)).astype(np.float32)
    scenes = [T0] if kind == "static" else [5, 4, 3]
    base = np.concatenate([np.repeat(rng.normal(size=(1, 3, size, size)), n, 0) for n in scenes])
    return (base + noise).astype(np.float32)


CASES = {  # id: (clip, settings); head=True: the SigLIP head loaded (signals "auto" → "head")
    "static": ("static", dict(dyseg_c=3)),
    "varied": ("varied", dict(dyseg_c=3)),
    "scenes": ("scenes", dict(dyseg_c=3)),
    "scenes-r0.25-p2": ("scenes", dict(dyseg_c=3, ratio=0.25, p=2)),
    "varied-default-compact": ("varied", dict(keep_positions=False)),
    "static-head": ("static", dict(dyseg_c=3, head=True)),
    "scenes-head": ("scenes", dict(dyseg_c=3, head=True)),
}


@pytest.fixture(scope="module")
def real_layout(tmp_path_factory):
    from tests.tiny_models import real_layout_model

    return real_layout_model(str(tmp_path_factory.mktemp("tiny378fv")), seed=1, vision_layers=2)


@pytest.fixture(scope="module")
def siglip(real_layout, tmp_path_factory):
    """The original SigLIP beside the tower: a tiny random transformers `SiglipVisionModel` with
    its head, the tower's sizes, saved → (torch model, its directory, our head's tree)."""
    from tests.tiny_models import tiny_siglip

    model, cfg, _ = real_layout
    sig, directory = tiny_siglip(model.config.vision_config, str(tmp_path_factory.mktemp("siglip")))
    return sig, directory, load_siglip_head(directory, cfg.vision)


@pytest.fixture(scope="module")
def runs(real_layout, siglip):
    """Per case: (ours: sizes, kept, tokens, logits, greedy, context counts; the reference's)."""
    model, cfg, params = real_layout
    sig, _, head = siglip
    pre, suf = jnp.asarray(PREFIX, jnp.int32), jnp.asarray(SUFFIX, jnp.int32)
    out = {}
    for case, (clip, kw) in CASES.items():
        kw = dict(kw)
        ratio = kw.pop("ratio", 0.1)
        with_sig = kw.pop("head", False)
        params = with_head(real_layout[2], head if with_sig else None)
        method = registry.build("fastvid", ratio, cfg, **kw)
        pix = _clip(clip, cfg.vision.image_size)
        feats, n, state = pipeline.stage_vision(params, jnp.asarray(pix), cfg, method)
        h, _, positions, _, info = pipeline.stage_tokens(params, feats, n, state, pre, suf, cfg, method)
        count = int(info["count"])
        starts = np.asarray(info["segment_starts"])
        sizes = np.diff(np.append(np.flatnonzero(starts), T0)).tolist()
        gen = generate(params, cfg, pix, PREFIX, SUFFIX, method, NEW)
        ours = dict(sizes=sizes, keep=np.asarray(info["kept_index"])[:count].tolist(),
                    tokens=np.asarray(h[0, len(PREFIX):len(PREFIX) + count]), logits=gen.first_logits,
                    greedy=gen.tokens, counts=np.asarray(info["context_per_frame"]).tolist(),
                    stats=gen.stats, positions=np.asarray(positions)[0], keep_positions=method.keep_positions)
        ref = fastvid_ref.fastvid_reference(model, torch.tensor(pix), PREFIX, SUFFIX, ratio=ratio,
                                            max_new_tokens=NEW, head=sig if with_sig else None, **kw)
        out[case] = (ours, ref)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(runs, case):
    ours, ref = runs[case]
    assert ours["sizes"] == ref["segments"]
    assert ours["counts"] == ref["context_per_frame"]
    assert ours["keep"] == ref["keep"]
    np.testing.assert_allclose(ours["tokens"], ref["tokens"].numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(ours["logits"], ref["first_logits"].numpy(), rtol=0, atol=1e-4)
    assert ours["greedy"] == ref["tokens_out"]


def test_head_signals_used_and_matter(runs):
    """With the head loaded, "auto" runs on the head's signals (stats say so), and they pick
    other tokens than the tower's on the same clip (so the head cases test the head)."""
    for case, (ours, _) in runs.items():
        assert ours["stats"]["signals_head"] is case.endswith("-head"), case
    for clip in ("static", "scenes"):
        assert runs[f"{clip}-head"][0]["keep"] != runs[clip][0]["keep"], clip
    assert runs["static-head"][0]["sizes"] != runs["static"][0]["sizes"]


def test_explicit_head_signals_need_the_head(real_layout, siglip):
    """signals="head" without the head loaded: one ConfigError line; signals="tower" ignores a
    loaded head."""
    _, cfg, params = real_layout
    pix = jnp.asarray(_clip("static", cfg.vision.image_size)[:2])
    method = registry.build("fastvid", 0.1, cfg, dyseg_c=3, signals="head")
    with pytest.raises(ConfigError, match="needs the original SigLIP's head") as e:
        pipeline.stage_vision(params, pix, cfg, method)
    assert "\n" not in str(e.value)
    tower = registry.build("fastvid", 0.1, cfg, dyseg_c=3, signals="tower")
    _, _, state = pipeline.stage_vision(with_head(params, siglip[2]), pix, cfg, tower)
    assert "frame_feature" not in state
    with pytest.raises(ConfigError, match="choose one of auto, head, tower"):
        registry.build("fastvid", 0.1, cfg, signals="pooled")


def test_clips_segment_differently(runs):
    """The clips exercise different segmentations, multi-frame DTM included."""
    sizes = {case: runs[case][0]["sizes"] for case in ("static", "varied", "scenes")}
    assert len({tuple(s) for s in sizes.values()}) == 3, sizes
    assert max(sizes["scenes"]) > 1 and max(runs["scenes"][0]["counts"]) > 7  # anchor frames of a segment
    assert len(sizes["static"]) == 3  # only the c - 1 least similar boundaries are cut


def test_budget_and_positions(runs, real_layout):
    """At most T0·int(196·r) tokens; with keep_positions the text keeps its uncompressed position."""
    _, cfg, _ = real_layout
    P, Q = len(PREFIX), len(SUFFIX)
    for case, (ours, _) in runs.items():
        ratio = CASES[case][1].get("ratio", 0.1)
        count = len(ours["keep"])
        assert 0 < count <= T0 * int(196 * ratio)
        pos = ours["positions"]
        text = P + (T0 * 196 if ours["keep_positions"] else count) + 1  # after the newline
        assert pos[-Q:].tolist() == list(range(text, text + Q)), case
        if ours["keep_positions"]:
            assert pos[P:P + count].tolist() == [P + k for k in ours["keep"]]
    assert FastVID(ratio=0.1).capacity(T0, 196) == T0 * 19


def test_compiles_once(real_layout, runs):
    """Another clip of the same shape reuses the compiled program."""
    _, cfg, params = real_layout
    pre, suf = jnp.asarray(PREFIX, jnp.int32), jnp.asarray(SUFFIX, jnp.int32)
    method = registry.build("fastvid", 0.1, cfg, dyseg_c=3)
    pipeline.prefill_jit(params, jnp.asarray(_clip("static", cfg.vision.image_size)), pre, suf, cfg, method, NEW, None)
    before = pipeline.prefill_jit._cache_size()
    for clip in ("varied", "scenes"):
        pipeline.prefill_jit(params, jnp.asarray(_clip(clip, cfg.vision.image_size)), pre, suf, cfg, method, NEW, None)
    assert pipeline.prefill_jit._cache_size() == before


@pytest.mark.parametrize("ratio, kw, match", [
    (0.5, {}, "anchor tokens"),
    (0.004, {}, "keeps no token"),
    (0.1, {"p": 0}, "must be >= 1"),
    (0.1, {"beta": 2.0}, "must be in"),
])
def test_rejects_settings_it_cannot_meet(real_layout, ratio, kw, match):
    _, cfg, _ = real_layout
    with pytest.raises(ConfigError, match=match):
        registry.build("fastvid", ratio, cfg, **kw)


def test_flops_count_fastvid_work(real_layout, runs):
    """Hook 2's own work goes into `tokens`; the LLM is counted on the kept tokens + newline."""
    _, cfg, _ = real_layout
    method = registry.build("fastvid", 0.1, cfg, dyseg_c=3)
    extra = method.select_flops(cfg, T0)
    h, m = cfg.text.hidden_size, 196 - 12
    assert extra >= T0 * 2 * m * m * h  # the distance matrices at least
    ours = runs["scenes"][0]
    text = len(PREFIX) + len(SUFFIX)
    pf = flops.prefill_flops(cfg, T0, text, ours["stats"], method)
    assert pf.tokens == flops.projector_and_pool(cfg, T0) + extra
    assert pf.llm == flops.llm_prefill(cfg, text + len(ours["keep"]) + 1)
    # the head's work when it gave the signals: "auto" from the run's stats, "head" always
    head = runs["scenes-head"][0]
    with_head_flops = flops.prefill_flops(cfg, T0, text, head["stats"], method).tokens
    means = T0 * 196 * h  # the frame means the head's pooled output replaces
    assert with_head_flops - pf.tokens == siglip_head.flops(cfg.vision, T0) - means > 0
    explicit = registry.build("fastvid", 0.1, cfg, dyseg_c=3, signals="head")
    assert explicit.select_flops(cfg, T0) == method.select_flops(cfg, T0, stats=head["stats"])
    kept = {k: v for k, v in head["stats"].items() if k in FLOP_STATS}  # what `bench` keeps of the stats
    assert flops.prefill_flops(cfg, T0, text, kept, method).tokens == with_head_flops


# ------------------------------------------------------------------------------ LLaVA-Video


VIDEO_CASES = {  # id: (clip, ratio, settings, head); FastVID's LLaVA-Video port (fastvid_video_ref)
    "video-scenes": ("scenes", 0.1, dict(dyseg_c=3), False),
    "video-static-head-p2": ("static", 0.15, dict(dyseg_c=3, p=2), True),
}


@pytest.fixture(scope="module")
def video_layout(tmp_path_factory):
    """A tiny random LLaVA-Video with the real 27 x 27 → 13 x 13 layout (grid newlines) and the
    original SigLIP's head beside it → (torch model, config, params, torch SigLIP, our head)."""
    from tests.test_llava_video import _video_checkpoint
    from tests.tiny_models import tiny_siglip

    model, cfg, params = _video_checkpoint(str(tmp_path_factory.mktemp("video378fv")), seed=2, image_size=378,
                                           vision_layers=2)
    assert (cfg.pooled_grid, cfg.tokens_per_frame) == (13, 169)
    sig, directory = tiny_siglip(model.config.vision_config, str(tmp_path_factory.mktemp("siglip_video")))
    return model, cfg, params, sig, load_siglip_head(directory, cfg.vision)


@pytest.fixture(scope="module")
def video_runs(video_layout):
    from tests.references.fastvid_video_ref import fastvid_video_reference

    model, cfg, params, sig, head = video_layout
    pre, suf = jnp.asarray(PREFIX, jnp.int32), jnp.asarray(SUFFIX, jnp.int32)
    out = {}
    for case, (clip, ratio, kw, with_sig) in VIDEO_CASES.items():
        p = with_head(params, head if with_sig else None)
        method = registry.build("fastvid", ratio, cfg, **kw)
        pix = _clip(clip, cfg.vision.image_size)
        feats, n, state = pipeline.stage_vision(p, jnp.asarray(pix), cfg, method)
        h, valid, positions, _, _ = pipeline.stage_tokens(p, feats, n, state, pre, suf, cfg, method)
        gen = generate(p, cfg, pix, PREFIX, SUFFIX, method, NEW)
        ref = fastvid_video_reference(model, torch.tensor(pix), PREFIX, SUFFIX, ratio=ratio, max_new_tokens=NEW,
                                      head=sig if with_sig else None, **kw)
        out[case] = (method, gen, np.asarray(h[0]), np.asarray(valid[0]), np.asarray(positions[0]), ref)
    return out


def segments_of(starts) -> list[int]:
    return np.diff(np.append(np.flatnonzero(np.asarray(starts)), len(starts))).tolist()


@pytest.mark.parametrize("case", list(VIDEO_CASES))
def test_llava_video_matches_port_reference(video_runs, case):
    """Segments, per-frame salient and context counts, kept indices, the visual span (kept tokens
    and the newline of each row that kept one), every slot's position in the full grid
    sequence, first-token logits and greedy tokens against the port's reference."""
    method, gen, h, valid, positions, ref = video_runs[case]
    s = gen.stats
    count, span = int(s["count"]), int(s["visual_tokens"])
    assert type(method).__name__ == "FastVIDVideo" and registry.name(method) == "fastvid"
    assert segments_of(s["segment_starts"]) == ref["segments"]
    assert np.asarray(s["salient_per_frame"]).tolist() == ref["salient_per_frame"]
    assert np.asarray(s["context_per_frame"]).tolist() == ref["context_per_frame"]
    assert np.asarray(s["kept_index"])[:count].tolist() == ref["keep"]
    assert span == len(ref["span_index"])
    P = len(PREFIX)
    vis = np.flatnonzero(valid[P:len(valid) - len(SUFFIX)]) + P
    assert len(vis) == span
    np.testing.assert_allclose(h[vis], ref["span"].numpy(), rtol=0, atol=1e-5)
    assert (positions[vis] - P).tolist() == ref["span_index"]
    assert positions[np.flatnonzero(valid)].tolist() == ref["positions"]
    np.testing.assert_allclose(gen.first_logits, ref["first_logits"].numpy(), rtol=0, atol=1e-4)
    assert gen.tokens == ref["tokens_out"]
    assert bool(s["signals_head"]) is VIDEO_CASES[case][3]


def test_llava_video_positions_matter(video_runs, video_layout):
    """The reference with consecutive positions instead of the full sequence's moves the logits
    far past the tolerance, so the positions are tested."""
    from tests.references.fastvid_video_ref import fastvid_video_reference

    model, cfg, *_ = video_layout
    clip, ratio, kw, _ = VIDEO_CASES["video-scenes"]
    ref = video_runs["video-scenes"][-1]
    pix = torch.tensor(_clip(clip, cfg.vision.image_size))
    moved = fastvid_video_reference(model, pix, PREFIX, SUFFIX, ratio=ratio, keep_positions=False, **kw)
    assert float((moved["first_logits"] - ref["first_logits"]).abs().max()) > 1e-3


def test_grid_positions_and_text_start(video_layout):
    """`pipeline.grid_positions` on scattered selections (slots in any order, padding between)
    against the full grid span's indices of the layout, and the splice's text after the full
    span (`text_start`) also when the last row kept nothing."""
    _, cfg, params, *_ = video_layout
    g, t0 = 3, 4
    s, vc = g * g, 4 * 9
    cap, full = vc + t0 * g, t0 * g * (g + 1)
    positions = jax.jit(lambda src: pipeline.grid_positions(src, src >= 0, g, jnp.int32(t0), cap))

    @jax.jit
    def text_positions(got, valid):
        info = {"visual_positions": got, "text_start": jnp.int32(full)}
        _, _, pos, out = pipeline.splice(params, jnp.zeros((cap, cfg.text.hidden_size)), valid, info, jnp.arange(2),
                                         jnp.arange(3), cfg)
        assert "text_start" not in out
        return pos[0, -3:]

    rng = np.random.default_rng(0)
    for density in (0.2, 0.5, 0.8):
        keep = rng.random((t0, s)) < density
        keep[-1, -g:] = False  # the last row of the last frame keeps nothing
        src = [t * s + j for t in range(t0) for j in range(s) if keep[t, j]]
        src_arr = np.full(vc, -1, np.int32)
        src_arr[rng.permutation(vc)[:len(src)]] = src
        got = positions(jnp.asarray(src_arr))
        want = []
        for t in range(t0):
            for r in range(g):
                cols = [c for c in range(g) if keep[t, r * g + c]]
                want += [(t * g + r) * (g + 1) + c for c in cols] + ([(t * g + r) * (g + 1) + g] if cols else [])
        assert np.asarray(got).tolist() == want + [0] * (cap - len(want))
        assert max(want) < full - 1  # the text does not follow the last kept slot
        assert np.asarray(text_positions(got, jnp.arange(cap) < len(want))).tolist() == [2 + full + i for i in range(3)]


def test_llava_video_cases_exercise_the_port(video_runs, video_layout):
    """Multi-frame segments with a salient remainder and several anchor frames, frames without
    context, rows without a kept token (fewer newlines than rows), the budget T0·int(169·r)."""
    _, cfg, *_ = video_layout
    for case, (method, gen, *_rest, ref) in video_runs.items():
        s = gen.stats
        count, newlines = int(s["count"]), int(s["visual_tokens"]) - int(s["count"])
        assert count == T0 * int(169 * VIDEO_CASES[case][1])  # every segment keeps R·L
        assert 0 < newlines < T0 * cfg.pooled_grid
        assert max(ref["segments"]) > 1 and 0 in ref["context_per_frame"]
    sal = video_runs["video-scenes"][-1]["salient_per_frame"]
    assert len(set(sal)) > 1  # sal % L > 0 in a segment
    head = video_runs["video-static-head-p2"][-1]
    start = 0
    anchors = []
    for L in head["segments"]:
        anchors.append(sum(c > 0 for c in head["context_per_frame"][start:start + L]))
        start += L
    assert max(anchors) > 1, head["segments"]


def test_llava_video_budgets_match_the_port(video_layout):
    """`frame_budgets` (static shapes) against the port's per-segment lists over random
    segmentations and settings."""
    from earlytom_jax.compression.fastvid_video import frame_budgets
    from tests.references.fastvid_video_ref import frame_counts

    budgets = jax.jit(frame_budgets, static_argnums=(1, 2, 3))
    rng = np.random.default_rng(0)
    for r, d, p in [(16, 0.4, 4), (25, 0.4, 2), (7, 0.25, 3), (33, 0.7, 1), (5, 0.0, 4), (1, 0.4, 2)]:
        for _ in range(6):  # segmentations of 17 frames, one or two long segments among them
            starts = np.concatenate([[True], rng.random(16) < rng.choice([0.1, 0.4])])
            sal, ctx = budgets(jnp.asarray(starts), r, d, p)
            want_s, want_c = [], []
            for L in segments_of(starts):
                a, b = frame_counts(L, r, d, p)
                want_s += a
                want_c += b
            assert np.asarray(sal).tolist() == want_s and np.asarray(ctx).tolist() == want_c


def test_llava_video_settings_and_refusals(video_layout):
    from earlytom_jax.compression.fastvid_video import FastVIDVideo

    _, cfg, *_ = video_layout
    m = registry.build("fastvid", 0.1, cfg)
    assert isinstance(m, FastVIDVideo) and (m.dyseg_c, m.tau, m.d, m.p, m.beta) == (8, 0.9, 0.4, 4, 0.6)
    assert m.capacity(64, 169) == 64 * 16
    assert pipeline.visual_span(cfg, m, 64, 169) == 64 * 16 + 64 * 13
    for ratio, kw, match in [(0.005, {}, "keeps no token"), (0.1, {"d": 1.0}, "no salient token"),
                             (0.9, {}, "more than its 169"), (0.1, {"dyseg_ignore": 0.9}, "Qwen2.5-VL port only")]:
        with pytest.raises(ConfigError, match=match) as e:
            registry.build("fastvid", ratio, cfg, **kw)
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="build it with FastVID.from_ratio"):
        FastVID(ratio=0.1).select(jnp.zeros((2, 169, 4)), 2, {}, cfg)
    h = cfg.text.hidden_size
    assert m.select_flops(cfg, 8) >= 8 * 2 * 169 * 169 * h
