"""EarlyTom stage II (decoupled spatial selection after the encoder), array level.

Spec: `earlytom.md` section 3. Host-side helpers (`bilinear_matrix`, `budget_tables`,
`visual_capacity`) are plain numpy / Python; the device functions (`select_tokens`,
`compact`) are jittable with static shapes: a frame axis of static capacity Tc, an int32 `n`
of valid frames, S tokens per frame (196 for a 14x14 pooled map).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


# ----------------------------------------------------------------------------------------
# budgets (host, Python float64)
# ----------------------------------------------------------------------------------------


def _retention(T0: int, Tp: int, r: float, S: int) -> float:
    """r' = min(r / ((T0*S - (T0-T')*S) / (T0*S)), 1), evaluated as the official code does."""
    return min(r / ((T0 * S - (T0 - Tp) * S) / (T0 * S)), 1.0)


def budget_tables(T0: int, r: float, S: int = 196):
    """Per-frame budgets for every possible number of frames T' left after stage I.

    Returns (k_dynamic, n_static), numpy int32 arrays of shape [T0 + 1] indexed by T'
    (index 0 unused, set to 0): k_dynamic[T'] = ceil(S r'), n_static[T'] = max(1, round(S r'))
    with Python's round (half to even), r' computed in float64 by `_retention`.
    """
    k_dyn = np.zeros(T0 + 1, np.int32)
    n_stat = np.zeros(T0 + 1, np.int32)
    for Tp in range(1, T0 + 1):
        x = S * _retention(T0, Tp, r, S)
        k_dyn[Tp] = math.ceil(x)
        n_stat[Tp] = max(1, round(x))
    return k_dyn, n_stat


def visual_capacity(T0: int, r: float, S: int = 196) -> int:
    """Static upper bound of the total tokens stage II keeps: max over T' in 1..T0 of
    T' * k_dynamic[T'].

    Tight: a frame keeps k_dynamic (dynamic) or n_static <= k_dynamic tokens (static), and
    every frame is dynamic when all final segments have <= 2 frames, so for each T' the bound
    T' * k_dynamic[T'] is reached by some segmentation; the max over T' covers every count
    stage I can leave. (The quirks=False 2-D blocks keep at most n_static tokens per static
    frame too.) The `image_newline` is not included.
    """
    k_dyn, _ = budget_tables(T0, r, S)
    return int(max(Tp * int(k_dyn[Tp]) for Tp in range(1, T0 + 1)))


# ----------------------------------------------------------------------------------------
# selection (device)
# ----------------------------------------------------------------------------------------


def topk_mask(imp: jax.Array, k: jax.Array) -> jax.Array:
    """[S] bool: the k largest of imp [S]; ties broken towards the lower index."""
    S = imp.shape[0]
    order = jnp.argsort(-imp, stable=True)
    rank = jnp.zeros((S,), jnp.int32).at[order].set(jnp.arange(S, dtype=jnp.int32))
    return rank < k


def _argmax_per_group(imp: jax.Array, group: jax.Array) -> jax.Array:
    """[S] bool: per group, the position of the maximum (first index on ties)."""
    S = imp.shape[0]
    gmax = jax.ops.segment_max(imp, group, num_segments=S)
    s = jnp.arange(S, dtype=jnp.int32)
    cand = jnp.where(imp == gmax[group], s, S)
    first = jax.ops.segment_min(cand, group, num_segments=S)
    return s == first[group]


def select_tokens(
    importance: jax.Array,
    n: jax.Array,
    dynamic: jax.Array,
    k_dyn: jax.Array,
    n_stat: jax.Array,
    quirks: bool = True,
    grid: tuple[int, int] | None = None,
) -> jax.Array:
    """Stage II token selection (spec 3.3-3.5).

    importance: [Tc, S] fp32 pooled importance of the merged frames; n: int32 valid frames;
    dynamic: [Tc] bool (from `segments.final_segments`); k_dyn, n_stat: int32 scalars (the
    budget-table entries for T' = n).
    Returns keep: [Tc, S] bool; padding frames keep nothing.
    Dynamic frame: the k_dyn highest-importance tokens (ties: lower raster index first).
    Static frame, quirks=True: n_stat contiguous 1-D runs in raster order, keep each run's
    argmax (first index on ties). quirks=False: see `block_ids_2d` (on `grid`, static).
    """
    Tc, S = importance.shape
    imp = importance.astype(jnp.float32)
    dyn_keep = jax.vmap(topk_mask, in_axes=(0, None))(imp, k_dyn)
    groups = run_ids_1d(S, n_stat) if quirks else block_ids_2d(S, n_stat, grid)
    stat_keep = jax.vmap(_argmax_per_group, in_axes=(0, None))(imp, groups)
    valid = jnp.arange(Tc) < jnp.asarray(n, jnp.int32)
    keep = jnp.where(dynamic[:, None], dyn_keep, stat_keep)
    return keep & valid[:, None]


def _even_split_ids(pos: jax.Array, total, parts) -> jax.Array:
    """Index of the part holding `pos` when `total` items are cut into `parts` contiguous
    parts, total // parts long, the first total % parts one longer (parts in 1..total)."""
    base = total // parts
    rem = total % parts
    head = rem * (base + 1)
    return jnp.where(pos < head, pos // (base + 1), rem + (pos - head) // base)


def run_ids_1d(S: int, n_runs: jax.Array) -> jax.Array:
    """[S] int32 run index of each raster position when S tokens are cut into n_runs
    contiguous runs: S // n long, the first S % n runs one longer (spec 3.5, quirks=True).
    n_runs is clipped to 1..S."""
    n_runs = jnp.clip(jnp.asarray(n_runs, jnp.int32), 1, S)
    return _even_split_ids(jnp.arange(S, dtype=jnp.int32), S, n_runs)


def _isqrt(v: jax.Array) -> jax.Array:
    """floor(sqrt(v)) for a small non-negative int32 (float guess, then corrected)."""
    r = jnp.floor(jnp.sqrt(v.astype(jnp.float32))).astype(jnp.int32)
    r = jnp.where(r * r > v, r - 1, r)
    return jnp.where((r + 1) * (r + 1) <= v, r + 1, r)


def block_ids_2d(S: int, n_blocks: jax.Array, grid: tuple[int, int] | None = None) -> jax.Array:
    """[S] int32 block index of each raster position for the paper's 2-D static blocks
    (quirks=False). The spec leaves the 2-D layout open; this is the split the test
    reference (`tests/references/earlytom_ref.py::_static_blocks_2d`) documents, on the
    gh x gw grid `grid` (static; None: the square sqrt(S) x sqrt(S)):
    bands = min(gh, max(isqrt(n), ceil(n / gw))) horizontal bands, the gh grid rows split
    evenly over them (first gh % bands bands one row taller); band b holds n // bands blocks,
    one more for the first n % bands bands, its gw columns split evenly (first blocks one
    column wider). Blocks are numbered band by band, left to right: exactly n blocks.
    n_blocks is clipped to 1..S.
    """
    if grid is None:
        g = math.isqrt(S)
        if g * g != S:
            raise ValueError(f"2-D static blocks need a square token count or a grid, got S={S}")
        grid = (g, g)
    gh, gw = grid
    if gh * gw != S:
        raise ValueError(f"grid {gh} x {gw} does not hold S={S} tokens")
    n = jnp.clip(jnp.asarray(n_blocks, jnp.int32), 1, S)
    rows = jnp.minimum(gh, jnp.maximum(_isqrt(n), -(-n // gw)))  # 1 <= rows <= gh
    s = jnp.arange(S, dtype=jnp.int32)
    y, x = s // gw, s % gw
    band = _even_split_ids(y, gh, rows)
    per, extra = n // rows, n % rows
    cols = per + (band < extra).astype(jnp.int32)  # 1 <= cols <= gw
    col_block = _even_split_ids(x, gw, cols)
    offset = band * per + jnp.minimum(band, extra)
    return offset + col_block


# ----------------------------------------------------------------------------------------
# packing (device)
# ----------------------------------------------------------------------------------------


def compact(keep: jax.Array, values: jax.Array, capacity: int):
    """Pack the kept tokens at the front of a static buffer, frame order then raster order.

    keep: [Tc, S] bool; values: [Tc, S, D]; capacity: static int (e.g. `visual_capacity`).
    Returns (buffer [capacity, D] in values' dtype, zeros after `count`;
             valid [capacity] bool; src_index [capacity] int32, flat index t*S + s of the
             source token, -1 on padding; count int32 = number of kept tokens, not clipped —
             if count > capacity the extra tokens are dropped).
    """
    Tc, S = keep.shape
    D = values.shape[-1]
    flat_keep = keep.reshape(Tc * S)
    (src,) = jnp.nonzero(flat_keep, size=capacity, fill_value=-1)
    src = src.astype(jnp.int32)
    valid = src >= 0
    buf = values.reshape(Tc * S, D)[jnp.maximum(src, 0)]
    buf = jnp.where(valid[:, None], buf, jnp.zeros((), values.dtype))
    count = jnp.sum(flat_keep.astype(jnp.int32))
    return buf, valid, src, count
