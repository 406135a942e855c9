"""Hook 3 inside the LLM prefill (compression/base.py): the layers up to each stage layer, the
stage's attention signal, the method's keep mask over the visual span, and the span compacted
to the stage's static capacity; the KV caches as one `decoding.CacheGroup` per layer range.
`llm_prefill_bucketed` runs it on the smallest span bucket that holds the valid visual slots,
for a method whose hook 2 fills its static buffer to a count known only on device."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from earlytom_jax.config import ModelConfig
from earlytom_jax.decoding import FULL, CacheGroup, _alloc
from earlytom_jax.models import family
from earlytom_jax.models.attention import dense as attn_dense
from earlytom_jax.models.attention import last_row_probs
from earlytom_jax.models.qwen2 import rms_norm

def _query_rows(method, L: int, b: int) -> slice:
    """The query slots of hook 3's signal (`llm_query`): the last slot, or every slot after the span."""
    if method.llm_query == "last_row":
        return slice(L - 1, L)
    if method.llm_query == "suffix_rows":
        return slice(b, L)
    raise ValueError(f"unknown llm_query {method.llm_query!r}")


def _rows_probs(q, k, valid, rows: slice, causal: bool, reduce: str = "mean"):
    """Attention probabilities [L] fp32 of the query rows `rows` (q [1, R, Hq, D] for those rows,
    k [1, L, Hk, D]), softmax over valid keys (and keys up to the row when causal), averaged
    over heads, then over the valid rows (`reduce` "max": the maximum over heads, then over the
    valid rows; `llm_reduce`)."""
    L = k.shape[1]
    if reduce not in ("mean", "max"):
        raise ValueError(f"unknown llm_reduce {reduce!r}")
    if rows == slice(L - 1, L) and reduce == "mean":
        return last_row_probs(q, k, valid)[0]
    s = attn_dense.scores(q, k, q.shape[-1] ** -0.5)  # [1, Hk, G, R, L]
    row_idx = jnp.arange(rows.start, rows.stop)
    ok = valid[:, None, :] & (jnp.arange(L)[None, None, :] <= row_idx[None, :, None] if causal else True)
    s = jnp.where(ok[:, None, None], s, attn_dense.NEG)
    if reduce == "max":  # probabilities are >= 0: an invalid row contributes 0
        return jnp.where(valid[0, rows][:, None], jax.nn.softmax(s, -1).max(axis=(1, 2))[0], 0.0).max(0)
    p = jax.nn.softmax(s, -1).mean(axis=(1, 2))[0]  # [R, L]
    row_valid = valid[0, rows].astype(jnp.float32)
    return (p * row_valid[:, None]).sum(0) / jnp.maximum(row_valid.sum(), 1.0)


def _stage_signal(text, h, positions, valid, start: int, k_layer: int, b: int, method):
    """Layers [start, k_layer) and the attention signal of the stage at k_layer.
    → (h, ks, vs [k_layer - start, ...], attn [L] fp32)."""
    L = h.shape[1]
    rows = _query_rows(method, L, b)
    cos, sin = text.rope(positions)
    if method.llm_signal_layer == "before":
        h, ks, vs = text.run_layers(h, positions, valid, start, k_layer - 1)
        causal = not method.llm_noncausal
        h, k, v, q = text.layer(k_layer - 1)(h, cos, sin, valid, causal=causal)
        ks, vs = jnp.concatenate([ks, k[None]], 0), jnp.concatenate([vs, v[None]], 0)
        return h, ks, vs, _rows_probs(q[:, rows], k, valid, rows, causal, getattr(method, "llm_reduce", "mean"))
    if method.llm_signal_layer == "at":
        h, ks, vs = text.run_layers(h, positions, valid, start, k_layer)
        lay = text.layer(k_layer)
        x = rms_norm(h, lay.ln1[...], lay.cfg.rms_norm_eps)
        k = lay.qkv(x, cos, sin)[1]
        q = lay.qkv(x[:, rows], cos[:, rows], sin[:, rows])[0]  # only the rows the signal reads
        return h, ks, vs, _rows_probs(q, k, valid, rows, True, getattr(method, "llm_reduce", "mean"))
    raise ValueError(f"unknown llm_signal_layer {method.llm_signal_layer!r}")


def llm_span_info(info, method, span0: int, cfg: ModelConfig):
    """Hook 2's `info` arrays that the method's hook 3 names (`llm_span_info`), one entry per slot
    of the visual span: each [Vc] array padded at the end with -1 to span0 (LLaVA-OV's newline sits
    at slot `count`, in hook 2's own -1 padding). None when the method names none."""
    names = tuple(getattr(method, "llm_span_info", ()))
    if not names:
        return None
    if getattr(cfg, "grid_newlines", False):
        raise ValueError("hook 2's per-slot info does not follow LLaVA-Video's grid-newline layout")
    return {k: jnp.pad(info[k], (0, span0 - info[k].shape[0]), constant_values=-1) for k in names}


