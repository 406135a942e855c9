"""PruneVid's array operations with static shapes (jittable): DPC-KNN clustering over a
masked set of points, the temporal refinement of frame labels into segments, and the
static/dynamic split of a segment's tokens.

Written from Visual-AI/PruneVid, commit b12600c6, `models/pllava/modeling_pllava.py`
(`cluster_dpc_knn`, `refine_clusters`, `segment_lengths`, `merge_frames_dynamic`); the
deterministic tie rules are in docs/baselines/prunevid.md.

DPC-KNN's distance, density and centres are `compression/dpc_knn.py`'s (HoliTom's); PruneVid
differs only in numbering the clusters by their centres' score rank and sending a point
equidistant from two centres to the one of lower rank (torch's argmin over the centres in rank
order), where `dpc_knn.assign_to_centres` picks the centre of lower index.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from earlytom_jax.compression import dpc_knn as shared


def dpc_knn(x, valid, n_clusters, k: int):
    """DPC-KNN over the valid points of x [N, C] (fp32): the shared `dpc_knn.distance_matrix` and
    `dpc_knn.density_peaks` (distance, density with the k nearest, self included, δ, the
    n_clusters centres of highest density · δ, index tie-breaks), then PruneVid's numbering.

    n_clusters: int32 scalar (<= the valid count); k: static neighbour count, at most the valid
    count. → (assign int32 [N]: the rank of each valid point's centre (nearest centre, lower rank
    on ties; a centre its own), rank int32 [N]: each point's rank by score, ties to the lower
    index)."""
    n = x.shape[0]
    d = shared.distance_matrix(x)
    centre, score = shared.density_peaks(d, valid, n_clusters, jnp.int32(k), k_max=k)
    order = jnp.argsort(-score, stable=True)
    rank = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
    to_centre = jnp.where(centre[:, None], d, jnp.inf)  # [centre j, point i]
    best = jnp.min(to_centre, axis=0)
    assign = jnp.min(jnp.where(centre[:, None] & (to_centre == best[None, :]), rank[:, None], n), axis=0)
    return jnp.where(centre, rank, assign).astype(jnp.int32), rank


def refine_labels(labels):
    """`refine_clusters` on frame labels int32 [T]: per label only its longest runs stay (all
    that tie; none when the longest is one frame); each gap is then filled, left to right,
    with the label of the longer neighbouring run (left on ties, 0 without neighbours)."""
    t = labels.shape[0]
    start = jnp.concatenate([jnp.ones((1,), bool), labels[1:] != labels[:-1]])
    run = jnp.cumsum(start) - 1
    run_len = jax.ops.segment_sum(jnp.ones((t,), jnp.int32), run, num_segments=t)[run]
    longest = jax.ops.segment_max(run_len, labels, num_segments=t)[labels]
    kept = jnp.where((run_len == longest) & (longest > 1), labels, -1)

    def ahead(carry, i):  # the run that starts at the first kept frame >= i: (label, length)
        lab, length = carry
        same = (kept[i] == lab) & (i + 1 < t) & (kept[jnp.minimum(i + 1, t - 1)] != -1)
        new = jnp.where(kept[i] == -1, jnp.stack([lab, length]),
                        jnp.stack([kept[i], jnp.where(same, length + 1, 1)]))
        return (new[0], new[1]), new

    _, right = jax.lax.scan(ahead, (jnp.int32(-2), jnp.int32(0)), jnp.arange(t - 1, -1, -1))
    right = right[::-1]

    def fill(carry, i):
        prev, prev_len, gap = carry
        opens = (kept[i] == -1) & ((i == 0) | (kept[jnp.maximum(i - 1, 0)] != -1))
        r_lab, r_len = right[i, 0], right[i, 1]
        l_lab, l_len = jnp.where(i == 0, -2, prev), jnp.where(i == 0, 0, prev_len)
        pick = jnp.where(l_len > r_len, l_lab, jnp.where(r_len > l_len, r_lab, jnp.where(l_lab != -2, l_lab, r_lab)))
        gap = jnp.where(opens, jnp.where(pick == -2, 0, pick), gap)
        lab = jnp.where(kept[i] == -1, gap, kept[i])
        length = jnp.where(lab == prev, prev_len + 1, 1)
        return (lab, length, gap), lab

    _, out = jax.lax.scan(fill, (jnp.int32(-2), jnp.int32(0), jnp.int32(0)), jnp.arange(t))
    return out.astype(jnp.int32)


def window_ids(labels):
    """Runs of equal labels → (window id int32 [T], number of windows)."""
    start = jnp.concatenate([jnp.ones((1,), bool), labels[1:] != labels[:-1]])
    wid = (jnp.cumsum(start) - 1).astype(jnp.int32)
    return wid, wid[-1] + 1


def static_mask(x, wid, n_windows: int, threshold: float):
    """Tokens x [T, S, H] and window ids [T] → static bool [n_windows, S]: mean cosine
    similarity of a position over the window's ordered frame pairs (the diagonal counted as
    exactly 1, as the official `(sum - 1)` does) above `threshold`. Windows past the last are
    all False."""
    xf = x.astype(jnp.float32)
    xn = xf / jnp.maximum(jnp.linalg.norm(xf, axis=-1, keepdims=True), 1e-12)
    cos = jnp.einsum("ash,bsh->abs", xn, xn)  # [T, T, S]
    same = (wid[:, None] == wid[None, :]).astype(jnp.float32)
    per_frame = jnp.einsum("ab,abs->as", same, cos) - 1.0  # [T, S]
    member = (jnp.arange(n_windows)[:, None] == wid[None, :]).astype(jnp.float32)  # [Wc, T]
    size = member.sum(1)
    sim = (member @ per_frame) / jnp.maximum(size * (size - 1.0), 1.0)[:, None]
    return (sim > threshold) & (size[:, None] > 1)
