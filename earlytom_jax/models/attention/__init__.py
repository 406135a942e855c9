"""Attention: one entry point per kind, each picking the fastest correct kernel for the
platform it is traced for and the inputs' dtype and sizes.

Layouts: q [B, Lq, Hq, D], k/v [B, Lk, Hk, D] with Hq a multiple of Hk (grouped-query
attention: query head h reads key/value head h // (Hq // Hk)); scores and softmax in fp32.

Entry points:
- `attention`: bidirectional, with optional key validity [B, Lk] and per-key bias [B, Lk]
  (SigLIP, with ToMe's log token sizes as bias; decode steps; a non-causal LLM layer).
- `causal_attention`: the LLM's prefill, with invalid slots anywhere (the visual buffer's
  padding).
- `segment_attention`: block-diagonal over variable-length segments of a permuted sequence
  (Qwen2.5-VL's windows and frames), as rows of a static layout (`segments.Segments`).
- `attention_colmean` and `last_row_probs`: the two paths that return probabilities, used only
  at the layers whose probabilities a method reads (EarlyTom's last frame-merge block and
  VisionZip's last block: the per-key mean over heads and queries; FastV and EarlyTom's stage
  III: the last query's row, one row, never the whole matrix).

Kernels (`impl`; None picks):
| impl     | what                                                | picked on                          |
|----------|-----------------------------------------------------|------------------------------------|
| "cpu"    | `cpu`: a loop over heads; blockwise causal softmax  | CPU                                |
| "fused"  | `fused`: jax.nn.dot_product_attention (cuDNN flash) | NVIDIA GPU, bf16/fp16, head dim ≤ 128 |
| "splash" | `splash`: Pallas splash attention                   | TPU (no per-key bias)              |
| "dense"  | `dense`: the materialised reference                 | anything else; < 16 queries or products < 128² |
The choice is made when tracing, for `jax.default_backend()` (not `lax.platform_dependent`,
whose unused branches would hide the CPU loops from the loop-aware FLOP count in bench).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from earlytom_jax.models.attention import cpu, dense, fused, splash
from earlytom_jax.models.attention.segments import Segments

IMPLS = ("cpu", "fused", "splash", "dense")
DENSE_MAX_QUERIES = 16  # fewer queries (decode steps) stay materialised on every platform

__all__ = ["IMPLS", "Segments", "attention", "attention_colmean", "causal_attention", "choose",
           "last_row_probs", "segment_attention", "segment_attention_colmean"]


@functools.cache
def _nvidia() -> bool:
    return "cuda" in jax.devices()[0].client.platform_version.lower()


def choose(q, k, bias=None) -> str:
    """The kernel `impl=None` picks for these queries and keys on the default backend."""
    backend = jax.default_backend()
    if backend == "cpu":
        return "cpu"
    if q.shape[1] < DENSE_MAX_QUERIES or q.shape[1] * k.shape[1] < cpu.BY_HEAD_MIN_SCORES:
        return "dense"  # decode steps and short products: memory-bound, nothing to fuse
    if backend == "gpu" and _nvidia() and fused.cudnn_applies(q):
        return "fused"
    if backend == "tpu" and bias is None:
        return "splash"
    return "dense"


def _impl(impl, q, k, bias=None) -> str:
    if impl is None:
        return choose(q, k, bias)
    if impl not in IMPLS:
        raise ValueError(f"attention impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    if impl == "splash" and bias is not None:
        raise ValueError("the splash kernel takes no per-key bias")
    return impl


def _scale(q, scale):
    return q.shape[-1] ** -0.5 if scale is None else scale


def attention(q, k, v, key_valid=None, scale=None, bias=None, impl=None):
    """Bidirectional attention. key_valid: bool [B, Lk] (True = may be attended) or None;
    bias: [B, Lk] added to every query's scores for that key, or None. → [B, Lq, Hq, D]."""
    impl, scale = _impl(impl, q, k, bias), _scale(q, scale)
    bias = None if bias is None else bias.astype(jnp.float32)
    if impl == "fused":
        return fused.attention(q, k, v, key_valid, scale, bias)
    if impl == "splash":
        return splash.attention(q, k, v, key_valid, scale)
    mask = None if key_valid is None else key_valid[:, None, :]
    run = cpu.materialised if impl == "cpu" else dense.dense
    return run(q, k, v, mask, scale, False, bias)[0]


