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
