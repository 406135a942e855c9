"""The token-budget baselines (VisionZip, uniform tokens, uniform frames) against PyTorch
references written from their descriptions (tests/references/baselines_ref.py) on a tiny
random LLaVA-OneVision with the real 27 x 27 → 14 x 14 layout; budgets, compile counts,
FLOPs and the registry."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from earlytom_jax import flops, pipeline
from earlytom_jax.architectures import architecture
from earlytom_jax.compression import defaults, registry
from earlytom_jax.compression.earlytom import EarlyTom
from earlytom_jax.compression.fastv import FastV
from earlytom_jax.errors import ConfigError
from earlytom_jax.generate import generate
from tests.helpers import hf_logits, random_pixels
from tests.references import baselines_ref

PREFIX, SUFFIX = [1, 2, 3], [4, 5, 6, 7]
T0 = 6


@pytest.fixture(scope="module")
def real_layout(tmp_path_factory):
    """378 px / 14 → 27 x 27 patches, pooled to 14 x 14 = 196 tokens per frame, as SigLIP-384."""
    from tests.tiny_models import real_layout_model

    return real_layout_model(str(tmp_path_factory.mktemp("tiny378")), seed=1, vision_layers=2)


def _run(loaded, method, seed=0):
    model, cfg, params = loaded
    pix = random_pixels(T0, cfg.vision.image_size, seed=seed)
    gen = generate(params, cfg, pix, PREFIX, SUFFIX, method.check(cfg) if hasattr(method, "check") else method, 1)
    return pix, gen


def _expected_slots(frames, budgets, S):
    """Reference VisionZip selection as (kept source per slot, slot of every source token)."""
    kept, slot_of = [], [-1] * (len(frames) * S)
    base = 0
    for t, f in enumerate(frames):
        for i, j in enumerate(f["dominant"] + f["targets"]):
            kept.append(t * S + j)
            slot_of[t * S + j] = base + i
        for tgt, group in f["groups"].items():
            for j in group:
                slot_of[t * S + j] = slot_of[t * S + tgt]
        base += budgets[t]
    return kept, slot_of


VZ_CASES = [dict(ratio=0.1), dict(ratio=0.25), dict(ratio=0.25, dominant_ratio=0.5, quirks=False)]


@pytest.mark.parametrize("settings", VZ_CASES, ids=["r0.1", "r0.25", "r0.25-half-average"])
def test_visionzip_matches_reference(real_layout, settings):
    model, cfg, _ = real_layout
    kw = dict(settings)
    ratio = kw.pop("ratio")
    pix, gen = _run(real_layout, registry.build("visionzip", ratio, cfg, **kw), seed=3)
    ref = baselines_ref.baseline_reference(model, torch.tensor(pix), PREFIX, SUFFIX, "visionzip", ratio, **kw)
    S = cfg.tokens_per_frame
    budgets = baselines_ref.frame_budgets(T0, ratio, S)
    kept, slot_of = _expected_slots(ref["frames"], budgets, S)
    assert gen.stats["kept_index"] == kept
    assert gen.stats["token_slot"] == slot_of
    assert any(len(g) > 1 for f in ref["frames"] for g in f["groups"].values())  # merges happen
    assert gen.stats["count"] == ref["visual_tokens"] == registry.token_budget(T0, ratio, S)
    assert gen.stats["visual_tokens"] == gen.stats["count"] + 1  # and the newline
    np.testing.assert_allclose(gen.first_logits, ref["first_logits"].numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("ratio,mode", [(0.1, "pool"), (0.25, "pool"), (0.1, "sample")])
def test_uniform_tokens_match_reference(real_layout, ratio, mode):
    model, cfg, _ = real_layout
    pix, gen = _run(real_layout, registry.build("uniform_tokens", ratio, cfg, mode=mode), seed=4)
    ref = baselines_ref.baseline_reference(model, torch.tensor(pix), PREFIX, SUFFIX, "uniform_tokens", ratio, mode=mode)
    S = cfg.tokens_per_frame
    assert gen.stats["kept_index"] == [t * S + c for t, f in enumerate(ref["frames"]) for c in f["centres"]]
    slot_of, base = [-1] * (T0 * S), 0
    for t, f in enumerate(ref["frames"]):
        for i, cell in enumerate(f["cells"]):
            for j in cell if mode == "pool" else [f["centres"][i]]:
                slot_of[t * S + j] = base + i
        base += len(f["cells"])
    assert gen.stats["token_slot"] == slot_of
    assert gen.stats["count"] == ref["visual_tokens"] == registry.token_budget(T0, ratio, S)
    assert gen.stats["visual_tokens"] == gen.stats["count"] + 1
    np.testing.assert_allclose(gen.first_logits, ref["first_logits"].numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("ratio,frames", [(0.1, [0]), (0.25, [0, 5])])
def test_uniform_frames_match_transformers_on_the_kept_frames(real_layout, ratio, frames):
    """The kept frames are the reference's, and the answer is transformers' own full model
    run on just those frames."""
    model, cfg, _ = real_layout
    method = registry.build("uniform_frames", ratio, cfg)
    assert list(method.input_frames(T0)) == baselines_ref.picked_frames(T0, ratio) == frames
    pix, gen = _run(real_layout, method, seed=5)
    ref = baselines_ref.baseline_reference(model, torch.tensor(pix), PREFIX, SUFFIX, "uniform_frames", ratio)
    hf, _ = hf_logits(model, pix[frames], PREFIX, SUFFIX)
    assert gen.stats["frames"] == len(frames)
    assert gen.stats["count"] == ref["visual_tokens"] == len(frames) * cfg.tokens_per_frame
    assert gen.stats["visual_tokens"] == gen.stats["count"] + 1
    np.testing.assert_allclose(gen.first_logits, ref["first_logits"].numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(gen.first_logits, hf[-1], atol=1e-4, rtol=0)


def test_each_baseline_compiles_once(real_layout):
    """A second video of the same shape reuses each method's compiled program (called as
    `generate` calls it, so the programs of the tests above are reused)."""
    _, cfg, params = real_layout
    pre, suf = jnp.asarray(PREFIX, jnp.int32), jnp.asarray(SUFFIX, jnp.int32)
    for name in ("visionzip", "uniform_tokens", "uniform_frames"):
        method = registry.build(name, 0.25, cfg)
        pipeline.prefill_jit(params, jnp.asarray(random_pixels(T0, cfg.vision.image_size, 7)), pre, suf, cfg, method, 1, None)
        before = pipeline.prefill_jit._cache_size()
        out = pipeline.prefill_jit(params, jnp.asarray(random_pixels(T0, cfg.vision.image_size, 8)), pre, suf, cfg, method, 1, None)
        assert pipeline.prefill_jit._cache_size() == before, name
        assert int(out[3]["visual_tokens"]) == method.capacity(T0, cfg.tokens_per_frame) + 1


# ------------------------------------------------------------------------------ budgets


@pytest.mark.parametrize("ratio", [0.1, 0.25])
@pytest.mark.parametrize("t0", [1, 7, 32])
def test_budgets_match_across_methods(ratio, t0):
    cfg = architecture("llava-ov-0.5b")
    S = cfg.tokens_per_frame
    budget = registry.token_budget(t0, ratio, S)
    assert budget == round(ratio * t0 * S)
    for name in ("visionzip", "uniform_tokens"):
        assert registry.build(name, ratio, cfg).capacity(t0, S) == budget, name
    k = max(1, round(ratio * t0))
    assert registry.build("uniform_frames", ratio, cfg).capacity(t0, S) == k * S
    span = t0 * S + 1
    assert registry.build("fastv", ratio, cfg).llm_capacity(span) == round(ratio * span)
    # the paper's VisionZip "10%": 20 tokens per frame, 16 dominant + 4 contextual
    k_, c_, _ = registry.build("visionzip", ratio, cfg, per_frame=20).budgets(t0, S)
    assert set(k_) == {16} and set(c_) == {4}


def test_registry_builds_like_the_command_line():
    cfg = architecture("llava-ov-0.5b")
    assert registry.build("full", None, cfg) == pipeline.FULL
    assert registry.build("fastv", 0.3, cfg, layer=3) == FastV(layer=3, drop=0.7)
    assert registry.build("earlytom", 0.1, cfg) == EarlyTom(ratio=0.1)
    got = registry.build("earlytom", 0.25, cfg, preset="videomme@0.1", llm_layer=-1, tau=0.5)
    assert got == EarlyTom(ratio=0.25, tau=0.5, layers=(10, 21, 23), llm_layer=None)
    tiny = architecture("tiny")
    scaled = registry.build("earlytom", 0.1, tiny, **defaults.settings("earlytom", tiny)[0])
    depth, nl = tiny.vision.num_layers, tiny.text.num_layers
    assert scaled.layers == tuple(sorted({min(depth - 1, round(x * depth / 26)) for x in (6, 21, 23)}))
    assert scaled.llm_layer == max(1, round(18 * nl / 24))


def test_registry_resolves_spellings_and_groups():
    assert registry.resolve(["Full", "EarlyTom", "uniform", "visionzip", "uniform-frames", "FastV"]) == [
        "full", "earlytom", "uniform_tokens", "uniform_frames", "visionzip", "fastv"]
    assert registry.canonical(" Uniform-Tokens ") == "uniform_tokens"
    with pytest.raises(ConfigError, match="unknown method 'prumerge'.*uniform = uniform_tokens and uniform_frames"):
        registry.resolve(["full", "prumerge"])


def test_registry_labels_every_built_method():
    cfg = architecture("tiny")
    # 0.2: a ratio every method can meet on the tiny model (FastVID's context tokens need r < 0.5)
    built = {n: registry.build(n, None if n == "full" else 0.2, cfg, **({} if n == "full" else defaults.settings(n, cfg)[0]))
             for n in registry.METHODS}
    assert {n: registry.label(m) for n, m in built.items()} == registry.LABELS
    assert registry.label(built["uniform_frames"]) == "uniform frames"


@pytest.mark.parametrize("name,ratio,kw,match", [
    ("prumerge", 0.1, {}, "unknown method 'prumerge'"),
    ("visionzip", 0.0, {}, "outside \\(0, 1\\]"),
    ("uniform_frames", 1.5, {}, "outside \\(0, 1\\]"),
    ("fastv", None, {}, "needs a ratio"),
    ("uniform_tokens", "a", {}, "not a number"),
    ("visionzip", 0.1, {"layer": 2}, "takes no setting layer"),
    ("uniform_tokens", 0.1, {"mode": "max"}, "choose pool or sample"),
    ("visionzip", 0.1, {"per_frame": 500}, "exceeds the 196 tokens"),
    ("fastv", 0.5, {"layer": 99}, "FastV layer 99"),
])
def test_registry_rejects_bad_requests(name, ratio, kw, match):
    with pytest.raises(ConfigError, match=match):
        registry.build(name, ratio, architecture("llava-ov-0.5b"), **kw)


# ------------------------------------------------------------------------------ FLOPs


def _analytic(cfg, frames_encoded: int, visual: int, text: int, select_extra: int = 0) -> int:
    """Embedding + every block on the encoded frames, projector + pooling per frame, every
    LLM layer on text + visual tokens (+ newline), the head; from the per-unit formulas that
    test_flops.py checks against XLA."""
    v, t = cfg.vision, cfg.text
    embed = frames_encoded * 2 * v.num_patches * 3 * v.patch_size**2 * v.hidden_size
    enc = embed + v.num_layers * frames_encoded * flops.siglip_block(cfg, 1)
    tok = frames_encoded * flops.projector_and_pool(cfg, 1) + select_extra
    llm = t.num_layers * flops.llm_layer(cfg, text + visual + 1) + 2 * t.hidden_size * t.vocab_size
    return enc + tok + llm


@pytest.mark.parametrize("ratio", [0.1, 0.25])
def test_flops_of_each_baseline(ratio):
    cfg = architecture("llava-ov-0.5b")
    t0, text, S = 32, 40, 196
    g, pg, d, h = cfg.vision.grid, cfg.pooled_grid, cfg.vision.head_dim, cfg.text.hidden_size
    budget = registry.token_budget(t0, ratio, S)
    k = max(1, round(ratio * t0))
    vz_extra = t0 * (2 * (pg * g * g + pg * pg * g) * (d + 1) + 2 * S * S * d + 2 * S * h)
    cases = [
        ("full", {}, t0, t0 * S, 0),
        ("visionzip", {}, t0, budget, vz_extra),
        ("uniform_tokens", {}, t0, budget, (t0 * S + budget) * h),
        ("uniform_tokens", {"mode": "sample"}, t0, budget, 0),
        ("uniform_frames", {}, k, k * S, 0),
    ]
    for name, kw, enc, visual, extra in cases:
        m = registry.build(name, ratio, cfg, **kw)
        stats = {"frames": enc, "visual_tokens": visual + 1}
        f = flops.prefill_flops(cfg, t0, text, stats, m)
        want = _analytic(cfg, enc, visual, text, extra)
        assert abs(f.total / want - 1) < 0.01, (name, f.total, want)
        assert f.tokens == enc * flops.projector_and_pool(cfg, 1) + extra
    # encoding fewer frames is what makes uniform frames cheap: the vision cost scales with k
    full = flops.prefill_flops(cfg, t0, text, {"frames": t0, "visual_tokens": t0 * S + 1}, pipeline.FULL)
    uf = flops.prefill_flops(cfg, t0, text, {"frames": k, "visual_tokens": k * S + 1}, registry.build("uniform_frames", ratio, cfg))
    assert uf.vision * t0 == full.vision * k
