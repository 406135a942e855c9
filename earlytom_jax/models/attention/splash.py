"""Attention through Pallas' splash attention kernel for TPU (run in interpret mode off TPU,
which is how the CPU tests check it; no TPU has timed it yet, so its block sizes are not tuned).

Splash expresses what the fused GPU kernel cannot: key validity anywhere in the sequence, as
segment ids (queries are segment 0, invalid keys segment 1, so no query attends them). Grouped
query attention runs the multi-query kernel once per key head (the G query heads sharing it).
Sequences are padded to whole blocks with invalid keys. Layouts as in `dense`: q [B, Lq, Hq, D],
k/v [B, Lk, Hk, D].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _block(length: int) -> int:
    return 512 if length >= 2048 else 128


@functools.cache
def _kernel(lq: int, lk: int, groups: int, causal: bool, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    one = sm.CausalMask((lq, lk)) if causal else sm.FullMask((lq, lk))
    bq, bk = _block(lq), _block(lk)
    sizes = sk.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk)
    # built once per shape and cached: its mask tables must be constants, not values of the
    # trace that first asked for them
    with jax.ensure_compile_time_eval():
        return sk.make_splash_mqa_single_device(sm.MultiHeadMask([one] * groups), block_sizes=sizes,
                                                interpret=interpret)


def _pad_to(x, length: int, axis: int):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, pad)


def attention(q, k, v, key_valid, scale, causal: bool = False):
    """key_valid bool [B, Lk] or None (all valid); causal needs Lq == Lk.
    → [B, Lq, Hq, D] in q's dtype."""
    from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import SegmentIds

    b, lq, hq, d = q.shape
    lk, hk = k.shape[1], k.shape[2]
    g = hq // hk
    plq, plk = -(-lq // _block(lq)) * _block(lq), -(-lk // _block(lk)) * _block(lk)
    valid = jnp.ones((b, lk), bool) if key_valid is None else key_valid
    kv_ids = _pad_to(jnp.where(valid, 0, 1).astype(jnp.int32), plk, 1)
    kv_ids = jnp.where(jnp.arange(plk)[None] < lk, kv_ids, 1)
    q_ids = jnp.zeros((b, plq), jnp.int32)
    # heads-major: q [B, Hk, G, Lq, D], k/v [B, Hk, Lk, D]
    qh = _pad_to(q * jnp.asarray(scale, q.dtype), plq, 1).reshape(b, plq, hk, g, d).transpose(0, 2, 3, 1, 4)
    kh, vh = (_pad_to(a, plk, 1).transpose(0, 2, 1, 3) for a in (k, v))
    kernel = _kernel(plq, plk, g, causal, jax.default_backend() != "tpu")

    def one_row(qr, kr, vr, qi, ki):
        ids = SegmentIds(q=qi, kv=ki)
        return jax.vmap(lambda qq, kk, vv: kernel(qq, kk, vv, segment_ids=ids))(qr, kr, vr)

    o = jax.vmap(one_row)(qh, kh, vh, q_ids, kv_ids)  # [B, Hk, G, Lq', D]
    return o.transpose(0, 3, 1, 2, 4).reshape(b, plq, hq, d)[:, :lq].astype(q.dtype)
