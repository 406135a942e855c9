"""The models' weight products: f32 accumulation, the activation dtype out, and the one-row
bf16 product computed as two rows on CPU giving the same numbers, and weights held transposed
(`stack.OutIn`) giving the same products."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from earlytom_jax.models.dense import dense, held_spec, rows
from earlytom_jax.models.stack import OutIn


def test_rows_counts_the_dims_that_reach_the_output():
    assert rows("blc,chd->blhd", jnp.zeros((1, 7, 4))) == 7
    assert rows("blhd,hdc->blc", jnp.zeros((1, 1, 2, 3))) == 1
    assert rows("...c,vc->...v", jnp.zeros((4,))) == 1
    assert rows("...c,vc->...v", jnp.zeros((3, 5, 4))) == 15


@pytest.mark.parametrize("spec,xshape,wshape", [
    ("blc,chd->blhd", (1, 1, 16), (16, 2, 8)),  # decode step: one row
    ("blhd,hdc->blc", (1, 1, 2, 8), (2, 8, 16)),
    ("...c,vc->...v", (16,), (40, 16)),  # first-token logits of h[0, -1]
    ("...c,vc->...v", (1, 16), (40, 16)),
    ("blc,chd->blhd", (1, 5, 16), (16, 2, 8)),  # several rows: the plain product
])
def test_bf16_matches_an_f32_product_rounded_once(spec, xshape, wshape):
    kx, kw, kb = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, xshape).astype(jnp.bfloat16)
    w = jax.random.normal(kw, wshape).astype(jnp.bfloat16)
    out_shape = jnp.einsum(spec, x, w).shape
    b = jax.random.normal(kb, out_shape[-1:]).astype(jnp.bfloat16)
    want = jnp.einsum(spec, x.astype(jnp.float32), w.astype(jnp.float32)) + b.astype(jnp.float32)
    got = jax.jit(lambda x, w, b: dense(spec, x, w, b))(x, w, b)
    assert got.shape == out_shape and got.dtype == jnp.bfloat16
    rounded = np.asarray(want.astype(jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), rounded, rtol=2**-7, atol=1e-6)  # 1 bf16 ulp
    logits = dense(spec, x, w, out_dtype=jnp.float32)
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(logits), np.asarray(want - b.astype(jnp.float32)), rtol=1e-5, atol=1e-4)


def test_f32_is_a_plain_einsum():
    x, w = jnp.ones((1, 1, 8)), jnp.full((8, 3), 0.5)
    np.testing.assert_array_equal(np.asarray(dense("blc,cv->blv", x, w)), np.asarray(jnp.einsum("blc,cv->blv", x, w)))


def test_held_spec_moves_the_contracted_axes_last():
    assert held_spec("...c,cm->...m", 1) == "...c,mc->...m"
    assert held_spec("blc,chd->blhd", 1) == "blc,hdc->blhd"
    assert held_spec("blhd,hdc->blc", 2) == "blhd,chd->blc"
    with pytest.raises(ValueError, match="contracted"):
        held_spec("blhd,hdc->blc", 1)  # d is contracted too


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("spec,xshape,wshape,n_in", [
    ("...c,cm->...m", (1, 6, 16), (16, 24), 1),
    ("...c,cm->...m", (16,), (16, 24), 1),  # one row: doubled on CPU in bf16
    ("blhd,hdc->blc", (1, 3, 2, 8), (2, 8, 16), 2),
])
def test_a_weight_held_transposed_gives_the_same_product(spec, xshape, wshape, n_in, dtype):
    kx, kw = jax.random.split(jax.random.PRNGKey(1))
    x = jax.random.normal(kx, xshape).astype(dtype)
    w = jax.random.normal(kw, wshape).astype(dtype)
    held = OutIn(jnp.transpose(w, tuple(range(n_in, w.ndim)) + tuple(range(n_in))), n_in)
    assert held.shape == w.shape and held.dtype == w.dtype
    want = jax.jit(lambda x, w: dense(spec, x, w))(x, w)
    got = jax.jit(lambda x, h: dense(spec, x, h))(x, held)
    assert got.shape == want.shape and got.dtype == want.dtype
    tol = 1e-6 if dtype == jnp.float32 else 2**-7
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol)


@pytest.mark.parametrize("name", ["gelu_tanh", "gelu", "silu"])
def test_bf16_activation_is_torchs_computed_in_f32_and_rounded_once(name):
    """With an identity weight the product is exact, so `act` alone decides the result: it
    must be PyTorch's bf16 activation (computed in f32 and rounded once)."""
    acts = {
        "gelu_tanh": (lambda y: jax.nn.gelu(y, approximate=True), lambda t: torch.nn.functional.gelu(t, approximate="tanh")),
        "gelu": (lambda y: jax.nn.gelu(y, approximate=False), torch.nn.functional.gelu),
        "silu": (jax.nn.silu, torch.nn.functional.silu),
    }
    ours, theirs = acts[name]
    x = (jax.random.normal(jax.random.PRNGKey(1), (64, 128)) * 3).astype(jnp.bfloat16)
    eye = jnp.eye(128, dtype=jnp.bfloat16)
    got = np.asarray(jax.jit(lambda x, w: dense("...c,cm->...m", x, w, act=ours))(x, eye).astype(jnp.float32))
    want = theirs(torch.from_numpy(np.array(x.astype(jnp.float32))).to(torch.bfloat16)).float().numpy()
    # Within 1 bf16 ulp everywhere but the far negative tail, where XLA's and PyTorch's f32
    # tanh / erf differ by up to ~1e-5 on outputs below 3e-3. Rounding after every op of the
    # formula (a bf16 activation on XLA:CPU) misses this by up to 0.016 on outputs near 2.
    np.testing.assert_array_less(np.abs(got - want), np.abs(want) * 2**-8 + 2e-5)
    big = np.abs(want) >= 1e-2
    same = np.mean(got[big] == want[big])
    assert same >= 0.995, f"{name}: only {same:.4f} of the values above 0.01 equal PyTorch's"
