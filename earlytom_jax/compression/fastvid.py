"""FastVID (Shen et al., NeurIPS 2025; LunarShen/FastVID, vendored by viridisGreen/EarlyTom as
`fastvid/`), a baseline after the encoder: DySeg cuts the video into segments of similar
frames, then STPrune keeps, per frame, the `salient` tokens of highest attention (ATS) and,
per segment, `context` tokens built by density-based token merging (DTM): the anchor frames of
a segment (its last frame and every p-th before it) each pick their tokens of highest
density-peak score as anchors, and every non-salient token of the segment joins its most
similar anchor. Docs: docs/baselines/fastvid.md (settings, sources, deviations).

Per frame of S pooled tokens: R = int(S·r) retained, salient = R - int(R·d), ctx = R - salient;
a segment of L frames has ceil(L/p) anchor frames of ctx·L // ceil(L/p) context tokens each
(ctx for a single frame), so at most T0·R tokens are kept (the static capacity), fewer when the
floors bite. Output: tokens in frame then raster order, then the newline; with
`keep_positions` (the official code) every kept token keeps its RoPE position in the full
sequence (`info["visual_positions"]`), the newline and the text theirs.

Signals: the official LLaVA-OV code takes DySeg's frame features and ATS's attention from the
original SigLIP's post-LayerNorm and attention-pooling head (the pooled output and the probe's
attention), weights LLaVA-OV checkpoints do not carry. Here, as FastVID's official
Qwen2.5-VL port does: DySeg on the mean of each frame's visual tokens, ATS on the last encoder
block's attention received (mean over heads and queries), pooled as the tokens are.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from earlytom_jax.compression import fastvid_prune as fp
from earlytom_jax.compression import select as sel
from earlytom_jax.compression.base import NoHooks
from earlytom_jax.compression.registration import DEFAULT_RATIO, check_ratio, register
from earlytom_jax.config import LlavaOVConfig
from earlytom_jax.errors import ConfigError
from earlytom_jax.models import llava_onevision as lov


@register(name="fastvid", label="FastVID", settings=("dyseg_c", "tau", "d", "p", "beta", "keep_positions"))
@dataclasses.dataclass(frozen=True)
class FastVID(NoHooks):
    """ratio: FastVID's RETAIN_RATIO r (R = int(S·r) tokens per frame, at most T0·R in all);
    dyseg_c: DySeg's minimum segment count c (the c - 1 least similar boundaries are cut);
    tau: DySeg's similarity threshold; d: STPrune's context share (salient = R - int(R·d));
    p: DTM's anchor-frame stride; beta: DTM's minimum anchor weight; keep_positions: kept
    tokens keep their position ids in the full sequence (official) instead of consecutive ones."""

    ratio: float = DEFAULT_RATIO
    dyseg_c: int = 8
    tau: float = 0.9
    d: float = 0.4
    p: int = 4
    beta: float = 0.6
    keep_positions: bool = True
    name = "fastvid"
    encoder_layers = (-1,)  # the last block's attention received: ATS's signal

    def __post_init__(self):
        check_ratio(self.ratio)
        if self.dyseg_c < 1 or self.p < 1:
            raise ConfigError(f"FastVID dyseg_c {self.dyseg_c} and p {self.p} must be >= 1")
        if not (0.0 <= self.d <= 1.0 and 0.0 <= self.beta <= 1.0 and 0.0 <= self.tau <= 1.0):
            raise ConfigError(f"FastVID d {self.d}, beta {self.beta} and tau {self.tau} must be in [0, 1]")

    @classmethod
    def from_ratio(cls, ratio, cfg, **kw) -> "FastVID":
        """The one budget conversion: `--ratio r` is FastVID's own RETAIN_RATIO (the scripts'
        0.10/0.15/0.20/0.25 are the tables' ratios), i.e. at most T0·int(196·r) tokens, which
        is at most (and about) the shared r·T0·196."""
        return cls(ratio=ratio, **kw).check(cfg)

    def check(self, cfg: LlavaOVConfig) -> "FastVID":
        s = cfg.tokens_per_frame
        r, sal, ctx = self.per_frame(s)
        if ctx * self.p > s - sal:  # a segment of p frames gives one anchor frame ctx·p anchors
            raise ConfigError(f"FastVID ratio {self.ratio} needs up to {ctx * self.p} anchor tokens from a frame's "
                              f"{s - sal} non-salient ones (p={self.p}); use a smaller ratio or p")
        return self

    def per_frame(self, s: int) -> tuple[int, int, int]:
        """(R, salient, ctx) tokens per frame of s; ConfigError when R is 0."""
        r = int(s * self.ratio)
        if r < 1:
            raise ConfigError(f"FastVID ratio {self.ratio} keeps no token of a frame's {s} (int(S·r) = 0)")
        sal = r - int(r * self.d)
        return r, sal, r - sal

    def context_slots(self, t0: int, s: int) -> int:
        """cmax: the most context tokens one frame of t0 can get (ConfigError past the frame's
        non-salient tokens, for a method built without `check`)."""
        _, sal, ctx = self.per_frame(s)
        cmax = fp.max_context(ctx, self.p, t0)
        if cmax > s - sal:
            raise ConfigError(f"FastVID ratio {self.ratio} needs up to {cmax} anchor tokens from a frame's "
                              f"{s - sal} non-salient ones (p={self.p}); use a smaller ratio or p")
        return cmax

    def capacity(self, t0: int, s: int) -> int:
        return t0 * self.per_frame(s)[0]

    # hook 1: only observe the last block --------------------------------------------------

    def encoder_merge(self, x, n, colmean, state, last):
        return x, n, {"colmean": colmean}

    # hook 2 --------------------------------------------------------------------------------

    def select(self, tokens, n, state, cfg, grid=None):
        t0, s, h = tokens.shape
        _, sal, ctx = self.per_frame(s)
        cmax = self.context_slots(t0, s)
        x = tokens.astype(jnp.float32)
        imp = lov.pool_frames(state["colmean"][..., None], cfg)[..., 0]  # [T, S]
        starts = fp.dyseg(jnp.mean(x, axis=1), self.dyseg_c, self.tau)
        counts, seg_id = fp.context_counts(starts, ctx, self.p)
        salient = fp.salient_mask(imp, sal)
        keep = salient
        if cmax > 0:
            filt = jnp.argsort(salient.astype(jnp.int32), axis=1, stable=True)[:, : s - sal]  # rest, raster order
            xf = jnp.take_along_axis(x, filt[..., None], axis=1)
            merged, slot_valid, order = fp.merge_context(
                xf, fp.density_scores(xf), counts, seg_id, ctx, cmax, self.beta)
            at = jnp.where(slot_valid, jnp.take_along_axis(filt, order, axis=1), s)  # s: dropped
            frame = jnp.arange(t0)[:, None]
            x = x.at[frame, at].set(merged, mode="drop")
            keep = keep | jnp.zeros((t0, s), bool).at[frame, at].set(True, mode="drop")
        buf, valid, src, count = sel.compact(keep, x.astype(tokens.dtype), self.capacity(t0, s))
        info = {"count": count, "kept_index": src, "segment_starts": starts, "context_per_frame": counts,
                "kept_per_frame": keep.sum(1), "importance": imp}
        return buf, valid, info

    def select_flops(self, cfg: LlavaOVConfig, t0: int, s: int | None = None) -> int:
        """Pooling the attention, DySeg's frame means and similarities, the per-frame distance
        matrices and density scores, and DTM's anchor similarities and sums as executed: every
        frame's cmax anchor slots against all T0·M filtered tokens (masked to the segment)."""
        g, pg, h = cfg.vision.grid, cfg.pooled_grid, cfg.text.hidden_size
        s = cfg.tokens_per_frame if s is None else s
        _, sal, _ = self.per_frame(s)
        m = s - sal
        cmax = self.context_slots(t0, s)
        pool = 2 * (pg * g * g + pg * pg * g)
        per_frame = pool + s * h + 3 * h + 2 * m * m * h + 3 * m * h + 8 * m * m
        return int(t0 * per_frame + 4 * t0 * t0 * m * cmax * h + 3 * t0 * cmax * h)

