"""Attention kernels.

Layouts: q [B, Lq, Hq, D], k/v [B, Lk, Hk, D] with Hq a multiple of Hk (grouped-query
attention: query head h reads key/value head h // (Hq // Hk)). Scores and softmax in fp32.

- `attention`: dense scores with an optional boolean mask [B, Lq, Lk]; for short sequences
  (SigLIP's 729 tokens, decode steps). On CPU, large score matrices are computed one key
  head (and, without a mesh, one batch row) at a time (`_attention_by_head`), so each
  [Lq, Lk] block stays in cache, which runs faster than all heads at once (measured:
  docs/cpu-forms.md#attention-one-key-head-at-a-time).
- `attention_colmean`: the same without a mask, also returning the attention each key receives
  averaged over heads and queries [B, Lk]; EarlyTom's importance needs nothing more.
- `causal_attention`: blockwise online softmax over key blocks for long causal prefills, never
  materialising the [Lq, Lk] score matrix of all heads, and skipping key blocks that lie wholly
  above the diagonal.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from earlytom_jax.models.stack import bits, unbits

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


def _dense(q, k, v, mask, scale, colmean: bool, bias=None):
    s = _scores(q, k, scale)
    if bias is not None:
        s = s + bias[:, None, None, None, :]
    p = jax.nn.softmax(_mask(s, mask), axis=-1)
    col = p.mean(axis=(1, 2, 3)) if colmean else None
    return _weighted(p.astype(v.dtype), v, q.shape[2]), col


def _mask(s, mask):
    return s if mask is None else jnp.where(mask[:, None, None], s, NEG)


def _attention_by_head(q, k, v, mask, scale, colmean: bool, bias=None):
    """`_dense` as a loop over key heads (and batch rows when no mesh shards the batch: a
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
            m = mask[ri]  # [(B,) Lq, Lk]
            s = jnp.where(jnp.concatenate([m] * g, axis=-2) if g > 1 else m, s, NEG)
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
        return bits(o), (p.sum(axis=-2) if colmean else None)

    # bf16 in and out of the loop as uint16 bits (XLA:CPU would convert q, k, v and the
    # output to f32 around the loop; measured: docs/cpu-forms.md#bf16-through-loops-as-bits)
    o, col = jax.lax.map(one, (bits(qh), bits(kh), bits(vh), rows))
    o = unbits(o)
    o = o.reshape(hk, b, lq, g, d).transpose(1, 2, 0, 3, 4).reshape(b, lq, hq, d)
    if colmean:
        col = col.reshape(hk, b, lk).sum(0) / (hq * lq)
    return o, col


_BY_HEAD_MIN_SCORES = 128 * 128  # smaller score matrices (decode steps) stay dense


def _attend(q, k, v, mask, scale, colmean: bool, bias=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    bias = None if bias is None else bias.astype(jnp.float32)
    # chosen when tracing for the default backend (not lax.platform_dependent, whose unused
    # branch would hide the loop from the loop-aware FLOP count in bench.py)
    if q.shape[1] * k.shape[1] >= _BY_HEAD_MIN_SCORES and jax.default_backend() == "cpu":
        return _attention_by_head(q, k, v, mask, scale, colmean, bias)
    return _dense(q, k, v, mask, scale, colmean, bias)


def attention(q, k, v, mask=None, scale=None, bias=None):
    """Dense attention. mask: bool [B, Lq, Lk] (True = may attend) or None; bias: [B, Lk]
    added to every query's scores for that key (ToMe's log token sizes) or None.
    → [B, Lq, Hq, D]."""
    return _attend(q, k, v, mask, scale, False, bias)[0]


def attention_colmean(q, k, v, scale=None):
    """Unmasked attention plus mean over heads and queries of the probabilities: [B, Lk] fp32."""
    return _attend(q, k, v, None, scale, True)


def causal_attention(q, k, v, key_valid, block: int = 128, scale=None):
    """Causal attention by key blocks with an online softmax.

    q [B, L, Hq, D], k/v [B, L, Hk, D], key_valid bool [B, L] (padding keys never attended).
    Query i attends keys j <= i with key_valid[j]. Exact up to fp32 rounding. Heads-major
    blocks: the G query heads sharing a key head are stacked into one [G·block, D] operand, so
    each step is one batched matmul per key head; key blocks above the diagonal are skipped.
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
