"""EarlyTom stage I (temporal merging inside the vision encoder), array level.

Spec: docs `earlytom.md` section 2 (2a segmentation, 2b per-segment rule, 2c middle-frame
merge, 2d repetition / final segmentation).

Static-shape convention used by every function here: the frame axis has a static capacity
`Tc`; an int32 scalar `n` says how many leading frames are valid (frames `[0, n)`), the rest
is padding that never influences a result (padding must hold finite values when it goes
through `apply_mixing`, since `0 * inf` is NaN). All functions are jittable; `quirks` (and the
Python-number settings `alpha`, `max_window` when given as Python numbers) are static.

`quirks=True` reproduces the official code (the published numbers); `quirks=False` is the
paper's prose: segmentation compares frame i to frame i-1, the middle-merge threshold is the
constant tau, and the last middle frame is emitted when no merge consumed it.

Numerics: similarities, the EMA, the threshold tests and the blend weights are fp32 (tau is
rounded to fp32 first), whatever the input dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

COSINE_EPS = 1e-8  # torch.nn.functional.cosine_similarity default


def _f32(v) -> jax.Array:
    return jnp.asarray(v, dtype=jnp.float32)


def _ema_coeffs(alpha):
    """(alpha, 1 - alpha) as fp32. A Python alpha has 1 - alpha formed in float64 and then
    rounded (what `alpha * t + (1 - alpha) * u` does in torch on fp32 tensors)."""
    if isinstance(alpha, (int, float)):
        return _f32(alpha), _f32(1.0 - float(alpha))
    a = _f32(alpha)
    return a, jnp.float32(1.0) - a


# ----------------------------------------------------------------------------------------
# similarity
# ----------------------------------------------------------------------------------------


def frame_similarity(x: jax.Array) -> jax.Array:
    """Mean-over-positions cosine similarity between every pair of frames.

    x: [Tc, N, C] (any float dtype; computed in fp32).
    Returns S: [Tc, Tc] fp32 with S[a, b] = mean_n cos(x[a, n], x[b, n]).

    The cosine follows torch.nn.functional.cosine_similarity (torch >= 1.12, incl. 2.x):
    `<x1 / max(|x1|, eps), x2 / max(|x2|, eps)>` with eps = 1e-8 (each norm is clamped
    separately; not the older `x1.x2 / max(|x1||x2|, eps)`).
    Rows/columns of padding frames hold garbage; callers mask them with `n`.
    """
    x32 = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True))
    xn = x32 / jnp.maximum(norm, COSINE_EPS)
    n_pos = x.shape[1]
    dots = jnp.einsum("anc,bnc->ab", xn, xn, precision=lax.Precision.HIGHEST)
    return dots / jnp.float32(n_pos)


# ----------------------------------------------------------------------------------------
# 2a: segmentation
# ----------------------------------------------------------------------------------------


def segment_starts(
    S: jax.Array, n: jax.Array, tau, alpha=0.9, max_window: int = 6, quirks: bool = True
) -> jax.Array:
    """Streaming segmentation (spec 2a) as a `lax.scan` over frames.

    S: [Tc, Tc] fp32 frame similarities; n: int32 scalar, valid frames [0, n).
    tau, alpha: scalars (cast to fp32); max_window: M (a segment holds at most M-1 frames).
    quirks: True compares frame i to its segment's first frame (official code); False to
    frame i-1 (paper).
    Returns starts: [Tc] bool, True where a segment begins; False on padding (all False when
    n == 0).
    """
    Tc = S.shape[0]
    n = jnp.asarray(n, jnp.int32)
    tau32 = _f32(tau)
    a, b = _ema_coeffs(alpha)
    M = jnp.asarray(max_window, jnp.int32)

    def body(carry, i):
        start, ref, s_hat = carry
        other = ref if quirks else jnp.maximum(i - 1, 0)
        s = S[other, i]
        new_hat = a * s + b * s_hat
        cut = (new_hat < tau32) | (i - start + 1 >= M)
        active = (i >= 1) & (i < n)
        is_start = jnp.where(i == 0, n > 0, active & cut)
        start = jnp.where(active & cut, i, start)
        ref = jnp.where(active & cut, i, ref)
        s_hat = jnp.where(active, jnp.where(cut, jnp.float32(1.0), new_hat), s_hat)
        return (start, ref, s_hat), is_start

    init = (jnp.int32(0), jnp.int32(0), jnp.float32(1.0))
    _, starts = lax.scan(body, init, jnp.arange(Tc, dtype=jnp.int32))
    return starts


class SegmentInfo(NamedTuple):
    """Per-frame segment description, each [Tc] int32; -1 on padding frames."""

    seg_id: jax.Array  # 0-based segment index in time order
    seg_start: jax.Array  # index of the segment's first frame
    seg_end: jax.Array  # index of the segment's last frame (inclusive)


def segment_info(starts: jax.Array, n: jax.Array) -> SegmentInfo:
    """Segment id, first and last frame of every frame's segment.

    starts: [Tc] bool (from `segment_starts`; frame 0 starts a segment when n > 0);
    n: int32 scalar. Returns SegmentInfo of three [Tc] int32 arrays, -1 on padding.
    """
    Tc = starts.shape[0]
    n = jnp.asarray(n, jnp.int32)
    idx = jnp.arange(Tc, dtype=jnp.int32)
    valid = idx < n
    starts = starts & valid
    seg_id = jnp.cumsum(starts.astype(jnp.int32)) - 1
    seg_start = lax.cummax(jnp.where(starts, idx, 0), axis=0)
    next_incl = lax.cummin(jnp.where(starts, idx, n), axis=0, reverse=True)
    next_excl = jnp.concatenate([next_incl[1:], n[None]])
    seg_end = jnp.minimum(next_excl, n) - 1
    neg = jnp.int32(-1)
    return SegmentInfo(
        seg_id=jnp.where(valid, seg_id, neg),
        seg_start=jnp.where(valid, seg_start, neg),
        seg_end=jnp.where(valid, seg_end, neg),
    )


# ----------------------------------------------------------------------------------------
# 2b + 2c: one compression layer as a mixing matrix
# ----------------------------------------------------------------------------------------


class _FrameRoles(NamedTuple):
    valid: jax.Array  # [Tc] bool
    walk: jax.Array  # [Tc] bool: middle frame of a segment with >= 2 middle frames
    last_mid: jax.Array  # [Tc] bool: the last middle frame of such a segment
    merge: jax.Array  # [Tc] bool: 2c's merge test passes if the walk reaches this frame
    w: jax.Array  # [Tc] fp32: blend weight of this frame when it merges with the next


def _frame_roles(S, n, starts, tau, quirks: bool) -> _FrameRoles:
    """Vectorised per-frame quantities of spec 2b/2c (everything except the walk state)."""
    Tc = S.shape[0]
    idx = jnp.arange(Tc, dtype=jnp.int32)
    info = segment_info(starts, n)
    valid = idx < jnp.asarray(n, jnp.int32)
    s, e = info.seg_start, info.seg_end
    L = e - s + 1
    m = L - 2  # number of middle frames
    k = idx - s - 1  # position among the middle frames
    walk = valid & (m >= 2) & (idx > s) & (idx < e)
    last_mid = walk & (k == m - 1)

    nxt1 = jnp.minimum(idx + 1, Tc - 1)
    nxt2 = jnp.minimum(idx + 2, Tc - 1)
    s_k = S[idx, nxt1]  # sim(F_k, F_{k+1})
    has_nxt = k + 1 < m - 1
    nxt = jnp.where(has_nxt, S[nxt1, nxt2], jnp.float32(0.0))  # s_{k+1} or 0
    if quirks:
        tau_m = S[jnp.maximum(s, 0), jnp.maximum(e, 0)]  # adaptive: sim(first, last)
    else:
        tau_m = jnp.broadcast_to(_f32(tau), (Tc,))
    merge = walk & (k < m - 1) & (s_k > tau_m) & (~has_nxt | (s_k > nxt))
    safe_den = jnp.where(nxt != 0, s_k + nxt, jnp.float32(1.0))
    w = jnp.where(nxt != 0, s_k / safe_den, jnp.float32(1.0))
    return _FrameRoles(valid=valid, walk=walk, last_mid=last_mid, merge=merge, w=w)


def _walk_emits(roles: _FrameRoles, quirks: bool):
    """The 2c pair-merge walk as a scan with state `skip_next_frame`.

    Returns (emit [Tc] bool: frame i produces one output row; merged [Tc] bool: that row
    blends frame i with frame i+1).
    """

    def body(skip, xs):
        valid, walk, last_mid, merge = xs
        # frames outside a 2c walk: emitted as they are
        plain = valid & ~walk
        # frames inside a walk (a frame the previous merge consumed, walk & skip, emits nothing)
        at_last = walk & ~skip & last_mid
        regular = walk & ~skip & ~last_mid
        emit = plain | regular | (at_last & (not quirks))
        merged = regular & merge
        return merged, (emit, merged)

    xs = (roles.valid, roles.walk, roles.last_mid, roles.merge)
    _, (emit, merged) = lax.scan(body, jnp.bool_(False), xs)
    return emit, merged


class Mixing(NamedTuple):
    """One compression layer of stage I (`mixing`)."""

    W: jax.Array  # [Tc, Tc] fp32: x_out = W @ x over the frame axis
    n_out: jax.Array  # int32: output frames
    starts_out: jax.Array  # [Tc] bool: output rows that hold an input segment's first frame
    first: jax.Array  # [Tc] int32: the input frame each output row starts from (Tc past n_out)


def mixing(S: jax.Array, n: jax.Array, tau, alpha=0.9, max_window: int = 6, quirks: bool = True,
           weighted: bool = True) -> Mixing:
    """One compression layer of stage I (spec 2a + 2b + 2c) as a mixing matrix.

    S: [Tc, Tc] fp32 frame similarities of the layer's input; n: int32 valid frames.
    Returns Mixing(W, n_out, starts_out, first):
      W: [Tc, Tc] fp32, `x_out = W @ x` over the frame axis. Row r is the r-th output frame
         (time order): a kept frame (one weight 1) or a blend `w F_k + (1-w) F_{k+1}` of
         two adjacent middle frames. Rows >= n_out are zero; columns >= n are zero.
      n_out: int32 scalar, number of output frames.
      starts_out: [Tc] bool, True at the output row holding the first frame of each input
         segment (the input segmentation expressed in output rows).
      first: [Tc] int32, the input frame of each output row (F_k of a blend), Tc past n_out.
    Segments of <= 2 frames, segment endpoints and single middle frames are kept as they
    are. With quirks=True the middle threshold is sim(first, last) and the last middle frame
    of a segment with >= 2 middle frames is never emitted; quirks=False uses tau and emits
    that frame unless a merge consumed it. A merge of the last middle pair has w = 1.
    weighted=False (the paper's ablation "without weighted frame merging"): every merge is
    the plain average, w = 1/2, the last pair's too.
    """
    Tc = S.shape[0]
    idx = jnp.arange(Tc, dtype=jnp.int32)
    starts = segment_starts(S, n, tau, alpha, max_window, quirks)
    roles = _frame_roles(S, n, starts, tau, quirks)
    if not weighted:
        roles = roles._replace(w=jnp.full((Tc,), 0.5, jnp.float32))
    emit, merged = _walk_emits(roles, quirks)

    row = jnp.cumsum(emit.astype(jnp.int32)) - 1
    n_out = jnp.sum(emit.astype(jnp.int32))
    w_self = jnp.where(merged, roles.w, jnp.float32(1.0))
    w_next = jnp.float32(1.0) - roles.w

    drop = jnp.int32(Tc)  # out-of-range row: dropped by the scatter
    row_self = jnp.where(emit, row, drop)
    row_next = jnp.where(emit & merged, row, drop)
    W = jnp.zeros((Tc, Tc), jnp.float32)
    W = W.at[row_self, idx].set(w_self, mode="drop")
    W = W.at[row_next, jnp.minimum(idx + 1, Tc - 1)].set(w_next, mode="drop")
    starts_out = jnp.zeros((Tc,), bool).at[jnp.where(starts & emit, row, drop)].set(
        True, mode="drop"
    )
    first = jnp.full((Tc,), Tc, jnp.int32).at[row_self].set(idx, mode="drop")
    return Mixing(W, n_out, starts_out, first)


def mixing_matrix(
    S: jax.Array, n: jax.Array, tau, alpha=0.9, max_window: int = 6, quirks: bool = True
):
    """(W, n_out, starts_out) of `mixing` (weighted merges)."""
    return tuple(mixing(S, n, tau, alpha, max_window, quirks)[:3])


def apply_mixing(W: jax.Array, x: jax.Array) -> jax.Array:
    """Merged frames `x_out[r] = sum_t W[r, t] x[t]`.

    W: [Tc_out, Tc] fp32; x: [Tc, ...] any float dtype. Returns [Tc_out, ...] in x's dtype.
    The sum is computed in fp32 (x upcast, full-precision matmul) and rounded to x's dtype
    once at the end. Padding frames of x must be finite (their weights are 0).
    """
    out = jnp.tensordot(W, x.astype(jnp.float32), axes=(1, 0), precision=lax.Precision.HIGHEST)
    return out.astype(x.dtype)


# ----------------------------------------------------------------------------------------
# 2d: final segmentation -> dynamic / static frames for stage II
# ----------------------------------------------------------------------------------------


def dynamic_frames(starts: jax.Array, n: jax.Array) -> jax.Array:
    """[Tc] bool: in a segment of <= 2 frames every frame is dynamic; in a longer one the
    first and last frames are dynamic, the middle ones static. Padding False."""
    Tc = starts.shape[0]
    idx = jnp.arange(Tc, dtype=jnp.int32)
    info = segment_info(starts, n)
    valid = idx < jnp.asarray(n, jnp.int32)
    L = info.seg_end - info.seg_start + 1
    return valid & ((L <= 2) | (idx == info.seg_start) | (idx == info.seg_end))


def final_segments(
    S: jax.Array, n: jax.Array, tau, alpha=0.9, max_window: int = 6, quirks: bool = True
):
    """Final segmentation after the last compression layer (spec 2d), driving stage II.

    S: [Tc, Tc] fp32 similarities of the *merged* frames; n: int32 merged frame count.
    Returns (starts [Tc] bool, dynamic [Tc] bool), both False on padding.
    """
    starts = segment_starts(S, n, tau, alpha, max_window, quirks)
    return starts, dynamic_frames(starts, n)
