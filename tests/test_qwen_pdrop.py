"""PyramidDrop on Qwen2.5-VL: our JAX pipeline against the PyTorch reference on transformers' own
Qwen2.5-VL modules (tests/references/qwen_pdrop_ref.py) on tiny random models with 4-6 text
layers: kept slots after every stage, the survivors' 3-D positions, first-token logits (fp32),
greedy tokens and decode-step logits from the shortened caches; one compile per shape."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from earlytom_jax import pipeline
from earlytom_jax.compression import registry
from earlytom_jax.compression.pdrop import PyramidDrop
from tests import tiny_qwen
from tests.references.qwen_pdrop_ref import qwen_pdrop_reference

PREFIX = [5, 6, 7, tiny_qwen.VSTART]
SUFFIX = [tiny_qwen.VEND, 8, 9, 10, 11]
N_NEW = 4

MODELS = {
    # last vision block windowed; 4 text layers: the default stages (1, 2, 3)
    "win": {"seed": 31, "vision_layers": 3, "fullatt": (1,), "window": 56, "text_layers": 4},
    # last vision block full attention; 6 text layers (default stages (2, 3, 4)), GQA 4, another M-RoPE split
    "full": {"seed": 32, "vision_layers": 3, "fullatt": (2,), "window": 56, "text_layers": 6, "kv_heads": 1,
             "mrope": (2, 4, 2)},
    # 5 text layers, tied head
    "tied": {"seed": 33, "vision_layers": 3, "fullatt": (0,), "window": 56, "text_layers": 5, "tie": True},
}


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return tiny_qwen.loader(tmp_path_factory, MODELS, "qwen-pdrop")


_pixels = tiny_qwen.random_pixels



def _prefill(params, cfg, method, pix, spt):
    pre, suf = jnp.asarray(PREFIX, jnp.int32), jnp.asarray(SUFFIX, jnp.int32)
    return pipeline.prefill_jit(params, jnp.asarray(pix), pre, suf, cfg, method, N_NEW, None, jnp.float32(spt))


def _kept_per_stage(st, n_stages):
    if n_stages == 1:
        return [np.flatnonzero(st["llm_keep_mask"]).tolist()]
    return [[int(i) for i in row if i >= 0] for row in st["llm_stage_index"]]


CASES = [  # model, frames, h, w, stage layers (None: the default), λ, seconds per temporal patch
    ("win", 6, 84, 112, None, 0.5, 1.0),       # V = 3·12 = 36 → 18, 9, 4
    ("full", 6, 112, 84, None, 0.7, 1.25),     # V = 36 → 25, 17, 12 at layers 2, 3, 4
    ("tied", 4, 112, 112, (1, 3), 0.5, 0.5),   # V = 2·16 = 32 → 16, 8
    ("tied", 4, 84, 84, (2,), 0.7, 2.0),       # V = 2·9 = 18 → 12 (one stage)
]


@pytest.mark.parametrize("name,frames,h,w,layers,lam,spt", CASES, ids=["win-default", "full-default",
                                                                      "tied-two-stages", "tied-one-stage"])
def test_matches_reference(loaded, name, frames, h, w, layers, lam, spt):
    model, cfg, params = loaded(name)
    pix = _pixels(frames, h, w, seed=frames + h + w)
    method = (registry.build("pdrop", lam, cfg) if layers is None else PyramidDrop(layers, lam).check(cfg))
    layers = method.stage_layers
    assert len(set(layers)) == len(layers) and layers[-1] < cfg.text.num_layers
    ref = qwen_pdrop_reference(model, pix, PREFIX, SUFFIX, spt, layers, lam, N_NEW)
    logits, caches, nxt, stats = _prefill(params, cfg, method, pix, spt)
    st = {k: np.asarray(v) for k, v in stats.items()}
    V = (frames // 2) * (h // 28) * (w // 28)
    counts = [int(V * lam ** (s + 1)) for s in range(len(layers))]
    assert int(st["visual_tokens"]) == ref["visual_tokens"] == V
    assert [len(k) for k in ref["kept"]] == counts and int(st["llm_kept"]) == counts[-1]
    if len(layers) > 1:
        assert st["llm_kept_stages"].tolist() == counts
    assert _kept_per_stage(st, len(layers)) == ref["kept"]
    # the survivors keep their own (t, h, w): the positions of their source tokens
    survivors = np.flatnonzero(st["llm_keep_mask"])
    assert [tuple(p) for p in st["visual_positions"][survivors].tolist()] == ref["kept_positions"]
    np.testing.assert_allclose(np.asarray(logits), ref["first_logits"].numpy(), atol=1e-4, rtol=0)
    assert int(np.asarray(nxt).reshape(-1)[0]) == ref["next_position"]
    toks, _ = pipeline.decode_loop(params, logits, nxt, caches, cfg, N_NEW, jnp.asarray([-1], jnp.int32))
    assert np.asarray(toks).tolist() == ref["tokens"]
    for i, want in enumerate(ref["step_logits"][:2]):  # decode steps from the shortened caches
        tok = jnp.asarray([ref["tokens"][i]], jnp.int32)
        step_logits, caches = pipeline.decode_step(params, tok, nxt + i, caches, jnp.asarray(i, jnp.int32), cfg)
        np.testing.assert_allclose(np.asarray(step_logits), want.numpy(), atol=1e-4, rtol=0)


def test_reference_without_drops_is_transformers(loaded):
    """λ = 1 drops nothing: the reference's layer-by-layer LLM, its positions and its decoding are
    transformers' own forward (logits, greedy tokens)."""
    model, _, _ = loaded("full")
    pix = _pixels(4, 56, 84, seed=3)
    ref = qwen_pdrop_reference(model, pix, PREFIX, SUFFIX, 1.25, (2, 4), 1.0, 3)
    hf, _ = tiny_qwen.logits(model, pix, PREFIX, SUFFIX, 1.25)
    np.testing.assert_allclose(ref["first_logits"].numpy(), hf[-1], atol=1e-5, rtol=0)
    assert ref["tokens"] == tiny_qwen.greedy(model, pix, PREFIX, SUFFIX, 3, 1.25)
    assert ref["kept"] == [list(range(12))] * 2


