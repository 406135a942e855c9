"""PruneVid's array operations with static shapes (jittable): DPC-KNN clustering over a
masked set of points, the temporal refinement of frame labels into segments, and the
static/dynamic split of a segment's tokens.

Written from Visual-AI/PruneVid, commit b12600c6, `models/pllava/modeling_pllava.py`
(`cluster_dpc_knn`, `refine_clusters`, `segment_lengths`, `merge_frames_dynamic`); the
deterministic tie rules are in docs/baselines/prunevid.md.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def dpc_knn(x, valid, n_clusters, k: int):
    """DPC-KNN over the valid points of x [N, C] (fp32).

    n_clusters: int32 scalar (<= the valid count); k: static number of nearest neighbours
    (self included) for the density, at most the valid count. Distances are Euclidean / sqrt(C)
    (computed as torch.cdist's matmul path: |a|² + |b|² - 2ab, clamped, square root); density
    exp(-mean of the k squared nearest distances), no noise; delta = distance to the nearest
    denser point (denser: higher density, or equal density and lower index), the largest
    valid distance for the densest; centres: the n_clusters highest density · delta (ties:
    lower index). → (assign int32 [N]: the rank of each valid point's centre (nearest centre,
    lower rank on ties; a centre its own), rank int32 [N]: each point's rank by score)."""
    n, c = x.shape
    x = x.astype(jnp.float32)
    sq = jnp.sum(x * x, axis=-1)
    d = jnp.sqrt(jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * (x @ x.T), 1e-30)) / (c ** 0.5)
    pair = valid[:, None] & valid[None, :]
    near = -jax.lax.top_k(-jnp.where(valid[None, :], d, jnp.inf), k)[0]
    density = jnp.exp(-jnp.mean(near ** 2, axis=-1))
    idx = jnp.arange(n)
    denser = valid[None, :] & ((density[None, :] > density[:, None])
                               | ((density[None, :] == density[:, None]) & (idx[None, :] < idx[:, None])))
    dmax = jnp.max(jnp.where(pair, d, -jnp.inf))
    delta = jnp.min(jnp.where(denser, d, dmax), axis=-1)
    score = jnp.where(valid, delta * density, -jnp.inf)
    order = jnp.argsort(-score, stable=True)
    rank = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
    centre = valid & (rank < n_clusters)
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