def llm_prefill(params, h, valid, positions, span: tuple[int, int], cfg: ModelConfig, max_new: int, method=FULL,
                span_info=None):
    """Prefill. h [1, L, H]; span = (start, stop) static slots of the visual buffer; span_info:
    `llm_span_info`'s arrays [span0] for a method that names some (passed to its stage merge,
    following the slots as earlier stages compact the span).

    Hook 3 (compression/base.py): for each stage layer K_i of `method.llm_layers`, the layers up
    to K_i, the stage's attention signal, the method's keep mask over the current span, and the
    span compacted to the stage's capacity (kept slots first, in order). Positions stay the
    slots' own unless the method renumbers (1-D positions only).

    → (logits [V] fp32 of the last slot, caches tuple[CacheGroup] (one per layer range), next
    position [1], info). info: {} without stages; else "llm_kept" (the final kept count) and
    "llm_keep_mask" (one stage: its keep mask over the span; several: the span slots that survive
    every stage), and with several stages "llm_kept_stages" int32 [n] and "llm_stage_index" int32
    [n, span0] (the span slots kept after each stage, ascending, -1 padding); with
    `llm_query` "suffix_rows" also "llm_query_rows" (valid query rows) and "llm_query_slots".
    """
    text = family.bind(cfg, params).text
    nl = cfg.text.num_layers
    stages = tuple(method.llm_layers)
    a, b = span
    span0 = b - a
    count0 = valid[0, a:b].sum()
    renumber = method.llm_renumber and positions.ndim == 2
    orig = jnp.arange(span0, dtype=jnp.int32)  # each current span slot's slot in the first span
    alive = valid[0, a:b]  # over the first span: still in the sequence
    groups, kept, index = [], [], []
    start, shift, pos, h_cur, v_cur = 0, jnp.asarray(0, jnp.int32), positions, h, valid
    if getattr(method, "llm_span_info", ()) and span_info is None:
        raise ValueError(f"{type(method).__name__}'s hook 3 needs hook 2's info (span_info, `llm_span_info`)")
    for i, k_layer in enumerate(stages):
        h_cur, ks, vs, attn = _stage_signal(text, h_cur, pos, v_cur, start, k_layer, b, method)
        groups.append((ks, vs, v_cur, shift, orig))
        extra = {"span_info": {k: x[orig] for k, x in span_info.items()}} if span_info else {}
        h_span, keep = method.llm_stage_merge(i, h_cur[0, a:b], attn[a:b], v_cur[0, a:b], count0, span0, **extra)
        cap = method.llm_stage_capacity(i, span0)
        order = jnp.argsort(~keep, stable=True)[:cap]  # kept slots first, in order
        span_pos = pos[0, a:b][order]
        after_pos = pos[0, b:]
        if renumber:  # each survivor moves back by the valid slots dropped before it
            gone = v_cur[0, a:b] & ~keep
            dropped, total = jnp.cumsum(gone, dtype=jnp.int32), gone.sum(dtype=jnp.int32)
            span_pos, after_pos = span_pos - dropped[order], after_pos - total
            shift = shift + total
        h_cur = jnp.concatenate([h_cur[0, :a], h_span[order], h_cur[0, b:]], 0)[None]
        v_cur = jnp.concatenate([v_cur[0, :a], keep[order], v_cur[0, b:]])[None]
        pos = jnp.concatenate([pos[0, :a], span_pos, after_pos])[None]
        alive = alive & jnp.zeros((span0,), bool).at[orig].set(keep)
        orig = orig[order]
        kept.append(keep.sum())
        index.append(jnp.full((span0,), -1, jnp.int32).at[: order.shape[0]].set(jnp.where(keep[order], orig, -1)))
        b, start = a + cap, k_layer
    h_cur, ks, vs = text.run_layers(h_cur, pos, v_cur, start, nl)
    groups.append((ks, vs, v_cur, shift, orig))
    caches = []
    for j, (ks, vs, gv, gs, go) in enumerate(groups):
        if method.llm_prune_caches and j < len(groups) - 1:  # later stages' drops, in this group's layout
            gv = gv.at[0, a:a + go.shape[0]].set(gv[0, a:a + go.shape[0]] & alive[go])
        caches.append(_alloc(ks, vs, gv, max_new, gs))
    info = {}
    if stages:
        info = {"llm_kept": kept[-1], "llm_keep_mask": keep if len(stages) == 1 else alive}
        if len(stages) > 1:
            info.update(llm_kept_stages=jnp.stack(kept), llm_stage_index=jnp.stack(index))
        if method.llm_query == "suffix_rows":
            info.update(llm_query_rows=valid[0, span[1]:].sum(), llm_query_slots=jnp.asarray(h.shape[1] - span[1]))
    logits = text.logits(h_cur[0, -1])
    next_pos = positions.reshape(positions.shape[:2] + (-1,))[:, -1, 0] + 1  # the last slot is text
    return logits, tuple(caches), next_pos, info


