"""HoliTom's temporal part (global redundancy-aware segmentation), array level, and its budget
tables (host, Python float64 as the official code computes them).

Official code: viridisGreen/EarlyTom (b909322) `holitom/llava_arch.py` = cokeshao/HoliTom
(e9b2972) `holitom/llava_arch.py`, `select_static_windows` (l. 53-98),
`get_static_dynamic_features` (l. 278-311) and the retention update (l. 388-391).

Segmentation: the adjacent-frame cosine similarity per pooled token, sim[p, s] (frames p and
p+1); a token is static over frames a..b when sim[p, s] > tau for every p in a..b-1. A segment
[a, b] "saves" count(a, b) · (b - a) tokens (its static tokens kept once instead of b - a + 1
times). A dynamic programme over the frames picks the segmentation with the most tokens saved
(segments of at most `max_window` frames; among equal totals the shortest last segment).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

COSINE_EPS = 1e-8


def adjacent_similarity(x: jax.Array) -> jax.Array:
    """[T-1, S] fp32: cosine similarity of token s in frames p and p+1, after L2-normalising
    every token (x [T, S, H]; torch's normalize then cosine_similarity)."""
    x = x.astype(jnp.float32)
    xn = x / jnp.maximum(jnp.sqrt(jnp.sum(x * x, -1, keepdims=True)), 1e-12)
    a, b = xn[:-1], xn[1:]
    den = jnp.sqrt(jnp.maximum(jnp.sum(a * a, -1) * jnp.sum(b * b, -1), COSINE_EPS**2))
    return jnp.sum(a * b, -1) / den


def segments(sim: jax.Array, tau: float, max_window: int):
    """The segmentation of T frames from sim [T-1, S] (`adjacent_similarity`).

    → dict of
      start  [T] int32: the first frame of each frame's segment,
      length [T] int32: its segment's number of frames,
      static [T, S] bool: the token is static over the frame's whole segment (False for a
                          segment of one frame),
      reduced int32: tokens saved, sum over segments of count · (length - 1) (the DP's total).
    """
    tm1, S = sim.shape
    T = tm1 + 1
    above = sim > tau
    # fails[p, s]: frames pairs q < p where token s is not above tau
    fails = jnp.concatenate([jnp.zeros((1, S), jnp.int32), jnp.cumsum(~above, 0, dtype=jnp.int32)], 0)
    count = jnp.sum(fails[None, :, :] == fails[:, None, :], -1, dtype=jnp.int32)  # [a, b]: static over a..b
    f = jnp.arange(T, dtype=jnp.int32)
    saved = jnp.where(f[None, :] > f[:, None], count * (f[None, :] - f[:, None]), 0)  # [a, b]

    def step(i, carry):
        dp, prev = carry
        before = jnp.where(f > 0, dp[jnp.maximum(f - 1, 0)], 0)
        ok = (f <= i) & (f >= i - max_window + 1)
        cand = jnp.where(ok, before + saved[:, i], -1)
        best = jnp.max(cand)
        start = jnp.max(jnp.where(cand == best, f, -1))  # the latest start wins ties
        return dp.at[i].set(best), prev.at[i].set(start)

    zero = jnp.zeros((T,), jnp.int32)
    dp, prev = lax.fori_loop(0, T, step, (zero, zero))

    def back(j, carry):
        cursor, is_end = carry
        t = T - 1 - j
        end = t == cursor
        return jnp.where(end, prev[t] - 1, cursor), is_end.at[t].set(end)

    _, is_end = lax.fori_loop(0, T, back, (jnp.int32(T - 1), jnp.zeros((T,), bool)))
    is_start = jnp.concatenate([jnp.ones((1,), bool), is_end[:-1]])
    start = lax.cummax(jnp.where(is_start, f, 0), axis=0)
    end = lax.cummin(jnp.where(is_end, f, T - 1), axis=0, reverse=True)
    length = end - start + 1
    static = (fails[end] == fails[start]) & (length > 1)[:, None]
    reduced = jnp.sum(jnp.where(is_start, 0, jnp.sum(static, -1, dtype=jnp.int32)))
    return {"start": start, "length": length, "static": static, "reduced": reduced, "saved_total": dp[-1]}


@functools.lru_cache(maxsize=64)
def count_tables(t0: int, s: int, ratio: float, d: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dominant, contextual, clusters), int [R_max + 1, s + 1] each, R_max = s·(t0 - 1): for
    tokens saved R and n tokens, with r' = min(ratio / ((t0·s - R) / (t0·s)), 1) in float64
    (l. 389-390) and a dynamic frame's budget c = ceil(n · r') (l. 154-155):
    dominant[R, n] = round(c · (1 - d)) (its top-attention tokens), contextual[R, n] =
    c - dominant (its DPC-KNN cluster tokens of the rest; 0 at d = 0) and clusters[R, n] =
    round(n · r') (a segment's static clusters, l. 201). round: Python's, half to even."""
    total = t0 * s
    R = np.arange(s * (t0 - 1) + 1, dtype=np.float64)
    rr = np.minimum(ratio / ((total - R) / total), 1.0)
    x = np.arange(s + 1, dtype=np.float64)[None, :] * rr[:, None]
    frame = np.ceil(x)
    dominant = np.rint(frame * (1.0 - float(d)))
    dtype = np.uint8 if s < 256 else np.int16
    return dominant.astype(dtype), (frame - dominant).astype(dtype), np.rint(x).astype(dtype)


def capacity(t0: int, s: int, ratio: float) -> int:
    """Static bound of the tokens HoliTom keeps: at most r·t0·s plus one ceil per frame and
    one half per multi-frame segment (at most t0 // 2 of them), and at most t0·s. Any D: a
    dynamic frame keeps ceil(n · r') tokens, dominant and contextual together."""
    return min(t0 * s, int(np.floor(ratio * t0 * s * (1 + 1e-12) + t0 + (t0 // 2) / 2)))
