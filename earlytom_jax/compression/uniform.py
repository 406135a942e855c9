"""The trivial floors at the same budget: uniform spatial pooling of every frame's pooled
tokens (`UniformTokens`) and uniform frame subsampling (`UniformFrames`).

UniformTokens keeps round(r · T0 · 196) tokens spread over the frames as evenly as possible
(`base.frame_budgets`); frame t's b_t tokens come from b_t near-equal 2-D cells of its
14 x 14 pooled map, the layout of `select.block_ids_2d` (horizontal bands, each cut into
columns; cells numbered band by band, left to right). mode "pool": each cell's mean;
mode "sample": each cell's centre token (middle row, middle column, rounded up-left).
The layout is static (known from T0 and r), so the buffer is exactly the budget.
`kept_index` gives each slot its cell's centre token (a pooled cell's source).

On Qwen2.5-VL the frames are temporal patches (T = T'/2) and the cells are 2-D cells of each
temporal patch's mh x mw grid of merged (2x2) tokens, the `grid` hook 2 receives
(`select.block_ids_2d` on the rectangular grid); the budget is round(r · T · S), S = mh·mw,
spread over the T temporal patches the same way. Mode "pool" (each cell's mean) is this
project's statement of the paper's "average pooling" row for Qwen2.5-VL (the encoder runs
unchanged, the LLM sees the cell means); each pooled token takes the 3-D M-RoPE position of its
cell's centre token (its `kept_index`), and the text after the video keeps the position it has
with every token.

UniformFrames keeps max(1, round(r · T0)) frames at `np.linspace(0, T0 - 1, k).astype(int)`
(the same rule that sampled the T0 frames from the video) with all their tokens, and runs
the encoder on those frames only: the honest speed baseline. Its budget is frame-granular:
k · 196 tokens. On Qwen2.5-VL it keeps max(1, round(r · T)) temporal patches (frame pairs) by
the same rule, with all their merged tokens; each keeps its original temporal position (the
pipeline's `_qwen_positions` of the picked patches), and `kept_index` is t·S + s over the
picked patches.
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
from earlytom_jax.models import family


def _grid(s: int, grid) -> tuple[int, int]:
    """(rows, columns) of a frame's token map: `grid`, or the square sqrt(s) x sqrt(s)."""
    if grid is not None:
        return int(grid[0]), int(grid[1])
    g = int(round(s**0.5))
    return g, g


@functools.lru_cache(maxsize=None)
def cells(s: int, b: int, grid: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(cell id of each of the s raster positions [s], centre position of each cell [b]),
    numpy int32, for b cells of the gh x gw map `grid` (None: sqrt(s) x sqrt(s)); b = 0:
    every position -1. A cell's centre: its middle row and column, (first + last) // 2 each."""
    if b == 0:
        return np.full(s, -1, np.int32), np.zeros(0, np.int32)
    gh, gw = _grid(s, grid)
    with jax.ensure_compile_time_eval():
        ids = np.asarray(sel.block_ids_2d(s, b, None if grid is None else (gh, gw)), np.int32)
    y, x = np.arange(s) // gw, np.arange(s) % gw
    centre = np.empty(b, np.int32)
    for c in range(b):
        m = ids == c
        centre[c] = ((y[m].min() + y[m].max()) // 2) * gw + (x[m].min() + x[m].max()) // 2
    return ids, centre


@register(name="uniform_tokens", label="uniform tokens", settings=("mode",), group="uniform")
@dataclasses.dataclass(frozen=True)
class UniformTokens(NoHooks):
    """ratio: retention r of T0·196 tokens (Qwen2.5-VL: of the T·S merged tokens); mode: "pool"
    (cell means; on Qwen2.5-VL the paper's "average pooling" row) or "sample" (cell centres)."""

    families = ("llava_onevision", "qwen2_5_vl")

    ratio: float = DEFAULT_RATIO
    mode: str = "pool"
    name = "uniform_tokens"

    def __post_init__(self):
        check_ratio(self.ratio)
        if self.mode not in ("pool", "sample"):
            raise ConfigError(f"uniform tokens mode {self.mode!r}: choose pool or sample")

    def layout(self, t0: int, s: int, grid: tuple[int, int] | None = None):
        """(slot of each token [T0, S] (-1: dropped in sample mode), source of each slot
        [B] as t·S + centre), numpy int32; slots count frame by frame, cell by cell; cells of
        the gh x gw `grid` (None: the square map)."""
        b = frame_budgets(t0, self.ratio, s)
        offset = np.concatenate([[0], np.cumsum(b)[:-1]])
        slot = np.empty((t0, s), np.int32)
        src = np.empty(int(b.sum()), np.int32)
        grid = None if grid is None else (int(grid[0]), int(grid[1]))
        for t in range(t0):
            ids, centre = cells(s, int(b[t]), grid)
            src[offset[t] : offset[t] + b[t]] = t * s + centre
            if self.mode == "pool":
                slot[t] = np.where(ids >= 0, offset[t] + ids, -1)
            else:
                slot[t] = -1
                slot[t, centre] = offset[t] + np.arange(b[t])
        return slot, src

    def capacity(self, t0: int, s: int) -> int:
        return int(frame_budgets(t0, self.ratio, s).sum())

    def select(self, tokens, n, state, cfg, grid=None):
        t0, s, h = tokens.shape
        slot_np, src_np = self.layout(t0, s, grid)
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

    def select_flops(self, cfg: LlavaOVConfig, t0: int, s: int | None = None) -> int:
        """Pool mode: one add per token and channel, one division per kept channel. s: tokens
        per frame (default LLaVA-OV's `cfg.tokens_per_frame`; on Qwen2.5-VL required: the
        merged tokens of one temporal patch, mh·mw, which the clip's frame size decides)."""
        if self.mode != "pool":
            return 0
        s = _tokens_per_frame(cfg, s)
        return (t0 * s + self.capacity(t0, s)) * cfg.text.hidden_size


def _tokens_per_frame(cfg, s: int | None) -> int:
    """s, or LLaVA-OV's fixed `cfg.tokens_per_frame`; on Qwen2.5-VL s is required."""
    if s is not None:
        return int(s)
    if family.is_qwen(cfg):
        raise ValueError("on Qwen2.5-VL the tokens per temporal patch depend on the frame size: pass s = mh·mw")
    return cfg.tokens_per_frame


@register(name="uniform_frames", label="uniform frames", group="uniform")
@dataclasses.dataclass(frozen=True)
class UniformFrames(NoHooks):
    """ratio: share r of the T0 frames kept (max(1, round(r · T0)) frames, all tokens; on
    Qwen2.5-VL of the T temporal patches)."""

    families = ("llava_onevision", "qwen2_5_vl")

    ratio: float = DEFAULT_RATIO
    name = "uniform_frames"

    def __post_init__(self):
        check_ratio(self.ratio)

    def input_frames(self, t0: int) -> tuple[int, ...]:
        k = max(1, round(self.ratio * t0))
        return tuple(int(i) for i in np.linspace(0, t0 - 1, k).astype(int))

    def capacity(self, t0: int, s: int) -> int:
        return len(self.input_frames(t0)) * s

    def select(self, tokens, n, state, cfg, grid=None):
        """Every token of the picked frames; kept_index t·S + s over the picked frames."""
        buf, valid, info = super().select(tokens, n, state, cfg, grid)
        return buf, valid, {**info, "kept_index": jnp.arange(buf.shape[0], dtype=jnp.int32)}