def attention_colmean(q, k, v, scale=None, impl=None):
    """Unmasked attention and the attention each key receives, averaged over heads and
    queries. → (out [B, Lq, Hq, D], colmean [B, Lk] fp32). Materialised ("cpu" or "dense")."""
    impl = ("cpu" if jax.default_backend() == "cpu" else "dense") if impl is None else impl
    if impl not in ("cpu", "dense"):
        raise ValueError(f"attention with probabilities runs materialised (cpu or dense), not {impl!r}")
    run = cpu.materialised if impl == "cpu" else dense.dense
    return run(q, k, v, None, _scale(q, scale), True)


def causal_attention(q, k, v, key_valid, scale=None, block: int | None = None, impl=None):
    """Causal attention: query i attends keys j <= i with key_valid[j]. q [B, L, Hq, D],
    k/v [B, L, Hk, D], key_valid bool [B, L]; block: the CPU kernel's block (None: by length).
    → [B, L, Hq, D]."""
    impl, scale = _impl(impl, q, k), _scale(q, scale)
    if impl == "cpu":
        return cpu.blockwise_causal(q, k, v, key_valid, scale, block)
    if impl == "fused":
        return fused.causal_attention(q, k, v, key_valid, scale)
    if impl == "splash":
        return splash.attention(q, k, v, key_valid, scale, causal=True)
    L = q.shape[1]
    return dense.dense(q, k, v, dense.causal_mask(L, L, key_valid), scale)[0]


def segment_attention(q, k, v, segments: Segments, scale=None, impl=None):
    """Attention within each segment of `segments` (a static layout of the L positions).
    q [B, L, Hq, D], k/v [B, L, Hk, D] → [B, L, Hq, D]."""
    b = q.shape[0]
    s, w = segments.shape
    rows = [a[:, segments.index].reshape((b * s, w) + a.shape[2:]) for a in (q, k, v)]
    valid = None  # all slots valid: no key mask at all
    if not segments.valid.all():
        valid = jnp.broadcast_to(jnp.asarray(segments.valid)[None], (b, s, w)).reshape(b * s, w)
    o = attention(*rows, valid, scale, impl=impl)
    return o.reshape((b, s * w) + o.shape[2:])[:, segments.back]


def segment_attention_colmean(q, k, v, segments: Segments, scale=None, impl=None):
    """`segment_attention` and the attention each position receives, averaged over heads and
    over all L queries of the sequence (zero from queries outside its segment, so each
    sequence's column means sum to 1). → (out [B, L, Hq, D], colmean [B, L] fp32).
    Materialised ("cpu" or "dense"), as `attention_colmean`."""
    impl = ("cpu" if jax.default_backend() == "cpu" else "dense") if impl is None else impl
    if impl not in ("cpu", "dense"):
        raise ValueError(f"attention with probabilities runs materialised (cpu or dense), not {impl!r}")
    b, length = q.shape[0], q.shape[1]
    s, w = segments.shape
    rows = [a[:, segments.index].reshape((b * s, w) + a.shape[2:]) for a in (q, k, v)]
    valid = jnp.broadcast_to(jnp.asarray(segments.valid)[None], (b, s, w)).reshape(b * s, w)
    run = cpu.materialised if impl == "cpu" else dense.dense
    o, col = run(*rows, valid[:, None, :], _scale(q, scale), True, None, valid)
    # each row's mean divides by its width w; over the whole sequence it is by L
    col = col.reshape(b, s * w)[:, segments.back] * (w / length)
    return o.reshape((b, s * w) + o.shape[2:])[:, segments.back], col


def last_row_probs(q, k, key_valid, scale=None):
    """The last query's attention probabilities averaged over heads: q [B, L, Hq, D],
    k [B, L, Hk, D], key_valid bool [B, L] → [B, L] fp32."""
    s = dense.scores(q[:, -1:], k, _scale(q, scale))  # [B, Hk, G, 1, L]
    s = jnp.where(key_valid[:, None, None, None, :], s, dense.NEG)
    return jax.nn.softmax(s, -1).mean(axis=(1, 2, 3))
