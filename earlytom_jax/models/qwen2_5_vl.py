"""Qwen2.5-VL as a Flax NNX module (`Qwen25VL`: the vision encoder and the Qwen2.5 LLM with
multimodal RoPE), with the video path's own pieces: the 3-D positions and the prompt splice.

Positions (`video_positions`, `Qwen25VL.splice`) follow Qwen2.5-VL's `get_rope_index` as the
model was trained and as transformers 4.x and lmms-eval run it: text before the video counts
0..P-1 on all three axes; a merged token at temporal patch t, row r, column c gets
(P + floor(t · second_per_grid_t · tokens_per_second), P + r, P + c); the text after the video
starts at one past the largest position so far. transformers 5.x (as installed here, 5.23)
starts that text at P + max(rows, columns) instead, below the video's temporal positions when
the clip is longer than it is wide, while its decoding steps continue from the largest
position + 1 as before; the parity tests hand transformers these positions explicitly.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from earlytom_jax.config import Qwen25VLConfig
from earlytom_jax.models import params as params_lib
from earlytom_jax.models.qwen2 import Qwen2
from earlytom_jax.models.qwen_vision import QwenVisionEncoder


def video_positions(grid: tuple[int, int, int], merge: int, second_per_grid_t, tokens_per_second: float):
    """The 3-D positions of a video's merged tokens relative to the video's first slot.

    grid: (temporal patches, patch rows, patch columns); second_per_grid_t: seconds per
    temporal patch (a float or a traced fp32 scalar). → int32 [T, S, 3] with S = rows ·
    columns / merge², raster order (t, row, column). The temporal step is the fp32 product
    tokens_per_second · second_per_grid_t, times t in fp32, truncated, as transformers
    computes it (`(arange(T) * interval).long()`)."""
    t, gh, gw = grid
    mh, mw = gh // merge, gw // merge
    interval = jnp.float32(tokens_per_second) * jnp.asarray(second_per_grid_t, jnp.float32)
    tt = (jnp.arange(t, dtype=jnp.float32) * interval).astype(jnp.int32)
    hw = np.stack(np.meshgrid(np.arange(mh), np.arange(mw), indexing="ij"), -1).reshape(1, mh * mw, 2)
    return jnp.concatenate([jnp.broadcast_to(tt[:, None, None], (t, mh * mw, 1)),
                            jnp.broadcast_to(jnp.asarray(hw, jnp.int32), (t, mh * mw, 2))], -1)


class Qwen25VL(nnx.Module):
    """The video model: `vision` (QwenVisionEncoder, its merger included) and `text` (Qwen2
    with multimodal RoPE). Its state as nested dicts is the parameter tree the pipeline takes."""

    def __init__(self, cfg: Qwen25VLConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.vision = QwenVisionEncoder(cfg.vision, rngs=rngs)
        self.text = Qwen2(cfg.text, rngs=rngs)

    def splice(self, prefix_ids, visual, visual_valid, visual_pos, suffix_ids, suffix_valid=None, text_start=None):
        """Build the prefill sequence for one video.

        prefix_ids [P], suffix_ids [Q] int32 (the prefix ends with <|vision_start|>, the suffix
        starts with <|vision_end|>); visual [Vc, Ht] with visual_valid bool [Vc] and visual_pos
        int32 [Vc, 3] (`video_positions` of each slot's token, relative to the video); suffix_valid
        bool [Q] marks padding at the front of the suffix (None: all valid); text_start: where
        the suffix's positions start relative to the video (int32 scalar; None: one past the
        largest valid video position; a compressed video passes its full video's).
        → h [1, L, Ht], valid [1, L], positions int32 [1, L, 3]: the prefix at 0..P-1, the
        video at P + its positions, the suffix's valid slots from P + text_start on
        (padding slots repeat a neighbour's position and are never attended)."""
        pre, suf = self.text.embed_tokens(prefix_ids), self.text.embed_tokens(suffix_ids)
        h = jnp.concatenate([pre, visual.astype(pre.dtype), suf], axis=0)
        if suffix_valid is None:
            suffix_valid = jnp.ones(suffix_ids.shape, bool)
        p = prefix_ids.shape[0]
        vis = jnp.where(visual_valid[:, None], visual_pos + p, p)
        if text_start is None:
            start = jnp.max(jnp.where(visual_valid[:, None], vis, p - 1)) + 1
        else:
            start = p + jnp.asarray(text_start, jnp.int32)
        after = start + jnp.maximum(jnp.cumsum(suffix_valid.astype(jnp.int32)) - 1, 0)
        positions = jnp.concatenate([
            jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32)[:, None], (p, 3)),
            vis.astype(jnp.int32),
            jnp.broadcast_to(after.astype(jnp.int32)[:, None], (after.shape[0], 3)),
        ])
        valid = jnp.concatenate([jnp.ones(prefix_ids.shape, bool), visual_valid, suffix_valid])
        return h[None], valid[None], positions[None]


def bind(cfg: Qwen25VLConfig, params: dict) -> Qwen25VL:
    """The model `cfg` over the parameter tree `params` (models/params.py `bind`)."""
    return params_lib.bind(Qwen25VL, cfg, params)