def test_position_rule_is_visible(loaded):
    """The parity above can tell the position rules apart: the official 1-D renumbering applied
    to each of Qwen's three axes (not our documented rule) moves the first-token logits by far
    more than the tolerance on the same case."""
    model, cfg, params = loaded("win")
    _, frames, h, w, _, lam, spt = CASES[0]
    pix = _pixels(frames, h, w, seed=frames + h + w)
    method = registry.build("pdrop", lam, cfg)
    kept = qwen_pdrop_reference(model, pix, PREFIX, SUFFIX, spt, method.stage_layers, lam, 1)
    moved = qwen_pdrop_reference(model, pix, PREFIX, SUFFIX, spt, method.stage_layers, lam, 1, renumber=True)
    logits = np.asarray(_prefill(params, cfg, method, pix, spt)[0])
    np.testing.assert_allclose(logits, kept["first_logits"].numpy(), atol=1e-4, rtol=0)
    assert np.abs(logits - moved["first_logits"].numpy()).max() > 1e-3


def test_compiles_once_per_shape(loaded):
    """Clips of one shape share one program whatever they keep and their seconds per temporal patch."""
    _, cfg, params = loaded("win")
    method = registry.build("pdrop", 0.5, cfg)
    assert method.stage_layers == (1, 2, 3)  # 8, 16, 24 of 32 scaled to 4 layers
    kept, before = [], None
    for i, spt in enumerate([1.0, 0.5, 2.0]):
        _, caches, _, stats = _prefill(params, cfg, method, _pixels(6, 84, 112, seed=100 + i), spt)
        kept.append(np.asarray(stats["llm_stage_index"]).tolist())
        if before is None:
            before = pipeline.prefill_jit._cache_size()
    assert pipeline.prefill_jit._cache_size() == before
    assert [g.k.shape[0] for g in caches] == [1, 1, 1, 1]  # one cache group per layer range
    assert len({str(k) for k in kept}) > 1, "the clips keep the same slots: the test shows nothing"
