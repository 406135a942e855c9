"""FastVID against its PyTorch reference (tests/references/fastvid_ref.py, written from the
official code) on a tiny random LLaVA-OneVision with the real 27 x 27 → 14 x 14 layout:
segments, kept indices, output tokens, first-token logits and greedy tokens on clips that
segment differently, with the tower's signals and with the original SigLIP head's (a tiny
random transformers `SiglipVisionModel` beside the tower, loaded from its saved directory);
compile counts, budgets, errors and FLOPs."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from earlytom_jax import flops, pipeline
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
