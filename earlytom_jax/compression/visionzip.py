"""VisionZip (a baseline after the encoder): per frame, the K tokens that receive the most
attention at the encoder's last block ("dominant") plus C "contextual" tokens that absorb the
rest by key similarity.

Where the signals come from follows EarlyTom's official LLaVA-OneVision baseline
(viridisGreen/EarlyTom, commit b909322), not VisionZip's own CLIP code:
- attention: the last SigLIP block's probabilities (the block whose output is the feature),
  averaged over heads, then over queries → [T, 729] attention received per token
  (`LLaVA-NeXT/.../siglip_encoder.py` l. 625-627 keep only the last layer's attentions,
  l. 831-834 return `attn_weights.mean(dim=1).mean(dim=1)`); that is our `colmean`;
- keys: that block's key projection of its LayerNorm'd input (bias included), averaged over
  heads → [T, 729, 72] (`siglip_encoder.py` l. 218-219 and 245-246 `raw_key_states.mean(1)`,
  read from `encoder.layers[-1]` at l. 833; `visionzip/utils.py` l. 59 sets r = 1 for the
  last block only; at b909322 the line that stores it, l. 333-336, is commented out, so the
  published runs used an earlier revision with this evident intent);
- selection happens **after** the projector and the 2x2 bilinear pooling, on 196 tokens per
  frame: features, attention and keys are all pooled with the same bilinear map
  (`visionzip/llava_arch.py` l. 81-86), then per frame (l. 88-181):
  K = int(budget · 54/64) dominant, C = budget - K contextual (l. 63-66; the scripts'
  budgets are 20/30/40/50 per frame for r = 0.10/0.15/0.20/0.25, `scripts/ov/
  eval_ov-7b_visionzip.sh`, i.e. K/C = 16/4, 25/5, 33/7, 42/8).
Per frame: dominant = top-K pooled attention; of the R = 196 - K others (raster order),
targets are positions 0, step, 2·step, … (first C) with step = max(1, R // C); every other
remaining token goes to the target of highest cosine similarity of pooled keys (first on
ties) and each target becomes target + mean(its assigned tokens) (official code, quirks=True;
quirks=False: the plain average of the target and its assigned tokens). Output per frame:
the dominant tokens in raster order, then the contextual ones in raster order; frames in
time order; one `image_newline` after the video (one_token newline).

Budget: by default the shared convention round(r · T0 · 196) spread over the frames
(`base.frame_budgets`, per-frame budgets differ by at most one), so counts match the other
methods exactly; `per_frame` fixes the per-frame budget instead (20 reproduces the paper's
"10%" runs). Static shapes: per-frame K and C are known from T0 alone, so the buffer is exactly
the budget, every slot valid; no frame is merged.

LLaVA-Video (average pooling, grid newlines): attention, keys and features are average-pooled
2x2 (13 x 13 = 169 a frame, `visionzip/llava_arch.py` l. 81-86 call `get_2dPool`, which follows
`mm_spatial_pool_mode`), the budget is round(r · T0 · 169), and the grid branch (l. 153-174)
lays each frame's dominant and contextual tokens out in raster order of their positions (a
contextual token at its target's) with a newline after every pooled row, also after a row that
kept nothing: T0 · 13 newlines on top of the budget (`grid_newline_rows = "all"`).

Qwen2.5-VL (this project's adaptation; the paper's Qwen table has a VisionZip row, its code for
this model is not released). A frame is a temporal patch (two input frames, T = T'/2 of them)
and selection acts on its S = mh·mw merged (2x2) tokens in raster order (no pooling on this
family), per temporal patch:
- importance of a merged token = the mean of its 4 patches' `colmean` at the encoder's last
  block (attention each patch receives, averaged over heads and all N queries of its temporal
  patch; zero from queries outside its window when that block is a window block);
- keys of a merged token = the mean of its 4 patches' keys at that block, each averaged over
  heads; the keys as that block's attention uses them (qkv projection, bias included, of the
  RMSNorm'd input, then the 2-D vision rotary);
- dominant = the top-K merged tokens by importance, and the other S - K merged into C
  contextual tokens exactly as above (targets every step-th of the rest in raster order,
  step = max(1, (S - K) // C), assignment by cosine similarity of the merged tokens' keys,
  the same quirks switch);
- budget as on LLaVA-OV with S for 196: round(r · T · S) spread over the T temporal patches
  (`base.frame_budgets`), K = int(b · dominant_ratio), C = b - K per temporal patch;
- positions: every slot takes the 3-D M-RoPE position of its `kept_index` token (a dominant
  token its own, a contextual token its target's); no newline follows the video, and the text
  after it keeps the position it has with every token (one past the full video's largest).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from earlytom_jax.compression import select as sel
from earlytom_jax.compression.base import NoHooks, frame_budgets
from earlytom_jax.compression.registration import DEFAULT_RATIO, check_ratio, register
from earlytom_jax.config import LlavaOVConfig
from earlytom_jax.errors import ConfigError
from earlytom_jax.models import family
from earlytom_jax.models import llava_onevision as lov


@register(name="visionzip", label="VisionZip", settings=("per_frame", "dominant_ratio", "quirks"))
@dataclasses.dataclass(frozen=True)
class VisionZip(NoHooks):
    """ratio: retention r of T0·196 tokens; per_frame: fixed tokens per frame (overrides
    ratio); dominant_ratio: share K/(K+C) (54/64, the official default); quirks: contextual
    token = target + mean(assigned) as the official code computes it (False: true average).
    On Qwen2.5-VL the frames are temporal patches and the tokens merged 2x2 tokens (module
    docstring)."""

    families = ("llava_onevision", "llava_video", "qwen2_5_vl")
    grid_newline_rows = "all"  # LLaVA-Video: the official grid branch gives every row a newline

    ratio: float = DEFAULT_RATIO
    per_frame: int | None = None
    dominant_ratio: float = 54 / 64
    quirks: bool = True
    name = "visionzip"
    encoder_layers = (-1,)  # the last block: its attention and keys
    encoder_keys = True

    def __post_init__(self):
        check_ratio(self.ratio)
        if not 0.0 <= self.dominant_ratio <= 1.0:
            raise ConfigError(f"VisionZip dominant ratio {self.dominant_ratio} is outside [0, 1]")
        if self.per_frame is not None and self.per_frame < 1:
            raise ConfigError(f"VisionZip per_frame {self.per_frame} must be >= 1")

    def check(self, cfg: LlavaOVConfig) -> "VisionZip":
        # Qwen2.5-VL's tokens per temporal patch depend on the clip's frame size: `budgets` checks there
        qwen = family.is_qwen(cfg)
        if self.per_frame is not None and not qwen and self.per_frame > cfg.tokens_per_frame:
            raise ConfigError(f"VisionZip per_frame {self.per_frame} exceeds the {cfg.tokens_per_frame} tokens of a frame")
        return self

    def budgets(self, t0: int, s: int):
        """Per-frame (K, C, step), numpy int32 [T0] each."""
        b = np.full(t0, self.per_frame, np.int32) if self.per_frame is not None else frame_budgets(t0, self.ratio, s)
        if int(b.max()) > s:
            raise ConfigError(f"VisionZip budget {int(b.max())} per frame exceeds the {s} tokens of a frame")
        k = np.array([int(int(x) * self.dominant_ratio) for x in b], np.int32)
        c = b - k
        step = np.array([max(1, (s - kk) // cc) if cc > 0 else 1 for kk, cc in zip(k, c)], np.int32)
        return k, c, step

    def capacity(self, t0: int, s: int) -> int:
        k, c, _ = self.budgets(t0, s)
        return int(k.sum() + c.sum())

    # hook 1: only observe the last block ------------------------------------------------

    def encoder_merge(self, x, n, colmean, state, last, keys=None):
        return x, n, {"colmean": colmean, "keys": keys}

    # hook 2 ------------------------------------------------------------------------------

    def select(self, tokens, n, state, cfg, grid=None):
        t0, s, h = tokens.shape
        if family.is_qwen(cfg):  # per merged token: the mean over its patches (processor order)
            unit = cfg.vision.merge_unit
            imp = state["colmean"].reshape(t0, s, unit).mean(-1)  # [T, S]
            keys = state["keys"]
            met = keys.reshape(t0, s, unit, keys.shape[-1]).mean(2)  # [T, S, D]
        else:  # pooled as the tokens are (LLaVA-NeXT's get_2dPool: bilinear, or average on LLaVA-Video)
            imp = lov.pool_frames(state["colmean"][..., None], cfg)[..., 0]  # [T, S]
            met = lov.pool_frames(state["keys"], cfg)  # [T, S, D]
        k_np, c_np, step_np = self.budgets(t0, s)
        cap = int(k_np.sum() + c_np.sum())
        k, c, step = (jnp.asarray(a)[:, None] for a in (k_np, c_np, step_np))

        dom = jax.vmap(sel.topk_mask)(imp, k[:, 0])
        rest = ~dom
        pos = jnp.cumsum(rest, axis=1) - 1  # position among the remaining tokens
        tgt = rest & (pos % step == 0) & (pos // step < c)
        metn = met / jnp.linalg.norm(met, axis=-1, keepdims=True)
        sim = jnp.einsum("tsd,tud->tsu", metn, metn)
        assign = jnp.argmax(jnp.where(tgt[:, None, :], sim, -jnp.inf), axis=-1)  # [T, S]
        merged = rest & ~tgt & (c > 0)

        frame = jnp.arange(t0, dtype=jnp.int32)[:, None]
        into = (frame * s + assign).reshape(-1)
        vals = tokens.reshape(t0 * s, h).astype(jnp.float32)
        w = merged.reshape(-1)
        summed = jax.ops.segment_sum(jnp.where(w[:, None], vals, 0.0), into, num_segments=t0 * s)
        count = jax.ops.segment_sum(w.astype(jnp.float32), into, num_segments=t0 * s)[:, None]
        ctx = vals + summed / jnp.maximum(count, 1.0) if self.quirks else (vals + summed) / (1.0 + count)
        vals = jnp.where(tgt.reshape(-1, 1), ctx, vals).astype(tokens.dtype)

        offset = jnp.asarray(np.concatenate([[0], np.cumsum(k_np + c_np)[:-1]]), jnp.int32)[:, None]
        slot = jnp.where(dom, jnp.cumsum(dom, axis=1) - 1, k + jnp.cumsum(tgt, axis=1) - 1)
        dest = jnp.where(dom | tgt, offset + slot, cap)  # cap: dropped by the scatter
        buf = jnp.zeros((cap, h), tokens.dtype).at[dest.reshape(-1)].set(vals, mode="drop")
        src = jnp.full((cap,), -1, jnp.int32).at[dest.reshape(-1)].set(jnp.arange(t0 * s, dtype=jnp.int32), mode="drop")
        into_slot = jnp.where(merged, jnp.take_along_axis(dest, assign, axis=1), dest)
        info = {
            "count": jnp.asarray(cap, jnp.int32),
            "kept_index": src,  # source t*S + s of each slot (a contextual slot: its target)
            "token_slot": jnp.where(into_slot < cap, into_slot, -1).reshape(-1),  # slot each token went to
            "importance": imp,
        }
        return buf, jnp.ones((cap,), bool), info

    def select_flops(self, cfg: LlavaOVConfig, t0: int, s: int | None = None) -> int:
        """Pooling attention and keys, the per-frame key similarity and the contextual sums.
        Qwen2.5-VL (s = mh·mw merged tokens per temporal patch, required): averaging each
        merged token's patches' attention and keys instead of the pooling."""
        d, h = cfg.vision.head_dim, cfg.text.hidden_size
        if family.is_qwen(cfg):
            if s is None:
                raise ValueError("on Qwen2.5-VL the tokens per temporal patch depend on the frame size: "
                                 "pass s = mh·mw")
            pool = s * cfg.vision.merge_unit * (d + 1)
        else:
            g, pg = cfg.vision.grid, cfg.pooled_grid
            s = cfg.tokens_per_frame if s is None else s
            pool = 2 * (pg * g * g + pg * pg * g) * (d + 1)
        return t0 * (pool + 2 * s * s * d + 2 * s * h)
