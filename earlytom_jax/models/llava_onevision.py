"""LLaVA-OneVision video path pieces: projector, 2x bilinear pooling, the prompt splice.

Pooling is `torch.nn.functional.interpolate(mode="bilinear", align_corners=False)` from the
g x g patch grid to ceil(g/2) x ceil(g/2), written as two small interpolation matrices
(`R @ X @ C^T`), which is exact and needs no gather.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from earlytom_jax.config import LlavaOVConfig


@functools.lru_cache(maxsize=None)
def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] weights of torch's 1-D linear resize, align_corners=False, no antialias."""
    scale = in_size / out_size
    m = np.zeros((out_size, in_size), np.float64)
    for o in range(out_size):
        src = max((o + 0.5) * scale - 0.5, 0.0)
        i0 = min(int(np.floor(src)), in_size - 1)
        i1 = min(i0 + 1, in_size - 1)
        lam = src - i0
        m[o, i0] += 1.0 - lam
        m[o, i1] += lam
    return m.astype(np.float32)


def pool(x, grid: int, out: int):
    """x [T, grid*grid, D] → [T, out*out, D] (bilinear, torch semantics)."""
    r = jnp.asarray(bilinear_matrix(grid, out), jnp.float32)
    t, _, d = x.shape
    xm = x.reshape(t, grid, grid, d)
    y = jnp.einsum("oi,tijd,pj->topd", r, xm.astype(jnp.float32), r)
    return y.reshape(t, out * out, d).astype(x.dtype)


def project(params, feats):
    """Projector: linear, exact (erf) GELU, linear. feats [..., C] → [..., Ht]."""
    h = jax.nn.gelu(feats @ params["w1"] + params["b1"], approximate=False)
    return h @ params["w2"] + params["b2"]


def video_tokens(params, feats, cfg: LlavaOVConfig):
    """Encoder features [T, N, C] → pooled LLM-space tokens [T, S, Ht]."""
    return pool(project(params["projector"], feats), cfg.vision.grid, cfg.pooled_grid)


def splice(embed, prefix_ids, visual, visual_valid, suffix_ids):
    """Build the prefill sequence for one video.

    embed [V, Ht]; prefix_ids [P], suffix_ids [Q] int32; visual [Vc, Ht] with visual_valid
    bool [Vc] (padding slots anywhere). → h [1, P+Vc+Q, Ht], valid [1, L], positions [1, L]
    where positions count valid slots only (0..n_valid-1; padding gets the previous id).
    """
    h = jnp.concatenate([embed[prefix_ids], visual.astype(embed.dtype), embed[suffix_ids]], axis=0)
    valid = jnp.concatenate(
        [jnp.ones(prefix_ids.shape, bool), visual_valid, jnp.ones(suffix_ids.shape, bool)]
    )
    positions = jnp.maximum(jnp.cumsum(valid.astype(jnp.int32)) - 1, 0)
    return h[None], valid[None], positions[None]
