"""LLaVA-OneVision as a Flax NNX module (`LlavaOneVision`: SigLIP, projector, newline, Qwen2),
with the video path's own pieces: the projector, 2x pooling, the newlines, the prompt splice.
LLaVA-Video is the same module under a `LlavaVideoConfig` (other pooling, other newlines).

Pooling is LLaVA-NeXT's `get_2dPool` with stride 2 on the g x g patch grid, by the config's
`pool_mode`: "bilinear" is `torch.nn.functional.interpolate(mode="bilinear",
align_corners=False)` to ceil(g/2) x ceil(g/2); "average" is `F.avg_pool2d(2)` to
floor(g/2) x floor(g/2) (an odd grid's last row and column are dropped). Both are written as
two small matrices (`R @ X @ C^T`), which is exact up to fp32 rounding and needs no gather.

Newlines by the config's `newline_position`: "one_token" puts one `image_newline` after the
last visual token (the pipeline); "grid" puts one after every row of every frame's pooled map
(LLaVA-NeXT's `add_token_per_grid`), and after selection after every row that kept a token
(`grid_newlines`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from earlytom_jax.config import LlavaOVConfig
from earlytom_jax.models import params as params_lib
from earlytom_jax.models.dense import dense
from earlytom_jax.models.params import param
from earlytom_jax.models.qwen2 import Qwen2
from earlytom_jax.models.siglip import SiglipEncoder


@functools.lru_cache(maxsize=None)
def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """1-D weights of torch `F.interpolate(mode="bilinear", align_corners=False)` (no
    antialias, output size given), so pooling an [h, w] map is `R @ X @ C.T` with
    `R = bilinear_matrix(h, out_h)`, `C = bilinear_matrix(w, out_w)`.

    Returns float32 [out_size, in_size]; each row has at most two non-zero weights summing
    to 1. The weights are formed as torch forms them for fp32 inputs (fp32 arithmetic):
    scale = in/out, src = max(scale * (i + 0.5) - 0.5, 0), i0 = floor(src),
    i1 = min(i0 + 1, in - 1), weights (1 - frac, frac) with frac = src - i0.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be >= 1, got in={in_size} out={out_size}")
    f32 = np.float32
    scale = f32(in_size) / f32(out_size)
    R = np.zeros((out_size, in_size), np.float32)
    for i in range(out_size):
        # scale * (i + 0.5) - 0.5 with a single rounding (torch's CPU build contracts it to
        # a fused multiply-add): exact in float64, then rounded once to fp32.
        src = f32(float(scale) * (i + 0.5) - 0.5)
        src = max(src, f32(0.0))
        i0 = min(int(math.floor(src)), in_size - 1)
        i1 = i0 + 1 if i0 < in_size - 1 else i0
        lam1 = min(max(f32(src - f32(i0)), f32(0.0)), f32(1.0))
        lam0 = f32(f32(1.0) - lam1)
        R[i, i0] += lam0
        R[i, i1] += lam1
    return R


@functools.lru_cache(maxsize=None)
def average_matrix(in_size: int, stride: int = 2) -> np.ndarray:
    """1-D weights of torch `F.avg_pool2d(kernel=stride, stride=stride)` (no padding, floor
    mode): output i averages inputs i·stride .. i·stride + stride - 1; inputs past the last
    whole window are dropped. float32 [in_size // stride, in_size]."""
    out = in_size // stride
    if out < 1:
        raise ValueError(f"cannot average-pool {in_size} inputs with stride {stride}")
    A = np.zeros((out, in_size), np.float32)
    for i in range(out):
        A[i, i * stride:(i + 1) * stride] = 1.0 / stride
    return A


