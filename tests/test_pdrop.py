"""PyramidDrop (multi-stage hook 3) against the PyTorch reference on transformers' LLaVA-OneVision
modules (tests/references/pdrop_ref.py): kept slots at every stage, first-token logits (fp32),
greedy tokens decoded from the pruned caches; one compile per shape; settings; FLOPs; and hook
3's two other options (suffix-row signal, pruning earlier caches) on a tiny dedicated case."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from earlytom_jax import flops, pipeline
from earlytom_jax.checkpoint.load import load_hf
from earlytom_jax.compression import registry
from earlytom_jax.compression.pdrop import PyramidDrop, default_layers, keep_table
from earlytom_jax.errors import ConfigError
from earlytom_jax.generate import generate
from tests.helpers import random_pixels
from tests.references import pdrop_ref

PREFIX, SUFFIX = [1, 2, 3], [4, 5, 6, 7]


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    model, d = tiny_dir
    cfg, params = load_hf(d)
    return model, cfg, params


def _stage_index(stats):
    return [[i for i in row if i >= 0] for row in stats["llm_stage_index"]]


CASES = [((1, 2, 3), 0.5, 5), ((1, 3), 0.7, 4), ((2,), 0.4, 3)]


@pytest.mark.parametrize("layers,lam,frames", CASES, ids=["official-shape", "two-stages", "one-stage"])
def test_matches_reference(loaded, layers, lam, frames):
    model, cfg, params = loaded
    pix = random_pixels(frames, cfg.vision.image_size, seed=frames)
    method = PyramidDrop(layers, lam).check(cfg)
    gen = generate(params, cfg, pix, PREFIX, SUFFIX, method, 6)
    ref = pdrop_ref.pdrop_reference(model, torch.tensor(pix), PREFIX, SUFFIX, list(layers), lam, 6)
    N = ref["visual_tokens"]
    assert gen.stats["visual_tokens"] == N
    counts = [int(N * lam ** (s + 1)) for s in range(len(layers))]
    if len(layers) > 1:
        assert _stage_index(gen.stats) == ref["kept"]
        assert gen.stats["llm_kept_stages"] == counts
    else:
        assert [i for i, k in enumerate(gen.stats["llm_keep_mask"]) if k] == ref["kept"][0]
    assert [len(k) for k in ref["kept"]] == counts and gen.stats["llm_kept"] == counts[-1]
    np.testing.assert_allclose(gen.first_logits, ref["first_logits"].numpy(), atol=1e-4, rtol=0)
    assert gen.tokens == ref["tokens"]
    _check_decode(params, cfg, pix, method, ref)


def _check_decode(params, cfg, pix, method, ref):
    """Decode steps from our pruned caches (each group's shifted positions) give the reference's logits."""
    out = pipeline.prefill_jit(params, jnp.asarray(pix), jnp.asarray(PREFIX, jnp.int32),
                               jnp.asarray(SUFFIX, jnp.int32), cfg, method, 6)
    caches, pos = out[1], out[2]
    for i, want in enumerate(ref["step_logits"][:2]):
        tok = jnp.asarray([ref["tokens"][i]], jnp.int32)
        logits, caches = pipeline.decode_step(params, tok, pos + i, caches, jnp.asarray(i, jnp.int32), cfg)
        np.testing.assert_allclose(np.asarray(logits), want.numpy(), atol=1e-4, rtol=0)
    return out


def test_compiles_once_per_shape(loaded):
    _, cfg, params = loaded
    method = registry.build("pdrop", 0.5, cfg)
    assert method.stage_layers == (1, 2, 3)  # 8, 16, 24 of 32 scaled to 4 layers
    pre, suf = jnp.asarray(PREFIX, jnp.int32), jnp.asarray(SUFFIX, jnp.int32)
    out = pipeline.prefill_jit(params, jnp.asarray(random_pixels(5, cfg.vision.image_size, 1)), pre, suf, cfg, method, 1)
    before = pipeline.prefill_jit._cache_size()
    out2 = pipeline.prefill_jit(params, jnp.asarray(random_pixels(5, cfg.vision.image_size, 2)), pre, suf, cfg, method, 1)
    assert pipeline.prefill_jit._cache_size() == before
    assert [g.k.shape[0] for g in out2[1]] == [1, 1, 1, 1]  # one cache group per layer range
    assert out[3]["llm_kept_stages"].tolist() == [10, 5, 2]


def test_settings_and_ratio(loaded):
    _, cfg, _ = loaded
    assert default_layers(32) == (8, 16, 24) and default_layers(28) == (7, 14, 21) and default_layers(24) == (6, 12, 18)
    assert registry.build("pdrop", 0.3, cfg).lam == 0.3  # --ratio is λ
    assert registry.build("pdrop", 0.5, cfg, stage_layers=(1, 2)).stage_layers == (1, 2)
    assert keep_table(21, 0.5, 2)[21] == 2 and keep_table(576, 0.5, 0)[576] == 288
    for bad, match in [(dict(stage_layers=(1, 4)), "stage layer 4"), (dict(stage_layers=(2, 2)), "increasing"),
                       (dict(stage_layers=(3, 1)), "increasing"), (dict(stage_layers=(0, 1)), "increasing"),
                       (dict(lam=0.0), "outside"), (dict(lam=1.5), "outside")]:
        with pytest.raises(ConfigError, match=match):
            PyramidDrop(**bad).check(cfg)
    with pytest.raises(ConfigError, match="stage layer 5"):
        registry.build("pdrop", 0.5, cfg, stage_layers=(2, 5))


def test_flops_count_every_stage(loaded):
    _, cfg, _ = loaded
    m = PyramidDrop((1, 3), 0.5).check(cfg)
    text, N = 7, 21
    stats = {"visual_tokens": N, "llm_kept": 5, "llm_kept_stages": [10, 5], "frames": 5}
    t = cfg.text
    ns = [text + N, text + 10, text + 10, text + 5]  # layers 0..3
    C, D = t.hidden_size, t.head_dim  # the probe: keys of n slots, the last slot's query, its scores
    probe = sum(2 * n * C * t.num_kv_heads * D + 2 * C * t.num_heads * D + 2 * t.num_heads * D * n
                for n in (text + N, text + 10))
    f = flops.prefill_flops(cfg, 5, text, stats, m)
    assert f.llm == sum(flops.llm_layer(cfg, n) for n in ns) + probe + 2 * t.hidden_size * t.vocab_size
    ex = flops.executed_prefill_flops(cfg, 5, text, stats, m)["llm"]
    caps = [text + 21, text + 10, text + 10, text + 5]  # static: span 21 → 10 → 5
    want = sum(flops.llm_layer_executed(cfg, L, flops.attention_entries(L)) for L in caps)
    assert ex == want + probe + 2 * t.hidden_size * t.vocab_size


# ---------------------------------------------------------------- hook 3's other options


@dataclasses.dataclass(frozen=True)
class _SuffixPrune(PyramidDrop):
    """PyramidDrop ranked by the suffix rows, also pruning the earlier caches (PruneVid's options)."""

    llm_query = "suffix_rows"
    llm_prune_caches = True


def test_suffix_rows_and_pruned_caches(loaded):
    model, cfg, params = loaded
    pix = random_pixels(4, cfg.vision.image_size, seed=11)
    method = _SuffixPrune((1, 2), 0.5).check(cfg)
    ref = pdrop_ref.pdrop_reference(model, torch.tensor(pix), PREFIX, SUFFIX, [1, 2], 0.5, 6, rows="suffix",
                                    prune_caches=True)
    plain = pdrop_ref.pdrop_reference(model, torch.tensor(pix), PREFIX, SUFFIX, [1, 2], 0.5, 6)
    gen = generate(params, cfg, pix, PREFIX, SUFFIX, method, 6)
    assert _stage_index(gen.stats) == ref["kept"] != plain["kept"]  # the suffix rows pick other tokens
    assert gen.stats["llm_query_rows"] == len(SUFFIX)
    np.testing.assert_allclose(gen.first_logits, ref["first_logits"].numpy(), atol=1e-4, rtol=0)
    assert gen.tokens == ref["tokens"]
    out = _check_decode(params, cfg, pix, method, ref)
    a, N = len(PREFIX), ref["visual_tokens"]
    g0 = np.asarray(out[1][0].valid)[0, a:a + N]
    assert np.flatnonzero(g0).tolist() == ref["kept"][-1]  # layer 0's cache keeps only the survivors
