"""FastVID on LLaVA-Video, as FastVID's official LLaVA-Video port runs it (LunarShen/FastVID
a40a109, `fastvid_llavavideo/LLaVA-NeXT/llava/model/language_model/modeling_qwen2.py`
l. 893-1085, `llava/model/llava_arch.py` l. 188-223; docs/baselines/fastvid.md, section
"LLaVA-Video"). `FastVID.from_ratio` (hence `--method fastvid`) builds this class on a
LLaVA-Video config.

The port receives the full grid span (T frames of g' rows of g' average-pooled tokens, each
row followed by `image_newline`: LLaVA-NeXT's `add_token_per_grid`), drops the newlines
(`(i + 1) % (g' + 1) != 0`; the port writes 14 = 13 + 1 and 64·13·13, its script's 64 frames
of 13 x 13), prunes the T x S tokens (S = g'²), then puts back the newline of every pooled row
that kept a token; every kept slot keeps its position in the uncompressed sequence.

Its pruning is neither the LLaVA-OV code's nor the Qwen2.5-VL port's:
- budgets per DySeg segment of L frames: R = int(S·r); the segment keeps R·L tokens,
  ctx = int(R·L·d) context and sal = R·L - ctx salient ones (no floor at 1);
- the salient tokens are spread over all L frames (sal // L each, +1 for the first sal % L);
  the context tokens over the last frame and every p-th before it (ceil(L/p) anchor frames,
  ctx split evenly, the remainder to the last frames first); L = 1: the frame keeps sal + ctx;
- per frame: its salient tokens by attention (ATS); its anchors, the tokens of highest
  density-peak score among its non-salient ones (as on LLaVA-OV), in index order; every
  non-salient token of the segment except the frame's own anchors (other frames' anchors
  included) joins its most cosine-similar anchor; anchor = w·anchor + (1-w)·mean(joined),
  w = max(1/(joined+1), beta) (the Qwen2.5-VL port's merge, `fastvid_qwen.merge_anchors`).
Signals as on LLaVA-OV (the port's `encode_images` runs the same SigLIP head; its
`get_attn_2dPool` average-pools the probe's attention 27 x 27 → 13 x 13), `signals` alike.

Static shapes: per-frame salient and context counts are int32 arrays from the segment mask
(`frame_budgets`, host tables of the port's integer arithmetic), density scores on each
frame's S x S matrix masked to its non-salient tokens, `cmax` context slots per frame, the
merge against all T·S tokens masked to the segment. Capacity T0·R. The pipeline lays the kept
tokens out with their rows' newlines (`lov.grid_newlines`) and, with `keep_positions`, gives
each slot its position in the full grid span (`pipeline.grid_positions`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np

from earlytom_jax.compression import fastvid_prune as fp
from earlytom_jax.compression import select as sel
from earlytom_jax.compression.fastvid import FastVID
from earlytom_jax.compression.fastvid_qwen import density_scores_masked, merge_anchors
from earlytom_jax.compression.segments import segment_info
from earlytom_jax.errors import ConfigError
from earlytom_jax.models import llava_onevision as lov
from earlytom_jax.models import siglip_head

PORT_FRAMES = 64  # the port's script (max_frames_num=64, force_sample=True): the build-time check


def segment_tables(r: int, d: float, t: int) -> tuple[np.ndarray, np.ndarray]:
    """(salient [T+1], context [T+1]) int32 of a segment of L = 0..T frames: ctx = int(R·L·d),
    sal = R·L - ctx (the port's host arithmetic, l. 936-938)."""
    ctx = np.array([int(r * L * d) for L in range(t + 1)], np.int32)
    return np.arange(t + 1, dtype=np.int32) * r - ctx, ctx


def segment_counts(sal: int, ctx: int, L: int, p: int) -> tuple[list[int], list[int]]:
    """Host lists (salient, context) of the L frames of a segment with sal and ctx tokens (the
    port l. 940-964): salient spread evenly, the first sal % L one more; context over the last
    frame and every p-th before it, the remainder to the last frames first."""
    if L == 1:
        return [sal], [ctx]
    n_anchor = -(-L // p)
    per = [ctx // n_anchor + (j < ctx % n_anchor) for j in range(n_anchor)]
    back = [L - 1 - i for i in range(L)]
    return ([sal // L + (i < sal % L) for i in range(L)],
            [per[b // p] if b % p == 0 else 0 for b in back])


@functools.lru_cache(maxsize=None)
def budget_bounds(r: int, d: float, p: int, t: int, s: int) -> tuple[int, int, int]:
    """(cmax: the most context tokens one frame of a segment of at most t frames gets; the
    largest salient + context of one frame; the L giving it) for frames of s tokens."""
    sal_tab, ctx_tab = segment_tables(r, d, t)
    cmax, worst, at = 0, 0, 1
    for L in range(1, t + 1):
        sal, ctx = segment_counts(int(sal_tab[L]), int(ctx_tab[L]), L, p)
        cmax = max(cmax, max(ctx))
        most = max(a + b for a, b in zip(sal, ctx))
        if most > worst:
            worst, at = most, L
    return cmax, worst, at


def frame_budgets(starts, r: int, d: float, p: int):
    """Salient and context counts of every frame (the port l. 933-964). starts [T] bool (DySeg
    segments) → (sal [T], ctx [T]) int32."""
    t = starts.shape[0]
    sal_tab, ctx_tab = (jnp.asarray(a) for a in segment_tables(r, d, t))
    info = segment_info(starts, jnp.int32(t))
    L = info.seg_end - info.seg_start + 1
    seg_sal, seg_ctx = sal_tab[L], ctx_tab[L]
    i = jnp.arange(t, dtype=jnp.int32) - info.seg_start
    sal = seg_sal // L + (i < seg_sal % L)
    back = L - 1 - i  # the context list is built forwards, then reversed
    n_anchor = (L + p - 1) // p
    ctx = jnp.where(back % p == 0, seg_ctx // n_anchor + (back // p < seg_ctx % n_anchor), 0)
    return sal.astype(jnp.int32), ctx.astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class FastVIDVideo(FastVID):
    """FastVID on LLaVA-Video (module docstring). ratio: the port's retention ratio r (R =
    int(S·r) per frame of S pooled tokens, at most T0·R in all); dyseg_c, tau, d, p, beta:
    the port's script (8, 0.9, 0.4, 4, 0.6); keep_positions: kept tokens and their rows'
    newlines keep their positions in the full grid sequence (the port) instead of consecutive
    ones; signals as FastVID's."""

    families = ("llava_video",)
    grid_newline_rows = "kept"  # the port: the newline of every pooled row that kept a token

    @classmethod
    def from_ratio(cls, ratio, cfg, **kw) -> "FastVIDVideo":
        return cls(ratio=ratio, **kw).check(cfg)

    def check(self, cfg) -> "FastVIDVideo":
        if cfg.family != "llava_video":
            raise ConfigError("FastVIDVideo runs on LLaVA-Video; build FastVID for other families")
        self.budget(PORT_FRAMES, cfg.tokens_per_frame)
        return self

    def budget(self, t0: int, s: int) -> tuple[int, int]:
        """(R, cmax) for t0 frames of s pooled tokens; ConfigError when R = 0, a one-frame
        segment gets no salient token (the port's `torch.cat` of no index fails), or a frame
        gets more salient and context tokens than it has (the port's top-k fails)."""
        r = int(s * self.ratio)
        if r < 1:
            raise ConfigError(f"FastVID ratio {self.ratio} keeps no token of a frame's {s} (int(S·r) = 0)")
        sal, _ = segment_tables(r, self.d, 1)
        if sal[1] < 1:
            raise ConfigError(f"FastVID d {self.d} leaves a one-frame segment no salient token "
                              f"(R - int(R·d) = 0 at R = {r}); use d < 1")
        cmax, worst, at = budget_bounds(r, self.d, self.p, t0, s)
        if worst > s:
            raise ConfigError(f"FastVID ratio {self.ratio} gives a frame of a {at}-frame segment {worst} salient and "
                              f"context tokens, more than its {s} (p={self.p}); use a smaller ratio or p")
        return r, cmax

    def capacity(self, t0: int, s: int) -> int:
        return t0 * self.budget(t0, s)[0]

    # hook 2 --------------------------------------------------------------------------------

    def select(self, tokens, n, state, cfg, grid=None):
        if grid is not None or not cfg.grid_newlines:
            raise ConfigError("FastVIDVideo runs on LLaVA-Video only")
        t0, s, _ = tokens.shape
        r, cmax = self.budget(t0, s)
        x = tokens.astype(jnp.float32)
        imp = lov.pool_frames(state["colmean"][..., None], cfg)[..., 0]  # [T, S]: avg_pool2d as the port
        g = state.get("frame_feature")  # the SigLIP head's pooled output, else the token mean
        starts = fp.dyseg(jnp.mean(x, axis=1) if g is None else g, self.dyseg_c, self.tau)
        sal, ctx = frame_budgets(starts, r, self.d, self.p)
        salient = fp.rank_ascending(-imp) < sal[:, None]
        keep = salient
        if cmax > 0:
            score = density_scores_masked(x, ~salient)
            anchor = ~salient & (fp.rank_ascending(-score) < ctx[:, None])
            seg_id = segment_info(starts, jnp.int32(t0)).seg_id
            merged, slot_valid, at = merge_anchors(x, anchor, salient, ctx, seg_id, cmax, self.beta)
            x = x.at[jnp.arange(t0)[:, None], jnp.where(slot_valid, at, s)].set(merged, mode="drop")
            keep = salient | anchor
        buf, valid, src, count = sel.compact(keep, x.astype(tokens.dtype), t0 * r)
        info = {"count": count, "kept_index": src, "segment_starts": starts, "salient_per_frame": sal,
                "context_per_frame": ctx, "kept_per_frame": keep.sum(1), "importance": imp,
                "signals_head": jnp.asarray(g is not None)}
        return buf, valid, info

    def select_flops(self, cfg, t0: int, s: int | None = None, stats: dict | None = None) -> int:
        """The SigLIP head when it gives the signals (as FastVID's), pooling the attention, the
        frame means (tower signals) and DySeg's similarities, every frame's S x S distance
        matrix and density scores, and DTM as executed: every frame's cmax anchor slots against
        all T0·S tokens (similarities and sums, masked to the segment)."""
        head = self.signals == "head" or (self.signals == "auto" and bool((stats or {}).get("signals_head", False)))
        g, pg, h = cfg.vision.grid, cfg.pooled_grid, cfg.text.hidden_size
        s = cfg.tokens_per_frame if s is None else s
        _, cmax = self.budget(t0, s)
        pool = 2 * (pg * g * g + pg * pg * g)
        means = 0 if head else s * h
        per_frame = pool + means + 3 * h + 2 * s * s * h + 3 * s * h + 8 * s * s
        signals = siglip_head.flops(cfg.vision, t0) if head else 0
        return int(signals + t0 * per_frame + 4 * t0 * t0 * s * cmax * h + 3 * t0 * cmax * h)
