"""checkpoint/table.py: every parameter of the module has exactly one source, and each layout
is an exact re-indexing both ways."""

import numpy as np
import pytest

from earlytom_jax.architectures import architecture
from earlytom_jax.checkpoint import table
from earlytom_jax.config import LlavaOVConfig


@pytest.mark.parametrize("arch", ["tiny", "llava-ov-0.5b", "llava-ov-7b"])
def test_rows_cover_the_module(arch):
    cfg = architecture(arch)
    rows = table.rows(cfg)
    assert [r.path for r in rows] == list(table.shapes(cfg))
    names = [n for r in rows for n in r.sources()]
    assert len(names) == len(set(names))  # no checkpoint tensor feeds two parameters
    for r in rows:
        full = ((r.layers,) if r.layers else ()) + r.shape
        assert full == table.shapes(cfg)[r.path]


def test_every_table_row_is_a_parameter_of_some_model():
    tied, untied = architecture("llava-ov-0.5b"), architecture("llava-ov-7b")
    used = set(table.shapes(tied)) | set(table.shapes(untied))
    assert set(table.TABLE) == used


def test_source_shapes_are_the_torch_layouts():
    cfg = architecture("llava-ov-7b")
    by = {r.path: r for r in table.rows(cfg)}
    assert by[("text", "layers", "q_w")].source_shape == (3584, 3584)  # [Hq·D, C]
    assert by[("text", "layers", "k_w")].source_shape == (512, 3584)
    assert by[("text", "layers", "o_w")].source_shape == (3584, 3584)
    assert by[("text", "layers", "gate_w")].source_shape == (18944, 3584)
    assert by[("vision", "patch_w")].source_shape == (1152, 3, 14, 14)
    assert by[("vision", "blocks", "q_b")].source_shape == (1152,)
    assert by[("text", "layers", "k_b")].sources()[27] == "text.layers.27.self_attn.k_proj.bias"


@pytest.mark.parametrize("arch", ["tiny"])
def test_layouts_round_trip_exactly(arch):
    cfg: LlavaOVConfig = architecture(arch)
    rng = np.random.default_rng(0)
    for r in table.rows(cfg):
        x = rng.standard_normal(r.source_shape).astype(np.float32)
        y = r.to_ours(x)
        assert y.shape == r.shape, r.path
        back = r.to_source(y)
        assert back.shape == x.shape and np.array_equal(back, x), r.path
        assert sorted(y.ravel()) == sorted(x.ravel())  # a re-indexing: same values


def test_heads_layout_matches_torch_semantics():
    """q_proj [H·D, C] (torch: out = x @ W.T) → ours [C, H, D] with out[h, d] = x @ w[:, h, d]."""
    cfg = architecture("tiny")
    r = next(r for r in table.rows(cfg) if r.path == ("text", "layers", "q_w"))
    w = np.random.default_rng(1).standard_normal(r.source_shape).astype(np.float32)
    x = np.random.default_rng(2).standard_normal(r.shape[0]).astype(np.float32)
    ours = np.einsum("c,chd->hd", x, r.to_ours(w))
    np.testing.assert_allclose(ours.reshape(-1), x @ w.T, rtol=1e-5, atol=1e-5)
