"""DPC-KNN clustering (density peaks with k-nearest-neighbour density), array level.

Shared by token-merging baselines (HoliTom's spatial merge of static tokens; PruneVid uses the
same clustering). One set of N tokens at a time (vmap over sets); jittable, static shapes:
the N rows of `x` are candidates and a bool `valid` [N] says which take part, the number of
clusters and the neighbour count are traced int32 scalars.

The algorithm (HoliTom's `cluster_dpc_knn`, itself from DPC-KNN / TCFormer):
1. distances d[i, j] = ||x_i - x_j|| / sqrt(D) between valid tokens (`distance_matrix`);
2. density rho_i = exp(-mean of d[i, j]^2 over the k nearest valid j, i itself included);
3. delta_i = the distance to the nearest valid token of higher density; for the densest
   token(s), the largest distance of the whole set;
4. centres: the `n_clusters` valid tokens of highest score rho_i * delta_i;
5. every other valid token joins its nearest centre (`assign_to_centres`).

Tie-break (this module's one departure from the official code): the official code adds
`torch.rand(N) * 1e-6` to the densities, a random perturbation whose only purpose is that no
two densities are equal. Here the densities are used as computed and ties are broken by index:
of two equal densities the lower index counts as the denser; equal scores prefer the lower
index (also for centres), equal distances the lower-indexed centre. Deterministic, and the
PyTorch references (tests/references/holitom_ref.py) apply the same rule.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from earlytom_jax.compression.select import topk_mask


def distance_matrix(x: jax.Array) -> jax.Array:
    """[N, N] fp32: Euclidean distances of the rows of x [N, D], divided by sqrt(D).

    Written as torch.cdist computes it for sets over 25 rows (its matrix-product form
    |a|^2 + |b|^2 - 2 a.b, clamped at 0 before the square root)."""
    x = x.astype(jnp.float32)
    sq = jnp.sum(x * x, axis=-1)
    g = jnp.matmul(x, x.T, precision=lax.Precision.HIGHEST)
    d2 = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * g, 0.0)
    return jnp.sqrt(d2) / jnp.sqrt(jnp.float32(x.shape[-1]))


def density(dist: jax.Array, valid: jax.Array, k: jax.Array, k_max: int) -> jax.Array:
    """[N] fp32: exp(-mean of the k smallest squared distances to valid tokens) per token.

    dist [N, N]; valid [N] bool; k: int32 scalar in 1..k_max (static k_max bounds it)."""
    far = jnp.where(valid[None, :], dist, jnp.inf)
    nearest = -lax.top_k(-far, k_max)[0]  # [N, k_max] ascending
    used = jnp.arange(k_max) < k
    sq = jnp.where(used[None, :], jnp.where(jnp.isfinite(nearest), nearest, 0.0) ** 2, 0.0)
    return jnp.exp(-jnp.sum(sq, axis=-1) / jnp.maximum(k, 1).astype(jnp.float32))


def density_peaks(dist: jax.Array, valid: jax.Array, n_clusters: jax.Array, k: jax.Array, k_max: int = 7):
    """Choose the centres. dist [N, N] (`distance_matrix`); valid [N] bool; n_clusters,
    k: int32 scalars (k <= k_max, static). → (centre [N] bool, score [N] fp32)."""
    n = dist.shape[0]
    rho = density(dist, valid, k, k_max)
    idx = jnp.arange(n)
    # j is "denser" than i: rho_j > rho_i, or equal and j < i (the index tie-break)
    denser = (rho[None, :] > rho[:, None]) | ((rho[None, :] == rho[:, None]) & (idx[None, :] < idx[:, None]))
    pair = valid[:, None] & valid[None, :]
    dist_max = jnp.max(jnp.where(pair, dist, -jnp.inf))
    delta = jnp.min(jnp.where(denser & valid[None, :], dist, dist_max), axis=-1)
    score = jnp.where(valid, delta * rho, -jnp.inf)
    centre = topk_mask(score, n_clusters) & valid
    return centre, score


def assign_to_centres(dist: jax.Array, valid: jax.Array, centre: jax.Array) -> jax.Array:
    """[N] int32: the centre each valid token belongs to (a centre: itself; others: the
    nearest centre, the lowest index on ties); -1 for invalid tokens or when there is none."""
    near = jnp.argmin(jnp.where(centre[None, :], dist, jnp.inf), axis=-1).astype(jnp.int32)
    own = jnp.where(centre, jnp.arange(dist.shape[0], dtype=jnp.int32), near)
    return jnp.where(valid & jnp.any(centre), own, -1)


def merge_clusters(x: jax.Array, centre: jax.Array, assign: jax.Array, beta: float | None = 0.6) -> jax.Array:
    """[N, D] fp32: at each centre c with members M_c (the other tokens assigned to it)
    beta * x_c + (1 - beta) * mean(x over M_c), or x_c when M_c is empty; beta None: the plain
    mean of x_c and its members. Rows that are not centres are returned unchanged."""
    n = x.shape[0]
    x32 = x.astype(jnp.float32)
    member = (assign >= 0) & ~centre
    into = jnp.where(member, assign, n)
    total = jax.ops.segment_sum(jnp.where(member[:, None], x32, 0.0), into, num_segments=n + 1)[:n]
    count = jax.ops.segment_sum(member.astype(jnp.float32), into, num_segments=n + 1)[:n, None]
    if beta is None:
        merged = (x32 + total) / (1.0 + count)
    else:
        merged = jnp.where(count > 0, beta * x32 + (1 - beta) * (total / jnp.maximum(count, 1.0)), x32)
    return jnp.where(centre[:, None], merged, x32)


def dpc_knn(x: jax.Array, valid: jax.Array, n_clusters: jax.Array, k: jax.Array, k_max: int = 7):
    """Cluster the valid rows of x [N, D]. → (centre [N] bool, assign [N] int32 (see
    `assign_to_centres`), dist [N, N])."""
    dist = distance_matrix(x)
    centre, _ = density_peaks(dist, valid, n_clusters, k, k_max)
    return centre, assign_to_centres(dist, valid, centre), dist


def flops(n: int, d: int) -> int:
    """Matmul FLOPs of one `dpc_knn` + `merge_clusters` on N = n tokens of width d: the Gram
    matrix and the members' sums."""
    return 2 * n * n * d + 2 * n * d
