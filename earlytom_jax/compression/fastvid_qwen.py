"""FastVID on Qwen2.5-VL, as FastVID's official Qwen2.5-VL port runs it (LunarShen/FastVID
a40a109, `fastvid_qwen25vl/lmms-eval/lmms_eval/models/qwenvlutils/modeling_qwen2_5_vl.py`;
docs/baselines/fastvid.md, section "Qwen2.5-VL"). `FastVID.from_ratio` (hence `--method
fastvid`) builds this class on a Qwen2.5-VL config.

A "frame" is a temporal patch (two input frames) of S = mh·mw merged (2x2) tokens in raster
order; T of them. Signals (the port, l. 192-203, 590-594, 1835-1836):
- DySeg's frame feature g_t: the mean of the temporal patch's S merged tokens;
- ATS's attention: at the encoder's LAST block, per head, the mean of the temporal patch's N
  rotated queries against the mean of each merge unit's 4 rotated keys, a softmax over the S
  merge units of the temporal patch (whatever the block's windows), then the mean over heads
  → [T, S] (in raster order).

The port's pruning differs from its LLaVA-OneVision code (l. 1892-2090):
- budgets per DySeg segment of L temporal patches: R = int(S·r); the segment keeps R·L tokens,
  ctx = max(int(R·L·d), 1) context and sal = R·L - ctx salient ones;
- a one-patch segment: its patch keeps sal salient and ctx context tokens;
- a longer segment is cut again where the neighbour similarity is below `dyseg_ignore`
  (V sub-segments): only the LAST temporal patch of each sub-segment keeps tokens: sub-segment
  i gets sal // V (+1 for the first sal % V) salient tokens; the last sub-segment and every
  p-th before it get the context tokens, ctx split evenly over those ceil(V/p) (the first of
  them in reverse order take the remainder), each at most S // 2, and the salient count is
  capped to S minus that patch's context count;
- context tokens of a patch: density-peak anchors among its non-salient tokens (as on
  LLaVA-OV); every non-salient token of the whole DySeg segment except that patch's own anchors
  (other patches' anchors included) joins its most cosine-similar anchor (anchors in index
  order, first on ties), anchor = w·anchor + (1-w)·mean(joined), w = max(1/(joined+1), beta);
- the kept tokens in sequence order, each with its own 3-D M-RoPE position (the port slices
  `position_ids[:, :, keep_indexs]`: a context token sits at its anchor's position); the text
  after the video keeps its full-sequence positions.

Static shapes: per-patch salient and context counts are int32 arrays computed from the segment
masks; context slots `cmax` per patch (the largest count any segment can give), the merge of
each patch against all T·S tokens masked to its segment. Capacity T·R (every segment keeps at
most R·L). Tie rules as fastvid_prune's (lower index first; density peaks by (density, lower
index) instead of the port's U(0, 1e-6) noise).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from earlytom_jax.compression import fastvid_prune as fp
from earlytom_jax.compression import select as sel
from earlytom_jax.compression.fastvid import FastVID
from earlytom_jax.compression.segments import segment_info
from earlytom_jax.errors import ConfigError
from earlytom_jax.models import family

HIGHEST = jax.lax.Precision.HIGHEST


def port_attention(q: jax.Array, keys: jax.Array, unit: int) -> jax.Array:
    """The port's ATS signal. q [T, heads, D] fp32: each temporal patch's mean rotated query;
    keys [T, N, heads, D] fp32 (rotated, processor order: each merge unit's `unit` patches
    consecutive) → [T, S] fp32, S = N / unit: per head the mean query against each merge
    unit's mean key, softmax over the S units, mean over heads."""
    t, n, h, d = keys.shape
    k = jnp.mean(keys.reshape(t, n // unit, unit, h, d), axis=2)  # [T, S, heads, D]
    logits = jnp.einsum("thd,tshd->ths", q, k, precision=HIGHEST) / jnp.float32(d**0.5)
    return jnp.mean(jax.nn.softmax(logits, axis=-1), axis=1)


def segment_tables(r: int, d: float, t: int) -> tuple[np.ndarray, np.ndarray]:
    """(salient [T+1], context [T+1]) int32 of a segment of L = 0..T temporal patches:
    ctx = max(int(R·L·d), 1), sal = R·L - ctx (the port's host arithmetic, l. 1929-1931)."""
    ctx = np.array([max(int(r * L * d), 1) for L in range(t + 1)], np.int32)
    return np.arange(t + 1, dtype=np.int32) * r - ctx, ctx


def patch_budgets(starts, sub_starts, s: int, r: int, d: float, p: int):
    """Salient and context counts of every temporal patch (the port l. 1920-1989).
    starts, sub_starts [T] bool (DySeg segments; sub-segments, nested in them) → (sal [T],
    ctx [T]) int32."""
    t = starts.shape[0]
    sal_tab, ctx_tab = (jnp.asarray(a) for a in segment_tables(r, d, t))
    info = segment_info(starts, jnp.int32(t))
    L = info.seg_end - info.seg_start + 1
    seg_sal, seg_ctx = sal_tab[L], ctx_tab[L]
    sub_id = jnp.cumsum(sub_starts.astype(jnp.int32)) - 1
    first = sub_id[info.seg_start]
    v = sub_id[info.seg_end] - first + 1  # sub-segments of the segment
    i = sub_id - first  # this patch's sub-segment, in time order
    last = jnp.concatenate([sub_starts[1:], jnp.ones((1,), bool)])  # last patch of its sub-segment
    sal_sub = seg_sal // v + (i < seg_sal % v)
    n_anchor = (v + p - 1) // p
    back = v - 1 - i  # the context counts are laid out from the last sub-segment backwards
    j = back // p
    ctx_sub = jnp.where(back % p == 0, jnp.minimum(seg_ctx // n_anchor + (j < seg_ctx % n_anchor), s // 2), 0)
    sal_multi = jnp.where(ctx_sub == 0, jnp.minimum(sal_sub, s), jnp.minimum(sal_sub, s - ctx_sub))
    single = L == 1
    sal = jnp.where(single, seg_sal, jnp.where(last, sal_multi, 0))
    ctx = jnp.where(single, seg_ctx, jnp.where(last, ctx_sub, 0))
    return sal.astype(jnp.int32), ctx.astype(jnp.int32)


def density_scores_masked(x: jax.Array, filt: jax.Array) -> jax.Array:
    """Density-peak scores among each patch's filtered tokens. x [T, S, H] fp32, filt [T, S]
    bool → [T, S] fp32 (-inf where not filtered): dist = euclidean / sqrt(H) between filtered
    tokens; density = exp(-mean of the 4 smallest dist², self included: the port's top-4; with
    fewer than 4 filtered tokens, where the port's top-k fails, the mean over those there are);
    score = density · (distance to the nearest denser filtered token, or the largest distance
    between filtered tokens)."""
    _, s, h = x.shape
    sq = jnp.sum(x * x, axis=-1)
    dot = jnp.einsum("tih,tjh->tij", x, x, precision=HIGHEST)
    dist = jnp.sqrt(jnp.maximum(sq[:, :, None] + sq[:, None, :] - 2.0 * dot, 0.0)) / jnp.float32(h**0.5)
    pair = filt[:, :, None] & filt[:, None, :]
    near = -jax.lax.top_k(-jnp.where(pair, dist, jnp.inf), min(4, s))[0]
    there = jnp.isfinite(near)
    mean_sq = jnp.sum(jnp.where(there, near * near, 0.0), -1) / jnp.maximum(jnp.sum(there, -1), 1)
    density = jnp.exp(-mean_sq)
    idx = jnp.arange(s)
    denser = (density[:, None, :] > density[:, :, None]) | (
        (density[:, None, :] == density[:, :, None]) & (idx[None, :] < idx[:, None])[None])
    dmax = jnp.max(jnp.where(pair, dist, -jnp.inf), axis=(1, 2))[:, None, None]
    nearest_denser = jnp.min(jnp.where(denser & pair, dist, dmax), axis=-1)
    return jnp.where(filt, nearest_denser * density, -jnp.inf)


def merge_anchors(x, anchor, salient, ctx, seg_id, cmax: int, beta: float):
    """DTM as the port runs it. x [T, S, H] fp32; anchor, salient [T, S] bool; ctx [T] int32
    (anchors of each patch); seg_id [T]. Each patch with anchors merges every non-salient token
    of its DySeg segment except its own anchors. → (merged [T, cmax, H], slot_valid [T, cmax],
    anchor index [T, cmax] (raster, in index order))."""
    t, s, h = x.shape
    at = jnp.argsort(~anchor, axis=1, stable=True)[:, :cmax]  # anchors first, in index order
    slot_valid = jnp.arange(cmax)[None, :] < ctx[:, None]
    anchors = jnp.take_along_axis(x, at[..., None], axis=1)  # [T, cmax, H]
    xn = x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
    an = jnp.take_along_axis(xn, at[..., None], axis=1)
    flat, flatn = x.reshape(t * s, h), xn.reshape(t * s, h)
    frame_of = jnp.repeat(jnp.arange(t), s)  # [T·S]
    own_anchor = (frame_of[None, :] == jnp.arange(t)[:, None]) & anchor.reshape(t * s)[None, :]
    member = ((seg_id[frame_of][None, :] == seg_id[:, None]) & ~salient.reshape(t * s)[None, :] & ~own_anchor
              & (ctx > 0)[:, None])  # [T, T·S]
    sim = jnp.einsum("uh,akh->auk", flatn, an, precision=HIGHEST)
    assign = jnp.argmax(jnp.where(slot_valid[:, None, :], sim, -jnp.inf), axis=-1)  # [T, T·S]
    onehot = ((assign[..., None] == jnp.arange(cmax)) & member[..., None]).astype(jnp.float32)
    joined = jnp.sum(onehot, axis=1)  # [T, cmax]
    agg = jnp.einsum("auk,uh->akh", onehot, flat, precision=HIGHEST) / jnp.maximum(joined, 1.0)[..., None]
    w = jnp.maximum(1.0 / (joined + 1.0), jnp.float32(beta))[..., None]
    return w * anchors + (1.0 - w) * agg, slot_valid, at


@dataclasses.dataclass(frozen=True)
class FastVIDQwen(FastVID):
    """FastVID on Qwen2.5-VL (module docstring). ratio: the port's retention ratio r (R =
    int(S·r) per temporal patch of S merged tokens, at most T·R in all); tau: DySeg's threshold
    (the port's script: 0.84); dyseg_ignore: the threshold that cuts a segment into
    sub-segments (0.95); dyseg_c, d, p, beta as on LLaVA-OV (8, 0.4, 4, 0.6, the port's
    script). Kept tokens always keep their 3-D positions (keep_positions must stay True)."""

    tau: float = 0.84
    dyseg_ignore: float = 0.95
    families = ("qwen2_5_vl",)
    encoder_layers = (-1,)  # the last block: its queries and keys give ATS's signal
    encoder_keys = "heads"
    select_flops_stats = False  # the count does not depend on what ran

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.dyseg_ignore <= 1.0:
            raise ConfigError(f"FastVID dyseg_ignore {self.dyseg_ignore} must be in [0, 1]")
        if not self.keep_positions:
            raise ConfigError("FastVID on Qwen2.5-VL keeps each kept token's 3-D position (the port's); "
                              "keep_positions=False is for LLaVA-OneVision")
        if getattr(self, "signals", "auto") == "head":  # LLaVA-OV's SigLIP head; the port's signals here
            raise ConfigError("FastVID signals='head' (the original SigLIP's head) is for LLaVA-OneVision; "
                              "Qwen2.5-VL uses its port's signals")

    @classmethod
    def from_ratio(cls, ratio, cfg, **kw) -> "FastVIDQwen":
        return cls(ratio=ratio, **kw).check(cfg)

    def check(self, cfg) -> "FastVIDQwen":
        """The tokens per temporal patch depend on the clip's frame size: `budget` checks them."""
        if not family.is_qwen(cfg):
            raise ConfigError("FastVIDQwen runs on Qwen2.5-VL; build FastVID for other families")
        return self

    def budget(self, t0: int, s: int) -> tuple[int, int]:
        """(R, cmax) for t0 temporal patches of s merged tokens; ConfigError when R = 0 or a
        one-patch segment would keep no salient token (the port fails on both)."""
        r = int(s * self.ratio)
        sal, ctx = segment_tables(r, self.d, t0)
        if r < 1 or sal[1] < 1:
            raise ConfigError(f"FastVID ratio {self.ratio} keeps {r} of a temporal patch's {s} merged tokens: a "
                              f"one-patch segment gets no salient token (R - max(int(R·d), 1) < 1); use a larger ratio")
        longer = min(s // 2, int(ctx[2:].max())) if t0 > 1 else 0
        return r, max(int(ctx[1]), longer)

    def capacity(self, t0: int, s: int) -> int:
        return t0 * self.budget(t0, s)[0]

    # hook 1: only observe the last block --------------------------------------------------

    def encoder_merge(self, x, n, colmean, state, last, keys=None, queries=None):
        return x, n, {"keys": keys, "query_mean": jnp.mean(queries, axis=1)}  # [T, heads, D]

    # hook 2 --------------------------------------------------------------------------------

    def select(self, tokens, n, state, cfg, grid=None):
        if grid is None or not family.is_qwen(cfg):
            raise ConfigError("FastVIDQwen runs on Qwen2.5-VL only")
        t0, s, h = tokens.shape
        r, cmax = self.budget(t0, s)
        x = tokens.astype(jnp.float32)
        imp = port_attention(state["query_mean"], state["keys"], cfg.vision.merge_unit)  # [T, S]
        g = jnp.mean(x, axis=1)
        starts = fp.dyseg(g, self.dyseg_c, self.tau)
        gn = g / jnp.sqrt(jnp.sum(g * g, axis=1, keepdims=True))
        below = jnp.sum(gn[:-1] * gn[1:], axis=1) < jnp.float32(self.dyseg_ignore)
        sub_starts = starts | jnp.concatenate([jnp.zeros((1,), bool), below])
        sal, ctx = patch_budgets(starts, sub_starts, s, r, self.d, self.p)
        salient = fp.rank_ascending(-imp) < sal[:, None]
        filt = ~salient
        score = density_scores_masked(x, filt)
        anchor = filt & (fp.rank_ascending(-score) < ctx[:, None])
        seg_id = segment_info(starts, jnp.int32(t0)).seg_id
        merged, slot_valid, at = merge_anchors(x, anchor, salient, ctx, seg_id, cmax, self.beta)
        frame = jnp.arange(t0)[:, None]
        x = x.at[frame, jnp.where(slot_valid, at, s)].set(merged, mode="drop")
        keep = salient | anchor
        buf, valid, src, count = sel.compact(keep, x.astype(tokens.dtype), t0 * r)
        info = {"count": count, "kept_index": src, "segment_starts": starts, "sub_segment_starts": sub_starts,
                "salient_per_frame": sal, "context_per_frame": ctx, "kept_per_frame": keep.sum(1),
                "importance": imp}
        return buf, valid, info

    def select_flops(self, cfg, t0: int, s: int | None = None, stats: dict | None = None) -> int:
        """The signal (the mean query and the merge units' mean keys, one query row against S
        keys per head), the frame means and DySeg's similarities, every patch's S x S distance
        matrix and density scores, and DTM as executed: every patch's cmax anchor slots against
        all T·S tokens (similarities and sums, masked to the segment)."""
        if s is None:
            raise ValueError("on Qwen2.5-VL the tokens per temporal patch depend on the frame size: pass s = mh·mw")
        c, h, n = cfg.vision.hidden_size, cfg.text.hidden_size, s * cfg.vision.merge_unit
        _, cmax = self.budget(t0, s)
        signal = 2 * n * c + 2 * s * c
        per_patch = signal + s * h + 6 * h + 2 * s * s * h + 3 * s * h + 8 * s * s
        return int(t0 * per_patch + 4 * t0 * t0 * s * cmax * h + 3 * t0 * cmax * h)
