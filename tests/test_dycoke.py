"""DyCoke against a PyTorch reference written from the official code (tests/references/dycoke_ref.py)
on a tiny random LLaVA-OneVision with the real 27 x 27 → 14 x 14 layout: TTM's kept tokens, the
first token's logits, every decode step's logits and tokens with the dynamic KV pruning, which
slots each step keeps; compiles, budget mapping, settings, FLOPs."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from earlytom_jax import pipeline
from earlytom_jax.compression import registry
from earlytom_jax.compression.dycoke import DyCoke, ttm_plan
from earlytom_jax.errors import ConfigError
from earlytom_jax.generate import generate
from tests.helpers import random_pixels
from tests.references import dycoke_ref

PREFIX, SUFFIX = [1, 2, 3], [4, 5, 6, 7]
T0 = 9  # odd: the last frame is left out; stage 2 has two groups (frames 2 and 6)
N_NEW = 6
NEVER = jnp.asarray([-1], jnp.int32)


@pytest.fixture(scope="module")
def real_layout(tmp_path_factory):
    """tests/tiny_models' real-layout model (27 x 27 patches pooled to 14 x 14), its projector
    biases scaled down: with them the random model's tokens are nearly alike across frames
    (cosine 0.85-0.99, exact ties), so TTM's similarity order would hinge on rounding."""
    from earlytom_jax.checkpoint.load import load_hf
    from tests.tiny_models import build_tiny_model, save_tiny_checkpoint

    model = build_tiny_model(seed=1, image_size=378, vision_layers=2)
    with torch.no_grad():
        for layer in (model.model.multi_modal_projector.linear_1, model.model.multi_modal_projector.linear_2):
            layer.bias.mul_(0.05)
    cfg, params = load_hf(save_tiny_checkpoint(model, str(tmp_path_factory.mktemp("tiny378_dycoke"))))
    assert cfg.tokens_per_frame == 196
    return model, cfg, params


@pytest.fixture(scope="module")
def pixels(real_layout):
    return random_pixels(T0, real_layout[1].vision.image_size, seed=7)


def _reference(real_layout, pixels, method):
    return dycoke_ref.dycoke_reference(real_layout[0], torch.tensor(pixels), PREFIX, SUFFIX, k=method.k,
                                       layer=method.layer, p=method.p, threshold=method.threshold,
                                       max_new_tokens=N_NEW)


def _pruned_steps(keep_rows, n_cand):
    """Our per-step keep masks [steps, span] → the reference's form (row 0 is the prefill's)."""
    out = []
    for row in np.asarray(keep_rows)[1:]:
        cand = row[:n_cand]
        out.append(None if cand.all() else np.flatnonzero(cand).tolist())
    return out


def _decode_by_step(params, cfg, method, pixels):
    """The prefill, then each decode step on its own (`decode_step_pruned_jit`): the logits of
    every step, the tokens, the keep masks."""
    out = pipeline.prefill_jit(params, jnp.asarray(pixels), jnp.asarray(PREFIX), jnp.asarray(SUFFIX), cfg, method,
                               N_NEW)
    logits, caches, pos, stats = out
    span = pipeline.decode_span(method, caches, len(PREFIX), len(SUFFIX))
    caches = pipeline.split_caches(caches, method.decode_layer)
    state = method.decode_init(span[1] - span[0])
    tokens, steps, keeps = [int(jnp.argmax(logits))], [], [np.ones(span[1] - span[0], bool)]
    for i in range(N_NEW - 1):
        logits, caches, state, keep = pipeline.decode_step_pruned_jit(
            params, jnp.asarray([tokens[-1]], jnp.int32), pos + i, caches, jnp.asarray(i, jnp.int32), cfg, method,
            span, state)
        tokens.append(int(jnp.argmax(logits)))
        steps.append(np.asarray(logits))
        keeps.append(np.asarray(keep))
    return tokens, steps, np.stack(keeps), span


