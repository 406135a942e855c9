"""EarlyTom stage III (token merging inside the LLM), array level: spec section 4, steps 2-3.

The visual span (the V selected tokens and the newline) lives in a static buffer of
capacity Vc with a `valid` mask. Jittable, static shapes, no sequential loop: the running
pairwise average of step 3 is written in closed form.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

COSINE_EPS = 1e-8


def keep_count_table(max_len: int, r_in: float) -> np.ndarray:
    """int32 [max_len + 1]: entry L = round(L * (1 - r_in)) with Python round (half to even),
    the number of span positions stage III keeps for a span of L positions."""
    return np.array([round(L * (1.0 - r_in)) for L in range(max_len + 1)], np.int32)


def keep_mask(attn: jax.Array, valid: jax.Array, n_keep: jax.Array) -> jax.Array:
    """[Vc] bool: the n_keep valid positions of highest attn (ties: lower index first)."""
    Vc = attn.shape[0]
    key = jnp.where(valid, -attn.astype(jnp.float32), jnp.inf)
    order = jnp.argsort(key, stable=True)
    rank = jnp.zeros((Vc,), jnp.int32).at[order].set(jnp.arange(Vc, dtype=jnp.int32))
    return valid & (rank < n_keep)


def _cosine_matrix(h32: jax.Array) -> jax.Array:
    """[Vc, Vc] cosine similarities, each norm clamped at eps (torch cosine_similarity)."""
    norm = jnp.sqrt(jnp.sum(h32 * h32, axis=-1, keepdims=True))
    hn = h32 / jnp.maximum(norm, COSINE_EPS)
    return jnp.matmul(hn, hn.T, precision=lax.Precision.HIGHEST)


def _rank_within_group(group: jax.Array, member: jax.Array) -> jax.Array:
    """[Vc] int32: for a member j, 1 + the number of members j' < j in the same group
    (1-based order of j inside its group); 0 for non-members."""
    Vc = group.shape[0]
    idx = jnp.arange(Vc, dtype=jnp.int32)
    # members sorted by (group, index); non-members last
    order = jnp.lexsort((idx, jnp.where(member, group, Vc)))
    g_sorted = jnp.where(member[order], group[order], -1)
    new_group = jnp.concatenate([jnp.array([True]), g_sorted[1:] != g_sorted[:-1]])
    first_pos = lax.cummax(jnp.where(new_group, idx, 0), axis=0)
    rank_sorted = idx - first_pos + 1
    rank = jnp.zeros((Vc,), jnp.int32).at[order].set(rank_sorted)
    return jnp.where(member, rank, 0)


def merge_visual_span(h: jax.Array, attn: jax.Array, valid: jax.Array, n_keep: jax.Array):
    """Stage III keep-and-merge over the visual span.

    h: [Vc, C] hidden states of the span positions; attn: [Vc] fp32 attention of the last
    prompt token (mean over heads); valid: [Vc] bool; n_keep: int32 scalar
    (`keep_count_table[L]` for L = number of valid positions).
    Returns (h_out [Vc, C] in h's dtype, keep [Vc] bool). Rows of h_out where keep is False
    are zero (meaningless).

    Keep: the n_keep valid positions of highest attn (ties: lower index first). Merge: each
    dropped valid j, in increasing index order, is averaged into the kept t of highest
    cosine similarity with it (similarities from the input h; first t on ties):
    h[t] = (h[t] + h[j]) / 2. Closed form used here: a kept t receiving j_1 < ... < j_m ends
    as h_t / 2^m + sum_i h_{j_i} / 2^(m - i + 1). Computed in fp32, cast to h's dtype once.
    When n_keep == 0 nothing is kept and nothing merged.
    """
    Vc = h.shape[0]
    h32 = h.astype(jnp.float32)
    keep = keep_mask(attn, valid, n_keep)
    dropped = valid & ~keep

    sim = _cosine_matrix(h32)
    sim = jnp.where(keep[None, :], sim, -jnp.inf)
    target = jnp.argmax(sim, axis=1).astype(jnp.int32)  # first maximal index on ties
    member = dropped & jnp.any(keep)

    m = jax.ops.segment_sum(member.astype(jnp.int32), target, num_segments=Vc)  # per kept t
    order_in_group = _rank_within_group(target, member)  # i in 1..m
    exp_j = m[target] - order_in_group + 1
    coef_j = jnp.where(member, jnp.exp2(-exp_j.astype(jnp.float32)), 0.0)
    coef_t = jnp.where(keep, jnp.exp2(-m.astype(jnp.float32)), 0.0)

    zero = jnp.float32(0.0)
    contrib = jax.ops.segment_sum(
        jnp.where(member[:, None], coef_j[:, None] * h32, zero), target, num_segments=Vc
    )
    h_out = jnp.where(keep[:, None], coef_t[:, None] * h32, zero) + contrib
    return h_out.astype(h.dtype), keep
