"""Attention kernels for XLA:CPU.

- `by_head`: materialised attention as a loop over key heads (and, without a mesh, batch
  rows), each step one [G·Lq, Lk] block that stays in cache; faster on CPU than all heads at
  once (measured: docs/cpu-forms.md#attention-one-key-head-at-a-time). Score matrices below
  `BY_HEAD_MIN_SCORES` (decode steps) stay in one product (`dense.dense`).
- `blockwise_causal`: causal attention by key blocks with an online softmax, never holding
  the [Lq, Lk] scores of all heads and skipping key blocks wholly above the diagonal; its block
  grows with the sequence (`causal_block`, measured: docs/cpu-forms.md#causal-attention-blocks).

Layouts as in `dense`: q [B, Lq, Hq, D], k/v [B, Lk, Hk, D].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from earlytom_jax.models.attention.dense import NEG, causal_mask, dense
from earlytom_jax.models.stack import bits, unbits

BY_HEAD_MIN_SCORES = 128 * 128  # smaller score matrices (decode steps) stay in one product


def materialised(q, k, v, mask, scale, colmean: bool = False, bias=None, query_valid=None):
    """`dense.dense` with the loop over heads where the score matrices are large."""
    if q.shape[1] * k.shape[1] >= BY_HEAD_MIN_SCORES:
        return by_head(q, k, v, mask, scale, colmean, bias, query_valid)
    return dense(q, k, v, mask, scale, colmean, bias, query_valid)


def causal_block(length: int) -> int:
    """Key/query block of `blockwise_causal` for a sequence of `length`: 256 from 4,096 tokens
    on (6,400 tokens: 0.45 → 0.41 s fp32 0.5B heads, 1.97 → 1.29 s bf16 7B heads per layer),
    128 below (3,200 tokens: 128 is 1.2-1.5x faster)."""
    return 256 if length >= 4096 else 128


def by_head(q, k, v, mask, scale, colmean: bool = False, bias=None, query_valid=None):
    """`dense.dense` as a loop over key heads (and batch rows when no mesh shards the batch: a
    loop over a sharded axis would gather it), each step one [G·Lq, Lk] block."""
    b, lq, hq, d = q.shape
    lk, hk = k.shape[1], k.shape[2]
    g = hq // hk
    per_row = jax.sharding.get_abstract_mesh().empty
    qh = q.reshape(b, lq, hk, g, d).transpose(2, 0, 1, 3, 4)  # [Hk, B, Lq, G, D]
    kh, vh = k.transpose(2, 0, 1, 3), v.transpose(2, 0, 1, 3)  # [Hk, B, Lk, D]
    rows = jnp.broadcast_to(jnp.arange(b)[None], (hk, b))
    if per_row:  # items (head, row) without a batch axis: 2-D products, XLA:CPU's fastest
        qh, kh, vh = (a.reshape((hk * b,) + a.shape[2:]) for a in (qh, kh, vh))
        rows = rows.reshape(hk * b)

    def one(item):
        qi, ki, vi, ri = item  # qi [(B,) Lq, G, D]; ki, vi [(B,) Lk, D]
        qi, ki, vi = (unbits(a) for a in (qi, ki, vi))
        qi = jnp.swapaxes(qi, -2, -3).reshape(qi.shape[:-3] + (g * lq, d))  # rows (g, q)
        # the scale on q, not on the scores: one pass fewer over [Lq, Lk]
        s = jnp.einsum("...qd,...kd->...qk", qi * jnp.asarray(scale, qi.dtype), ki,
                       preferred_element_type=jnp.float32)
        if bias is not None:
            s = s + bias[ri][..., None, :]
        if mask is not None:
            m = mask[ri]  # [(B,) Lq or 1, Lk]
            s = jnp.where(jnp.concatenate([m] * g, axis=-2) if g > 1 and m.shape[-2] > 1 else m, s, NEG)
        if colmean:
            p = jax.nn.softmax(s, axis=-1)
            o = jnp.einsum("...qk,...kd->...qd", p.astype(vi.dtype), vi, preferred_element_type=jnp.float32)
        else:  # normalised after the product: one pass fewer over [Lq, Lk]; in bf16, exp and
            # rounding in one pass, and the sum taken over the rounded weights
            # (measured: docs/cpu-forms.md#attention-one-key-head-at-a-time)
            e = jnp.exp(s - jax.lax.stop_gradient(s.max(axis=-1, keepdims=True))).astype(vi.dtype)
            o = jnp.einsum("...qk,...kd->...qd", e, vi, preferred_element_type=jnp.float32)
            o = o / e.sum(axis=-1, keepdims=True, dtype=jnp.float32)
        o = o.astype(vi.dtype)
        o = jnp.swapaxes(o.reshape(o.shape[:-2] + (g, lq, d)), -2, -3)  # [(B,) Lq, G, D]
        if colmean and query_valid is not None:  # rows (g, q): the query mask tiled g times
            p = jnp.where(jnp.tile(query_valid[ri], g)[..., None], p, 0.0)
        return bits(o), (p.sum(axis=-2) if colmean else None)

    # bf16 in and out of the loop as uint16 bits (XLA:CPU would convert q, k, v and the
    # output to f32 around the loop; measured: docs/cpu-forms.md#bf16-through-loops-as-bits)
    o, col = jax.lax.map(one, (bits(qh), bits(kh), bits(vh), rows))
    o = unbits(o)
    o = o.reshape(hk, b, lq, g, d).transpose(1, 2, 0, 3, 4).reshape(b, lq, hq, d)
    if colmean:
        col = col.reshape(hk, b, lk).sum(0) / (hq * lq)
    return o, col


def blockwise_causal(q, k, v, key_valid, scale, block: int | None = None):
    """Causal attention by key blocks with an online softmax.

    q [B, L, Hq, D], k/v [B, L, Hk, D], key_valid bool [B, L] (padding keys never attended).
    Query i attends keys j <= i with key_valid[j]. Exact up to fp32 rounding. Heads-major
    blocks: the G query heads sharing a key head are stacked into one [G·block, D] operand, so
    each step is one batched matmul per key head; key blocks above the diagonal are skipped.
    """
    b, L, hq, d = q.shape
    hk = k.shape[2]
    g = hq // hk
    block = causal_block(L) if block is None else block
    if L <= block:
        return materialised(q, k, v, causal_mask(L, L, key_valid), scale)[0]
    nb = -(-L // block)
    pad = ((0, 0), (0, nb * block - L), (0, 0), (0, 0))
    qp, kp, vp = jnp.pad(q, pad), jnp.pad(k, pad), jnp.pad(v, pad)
    valid = jnp.pad(key_valid, ((0, 0), (0, nb * block - L)))
    # q blocks [nb, B, Hk, G*block, D]; k/v blocks [nb, B, Hk, block, D]
    qb = qp.reshape(b, nb, block, hk, g, d).transpose(1, 0, 3, 4, 2, 5).reshape(nb, b, hk, g * block, d)
    qb = qb * jnp.asarray(scale, q.dtype)
    kb = kp.reshape(b, nb, block, hk, d).transpose(1, 0, 3, 2, 4)
    vb = vp.reshape(b, nb, block, hk, d).transpose(1, 0, 3, 2, 4)
    validb = valid.reshape(b, nb, block).transpose(1, 0, 2)
    pos = jnp.arange(block)
    qpos = jnp.tile(pos, g)  # position inside the block of each stacked query row

    def one_query_block(qi, qblk):
        def step(carry, j):
            def compute(carry):
                m, l, acc = carry
                s = jnp.einsum("bhqd,bhkd->bhqk", qblk, kb[j], preferred_element_type=jnp.float32)
                causal = (qi * block + qpos)[:, None] >= (j * block + pos)[None, :]
                s = jnp.where(causal[None, None] & validb[j][:, None, None, :], s, NEG)
                m_new = jnp.maximum(m, s.max(-1))
                corr = jnp.exp(m - m_new)
                p = jnp.exp(s - m_new[..., None])
                pv = jnp.einsum("bhqk,bhkd->bhqd", p.astype(vb.dtype), vb[j], preferred_element_type=jnp.float32)
                return m_new, l * corr + p.sum(-1), acc * corr[..., None] + pv

            return jax.lax.cond(j <= qi, compute, lambda c: c, carry), None

        m0 = jnp.full((b, hk, g * block), NEG, jnp.float32)
        l0 = jnp.zeros((b, hk, g * block), jnp.float32)
        a0 = jnp.zeros((b, hk, g * block, d), jnp.float32)
        (_, l, acc), _ = jax.lax.scan(step, (m0, l0, a0), jnp.arange(nb))
        return acc / l[..., None]

    out = jax.lax.map(lambda a: one_query_block(*a), (jnp.arange(nb), qb))
    out = out.reshape(nb, b, hk, g, block, d).transpose(1, 0, 4, 2, 3, 5).reshape(b, nb * block, hq, d)
    return out[:, :L].astype(q.dtype)