@pytest.mark.parametrize("threshold", [0.9, 1.01], ids=["official-0.9", "prune-every-step"])
def test_matches_reference(real_layout, pixels, threshold):
    """TTM's kept tokens, first-token logits, every decode step's logits and tokens, and the
    pruned set of every step equal the reference's. Threshold 0.9 (official): steps whose
    attention resembles the previous one's keep every visual token; above 1 every step prunes."""
    model, cfg, params = real_layout
    method = registry.build("dycoke", 0.3, cfg, threshold=threshold)
    assert method.k == pytest.approx(0.7)  # the official LLaVA-OV K
    ref = _reference(real_layout, pixels, method)
    gen = generate(params, cfg, pixels, PREFIX, SUFFIX, method, N_NEW, eos_ids=())

    S = cfg.tokens_per_frame
    assert gen.stats["kept_index"] == ref["kept"]
    assert gen.stats["count"] == len(ref["kept"]) == method.capacity(T0, S) == 2 * S + 6 * int(0.3 * S)
    assert all(j < 8 * S for j in ref["kept"])  # the odd last frame is left out
    np.testing.assert_allclose(gen.first_logits, ref["first_logits"].numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(gen.first_logits, ref["hf_logits"].numpy(), atol=1e-4, rtol=0)
    assert gen.tokens == ref["tokens"]

    tokens, steps, keeps, span = _decode_by_step(params, cfg, method, pixels)
    assert tokens == ref["tokens"]
    for got, want in zip(steps, ref["step_logits"]):
        np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=0)
    n_cand = span[1] - span[0] - 2
    pruned = _pruned_steps(keeps, n_cand)
    assert pruned == ref["pruned"]
    assert keeps[:, n_cand:].all()  # the last visual token and the newline are never candidates
    assert pruned[0] is not None and all(len(p) == int(n_cand * (1 - method.p)) for p in pruned if p)
    if threshold > 1:  # every step prunes, and what it keeps changes between steps
        assert all(p is not None for p in pruned)
        assert len({tuple(p) for p in pruned}) > 1

    # the one-loop decode (`decode_loop`, as `generate` and bench run it) keeps the same slots
    out = pipeline.prefill_jit(params, jnp.asarray(pixels), jnp.asarray(PREFIX), jnp.asarray(SUFFIX), cfg, method,
                               N_NEW)
    toks, count, hist = pipeline.decode_loop(params, out[0], out[2], out[1], cfg, N_NEW, NEVER, method=method,
                                             span=span, trace=True)
    assert np.asarray(toks).tolist() == ref["tokens"] and int(count) == N_NEW
    assert _pruned_steps(hist, n_cand) == ref["pruned"]


def test_pruning_changes_the_decode(real_layout, pixels):
    """The masked visual entries matter: a pruning step's logits differ from the unpruned step's;
    streaming decodes the same tokens."""
    _, cfg, params = real_layout
    method = registry.build("dycoke", 0.3, cfg)
    tokens, steps, _, _ = _decode_by_step(params, cfg, method, pixels)
    streamed = []
    gen = generate(params, cfg, pixels, PREFIX, SUFFIX, method, N_NEW, on_token=streamed.append)
    assert gen.tokens == streamed == tokens  # streaming runs the same pruned step
    logits, caches, pos, _ = pipeline.prefill_jit(params, jnp.asarray(pixels), jnp.asarray(PREFIX),
                                                  jnp.asarray(SUFFIX), cfg, method, N_NEW)
    full, _ = pipeline.decode_step(params, jnp.argmax(logits)[None].astype(jnp.int32), pos, caches,
                                   jnp.asarray(0, jnp.int32), cfg)
    assert np.abs(np.asarray(full) - steps[0]).max() > 1e-3


def test_compiles_once_per_shape(real_layout):
    """A second video of the same shape reuses the prefill and the decode loop's programs."""
    _, cfg, params = real_layout
    method = registry.build("dycoke", 0.25, cfg)
    sizes = []
    for seed in (11, 12, 13):
        generate(params, cfg, random_pixels(T0, cfg.vision.image_size, seed=seed), PREFIX, SUFFIX, method, 3)
        sizes.append((pipeline.prefill_jit._cache_size(), pipeline.decode_loop._cache_size()))
    assert sizes[0] == sizes[1] == sizes[2]


def test_plan_budget_and_settings(real_layout):
    _, cfg, _ = real_layout
    # the official grouping on 32 frames: 9 whole frames, 23 pruned ones
    plan = ttm_plan(32)
    whole = [t for t, r in plan if r is None]
    assert whole == [0, 4, 8, 12, 16, 20, 24, 28, 30] and len(plan) == 32
    assert dict(plan)[26] == 24 and dict(plan)[2] == 0 and dict(plan)[3] == 2
    assert [t for t, r in ttm_plan(4) if r is not None] == [1, 3]  # no stage 2 on 4 frames
    assert len(ttm_plan(5)) == 4  # the odd last frame is left out
    # --ratio r → K = 1 - r: a pruned frame keeps int(r · 196)
    m = registry.build("dycoke", 0.25, cfg)
    assert (m.k, m.layer, m.p, m.threshold) == (0.75, 3, 0.8, 0.9)
    assert m.capacity(32, 196) == 9 * 196 + 23 * 49
    assert registry.build("dycoke", 0.3, cfg).capacity(32, 196) == 9 * 196 + 23 * 58  # official K = 0.7
    assert m.select_flops(cfg, 32) == 23 * 196 * 6 * cfg.text.hidden_size
    with pytest.raises(ConfigError, match="layer"):
        registry.build("dycoke", 0.3, cfg, layer=cfg.text.num_layers)
    with pytest.raises(ConfigError, match="P"):
        DyCoke(p=1.0)
    with pytest.raises(ConfigError, match="2 frames"):
        ttm_plan(1)
    with pytest.raises(ConfigError, match="setting"):
        registry.build("dycoke", 0.3, cfg, k=0.5)
