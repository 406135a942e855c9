"""PruneVid (Huang et al., ACL 2025 Findings; Visual-AI/PruneVid, commit b12600c6): merging of
the pooled video tokens at hook 2, then a question-guided drop inside the LLM (hook 3). docs/baselines/prunevid.md has the settings, their sources and the
differences from the original.

Hook 2 (`select`), on the pooled tokens [T, S, H] (`prunevid_ops`):
1. temporal segments: DPC-KNN over the frames' mean tokens (max(1, int(T · temporal_segment_ratio))
   clusters, min(k, T) neighbours), labels refined into runs of >= 2 frames (`refine_labels`);
2. per segment (window), a position is static when its tokens' mean pairwise cosine
   similarity over the window's frames exceeds `threshold`; static positions are averaged
   over the window's frames (one static set per window), dynamic ones stay per frame;
3. every set of more than 14 tokens is clustered by DPC-KNN (int(n · cluster_ratio) clusters,
   k neighbours) into its clusters' means; a set of at most 14 stays as it is.
Output order: per window its static tokens, then each frame's dynamic tokens; clusters in
the order of their centres' scores, unclustered tokens in raster order.

info: "count", "kept_index" (a representative t·S + s per slot: the cluster's centre, a static
token's in the window's first frame), "token_slot" (the slot each source token went to),
"group" (per slot: its frame t for a dynamic token, T + w for window w's static set, -1 padding:
the groups the in-LLM stage selects in), "segment" (window of each frame), "static" [T, S].

Hook 3 (`PruneVid`, registered "prunevid"): before LLM layer K = llm_layer (the official
selected_layer + 1), layer K-1's attention of the question rows (every valid slot after the visual
span; `llm_query` "suffix_rows") to each visual slot, the maximum over heads then over rows
(`llm_reduce` "max"); per group of hook 2's "group" (`llm_span_info`) the int(size ·
retention_ratio) highest are kept (`keep_in_groups`), the newline always; the KV caches of layers
0..K-1 drop the others too (`llm_prune_caches`); the kept slots keep their positions. The merged
count is known on device only, so the LLM prefill runs on the smallest of 8 evenly spaced span
lengths that holds it (`llm_span_buckets`, `llm_stages.llm_prefill_bucketed`), not on the whole
static buffer.

Budget (`PruneVid.from_ratio`, the one place): retention_ratio = r / cluster_ratio, so layers
K.. see at most about r · T0 · 196 visual tokens; r > cluster_ratio is a ConfigError.
"prunevid_stage1" (`PruneVidMerge`, no ratio) stays registered as the merging-only ablation.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from earlytom_jax.compression import prunevid_ops as ops
from earlytom_jax.compression.base import NoHooks, frame_buckets
from earlytom_jax.compression.registration import register
from earlytom_jax.config import LlavaOVConfig
from earlytom_jax.errors import ConfigError

SMALL_SET = 14  # sets of at most this many tokens are not clustered (official constant)


@functools.lru_cache(maxsize=None)
def cluster_table(s: int, cluster_ratio: float) -> tuple[int, ...]:
    """Clusters a set of n tokens becomes, for n = 0..s: int(n · cluster_ratio) (Python
    float64, as the official code) when n > 14, else n."""
    return tuple(int(n * cluster_ratio) if n > SMALL_SET else n for n in range(s + 1))


@functools.lru_cache(maxsize=None)
def merged_capacity(t0: int, s: int, cluster_ratio: float) -> int:
    """The most tokens the merging can give for t0 frames of s tokens: windows have >= 2 frames
    (one when t0 = 1) and a window of W frames gives at most max over the static count m of
    c(m) + W · c(s - m); the best split of t0 into windows (dynamic programming)."""
    c = cluster_table(s, cluster_ratio)
    most = [max(c[m] + w * c[s - m] for m in range(s + 1)) for w in range(t0 + 1)]
    best = [0] + [-1] * t0
    for t in range(1, t0 + 1):
        for w in range(1 if t0 == 1 else 2, t + 1):
            if best[t - w] >= 0:
                best[t] = max(best[t], best[t - w] + most[w])
    return best[t0]


def _sets(x, valid, table, k: int):
    """Cluster each set: x [N, S, H], valid [N, S] → (means [N, S, H] by cluster rank, count
    [N] clusters, assign [N, S] cluster of each token, rep [N, S] position of each cluster's
    representative, -1 where none)."""
    _, s, _ = x.shape
    size = valid.sum(1)
    count = jnp.asarray(table)[size]
    dpc, rank = jax.vmap(lambda a, b, c: ops.dpc_knn(a, b, c, k))(x, valid, count)
    plain = jnp.cumsum(valid, axis=1) - 1  # no clustering: each token its own, raster order
    big = (size > SMALL_SET)[:, None]
    assign = jnp.where(valid, jnp.where(big, dpc, plain), s).astype(jnp.int32)
    pos = jnp.arange(s, dtype=jnp.int32)
    is_rep = valid & (~big | (rank < count[:, None]))  # a cluster's centre, or the token itself
    rep = jax.vmap(lambda a, m: jnp.full((s,), -1, jnp.int32).at[jnp.where(m, a, s)].set(pos, mode="drop"))(assign, is_rep)

    def means(xs, a):
        tot = jax.ops.segment_sum(xs.astype(jnp.float32), a, num_segments=s)
        num = jax.ops.segment_sum(jnp.ones((s,), jnp.float32), a, num_segments=s)
        return tot / jnp.maximum(num, 1.0)[:, None]

    return jax.vmap(means)(x, assign), count, assign, rep


@functools.lru_cache(maxsize=None)
def quota_table(v: int, retention_ratio: float) -> tuple[int, ...]:
    """Slots a group of n keeps, for n = 0..v: int(n · retention_ratio) (Python float64, as the
    official `int(size * alpha)`)."""
    return tuple(int(n * retention_ratio) for n in range(v + 1))


@functools.lru_cache(maxsize=None)
def kept_capacity(tokens: int, retention_ratio: float) -> int:
    """The most grouped slots `keep_in_groups` keeps when the groups hold at most `tokens` slots in
    all: at most max over n of quota(n) / n per slot (exact integer arithmetic; α · tokens
    rounded down unless a float product rounds up)."""
    q = quota_table(tokens, retention_ratio)
    return max(((q[n] * tokens) // n for n in range(1, tokens + 1)), default=0)


def keep_in_groups(score, group, valid, retention_ratio: float):
    """The in-LLM selection (`VTPWindowCache.process_attention`): score [V] fp32 (attention to
    each visual slot), group int32 [V] (hook 2's "group"; -1: a slot outside every group, e.g.
    the newline, kept when valid), valid bool [V] → keep bool [V]: in each group the
    int(size · retention_ratio) slots of highest score (ties: lower index). One sort by (group,
    score descending, index); a slot's rank in its group is its distance to the group's start."""
    v = score.shape[0]
    grouped = valid & (group >= 0)
    key = jnp.where(grouped, group, jnp.iinfo(jnp.int32).max)  # slots outside every group: last, one block
    by_score = jnp.argsort(0.0 - score.astype(jnp.float32), stable=True)  # 0 - s: no -0.0
    order = by_score[jnp.argsort(key[by_score], stable=True)]
    sorted_key = key[order]
    first = jnp.searchsorted(sorted_key, sorted_key, side="left")
    size = jnp.searchsorted(sorted_key, sorted_key, side="right") - first
    quota = jnp.asarray(quota_table(v, retention_ratio), jnp.int32)[size]
    kept_sorted = jnp.arange(v) - first < quota
    keep = jnp.zeros((v,), bool).at[order].set(kept_sorted)
    return valid & (~grouped | keep)


@register(name="prunevid_stage1", label="PruneVid (merging only)",
          settings=("temporal_segment_ratio", "k", "threshold", "cluster_ratio"), takes_ratio=False)
@dataclasses.dataclass(frozen=True)
class PruneVidMerge(NoHooks):
    """PruneVid's hook-2 merging (module docstring); defaults are the official ones
    (scripts/eval.sh at b12600c6; k: `merge_frames_dynamic(..., k=7)`)."""

    temporal_segment_ratio: float = 0.25
    k: int = 7
    threshold: float = 0.8
    cluster_ratio: float = 0.5
    name = "prunevid_stage1"
    span_buckets = 8  # the merged count is known on device only: the LLM runs on 8 evenly spaced span lengths

    def __post_init__(self):
        if not 0.0 < self.temporal_segment_ratio <= 1.0:
            raise ConfigError(f"PruneVid temporal_segment_ratio {self.temporal_segment_ratio} is outside (0, 1]")
        if not 0.0 < self.cluster_ratio <= 1.0:
            raise ConfigError(f"PruneVid cluster_ratio {self.cluster_ratio} is outside (0, 1]")
        if not 1 <= int(self.k) <= SMALL_SET + 1:
            raise ConfigError(f"PruneVid k {self.k} must be in 1..{SMALL_SET + 1} (the smallest set it clusters)")

    def check(self, cfg: LlavaOVConfig):
        return self

    def capacity(self, t0: int, s: int) -> int:
        return merged_capacity(t0, s, self.cluster_ratio)

    def llm_span_buckets(self, span0: int) -> tuple[int, ...]:
        return frame_buckets(span0, self.span_buckets)

    def select(self, tokens, n, state, cfg, grid=None):
        t, s, h = tokens.shape
        x = tokens.astype(jnp.float32)
        n_win = max(1, t // 2)  # windows have >= 2 frames (`refine_labels`)
        n_seg = max(1, int(t * self.temporal_segment_ratio))
        labels, _ = ops.dpc_knn(x.mean(1), jnp.ones((t,), bool), n_seg, min(self.k, t))
        wid, _ = ops.window_ids(ops.refine_labels(labels))
        static = ops.static_mask(x, wid, n_win, self.threshold)  # [Wc, S]
        member = jnp.arange(n_win)[:, None] == wid[None, :]  # [Wc, T]
        size = member.sum(1)
        window_mean = jnp.einsum("wt,tsh->wsh", member.astype(jnp.float32), x) / jnp.maximum(size, 1)[:, None, None]
        frame_static = static[wid]  # [T, S]
        table = cluster_table(s, self.cluster_ratio)
        sets_x = jnp.concatenate([window_mean, x], 0)
        sets_v = jnp.concatenate([static & (size > 0)[:, None], ~frame_static], 0)
        means, count, assign, rep = _sets(sets_x, sets_v, table, self.k)

        cs, cd = count[:n_win], count[n_win:][jnp.argmax(member, axis=1)] * (size > 0)  # per window
        total = cs + size * cd
        offset = jnp.cumsum(total) - total
        first = jnp.cumsum(size) - size
        j = jnp.arange(t) - first[wid]  # frame's index inside its window
        base = jnp.concatenate([offset, offset[wid] + cs[wid] + j * cd[wid]])  # [Wc + T]
        cap = self.capacity(t, s)
        r = jnp.arange(s)
        dest = jnp.where(r[None, :] < count[:, None], base[:, None] + r[None, :], cap)  # [Wc + T, S]
        buf = jnp.zeros((cap, h), tokens.dtype).at[dest.reshape(-1)].set(
            means.reshape(-1, h).astype(tokens.dtype), mode="drop")
        src_frame = jnp.concatenate([first, jnp.arange(t)])
        kept = jnp.where(rep >= 0, src_frame[:, None] * s + rep, -1)
        kept_index = jnp.full((cap,), -1, jnp.int32).at[dest.reshape(-1)].set(kept.reshape(-1), mode="drop")
        gid = jnp.concatenate([t + jnp.arange(n_win), jnp.arange(t)]).astype(jnp.int32)
        group = jnp.full((cap,), -1, jnp.int32).at[dest.reshape(-1)].set(jnp.repeat(gid, s), mode="drop")
        slot_static = jnp.take_along_axis(dest[:n_win][wid], jnp.minimum(assign[:n_win][wid], s - 1), axis=1)  # [T, S]
        slot_dynamic = jnp.take_along_axis(dest[n_win:], jnp.minimum(assign[n_win:], s - 1), axis=1)
        token_slot = jnp.where(frame_static, slot_static, slot_dynamic)
        n_valid = total.sum()
        info = {
            "count": n_valid.astype(jnp.int32),
            "kept_index": kept_index,
            "token_slot": jnp.where(token_slot < cap, token_slot, -1).reshape(-1).astype(jnp.int32),
            "group": group,
            "segment": wid,
            "static": frame_static,
        }
        return buf, jnp.arange(cap) < n_valid, info

    def select_flops(self, cfg: LlavaOVConfig, t0: int, s: int | None = None) -> int:
        """What `select` computes: the frames' means and the frame DPC-KNN (T² distances), the
        cosine similarity of every position over every frame pair (T²·S·H), the window means,
        and a DPC-KNN (S² distances of H) with its cluster means for each of the T // 2
        window (static) and T frame (dynamic) sets, whatever their sizes (static shapes)."""
        s = cfg.tokens_per_frame if s is None else s
        h = cfg.text.hidden_size
        sets = max(1, t0 // 2) + t0
        frames = t0 * s * h + 2 * t0 * t0 * h
        similarity = 3 * t0 * s * h + 2 * t0 * t0 * s * h + 2 * max(1, t0 // 2) * t0 * s * h
        clustering = sets * (2 * s * s * h + 2 * s * h)
        return int(frames + similarity + clustering)


@register(name="prunevid", label="PruneVid",
          settings=("temporal_segment_ratio", "k", "threshold", "cluster_ratio", "llm_layer"))
@dataclasses.dataclass(frozen=True)
class PruneVid(PruneVidMerge):
    """The whole method: the merging (hook 2, `PruneVidMerge`) and the in-LLM selection (hook 3).

    llm_layer: K, the first LLM layer that sees only the kept tokens: the official
    `selected_layer` + 1 (its attention is layer K - 1's); 11 = the official selected_layer 10 of
    PLLaVA-7B's 32 layers, kept where it fits the depth, scaled where not (`defaults.BUILT_IN`).
    retention_ratio: α, each group keeps int(size · α) (official 0.4)."""

    llm_layer: int = 11
    retention_ratio: float = 0.4
    name = "prunevid"
    llm_query = "suffix_rows"  # the text after the video (its newline)
    llm_reduce = "max"  # max over heads, then over the rows
    llm_prune_caches = True  # layers 0..K-1 drop them too
    llm_span_info = ("group",)

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 < self.retention_ratio <= 1.0:
            raise ConfigError(f"PruneVid retention ratio {self.retention_ratio} is outside (0, 1]")

    @classmethod
    def from_ratio(cls, ratio, cfg, llm_layer: int = 11, cluster_ratio: float = 0.5, **kw) -> "PruneVid":
        """The one place `--ratio` r is converted: α = r / cluster_ratio (r = 0.2: the official
        α = 0.4), so that layers K.. see at most about r · T0 · 196 visual tokens (every set
        clustered to cluster_ratio of its tokens, then α of each group kept); r > cluster_ratio
        is a ConfigError."""
        if ratio > cluster_ratio:
            raise ConfigError(f"PruneVid keeps at most ratio {cluster_ratio} (its cluster_ratio), not {ratio}")
        return cls(llm_layer=int(llm_layer), cluster_ratio=cluster_ratio,
                   retention_ratio=ratio / cluster_ratio, **kw).check(cfg)

    def check(self, cfg: LlavaOVConfig) -> "PruneVid":
        if not 1 <= self.llm_layer < cfg.text.num_layers:
            raise ConfigError(f"PruneVid llm layer {self.llm_layer} must be in 1..{cfg.text.num_layers - 1}")
        return self

    def llm_capacity(self, span: int) -> int:
        # every span slot but one (LLaVA-OV's newline, kept) is grouped or padding
        return min(span, kept_capacity(span - 1, self.retention_ratio) + 1)

    def llm_stage_merge(self, stage, h, attn, valid, count0, span0, span_info):
        return h, keep_in_groups(attn, span_info["group"], valid, self.retention_ratio)