def pool(x, grid: int, out: int, mode: str = "bilinear"):
    """x [T, grid*grid, D] → [T, out*out, D]: bilinear (torch `interpolate`, align_corners
    False) or average (torch `avg_pool2d(2)`, then out = grid // 2)."""
    if mode == "average":
        r = jnp.asarray(average_matrix(grid), jnp.float32)
        if r.shape[0] != out:
            raise ValueError(f"average pooling of a {grid} grid gives {r.shape[0]}, not {out}")
    else:
        r = jnp.asarray(bilinear_matrix(grid, out), jnp.float32)
    t, _, d = x.shape
    xm = x.reshape(t, grid, grid, d)
    y = jnp.einsum("oi,tijd,pj->topd", r, xm.astype(jnp.float32), r)
    return y.reshape(t, out * out, d).astype(x.dtype)


def pool_frames(x, cfg: LlavaOVConfig):
    """Per-frame maps x [T, g*g, D] pooled as `cfg`'s video path pools its tokens (features,
    attention and keys alike, as LLaVA-NeXT's `get_2dPool` is applied to each)."""
    return pool(x, cfg.vision.grid, cfg.pooled_grid, cfg.pool_mode)


def grid_newlines(buf, valid, src, newline, pooled_grid: int, frames, capacity: int, every_row: bool = False):
    """The visual span with LLaVA-NeXT's grid newlines, from selected tokens.

    buf [Vc, H] tokens, valid bool [Vc], src int32 [Vc]: each slot's source token t·S + s
    (S = pooled_grid², s in raster order; -1 padding); newline [H]; frames: int32 number of
    frames present (0..n-1 in time order; `every_row` only).

    The tokens are laid out frame by frame, each frame's in raster order (slots sorted by
    `src`), and one newline follows every pooled row of a frame:
    - every_row False (EarlyTom's and HoliTom's `add_newline_token`): only rows that kept at
      least one token get one, right after that row's last kept token;
    - every_row True (the VisionZip baseline's grid branch): every row of every present frame
      gets one, alone where the row kept nothing.
    With every token kept both are `add_token_per_grid`: g' rows of g' tokens and a newline.

    → (buffer [capacity, H], valid [capacity]); the static `capacity` must hold the valid
    tokens and their newlines (`visual_span`); the rest is padding (zeros, invalid)."""
    vc, h = buf.shape
    g = pooled_grid
    big = jnp.iinfo(jnp.int32).max
    order = jnp.argsort(jnp.where(valid, src, big), stable=True)  # valid slots first, by source
    toks, ok, source = buf[order], valid[order], src[order]
    row = jnp.where(ok, source // g, -1)  # t·g + r (S = g·g): the frame's row, across frames
    rank = jnp.arange(vc, dtype=jnp.int32)
    if every_row:
        key = jnp.where(ok, row, big)
        tok_dest = jnp.where(ok, rank + row, capacity)  # `row` newlines precede it
        r = jnp.arange(max(capacity - vc, 0), dtype=jnp.int32)  # row keys: T0·g' of them
        upto = jnp.searchsorted(key, r, side="right").astype(jnp.int32)  # tokens in rows ≤ r
        nl_dest = jnp.where(r < frames * g, upto + r, capacity)
    else:
        nxt = jnp.concatenate([row[1:], jnp.full((1,), -1, row.dtype)])
        last = ok & (row != nxt)  # the last kept token of its row
        before = jnp.cumsum(last.astype(jnp.int32)) - last.astype(jnp.int32)
        tok_dest = jnp.where(ok, rank + before, capacity)
        nl_dest = jnp.where(last, rank + before + 1, capacity)
    # small integer scatters, then one gather of the rows (no [capacity, H] scatter)
    slot = jnp.full((capacity,), -1, jnp.int32).at[tok_dest].set(rank, mode="drop")
    is_nl = jnp.zeros((capacity,), bool).at[nl_dest].set(True, mode="drop")
    out = jnp.where(is_nl[:, None], newline.astype(buf.dtype)[None], toks[jnp.maximum(slot, 0)])
    out_valid = is_nl | (slot >= 0)
    return jnp.where(out_valid[:, None], out, jnp.zeros((), buf.dtype)), out_valid


# ----------------------------------------------------------------------------- parameters


class Projector(nnx.Module):
    """Two linears with an exact (erf) GELU between: w1 [C, Ht], b1 [Ht], w2 [Ht, Ht], b2 [Ht]."""

    def __init__(self, c: int, ht: int, *, rngs: nnx.Rngs):
        self.w1 = param(rngs, (c, ht), (None, "mlp"))
        self.b1 = param(rngs, (ht,), ("mlp",))
        self.w2 = param(rngs, (ht, ht), ("mlp", None))
        self.b2 = param(rngs, (ht,), (None,))

    def __call__(self, feats):
        """feats [..., C] → [..., Ht]."""
        gelu = functools.partial(jax.nn.gelu, approximate=False)
        h = dense("...c,ch->...h", feats, self.w1[...], self.b1[...], act=gelu)
        return dense("...h,hk->...k", h, self.w2[...], self.b2[...])


class LlavaOneVision(nnx.Module):
    """The video model: `vision` (SigLIP), `projector`, `newline` [Ht] (the token after the
    last kept visual token, or after every pooled row on LLaVA-Video) and `text` (Qwen2). Its state as nested dicts
    (`nnx.to_pure_dict(nnx.state(model))`) is the parameter tree the pipeline takes; `bind`
    gives the module back over such a tree."""

    def __init__(self, cfg: LlavaOVConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        ht = cfg.text.hidden_size
        self.vision = SiglipEncoder(cfg.vision, rngs=rngs)
        self.projector = Projector(cfg.vision.hidden_size, ht, rngs=rngs)
        self.newline = param(rngs, (ht,), (None,))
        self.text = Qwen2(cfg.text, rngs=rngs)

    def video_tokens(self, feats):
        """Encoder features [T, N, C] → pooled LLM-space tokens [T, S, Ht] (projector, then
        the config's pooling, as LLaVA-NeXT's `get_2dPool` follows `mm_projector`)."""
        return pool_frames(self.projector(feats), self.cfg)

    def splice(self, prefix_ids, visual, visual_valid, suffix_ids, suffix_valid=None, visual_positions=None,
               text_start=None):
        """Build the prefill sequence for one video.

        prefix_ids [P], suffix_ids [Q] int32; visual [Vc, Ht] with visual_valid bool [Vc]
        (padding slots anywhere); suffix_valid bool [Q] (None: all valid) lets prompts of
        different lengths share one program (pad at the front of the suffix, so the last slot
        stays a real token). → h [1, P+Vc+Q, Ht], valid [1, L], positions [1, L] where
        positions count valid slots only (0..n_valid-1; padding gets the previous id).
        visual_positions int32 [Vc] (optional, FastVID): each visual slot's position relative
        to the video's first slot, and the text after the video continues from the largest
        valid one (positions of the uncompressed sequence, gaps included), or from `text_start`
        (int32, relative to the video's first slot) when given.
        """
        pre, suf = self.text.embed_tokens(prefix_ids), self.text.embed_tokens(suffix_ids)
        h = jnp.concatenate([pre, visual.astype(pre.dtype), suf], axis=0)
        if suffix_valid is None:
            suffix_valid = jnp.ones(suffix_ids.shape, bool)
        valid = jnp.concatenate([jnp.ones(prefix_ids.shape, bool), visual_valid, suffix_valid])
        positions = jnp.maximum(jnp.cumsum(valid.astype(jnp.int32)) - 1, 0)
        if visual_positions is not None:
            p = prefix_ids.shape[0]
            vis = p + jnp.asarray(visual_positions, jnp.int32)
            top = jnp.max(jnp.where(visual_valid, vis, p - 1)) if text_start is None else p + text_start - 1
            text = top + jnp.maximum(jnp.cumsum(suffix_valid.astype(jnp.int32)), 1)
            positions = jnp.concatenate([positions[:p], jnp.where(visual_valid, vis, 0), text])
        return h[None], valid[None], positions[None]


def bind(cfg: LlavaOVConfig, params: dict) -> LlavaOneVision:
    """The model `cfg` over the parameter tree `params` (models/params.py `bind`)."""
    return params_lib.bind(LlavaOneVision, cfg, params)
