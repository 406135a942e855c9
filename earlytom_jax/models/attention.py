"""Attention kernels.

Layouts: q [B, Lq, Hq, D], k/v [B, Lk, Hk, D] with Hq a multiple of Hk (grouped-query
attention: query head h reads key/value head h // (Hq // Hk)). Scores and softmax in fp32.

- `attention`: dense scores with an optional boolean mask [B, Lq, Lk]; for short sequences
  (SigLIP's 729 tokens, decode steps).
- `attention_colmean`: the same without a mask, also returning the attention each key receives
  averaged over heads and queries [B, Lk]; EarlyTom's importance needs nothing more.
- `causal_attention`: blockwise online softmax over key blocks for long causal prefills, never
  materialising the [Lq, Lk] score matrix of all heads, and skipping key blocks that lie wholly
  above the diagonal.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG = -1e30  # finite, so a fully masked row gives a uniform softmax instead of NaN


def _scores(q, k, scale):
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


def _weighted(p, v, hq):
    """p [B, Hk, G, Lq, Lk] · v [B, Lk, Hk, D] → [B, Lq, Hq, D]."""
    b, hk, g, lq, _ = p.shape
    if g == 1:
        return jnp.einsum("bhqk,bkhd->bqhd", p[:, :, 0], v)
    o = jnp.einsum("bhgqk,bkhd->bqhgd", p, v)
    return o.reshape(b, lq, hq, v.shape[-1])


def attention(q, k, v, mask=None, scale=None):
    """Dense attention. mask: bool [B, Lq, Lk] (True = may attend) or None. → [B, Lq, Hq, D]."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = _scores(q, k, scale)
    if mask is not None:
        s = jnp.where(mask[:, None, None], s, NEG)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    return _weighted(p, v, q.shape[2])


def attention_colmean(q, k, v, scale=None):
    """Unmasked attention plus mean over heads and queries of the probabilities: [B, Lk] fp32."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    p = jax.nn.softmax(_scores(q, k, scale), axis=-1)
    colmean = p.mean(axis=(1, 2, 3))
    return _weighted(p.astype(v.dtype), v, q.shape[2]), colmean


def causal_attention(q, k, v, key_valid, block: int = 512, scale=None):
    """Causal attention by key blocks with an online softmax.

    q [B, L, Hq, D], k/v [B, L, Hk, D], key_valid bool [B, L] (padding keys never attended).
    Query i attends keys j <= i with key_valid[j]. Exact up to fp32 rounding.
    """
    b, L, hq, d = q.shape
    hk = k.shape[2]
    g = hq // hk
    scale = d**-0.5 if scale is None else scale
    if L <= block:
        i = jnp.arange(L)
        mask = (i[:, None] >= i[None, :])[None] & key_valid[:, None, :]
        return attention(q, k, v, mask, scale)
    nb = -(-L // block)
    pad = nb * block - L
    qp = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    kp = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0)))
    vp = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))
    valid = jnp.pad(key_valid, ((0, 0), (0, pad)))
    # [nb, B, block, Hk, G, D] query blocks; [nb, B, block, Hk, D] key/value blocks
    qb = qp.reshape(b, nb, block, hk, g, d).transpose(1, 0, 2, 3, 4, 5)
    kb = kp.reshape(b, nb, block, hk, d).transpose(1, 0, 2, 3, 4)
    vb = vp.reshape(b, nb, block, hk, d).transpose(1, 0, 2, 3, 4)
    validb = valid.reshape(b, nb, block).transpose(1, 0, 2)
    pos = jnp.arange(block)

    def one_query_block(qi, qblk):
        def step(carry, j):
            m, l, acc = carry

            def compute(carry):
                m, l, acc = carry
                kj, vj, vmask = kb[j], vb[j], validb[j]
                s = jnp.einsum("bqhgd,bkhd->bhgqk", qblk, kj, preferred_element_type=jnp.float32) * scale
                causal = (qi * block + pos)[:, None] >= (j * block + pos)[None, :]
                ok = causal[None, None, None] & vmask[:, None, None, None, :]
                s = jnp.where(ok, s, NEG)
                m_new = jnp.maximum(m, s.max(-1))
                corr = jnp.exp(m - m_new)
                p = jnp.exp(s - m_new[..., None])
                l_new = l * corr + p.sum(-1)
                acc_new = acc * corr[..., None] + jnp.einsum(
                    "bhgqk,bkhd->bhgqd", p.astype(vj.dtype), vj, preferred_element_type=jnp.float32
                )
                return m_new, l_new, acc_new

            return jax.lax.cond(j <= qi, compute, lambda c: c, carry), None

        m0 = jnp.full((b, hk, g, block), NEG, jnp.float32)
        l0 = jnp.zeros((b, hk, g, block), jnp.float32)
        a0 = jnp.zeros((b, hk, g, block, d), jnp.float32)
        (m, l, acc), _ = jax.lax.scan(step, (m0, l0, a0), jnp.arange(nb))
        out = acc / l[..., None]
        return out.transpose(0, 3, 1, 2, 4).reshape(b, block, hq, d)

    out = jax.lax.map(lambda a: one_query_block(*a), (jnp.arange(nb), qb))
    out = out.transpose(1, 0, 2, 3, 4).reshape(b, nb * block, hq, d)[:, :L]
    return out.astype(q.dtype)
