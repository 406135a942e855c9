"""Qwen2.5-VL's vision encoder as Flax NNX modules: `QwenVisionBlock`, `PatchMerger` and
`QwenVisionEncoder`, computing what transformers' `Qwen2_5_VisionTransformerPretrainedModel`
computes for one video.

Layout. Activations are [T, N, C]: T temporal patches (pairs of frames) on the leading axis,
as LLaVA-OneVision's encoder keeps frames there, and the N = gh·gw patches of one temporal
patch in *window order*. Every block attends within one temporal patch (window blocks within
a window of it, the `fullatt_block_indexes` over all of it: transformers' `cu_seqlens` repeat
per temporal patch), so the temporal patches are a batch. transformers permutes the whole
sequence once by `window_index` (windows of `window_merged`² merged tokens, each merged token's
2x2 patches kept together) and attends over `cu_window_seqlens` segments; the same
permutation holds for every temporal patch, so here it is one static gather of N positions
(`WindowLayout`), the windows a static block-diagonal layout (`attention.Segments`), and the
merged tokens are put back in raster order by the inverse gather after the merger.

Patches within a temporal patch are ordered as transformers' processor flattens them: by
2x2 merge block (row-major), then within the block (row-major); each patch vector is
(channel, frame of the pair, row, column) as the Conv3d kernel reads it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from earlytom_jax.config import QwenVisionConfig
from earlytom_jax.models import stack
from earlytom_jax.models.attention import (Segments, attention, attention_colmean, segment_attention,
                                           segment_attention_colmean)
from earlytom_jax.models.axes import constrain
from earlytom_jax.models.dense import dense
from earlytom_jax.models.params import param, stacked
from earlytom_jax.models.qwen2 import apply_rope, rms_norm

ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}
NORM_EPS = 1e-6  # transformers builds every vision RMSNorm with eps 1e-6, whatever the config says


@dataclasses.dataclass(frozen=True, eq=False)
class WindowLayout:
    """The static layout of one temporal patch of gh x gw patches (numpy, known when tracing).

    order int [N]: the patch (processor order) at each slot of the window order;
    segments: the windows as `Segments` of the window-ordered sequence;
    back int [N / merge_unit]: for each merged token in raster order, its slot after the merger;
    hw int [N, 2]: the (row, column) of the patch at each slot (the rotary positions)."""

    order: np.ndarray
    segments: Segments
    back: np.ndarray
    hw: np.ndarray

    @classmethod
    @functools.lru_cache(maxsize=64)
    def of(cls, gh: int, gw: int, merge: int, window: int) -> WindowLayout:
        """transformers' `get_vision_window_index` and `get_vision_position_ids` for one
        temporal patch: merged tokens (gh/merge x gw/merge, raster order) taken window by
        window (windows of `window` x `window` merged tokens, row-major, edge windows smaller)."""
        if gh % merge or gw % merge:
            raise ValueError(f"a {gh} x {gw} patch grid does not divide into {merge} x {merge} merge blocks")
        mh, mw = gh // merge, gw // merge
        unit = merge * merge
        merged = np.arange(mh * mw).reshape(mh, mw)
        win, lengths = [], []
        for r in range(0, mh, window):
            for c in range(0, mw, window):
                block = merged[r: r + window, c: c + window].ravel()
                win.append(block)
                lengths.append(block.size * unit)
        win = np.concatenate(win)  # merged token at each merged slot
        order = (win[:, None] * unit + np.arange(unit)[None]).ravel()
        rows, cols = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
        blocks = (mh, merge, mw, merge)
        hw = np.stack([rows.reshape(blocks).transpose(0, 2, 1, 3).ravel(),
                       cols.reshape(blocks).transpose(0, 2, 1, 3).ravel()], -1)
        return cls(order.astype(np.int32), Segments.from_lengths(lengths), np.argsort(win).astype(np.int32),
                   hw[order].astype(np.int32))


def vision_rope(hw, head_dim: int, theta: float):
    """Rotary tables of the encoder's 2-D positions. hw int [N, 2] → cos, sin fp32 [1, N, D]:
    frequencies of a D/2 rope, the first D/4 turning with the row, the next D/4 with the
    column, duplicated to D (transformers' `Qwen2_5_VLVisionRotaryEmbedding`)."""
    half = head_dim // 2
    inv = 1.0 / (theta ** (np.arange(0, half, 2, dtype=np.float32) / half))
    f = jnp.concatenate([jnp.asarray(hw[:, :1], jnp.float32) * inv, jnp.asarray(hw[:, 1:], jnp.float32) * inv], -1)
    emb = jnp.concatenate([f, f], -1)[None]
    return jnp.cos(emb), jnp.sin(emb)


class QwenVisionBlock(nnx.Module):
    """One encoder block (einsum layouts): ln1, ln2 [C] (RMSNorm); qkv_w [C, 3, H, D],
    qkv_b [3, H, D]; o_w [H, D, C], o_b [C]; gate_w, up_w [C, F], gate_b, up_b [F];
    down_w [F, C], down_b [C]."""

    def __init__(self, cfg: QwenVisionConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        c, f, h, d = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.head_dim
        self.ln1 = param(rngs, (c,), (None,), "ones")
        self.ln2 = param(rngs, (c,), (None,), "ones")
        self.qkv_w = param(rngs, (c, 3, h, d), (None, None, "heads", None))
        self.qkv_b = param(rngs, (3, h, d), (None, "heads", None))
        self.o_w = param(rngs, (h, d, c), ("heads", None, None))
        self.o_b = param(rngs, (c,), (None,))
        self.gate_w = param(rngs, (c, f), (None, "mlp"))
        self.gate_b = param(rngs, (f,), ("mlp",))
        self.up_w = param(rngs, (c, f), (None, "mlp"))
        self.up_b = param(rngs, (f,), ("mlp",))
        self.down_w = param(rngs, (f, c), ("mlp", None))
        self.down_b = param(rngs, (c,), (None,))

    def __call__(self, x, cos, sin, windows: Segments | None, with_attention: bool = False,
                 with_keys: bool | str = False):
        """x [T, N, C] (window order); cos, sin [1, N, D]; windows: the window layout, or None
        for a full-attention block (all N positions of each temporal patch). → [T, N, C];
        with_attention: (x, colmean [T, N] fp32), the attention each patch receives averaged
        over heads and all N queries (zero from queries outside its window); with_keys also the
        rotated keys averaged over heads [T, N, D] fp32; with_keys="heads" instead the rotated
        keys and queries per head, (x, colmean, keys, queries), each [T, N, heads, D] fp32."""
        x = constrain(x, "frames", None, None)
        h = rms_norm(x, self.ln1[...], NORM_EPS)
        qkv = dense("tnc,cshd->tnshd", h, self.qkv_w[...], self.qkv_b[...])
        q, k, v = (constrain(qkv[:, :, i], "frames", None, "heads", None) for i in range(3))
        # transformers rotates in fp32 and rounds back to the activation dtype
        q = apply_rope(q.astype(jnp.float32), cos, sin).astype(x.dtype)
        k = apply_rope(k.astype(jnp.float32), cos, sin).astype(x.dtype)
        colmean = None
        if not with_attention:
            o = attention(q, k, v) if windows is None else segment_attention(q, k, v, windows)
        elif windows is None:
            o, colmean = attention_colmean(q, k, v)
        else:
            o, colmean = segment_attention_colmean(q, k, v, windows)
        x = x + dense("tnhd,hdc->tnc", o, self.o_w[...], self.o_b[...])
        x = x + self.mlp(rms_norm(x, self.ln2[...], NORM_EPS))
        if not with_attention:
            return x
        if with_keys == "heads":
            return x, colmean, k.astype(jnp.float32), q.astype(jnp.float32)
        if with_keys:
            return x, colmean, k.astype(jnp.float32).mean(axis=2)
        return x, colmean

    def mlp(self, h):
        """Gated MLP with biases. h [..., C] → [..., C]."""
        act = ACTIVATIONS[self.cfg.hidden_act]
        g = dense("...c,cm->...m", h, self.gate_w[...], self.gate_b[...], act=act) * dense(
            "...c,cm->...m", h, self.up_w[...], self.up_b[...])
        g = constrain(g, "frames", None, "mlp")
        return dense("...m,mc->...c", g, self.down_w[...], self.down_b[...])


class PatchMerger(nnx.Module):
    """RMSNorm ln [C], then each merge unit's patches concatenated [U·C] through w1 [U·C, U·C],
    b1, an exact GELU, w2 [U·C, Ht], b2 [Ht]."""

    def __init__(self, cfg: QwenVisionConfig, *, rngs: nnx.Rngs):
        c4, out = cfg.hidden_size * cfg.merge_unit, cfg.out_hidden_size
        self.ln = param(rngs, (cfg.hidden_size,), (None,), "ones")
        self.w1 = param(rngs, (c4, c4), (None, "mlp"))
        self.b1 = param(rngs, (c4,), ("mlp",))
        self.w2 = param(rngs, (c4, out), ("mlp", None))
        self.b2 = param(rngs, (out,), (None,))

    def __call__(self, x, unit: int):
        """x [T, N, C] (each merge unit's `unit` patches consecutive) → [T, N / unit, Ht]."""
        t, n, c = x.shape
        h = rms_norm(x, self.ln[...], NORM_EPS).reshape(t, n // unit, unit * c)
        gelu = functools.partial(jax.nn.gelu, approximate=False)
        h = dense("tmk,kj->tmj", h, self.w1[...], self.b1[...], act=gelu)
        return dense("tmj,jo->tmo", h, self.w2[...], self.b2[...])


class QwenVisionEncoder(nnx.Module):
    """Patch embedding patch_w [3, tp, p, p, C] (a Conv3d kernel with stride = size, no bias),
    `num_layers` blocks stacked on a leading axis (`blocks`) and the `merger`."""

    def __init__(self, cfg: QwenVisionConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        tp, p = cfg.temporal_patch_size, cfg.patch_size
        self.patch_w = param(rngs, (3, tp, p, p, cfg.hidden_size), (None, None, None, None, None))
        self.blocks = stacked(lambda r: QwenVisionBlock(cfg, rngs=r), cfg.num_layers, rngs)
        self.merger = PatchMerger(cfg, rngs=rngs)

    def __call__(self, pixels):
        """pixels [T', 3, H, W] → merged tokens [T'/tp, H·W / (p·merge)², Ht] in raster order."""
        x = self.embed(pixels)
        x = self.run_blocks(x, self.layout(pixels.shape), 0, self.cfg.num_layers)
        return self.merge(x, self.layout(pixels.shape))

    def grid(self, shape) -> tuple[int, int, int]:
        """(temporal patches, patch rows, patch columns) of pixels of `shape` [T', 3, H, W]."""
        cfg = self.cfg
        t, _, hh, ww = shape
        if t % cfg.temporal_patch_size or hh % cfg.factor or ww % cfg.factor:
            raise ValueError(f"pixels {tuple(shape)}: frames must come in multiples of {cfg.temporal_patch_size} "
                             f"and sides in multiples of {cfg.factor}")
        return t // cfg.temporal_patch_size, hh // cfg.patch_size, ww // cfg.patch_size

    def layout(self, shape) -> WindowLayout:
        _, gh, gw = self.grid(shape)
        cfg = self.cfg
        return WindowLayout.of(gh, gw, cfg.spatial_merge_size, cfg.window_merged)

    def embed(self, pixels):
        """pixels [T', 3, H, W] (normalised) → patch embeddings [T'/tp, N, C] in window order."""
        cfg = self.cfg
        gt, gh, gw = self.grid(pixels.shape)
        tp, p, m = cfg.temporal_patch_size, cfg.patch_size, cfg.spatial_merge_size
        w = self.patch_w[...]
        w = w.reshape(-1, w.shape[-1])
        x = pixels.astype(w.dtype).reshape(gt, tp, 3, gh // m, m, p, gw // m, m, p)
        x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(gt, gh * gw, 3 * tp * p * p)
        x = x[:, jnp.asarray(self.layout(pixels.shape).order)]
        return dense("tnk,kc->tnc", x, w)

    def rope(self, layout: WindowLayout):
        """cos, sin fp32 [1, N, D] of the slots of `layout`."""
        return vision_rope(layout.hw, self.cfg.head_dim, self.cfg.rope_theta)

    def block(self, index) -> QwenVisionBlock:
        """Block `index` (int, or a traced int32) as a module of its own."""
        return stack.layer(self.blocks, index)

    def run_blocks(self, x, layout: WindowLayout, start: int, stop: int):
        """Blocks [start, stop) (static) on x [T, N, C] in window order: runs of window blocks
        as one loop each, the full-attention blocks between them on their own; bf16 on CPU one
        temporal patch at a time (`stack.frame_by_frame`)."""
        if stop <= start:
            return x
        if stack.frame_by_frame(x):
            return stack.map_frames(lambda xb: self._run_blocks(xb, layout, start, stop), x)
        return self._run_blocks(x, layout, start, stop)

    def _run_blocks(self, x, layout: WindowLayout, start: int, stop: int):
        cos, sin = self.rope(layout)
        full = set(self.cfg.fullatt_block_indexes)
        i = start
        while i < stop:
            if i in full:
                x = self.block(i)(x, cos, sin, None)
                i += 1
                continue
            j = i
            while j < stop and j not in full:
                j += 1

            def step(x, blk, _):
                return blk(x, cos, sin, layout.segments), None

            x, _ = stack.scan(step, x, self.blocks, i, j)
            i = j
        return x

    def block_with_attention(self, x, layout: WindowLayout, index: int, with_keys: bool | str = False):
        """Block `index` on x [T, N, C] (window order) → (x, colmean [T, N] fp32) with colmean
        (the attention each patch receives, `QwenVisionBlock`) in the processor's patch order
        (merge unit by merge unit in raster order, each unit's patches consecutive); with_keys
        also (…, keys [T, N, D] fp32) in that order; with_keys="heads": (…, keys, queries), the
        rotated keys and queries per head [T, N, heads, D] fp32 in that order."""
        cos, sin = self.rope(layout)
        windows = None if index in self.cfg.fullatt_block_indexes else layout.segments
        x, *extra = self.block(index)(x, cos, sin, windows, with_attention=True, with_keys=with_keys)
        inverse = jnp.asarray(np.argsort(layout.order))
        return (x, *(e[:, inverse] for e in extra))

    def merge(self, x, layout: WindowLayout):
        """x [T, N, C] in window order → merged tokens [T, N / unit, Ht] in raster order."""
        y = self.merger(x, self.cfg.merge_unit)
        return y[:, jnp.asarray(layout.back)]
