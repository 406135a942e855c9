"""FastVID (Shen et al., NeurIPS 2025; LunarShen/FastVID, vendored by viridisGreen/EarlyTom as
`fastvid/`), a baseline after the encoder: DySeg cuts the video into segments of similar
frames, then STPrune keeps, per frame, the `salient` tokens of highest attention (ATS) and,
per segment, `context` tokens built by density-based token merging (DTM): the anchor frames of
a segment (its last frame and every p-th before it) each pick their tokens of highest
density-peak score as anchors, and every non-salient token of the segment joins its most
similar anchor. Docs: docs/baselines/fastvid.md (settings, sources, deviations). On
Qwen2.5-VL and LLaVA-Video, `from_ratio` builds FastVID's official ports instead
(fastvid_qwen.FastVIDQwen, fastvid_video.FastVIDVideo: other budgets and merge pools).

Per frame of S pooled tokens: R = int(S·r) retained, salient = R - int(R·d), ctx = R - salient;
a segment of L frames has ceil(L/p) anchor frames of ctx·L // ceil(L/p) context tokens each
(ctx for a single frame), so at most T0·R tokens are kept (the static capacity), fewer when the
floors bite. Output: tokens in frame then raster order, then the newline; with
`keep_positions` (the official code) every kept token keeps its RoPE position in the full
sequence (`info["visual_positions"]`), the newline and the text theirs.

Signals (`signals`): "head", as the official LLaVA-OV code: the original SigLIP's
post-LayerNorm and attention-pooling head (models/siglip_head.py, loaded from a second
checkpoint: `--siglip-head`) on the tower's output; DySeg's g_t is the head's pooled output,
ATS's attention the probe's attention over the patches (mean over heads), pooled to the token
grid. "tower": the tower's own, g_t the mean of each frame's visual tokens (as
FastVID's Qwen2.5-VL port), ATS on the last encoder block's attention received (mean over heads
and queries), pooled the same way. "auto" (default): "head" when the parameters carry the head
(`params["siglip_head"]`), else "tower"; `info["signals_head"]` says which ran.
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
from earlytom_jax.models import siglip_head

SIGNALS = ("auto", "head", "tower")


@register(name="fastvid", label="FastVID",
          settings=("dyseg_c", "tau", "d", "p", "beta", "keep_positions", "dyseg_ignore", "signals"))
@dataclasses.dataclass(frozen=True)
class FastVID(NoHooks):
    """ratio: FastVID's RETAIN_RATIO r (R = int(S·r) tokens per frame, at most T0·R in all);
    dyseg_c: DySeg's minimum segment count c (the c - 1 least similar boundaries are cut);
    tau: DySeg's similarity threshold; d: STPrune's context share (salient = R - int(R·d));
    p: DTM's anchor-frame stride; beta: DTM's minimum anchor weight; keep_positions: kept
    tokens keep their position ids in the full sequence (official) instead of consecutive ones;
    signals: where DySeg's frame features and ATS's attention come from, "head" (the SigLIP
    head's, official), "tower" (the tower's own) or "auto" (the head's when loaded)."""

    ratio: float = DEFAULT_RATIO
    dyseg_c: int = 8
    tau: float = 0.9
    d: float = 0.4
    p: int = 4
    beta: float = 0.6
    keep_positions: bool = True
    signals: str = "auto"
    name = "fastvid"
    # Qwen2.5-VL and LLaVA-Video: `from_ratio` builds their ports (fastvid_qwen.FastVIDQwen,
    # fastvid_video.FastVIDVideo)
    families = ("llava_onevision", "qwen2_5_vl", "llava_video")
    encoder_layers = (-1,)  # the last block's attention received: ATS's signal

    def __post_init__(self):
        check_ratio(self.ratio)
        if self.dyseg_c < 1 or self.p < 1:
            raise ConfigError(f"FastVID dyseg_c {self.dyseg_c} and p {self.p} must be >= 1")
        if not (0.0 <= self.d <= 1.0 and 0.0 <= self.beta <= 1.0 and 0.0 <= self.tau <= 1.0):
            raise ConfigError(f"FastVID d {self.d}, beta {self.beta} and tau {self.tau} must be in [0, 1]")
        if self.signals not in SIGNALS:
            raise ConfigError(f"FastVID signals {self.signals!r}: choose one of {', '.join(SIGNALS)}")

    @classmethod
    def from_ratio(cls, ratio, cfg, **kw) -> "FastVID":
        """The one budget conversion: `--ratio r` is FastVID's own RETAIN_RATIO (the scripts'
        0.10/0.15/0.20/0.25 are the tables' ratios), i.e. at most T0·int(196·r) tokens, which
        is at most (and about) the shared r·T0·196. On Qwen2.5-VL: the official port's variant
        (`fastvid_qwen.FastVIDQwen`, its own defaults: tau 0.84, dyseg_ignore 0.95); on
        LLaVA-Video its LLaVA-Video port's (`fastvid_video.FastVIDVideo`: T0·int(169·r))."""
        from earlytom_jax.models import family

        if family.is_qwen(cfg):
            from earlytom_jax.compression.fastvid_qwen import FastVIDQwen

            return FastVIDQwen.from_ratio(ratio, cfg, **kw)
        if "dyseg_ignore" in kw:
            raise ConfigError("FastVID dyseg_ignore is a setting of its Qwen2.5-VL port only")
        if cfg.family == "llava_video":
            from earlytom_jax.compression.fastvid_video import FastVIDVideo

            return FastVIDVideo.from_ratio(ratio, cfg, **kw)
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

    def uses_head(self, loaded: bool) -> bool:
        """Whether the SigLIP head gives the signals, the head being `loaded` or not;
        ConfigError (one line) for signals="head" without it."""
        if self.signals == "head" and not loaded:
            raise ConfigError("FastVID signals='head' needs the original SigLIP's head: load it with --siglip-head DIR "
                              "(google/siglip-so400m-patch14-384; VideoLLM.load(..., siglip_head=DIR)), or use "
                              "signals='tower'")
        return self.signals == "head" or (self.signals == "auto" and loaded)

    def head_signals(self, head, feats, state, cfg):
        """The end of hook 1 (`pipeline.encode_video`, LLaVA only), with the head's tree `head`
        (None: not loaded). With the head's signals: feats [T0, N, C] (the tower's output) →
        state["frame_feature"] [T0, C] (the pooled output: DySeg's g_t) and state["colmean"]
        [T0, N] replaced by the probe's attention (mean over heads), which `select` pools to the
        token grid as the official `get_attn_2dPool` does (llava_arch.py l. 171-182)."""
        if not self.uses_head(head is not None):
            return state
        pooled, attn = siglip_head.bind(cfg.vision, head)(feats)
        return {**state, "colmean": attn, "frame_feature": pooled}

    # hook 2 --------------------------------------------------------------------------------

    def select(self, tokens, n, state, cfg, grid=None):
        if grid is not None:  # a FastVID built directly, not by from_ratio, on Qwen2.5-VL
            raise ConfigError("FastVID on Qwen2.5-VL: build it with FastVID.from_ratio (fastvid_qwen.FastVIDQwen)")
        if getattr(cfg, "grid_newlines", False):  # likewise on LLaVA-Video
            raise ConfigError("FastVID on LLaVA-Video: build it with FastVID.from_ratio (fastvid_video.FastVIDVideo)")
        t0, s, h = tokens.shape
        _, sal, ctx = self.per_frame(s)
        cmax = self.context_slots(t0, s)
        x = tokens.astype(jnp.float32)
        imp = lov.pool_frames(state["colmean"][..., None], cfg)[..., 0]  # [T, S]
        g = state.get("frame_feature")  # the SigLIP head's pooled output, else the token mean
        starts = fp.dyseg(jnp.mean(x, axis=1) if g is None else g, self.dyseg_c, self.tau)
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
                "kept_per_frame": keep.sum(1), "importance": imp, "signals_head": jnp.asarray(g is not None)}
        return buf, valid, info

    select_flops_stats = True  # `select_flops` takes the run's stats: "auto" counts the head when it ran

    def select_flops(self, cfg: LlavaOVConfig, t0: int, s: int | None = None, stats: dict | None = None) -> int:
        """The SigLIP head when it gives the signals (signals "head", or "auto" with
        stats["signals_head"]: `siglip_head.flops`), pooling the attention, DySeg's frame means
        (without the head) and similarities, the per-frame distance matrices and density
        scores, and DTM's anchor similarities and sums as executed: every frame's cmax anchor
        slots against all T0·M filtered tokens (masked to the segment)."""
        head = self.signals == "head" or (self.signals == "auto" and bool((stats or {}).get("signals_head", False)))
        g, pg, h = cfg.vision.grid, cfg.pooled_grid, cfg.text.hidden_size
        s = cfg.tokens_per_frame if s is None else s
        _, sal, _ = self.per_frame(s)
        m = s - sal
        cmax = self.context_slots(t0, s)
        pool = 2 * (pg * g * g + pg * pg * g)
        means = 0 if head else s * h
        per_frame = pool + means + 3 * h + 2 * m * m * h + 3 * m * h + 8 * m * m
        signals = siglip_head.flops(cfg.vision, t0) if head else 0
        return int(signals + t0 * per_frame + 4 * t0 * t0 * m * cmax * h + 3 * t0 * cmax * h)

