"""HoliTom (Shao et al., CVPR 2025, "Holistic Token Merging for Fast Video LLMs"), a baseline
after the projector and inside the LLM. docs/baselines/holitom.md has the settings and their
sources; in short, on the pooled tokens [T0, S, H] (hook 2):

1. temporal segmentation (`holitom_temporal.segments`): adjacent-frame similarity per token
   against tau, a DP over frames that maximises the tokens saved;
2. temporal merging: in a segment of W > 1 frames, a token static over all of it is kept once,
   as its mean over the W frames; R = the tokens so saved, and the retention becomes
   r' = min(r · T0·S / (T0·S - R), 1);
3. spatial merging: the static tokens of a segment are clustered by DPC-KNN (`dpc_knn`,
   round(n·r') clusters, k = min(7, clusters) neighbours), each cluster token = beta · centre +
   (1 - beta) · mean(members) (beta 0.6); every frame keeps c = ceil(n·r') of its n dynamic
   tokens: its round(c·(1 - D)) of highest pooled attention (the last SigLIP block's
   attention received, as VisionZip's), "dominant", and (D > 0) c minus that many
   "contextual" tokens, DPC-KNN cluster tokens of its other dynamic tokens formed as the
   static ones (D = 0, the official setting: dominant tokens only); order: per segment its
   static cluster tokens (centre raster order), then frame by frame its dominant tokens
   (raster order) and its contextual ones (centre raster order); one newline after the
   video (LLaVA-OV);
4. inside the LLM (hook 3) at layer K = 18 with drop ratio 0.5: exactly EarlyTom's stage III
   (`llm_merge.merge_visual_span`: keep round(L·(1 - r)) of the visual span by the last
   prompt token's attention at layer K-1, average every other token into its most similar
   kept one); llm_layer None = "HoliTom (w/o M)".

Budget: `ratio` is r of the official code (RETAIN_RATIO), the share of the T0·S pooled tokens;
the count kept is data dependent (about r·T0·S, above it by the per-frame ceilings), held in a
static buffer of `holitom_temporal.capacity` slots with a valid mask (D does not change the
count). kept_index: a dominant token's own t·S + s, a contextual token's frame t and centre s,
a static cluster token's segment-first-frame t and centre s.

LLaVA-Video: the same on the 13 x 13 average-pooled tokens; a cluster token sits in its
segment's first frame at its centre's position, and the pipeline's grid newlines (after each
row that kept a token) reproduce the official grid branch (`add_newline_token`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from earlytom_jax.compression import dpc_knn, llm_merge
from earlytom_jax.compression import holitom_temporal as temporal
from earlytom_jax.compression import select as sel
from earlytom_jax.compression.base import NoHooks
from earlytom_jax.compression.registration import DEFAULT_RATIO, check_ratio, register
from earlytom_jax.errors import ConfigError
from earlytom_jax.models import llava_onevision as lov

TAU_LOW, TAU = 0.65, 0.80  # the official scripts' T: 0.65 at r = 0.10 (LLaVA-OV), else 0.80


def default_tau(ratio: float, family: str = "llava_onevision") -> float:
    """T of the official scripts: 0.65 at r <= 0.10 on LLaVA-OneVision, 0.80 otherwise (0.15-0.25
    on LLaVA-OV, every ratio on LLaVA-Video, and the code's default)."""
    return TAU_LOW if family == "llava_onevision" and ratio <= 0.10 + 1e-9 else TAU


@register(name="holitom", label="HoliTom", settings=("tau", "llm_layer", "llm_ratio", "beta", "knn", "max_window", "d"))
@dataclasses.dataclass(frozen=True)
class HoliTom(NoHooks):
    """ratio: retention r (of T0·S pooled tokens); tau: T, the static-token similarity
    threshold; llm_layer: HOLITOM_k (None: no in-LLM merge); llm_ratio: HOLITOM_r;
    beta: a cluster token's weight of its centre; knn: DPC-KNN's K (neighbours, capped by the
    number of clusters); max_window: the longest segment in frames; d: D, the share of a
    dynamic frame's tokens given to contextual (DPC-KNN cluster) tokens, 0 officially."""

    families = ("llava_onevision", "llava_video")

    ratio: float = DEFAULT_RATIO
    tau: float = TAU_LOW
    llm_layer: int | None = 18
    llm_ratio: float = 0.5
    beta: float = 0.6
    knn: int = 7
    max_window: int = 1024
    d: float = 0.0
    name = "holitom"
    encoder_layers = (-1,)  # observe the last SigLIP block's attention

    def __post_init__(self):
        check_ratio(self.ratio)
        if not 0.0 <= self.tau <= 1.0:
            raise ConfigError(f"HoliTom tau {self.tau} is outside [0, 1]")
        if not 0.0 <= self.llm_ratio < 1.0:
            raise ConfigError(f"HoliTom llm ratio {self.llm_ratio} is outside [0, 1)")
        if not 0.0 <= self.beta <= 1.0:
            raise ConfigError(f"HoliTom beta {self.beta} is outside [0, 1]")
        if not 0.0 <= self.d < 1.0:
            raise ConfigError(f"HoliTom D {self.d} is outside [0, 1)")
        if self.knn < 1 or self.max_window < 1:
            raise ConfigError("HoliTom knn and max_window must be >= 1")

    @classmethod
    def from_ratio(cls, ratio, cfg, tau: float | None = None, llm_layer: int | None = 18, **kw) -> "HoliTom":
        """At retention `ratio` (RETAIN_RATIO); tau None: `default_tau`; llm_layer None or < 0
        turns the in-LLM merge off."""
        fam = getattr(cfg, "family", "llava_onevision")
        tau = default_tau(ratio, fam) if tau is None else tau
        llm_layer = None if llm_layer is None or llm_layer < 0 else llm_layer
        return cls(ratio=ratio, tau=tau, llm_layer=llm_layer, **kw).check(cfg)

    def check(self, cfg) -> "HoliTom":
        s = cfg.tokens_per_frame
        if self.ratio * s < 1:
            raise ConfigError(f"HoliTom keeps at least one token per frame: ratio {self.ratio} is below 1/{s}")
        if self.llm_layer is not None and not 1 <= self.llm_layer < cfg.text.num_layers:
            raise ConfigError(f"HoliTom llm layer {self.llm_layer} must be in 1..{cfg.text.num_layers - 1} "
                              "(or off: -1)")
        return self

    # hook 1: only observe the last block -------------------------------------------------

    def encoder_merge(self, x, n, colmean, state, last):
        return x, n, {"colmean": colmean}

    # hook 2 --------------------------------------------------------------------------------

    def capacity(self, t0: int, s: int) -> int:
        return temporal.capacity(t0, s, self.ratio)

    def select(self, tokens, n, state, cfg, grid=None):
        t0, s, h = tokens.shape
        attn = lov.pool_frames(state["colmean"][..., None], cfg)[..., 0]  # [T, S]
        x = tokens.astype(jnp.float32)
        seg = temporal.segments(temporal.adjacent_similarity(x), self.tau, self.max_window)
        static, start, length, reduced = seg["static"], seg["start"], seg["length"], seg["reduced"]
        tables = temporal.count_tables(t0, s, self.ratio, self.d)
        dom_table, ctx_table, cl_table = (jnp.asarray(a, jnp.int32) for a in tables)
        n_static = jnp.sum(static, -1, dtype=jnp.int32)
        cluster = jax.vmap(lambda m, v, c, k: dpc_knn.dpc_knn(m, v, c, k, self.knn))
        merge = jax.vmap(lambda m, c, a: dpc_knn.merge_clusters(m, c, a, self.beta))

        # dynamic tokens: each frame's dominant ones by pooled attention, its contextual ones
        # (D > 0) clustered from the rest by DPC-KNN, centre and members as the static ones
        dynamic = ~static
        dom = jax.vmap(sel.topk_mask)(jnp.where(dynamic, attn, -jnp.inf), dom_table[reduced, s - n_static]) & dynamic
        parts_keep, parts_vals = [dom], [x]
        ctx_assign = jnp.full((t0, s), -1, jnp.int32)
        if self.d > 0:
            k_ctx = ctx_table[reduced, s - n_static]
            ctx_centre, ctx_assign, _ = cluster(x, dynamic & ~dom, k_ctx, jnp.minimum(self.knn, k_ctx))
            parts_keep.append(ctx_centre)
            parts_vals.append(merge(x, ctx_centre, ctx_assign))

        # static tokens: the mean over the segment's frames, clustered, on its first frame's row
        f = jnp.arange(t0, dtype=jnp.int32)
        first = (start == f) & (length > 1)  # rows holding a multi-frame segment's static tokens
        member = (start[None, :] == f[:, None]) & first[:, None]  # [row a, frame t]
        mean = jnp.einsum("at,tsh->ash", member.astype(jnp.float32), x, precision=jax.lax.Precision.HIGHEST)
        mean = mean / jnp.maximum(length, 1)[:, None, None].astype(jnp.float32)
        rows_valid = static & first[:, None]
        n_cl = jnp.where(first, cl_table[reduced, n_static], 0)
        centre, assign, _ = cluster(mean, rows_valid, n_cl, jnp.minimum(self.knn, n_cl))
        merged = merge(mean, centre, assign)

        # per frame row: [its segment's cluster tokens | its dominant tokens | its contextual
        # tokens (D > 0)], compacted in order
        keep = jnp.concatenate([centre] + parts_keep, 1)
        vals = jnp.concatenate([merged] + parts_vals, 1).astype(tokens.dtype)
        width = keep.shape[1]
        buf, valid, src, count = sel.compact(keep, vals, self.capacity(t0, s))
        kept = jnp.where(src >= 0, (src // width) * s + src % s, -1)
        token_slot = self._token_slots(src, static, start, assign, ctx_assign, width)
        info = {
            "count": count, "kept_index": kept, "token_slot": token_slot, "importance": attn,
            "segment_start": start, "static": static, "reduced": reduced, "cluster": assign,
            "context_cluster": ctx_assign, "kept_per_frame": jnp.sum(keep, 1),
        }
        return buf, valid, info

    @staticmethod
    def _token_slots(src, static, start, assign, ctx_assign, width):
        """[T0·S] int32: the buffer slot each source token went to (-1: dropped): a dominant
        token its own, a contextual member its centre's, a static one its cluster's (on its
        segment's first row). src indexes rows of `width` = 2·S or 3·S columns (`select`)."""
        t0, s = static.shape
        cap = src.shape[0]
        slot_of = jnp.full((t0 * width,), -1, jnp.int32).at[jnp.where(src >= 0, src, t0 * width)].set(
            jnp.arange(cap, dtype=jnp.int32), mode="drop")
        rows = slot_of.reshape(t0, width)
        own = rows[:, s:2 * s]  # dominant tokens kept in their own slot
        if width > 2 * s:
            via_ctx = jnp.take_along_axis(rows[:, 2 * s:], jnp.maximum(ctx_assign, 0), axis=1)
            own = jnp.where(ctx_assign >= 0, via_ctx, own)
        seg_assign = assign[start]  # [T, S]: the cluster of the token's segment
        via = jnp.take_along_axis(rows[start, :s], jnp.maximum(seg_assign, 0), axis=1)
        return jnp.where(static, jnp.where(seg_assign >= 0, via, -1), own).reshape(-1)

    def select_flops(self, cfg, t0: int, s: int | None = None) -> int:
        """Pooling the attention, the adjacent-frame similarities, the segment means and
        DPC-KNN with its cluster sums on each of the T0 rows (static shapes: every row runs),
        at D > 0 once more per frame for the contextual tokens."""
        g, pg, h = cfg.vision.grid, cfg.pooled_grid, cfg.text.hidden_size
        s = cfg.tokens_per_frame if s is None else s
        pool = 2 * (pg * g * g + pg * pg * g)
        runs = 2 if self.d > 0 else 1
        return pool * t0 + 2 * (t0 - 1) * s * h + 2 * t0 * t0 * s * h + runs * t0 * dpc_knn.flops(s, h)

    # hook 3 --------------------------------------------------------------------------------

    def _keep_table(self, span: int):
        return llm_merge.keep_count_table(span, self.llm_ratio)

    def llm_capacity(self, span: int) -> int:
        return int(self._keep_table(span).max()) if self.llm_layer is not None else span

    def llm_merge(self, h, attn, valid):
        n_keep = jnp.asarray(self._keep_table(h.shape[0]))[valid.sum()]
        return llm_merge.merge_visual_span(h, attn, valid, n_keep)
