"""LLaVA-OneVision as a Flax NNX module (`LlavaOneVision`: SigLIP, projector, newline, Qwen2),
with the video path's own pieces: the projector, 2x bilinear pooling, the prompt splice.

Pooling is `torch.nn.functional.interpolate(mode="bilinear", align_corners=False)` from the
g x g patch grid to ceil(g/2) x ceil(g/2), written as two small interpolation matrices
(`R @ X @ C^T`), which is exact and needs no gather.
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


def pool(x, grid: int, out: int):
    """x [T, grid*grid, D] → [T, out*out, D] (bilinear, torch semantics)."""
    r = jnp.asarray(bilinear_matrix(grid, out), jnp.float32)
    t, _, d = x.shape
    xm = x.reshape(t, grid, grid, d)
    y = jnp.einsum("oi,tijd,pj->topd", r, xm.astype(jnp.float32), r)
    return y.reshape(t, out * out, d).astype(x.dtype)


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
    last kept visual token) and `text` (Qwen2). Its state as nested dicts
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
        """Encoder features [T, N, C] → pooled LLM-space tokens [T, S, Ht]."""
        return pool(self.projector(feats), self.cfg.vision.grid, self.cfg.pooled_grid)

    def splice(self, prefix_ids, visual, visual_valid, suffix_ids, suffix_valid=None):
        """Build the prefill sequence for one video.

        prefix_ids [P], suffix_ids [Q] int32; visual [Vc, Ht] with visual_valid bool [Vc]
        (padding slots anywhere); suffix_valid bool [Q] (None: all valid) lets prompts of
        different lengths share one program (pad at the front of the suffix, so the last slot
        stays a real token). → h [1, P+Vc+Q, Ht], valid [1, L], positions [1, L] where
        positions count valid slots only (0..n_valid-1; padding gets the previous id).
        """
        pre, suf = self.text.embed_tokens(prefix_ids), self.text.embed_tokens(suffix_ids)
        h = jnp.concatenate([pre, visual.astype(pre.dtype), suf], axis=0)
        if suffix_valid is None:
            suffix_valid = jnp.ones(suffix_ids.shape, bool)
        valid = jnp.concatenate([jnp.ones(prefix_ids.shape, bool), visual_valid, suffix_valid])
        positions = jnp.maximum(jnp.cumsum(valid.astype(jnp.int32)) - 1, 0)
        return h[None], valid[None], positions[None]


def bind(cfg: LlavaOVConfig, params: dict) -> LlavaOneVision:
    """The model `cfg` over the parameter tree `params` (models/params.py `bind`)."""
    return params_lib.bind(LlavaOneVision, cfg, params)
