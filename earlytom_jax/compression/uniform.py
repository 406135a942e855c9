"""The trivial floors at the same budget: uniform spatial pooling of every frame's pooled
tokens (`UniformTokens`) and uniform frame subsampling (`UniformFrames`).

UniformTokens keeps round(r · T0 · 196) tokens spread over the frames as evenly as possible
(`base.frame_budgets`); frame t's b_t tokens come from b_t near-equal 2-D cells of its
14 x 14 pooled map, the layout of `select.block_ids_2d` (horizontal bands, each cut into
columns; cells numbered band by band, left to right). mode "pool": each cell's mean;
mode "sample": each cell's centre token (middle row, middle column, rounded up-left).
The layout is static (known from T0 and r), so the buffer is exactly the budget.

UniformFrames keeps max(1, round(r · T0)) frames at `np.linspace(0, T0 - 1, k).astype(int)`
(the same rule that sampled the T0 frames from the video) with all their tokens, and runs
the encoder on those frames only: the honest speed baseline. Its budget is frame-granular:
k · 196 tokens.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from earlytom_jax.compression import select as sel
from earlytom_jax.compression.base import NoHooks, frame_budgets
from earlytom_jax.compression.registration import DEFAULT_RATIO, check_ratio, register
from earlytom_jax.config import LlavaOVConfig
from earlytom_jax.errors import ConfigError


@functools.lru_cache(maxsize=None)
def cells(s: int, b: int) -> tuple[np.ndarray, np.ndarray]:
    """(cell id of each of the s raster positions [s], centre position of each cell [b]),
    numpy int32, for b cells of the sqrt(s) x sqrt(s) map (b = 0: every position -1)."""
    if b == 0:
        return np.full(s, -1, np.int32), np.zeros(0, np.int32)
    with jax.ensure_compile_time_eval():
        ids = np.asarray(sel.block_ids_2d(s, b), np.int32)
    g = int(round(s**0.5))
    y, x = np.arange(s) // g, np.arange(s) % g
    centre = np.empty(b, np.int32)
    for c in range(b):
        m = ids == c
        centre[c] = ((y[m].min() + y[m].max()) // 2) * g + (x[m].min() + x[m].max()) // 2
    return ids, centre


@register(name="uniform_tokens", label="uniform tokens", settings=("mode",), group="uniform")
@dataclasses.dataclass(frozen=True)
class UniformTokens(NoHooks):
    """ratio: retention r of T0·196 tokens; mode: "pool" (cell means) or "sample" (cell
    centres)."""

    ratio: float = DEFAULT_RATIO
    mode: str = "pool"
    name = "uniform_tokens"

    def __post_init__(self):
        check_ratio(self.ratio)
        if self.mode not in ("pool", "sample"):
            raise ConfigError(f"uniform tokens mode {self.mode!r}: choose pool or sample")

    def layout(self, t0: int, s: int):
        """(slot of each token [T0, S] (-1: dropped in sample mode), source of each slot
        [B] as t·S + centre), numpy int32; slots count frame by frame, cell by cell."""
        b = frame_budgets(t0, self.ratio, s)
        offset = np.concatenate([[0], np.cumsum(b)[:-1]])
        slot = np.empty((t0, s), np.int32)
        src = np.empty(int(b.sum()), np.int32)
        for t in range(t0):
            ids, centre = cells(s, int(b[t]))
            src[offset[t] : offset[t] + b[t]] = t * s + centre
            if self.mode == "pool":
                slot[t] = np.where(ids >= 0, offset[t] + ids, -1)
            else:
                slot[t] = -1
                slot[t, centre] = offset[t] + np.arange(b[t])
        return slot, src

    def capacity(self, t0: int, s: int) -> int:
        return int(frame_budgets(t0, self.ratio, s).sum())

    def select(self, tokens, n, state, cfg):
        t0, s, h = tokens.shape
        slot_np, src_np = self.layout(t0, s)
        cap = len(src_np)
        flat = tokens.reshape(t0 * s, h)
        if self.mode == "pool":
            seg = jnp.asarray(np.where(slot_np < 0, cap, slot_np).reshape(-1))
            sums = jax.ops.segment_sum(flat.astype(jnp.float32), seg, num_segments=cap + 1)[:cap]
            sizes = np.bincount(slot_np[slot_np >= 0], minlength=cap).astype(np.float32)
            buf = (sums / jnp.asarray(sizes)[:, None]).astype(tokens.dtype)
        else:
            buf = flat[jnp.asarray(src_np)]
        info = {"count": jnp.asarray(cap, jnp.int32), "kept_index": jnp.asarray(src_np),
                "token_slot": jnp.asarray(slot_np.reshape(-1))}
        return buf, jnp.ones((cap,), bool), info

    def select_flops(self, cfg: LlavaOVConfig, t0: int) -> int:
        """Pool mode: one add per token and channel, one division per kept channel."""
        if self.mode != "pool":
            return 0
        s, h = cfg.tokens_per_frame, cfg.text.hidden_size
        return (t0 * s + self.capacity(t0, s)) * h


@register(name="uniform_frames", label="uniform frames", group="uniform")
@dataclasses.dataclass(frozen=True)
class UniformFrames(NoHooks):
    """ratio: share r of the T0 frames kept (max(1, round(r · T0)) frames, all tokens)."""

    ratio: float = DEFAULT_RATIO
    name = "uniform_frames"

    def __post_init__(self):
        check_ratio(self.ratio)

    def input_frames(self, t0: int) -> tuple[int, ...]:
        k = max(1, round(self.ratio * t0))
        return tuple(int(i) for i in np.linspace(0, t0 - 1, k).astype(int))

    def capacity(self, t0: int, s: int) -> int:
        return len(self.input_frames(t0)) * s
