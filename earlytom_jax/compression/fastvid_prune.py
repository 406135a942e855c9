"""FastVID's array-level steps (DySeg, ATS, density scores, DTM), jittable with static shapes.

Static-shape convention: T frames (all valid: FastVID merges no frame), S pooled tokens per
frame, M = S - salient filtered tokens per frame, Cmax context slots per frame (`max_context`);
data-dependent sizes (segments, anchor frames, context tokens per anchor frame) are masks.

Tie rules (the reference, tests/references/fastvid_ref.py, breaks them the same way):
- DySeg's c - 1 smallest neighbour similarities: lower boundary index first;
- ATS's salient top-k and the density top-k of the anchors: lower token index first;
- density peaks: token j counts as denser than token i when density[j] > density[i], or the two
  are equal and j < i (the official code adds U(0, 1e-6) noise to the density instead);
- a token joins its most similar anchor, the first in anchor order (descending density score,
  lower index first) on ties (torch.argmax's first maximum).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from earlytom_jax.compression.segments import segment_info

HIGHEST = lax.Precision.HIGHEST


def max_context(ctx: int, p: int, t0: int) -> int:
    """Largest context count one frame can get: ctx·L // ceil(L/p) over segment lengths L."""
    return max(ctx * L // -(-L // p) for L in range(1, t0 + 1))


def rank_ascending(x: jax.Array) -> jax.Array:
    """Rank of each entry of x [..., K] in ascending order, ties: lower index first."""
    order = jnp.argsort(x, axis=-1, stable=True)
    return jnp.argsort(order, axis=-1).astype(jnp.int32)  # a permutation's inverse


def dyseg(global_feats: jax.Array, c: int, tau: float) -> jax.Array:
    """DySeg. global_feats [T, D] → starts [T] bool (True where a segment begins).

    A boundary after frame i is cut when cos(g_i, g_{i+1}) is among the c - 1 smallest (at most
    T - 1 of them) or below tau."""
    t = global_feats.shape[0]
    g = global_feats.astype(jnp.float32)
    g = g / jnp.sqrt(jnp.sum(g * g, axis=1, keepdims=True))
    sim = jnp.sum(g[:-1] * g[1:], axis=1)  # [T-1]
    k = min(c - 1, t - 1)
    cut = (rank_ascending(sim) < k) | (sim < jnp.float32(tau))
    return jnp.concatenate([jnp.ones((1,), bool), cut])


def context_counts(starts: jax.Array, ctx: int, p: int):
    """Anchor-token distribution. starts [T] bool → (count [T] int32: context tokens of each
    frame, seg_id [T] int32). In a segment of L frames the last frame and every p-th before it
    are anchor frames (ceil(L/p) of them) with ctx·L // ceil(L/p) tokens each; others get 0."""
    t = starts.shape[0]
    info = segment_info(starts, jnp.int32(t))
    L = info.seg_end - info.seg_start + 1
    idx = jnp.arange(t, dtype=jnp.int32)
    anchor = (info.seg_end - idx) % p == 0
    n_anchor = (L + p - 1) // p
    return jnp.where(anchor, (ctx * L) // n_anchor, 0).astype(jnp.int32), info.seg_id


def salient_mask(imp: jax.Array, k: int) -> jax.Array:
    """ATS: [T, S] bool, each frame's k highest-attention tokens (lower index first on ties)."""
    return rank_ascending(-imp.astype(jnp.float32)) < k


def density_scores(x: jax.Array) -> jax.Array:
    """Density-peak scores of each frame's tokens. x [T, M, H] fp32 → [T, M]:
    dist = euclidean / sqrt(H); density = exp(-mean of the 4 smallest dist², self included);
    score = density · (distance to the nearest denser token, or the frame's largest distance)."""
    _, m, h = x.shape
    sq = jnp.sum(x * x, axis=-1)
    dot = jnp.einsum("tih,tjh->tij", x, x, precision=HIGHEST)
    dist = jnp.sqrt(jnp.maximum(sq[:, :, None] + sq[:, None, :] - 2.0 * dot, 0.0)) / jnp.float32(h**0.5)
    nearest = -lax.top_k(-dist, 4)[0]
    density = jnp.exp(-jnp.mean(nearest * nearest, axis=-1))  # [T, M]
    i = jnp.arange(m)
    denser = (density[:, None, :] > density[:, :, None]) | (
        (density[:, None, :] == density[:, :, None]) & (i[None, :] < i[:, None])[None])
    dmax = jnp.max(dist, axis=(1, 2))[:, None, None]
    return jnp.min(jnp.where(denser, dist, dmax), axis=-1) * density


def merge_context(x, score, counts, seg_id, ctx: int, cmax: int, beta: float):
    """DTM. x [T, M, H] fp32 filtered tokens, score [T, M], counts [T] (context tokens of each
    frame), seg_id [T]. A frame with count == ctx merges its own tokens; one with count > ctx
    (an anchor frame of a multi-frame segment) merges every filtered token of its segment.
    Anchors: the frame's `count` tokens of highest score; each token joins its most similar
    anchor (cosine); anchor = w·anchor + (1-w)·mean(joined), w = max(1/(joined+1), beta).
    → (merged [T, cmax, H], slot_valid [T, cmax] bool, anchor position [T, cmax] in 0..M-1)."""
    t, m, h = x.shape
    order = jnp.argsort(-score, axis=-1, stable=True)[:, :cmax]  # [T, cmax]
    slot_valid = jnp.arange(cmax)[None, :] < counts[:, None]
    anchors = jnp.take_along_axis(x, order[..., None], axis=1)  # [T, cmax, H]
    xn = x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
    an = jnp.take_along_axis(xn, order[..., None], axis=1)
    flat, flatn = x.reshape(t * m, h), xn.reshape(t * m, h)
    frame_of = jnp.repeat(jnp.arange(t), m)  # [T·M]
    own = frame_of[None, :] == jnp.arange(t)[:, None]
    same_seg = seg_id[frame_of][None, :] == seg_id[:, None]
    member = jnp.where((counts > ctx)[:, None], same_seg, own & (counts == ctx)[:, None])  # [T, T·M]
    sim = jnp.einsum("uh,akh->auk", flatn, an, precision=HIGHEST)
    assign = jnp.argmax(jnp.where(slot_valid[:, None, :], sim, -jnp.inf), axis=-1)  # [T, T·M]
    onehot = ((assign[..., None] == jnp.arange(cmax)) & member[..., None]).astype(jnp.float32)
    joined = jnp.sum(onehot, axis=1)  # [T, cmax]
    agg = jnp.einsum("auk,uh->akh", onehot, flat, precision=HIGHEST) / jnp.maximum(joined, 1.0)[..., None]
    w = jnp.maximum(1.0 / (joined + 1.0), jnp.float32(beta))[..., None]
    return w * anchors + (1.0 - w) * agg, slot_valid, order
