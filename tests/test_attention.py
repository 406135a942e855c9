"""The blockwise causal kernel equals dense masked attention."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from earlytom_jax.models.attention import attention, causal_attention


@pytest.mark.parametrize("L,block,hq,hk", [(37, 8, 4, 2), (64, 16, 7, 1), (50, 64, 2, 2)])
def test_blockwise_equals_dense(L, block, hq, hk):
    rng = np.random.default_rng(L)
    q = rng.normal(size=(1, L, hq, 16)).astype(np.float32)
    k = rng.normal(size=(1, L, hk, 16)).astype(np.float32)
    v = rng.normal(size=(1, L, hk, 16)).astype(np.float32)
    valid = rng.uniform(size=(1, L)) > 0.3
    valid[0, 0] = True
    i = np.arange(L)
    mask = (i[:, None] >= i[None, :])[None] & valid[:, None, :]
    ref = attention(q, k, v, jnp.asarray(mask))
    out = causal_attention(q, k, v, jnp.asarray(valid), block=block)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-6, rtol=0)


def _numpy_attention(q, k, v, mask):
    """Plain float64 attention, probabilities [B, Hq, Lq, Lk] too."""
    b, lq, hq, d = q.shape
    g = hq // k.shape[2]
    kk, vv = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q.astype(np.float64), kk) / np.sqrt(d)
    if mask is not None:
        s = np.where(mask[:, None], s, -1e30)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, vv), p


@pytest.mark.parametrize("with_mesh", [False, True], ids=["per-row", "mesh"])
@pytest.mark.parametrize("b,lq,lk,hq,hk,masked", [(2, 160, 160, 4, 4, False), (3, 130, 150, 6, 2, True)])
def test_cpu_by_head_attention_equals_plain_attention(b, lq, lk, hq, hk, masked, with_mesh):
    """Score matrices this large take the CPU loop over heads (and rows without a mesh)."""
    import contextlib

    import jax

    from earlytom_jax.models import attention as attn

    assert lq * lk >= attn._BY_HEAD_MIN_SCORES
    rng = np.random.default_rng(lq)
    q = rng.normal(size=(b, lq, hq, 8)).astype(np.float32)
    k, v = (rng.normal(size=(b, lk, hk, 8)).astype(np.float32) for _ in range(2))
    mask = rng.uniform(size=(b, lq, lk)) > 0.3 if masked else None
    ref, p = _numpy_attention(q, k, v, mask)
    mesh = jax.make_mesh((1,), ("data",)) if with_mesh else None
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        out = jax.jit(attn.attention)(q, k, v, None if mask is None else jnp.asarray(mask))
        np.testing.assert_allclose(np.asarray(out), ref, atol=2e-6, rtol=0)
        if not masked:
            o, col = jax.jit(attn.attention_colmean)(q, k, v)
            np.testing.assert_allclose(np.asarray(o), ref, atol=2e-6, rtol=0)
            np.testing.assert_allclose(np.asarray(col), p.mean(axis=(1, 2)), atol=1e-8, rtol=1e-5)


@pytest.mark.parametrize("masked", [False, True])
def test_cpu_by_head_attention_bf16(masked):
    """bf16 through the CPU loop over heads (q, k, v and the output pass it as uint16 bits,
    the weights are rounded to bf16): within bf16 rounding of the exact attention of the same
    bf16 inputs, on an unseen draw."""
    import jax

    from earlytom_jax.models import attention as attn

    b, lq, lk, hq, hk = 2, 140, 150, 6, 2
    rng = np.random.default_rng(2026)
    q, k, v = (jnp.asarray(rng.normal(size=(b, n, h, 16)), jnp.bfloat16) for n, h in ((lq, hq), (lk, hk), (lk, hk)))
    mask = rng.uniform(size=(b, lq, lk)) > 0.3 if masked else None
    ref, p = _numpy_attention(*(np.asarray(a, np.float32) for a in (q, k, v)), mask)
    out = jax.jit(attn.attention)(q, k, v, None if mask is None else jnp.asarray(mask))
    assert out.dtype == jnp.bfloat16
    err = np.abs(np.asarray(out, np.float32) - ref)
    assert err.max() < 1e-2 and err.mean() < 1e-3, (err.max(), err.mean())
    if not masked:
        o, col = jax.jit(attn.attention_colmean)(q, k, v)
        assert np.abs(np.asarray(o, np.float32) - ref).max() < 1e-2
        np.testing.assert_allclose(np.asarray(col), p.mean(axis=(1, 2)), atol=1e-6, rtol=1e-2)
