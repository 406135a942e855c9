"""Attention through `jax.nn.dot_product_attention`: cuDNN's fused flash attention on NVIDIA
GPUs (bf16/fp16), XLA's implementation of the same call elsewhere (which is how CPU tests run
every line of this path).

The fused kernel takes key validity only as right padding (`key_value_seq_lengths`), and a
bias only as a full [B, H, Lq, Lk] tensor, while our sequences have invalid slots in the
middle (the visual buffer's padding). So valid keys are first moved to the front, in order:
- bidirectional attention does not depend on the keys' order, so only k and v move;
- causal attention moves q, k and v by the same stable permutation: valid tokens keep their
  order (so the causal mask between them is unchanged) and invalid ones go to the end, where
  they attend only valid keys; the output moves back.
Layouts as in `dense`: q [B, Lq, Hq, D], k/v [B, Lk, Hk, D].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

FUSED_DTYPES = (jnp.bfloat16, jnp.float16)
MAX_HEAD_DIM = 128  # cuDNN's flash attention: head dims up to 128, multiples of 8


def cudnn_applies(q) -> bool:
    """Whether cuDNN's fused kernel takes these queries (dtype and head dim)."""
    d = q.shape[-1]
    return q.dtype in FUSED_DTYPES and d % 8 == 0 and d <= MAX_HEAD_DIM


def _implementation(q) -> str:
    return "cudnn" if jax.default_backend() == "gpu" and cudnn_applies(q) else "xla"


def _valid_first(key_valid):
    """Stable permutation putting valid slots first, and their count. key_valid bool [B, L]
    → (order int32 [B, L], count int32 [B])."""
    order = jnp.argsort(~key_valid, axis=-1, stable=True).astype(jnp.int32)
    return order, key_valid.sum(-1, dtype=jnp.int32)


def _take(x, order):
    """x [B, L, ...] gathered along L by order [B, L]."""
    return jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 2)), axis=1)


def attention(q, k, v, key_valid, scale, bias=None):
    """Bidirectional attention. key_valid bool [B, Lk] or None; bias fp32 [B, Lk] or None.
    → [B, Lq, Hq, D]."""
    lengths = None
    if key_valid is not None:
        order, lengths = _valid_first(key_valid)
        k, v = _take(k, order), _take(v, order)
        bias = None if bias is None else _take(bias, order)
    if bias is not None:
        bias = jnp.broadcast_to(bias[:, None, None, :], (q.shape[0], 1, q.shape[1], k.shape[1])).astype(q.dtype)
    return jax.nn.dot_product_attention(
        q, k, v, bias=bias, scale=scale, key_value_seq_lengths=lengths, implementation=_implementation(q)
    )


def causal_attention(q, k, v, key_valid, scale):
    """Causal attention over key_valid bool [B, L] (query i attends keys j <= i that are
    valid). → [B, L, Hq, D]."""
    order, lengths = _valid_first(key_valid)
    q, k, v = _take(q, order), _take(k, order), _take(v, order)
    o = jax.nn.dot_product_attention(
        q, k, v, scale=scale, is_causal=True, key_value_seq_lengths=lengths, implementation=_implementation(q)
    )
    back = jnp.argsort(order, axis=-1).astype(jnp.int32)
    return _take(o, back)