def llm_prefill_bucketed(params, h, valid, positions, span: tuple[int, int], cfg: ModelConfig, max_new: int,
                         method=FULL, span_info=None, batch_axis=None):
    """`llm_prefill` on the smallest of the method's span buckets (`llm_span_buckets(span0)`) that
    holds every valid slot of the visual span: the span's slots from the bucket on are all invalid
    (never attended, no position), so they are left out of the sequence, and the outputs are padded
    back to the unbucketed layout (invalid cache slots inserted after each group's span; stats'
    per-slot arrays padded at the end), so decoding and the stats see one layout whatever the
    bucket. The bucket is chosen on device (`lax.switch`: every bucket is a branch of one program);
    under `vmap` over `batch_axis` the batch shares the bucket of its largest need.

    → `llm_prefill`'s outputs, info also holding "llm_span_bucket" (int32: the span slots run)
    when the method has buckets."""
    a, b = span
    span0 = b - a
    buckets = tuple(getattr(method, "llm_span_buckets", lambda s: (s,))(span0))
    if buckets == (span0,):
        return llm_prefill(params, h, valid, positions, span, cfg, max_new, method, span_info)
    if buckets[-1] != span0 or any(x >= y for x, y in zip(buckets, buckets[1:])):
        raise ValueError(f"span buckets {buckets} must ascend to the span's {span0} slots")
    need = jnp.max(jnp.where(valid[0, a:b], jnp.arange(1, span0 + 1, dtype=jnp.int32), 0))
    if batch_axis is not None:
        need = jax.lax.pmax(need, batch_axis)
    caps = [span0] + [method.llm_stage_capacity(i, span0) for i in range(len(tuple(method.llm_layers)))]

    def branch(bj: int):
        def run(h, valid, positions, span_info):
            def cut(x):
                return jnp.concatenate([x[:, : a + bj], x[:, b:]], 1)

            info_j = None if span_info is None else {k: x[:bj] for k, x in span_info.items()}
            logits, caches, next_pos, info = llm_prefill(params, cut(h), cut(valid), cut(positions), (a, a + bj),
                                                         cfg, max_new, method, info_j)
            caps_j = [bj] + [method.llm_stage_capacity(i, bj) for i in range(len(caps) - 1)]
            caches = tuple(_widen(g, a + cj, cap - cj) for g, cj, cap in zip(caches, caps_j, caps))
            return logits, caches, next_pos, {**_pad_span_info(info, span0), "llm_span_bucket": jnp.int32(bj)}

        return run

    idx = jnp.searchsorted(jnp.asarray(buckets, jnp.int32), need, side="left")
    return jax.lax.switch(idx, [branch(x) for x in buckets], h, valid, positions, span_info)


def _widen(g: CacheGroup, at: int, gap: int) -> CacheGroup:
    """g with `gap` invalid slots inserted before slot `at` (k/v [n, B, Lc, Hk, D], valid [B, Lc])."""
    if gap < 0:
        raise ValueError(f"a span bucket's stage capacity exceeds the full span's by {-gap}")
    if gap == 0:
        return g

    def ins(x, axis):
        shape = list(x.shape)
        shape[axis] = gap
        parts = [jax.lax.slice_in_dim(x, 0, at, axis=axis), jnp.zeros(shape, x.dtype),
                 jax.lax.slice_in_dim(x, at, x.shape[axis], axis=axis)]
        return jnp.concatenate(parts, axis)

    return CacheGroup(ins(g.k, 2), ins(g.v, 2), ins(g.valid, 1), g.length + gap, g.shift)


_SPAN_FILL = {"llm_keep_mask": False, "llm_stage_index": -1}  # llm_prefill's per-span-slot stats


def _pad_span_info(info: dict, span0: int) -> dict:
    out = dict(info)
    for k, fill in _SPAN_FILL.items():
        if k in out:
            x = out[k]
            out[k] = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, span0 - x.shape[-1])], constant_values=fill)
    return out
