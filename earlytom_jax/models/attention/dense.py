"""Materialised attention: the full score matrix, softmax in fp32, on any platform.

The reference every other kernel is tested against, the path of short products (decode steps)
where a fused kernel gains nothing, and the one path that can return probabilities.
Layouts: q [B, Lq, Hq, D], k/v [B, Lk, Hk, D], Hq a multiple of Hk (query head h reads
key/value head h // (Hq // Hk)).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG = -1e30  # finite, so a fully masked row gives a uniform softmax instead of NaN


def scores(q, k, scale):
    """Scaled scores fp32 [B, Hk, G, Lq, Lk]; plain multi-head (G = 1) skips the group axis,
    which XLA:CPU runs markedly faster."""
    b, lq, hq, d = q.shape
    hk = k.shape[2]
    if hq == hk:
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)[:, :, None]
    else:
        qg = q.reshape(b, lq, hk, hq // hk, d)
        s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32)
    return s * scale


def weighted(p, v, hq):
    """p [B, Hk, G, Lq, Lk] · v [B, Lk, Hk, D] → [B, Lq, Hq, D]."""
    b, hk, g, lq, _ = p.shape
    if g == 1:
        return jnp.einsum("bhqk,bkhd->bqhd", p[:, :, 0], v)
    o = jnp.einsum("bhgqk,bkhd->bqhgd", p, v)
    return o.reshape(b, lq, hq, v.shape[-1])


def dense(q, k, v, mask, scale, colmean: bool = False, bias=None, query_valid=None):
    """mask: bool broadcastable to [B, Lq, Lk] (True = may attend) or None; bias: fp32 [B, Lk]
    or None. → (out [B, Lq, Hq, D], colmean [B, Lk] fp32 or None: the probabilities averaged
    over heads and queries; query_valid bool [B, Lq] leaves the invalid queries' rows out of
    the sum, which still divides by Hq·Lq)."""
    s = scores(q, k, scale)
    if bias is not None:
        s = s + bias[:, None, None, None, :]
    if mask is not None:
        s = jnp.where(mask[:, None, None], s, NEG)
    p = jax.nn.softmax(s, axis=-1)
    col = None
    if colmean:
        if query_valid is not None:
            p = jnp.where(query_valid[:, None, None, :, None], p, 0.0)
        col = p.mean(axis=(1, 2, 3))
    return weighted(p.astype(v.dtype), v, q.shape[2]), col


def causal_mask(lq: int, lk: int, key_valid):
    """Query i (the last lq of lk positions) may attend key j <= i + lk - lq with key_valid[j].
    → bool [B, Lq, Lk]."""
    i = jnp.arange(lq)[:, None] + (lk - lq)
    return (i >= jnp.arange(lk)[None, :])[None] & key_valid[:, None, :]
