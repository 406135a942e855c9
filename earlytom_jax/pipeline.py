"""The video → first token pipeline with three compression hooks, all under jit.

    pixels [T0,3,S,S] ─► SigLIP blocks ─(hook 1: merge frames after chosen blocks)─► features
        ─► projector + 2x pool [Tc, S', H] ─(hook 2: select tokens into a static buffer)─►
        splice into the prompt ─► Qwen2 layers 0..k-1 ─(hook 3: drop/merge visual tokens)─►
        layers k.. ─► logits of the last prompt token, KV caches for decoding.

Shapes stay static: frames live in a buffer of capacity T0 with a valid count `n`; after a
frame merge the following encoder blocks, and then the projector and pooling, run on the
smallest bucket of frames that holds `n` (chosen on device with `lax.switch`, so no host
round trip); visual tokens live in a buffer of the method's static capacity with a validity
mask; the in-LLM merge compacts the sequence into a shorter static capacity. Positions count
valid slots only, so padding never moves a RoPE id and is never attended.

LLaVA-Video runs LLaVA-OneVision's path with its config's other pooling (2x2 average, 13 x 13
a frame) and a newline after every pooled row that kept a token (`visual_span`).

A method is a frozen dataclass with the hooks of compression/base.py; `FullTokens()` (the
default) is the uncompressed model exactly as transformers runs it.

Qwen2.5-VL runs through the same functions: its encoder (window attention, the 2x2 merger)
gives merged tokens [T, S, H] per temporal patch, hook 2 selects from them, no newline follows,
and the splice gives every slot its 3-D position (models/qwen2_5_vl.py), the video's
positions scaled by `video_time` (seconds per temporal patch, transformers'
`second_per_grid_ts`). Its encoder's frames are temporal patches (pairs of frames): hook 1
merges them, hook 2 selects merged tokens, each keeping its source's position
(docs/qwen-earlytom.md). A method runs on the families it names (`check_family`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from earlytom_jax.compression import registry
from earlytom_jax.compression.base import FullTokens
from earlytom_jax.config import LlavaOVConfig, ModelConfig
from earlytom_jax.models import family
from earlytom_jax.models import llava_onevision as lov
from earlytom_jax.models.attention import dense as attn_dense
from earlytom_jax.models.attention import last_row_probs
from earlytom_jax.models.qwen2 import rms_norm
from earlytom_jax.models.qwen2_5_vl import video_positions


FULL = FullTokens()

# ----------------------------------------------------------------------------- vision


def _bucketed(fn, x, n, buckets):
    """Run fn on the first b frames of x for the smallest bucket b >= n; pad back to capacity.

    fn(x [b, ...]) → tuple of arrays with leading frame axis b.
    """
    cap = x.shape[0]
    if len(buckets) == 1 and buckets[0] == cap:
        return fn(x)

    def branch(b):
        def f(x):
            outs = fn(x[:b])
            return tuple(jnp.pad(o, [(0, cap - b)] + [(0, 0)] * (o.ndim - 1)) for o in outs)

        return f

    idx = jnp.searchsorted(jnp.asarray(buckets), n, side="left")
    return jax.lax.switch(idx, [branch(b) for b in buckets], x)


def check_family(cfg: ModelConfig, method) -> None:
    """ConfigError (one line) unless `method` runs on `cfg`'s family (its `families`)."""
    if cfg.family not in getattr(method, "families", ("llava_onevision",)):
        registry.check_family(registry.name(method), cfg)


def _qwen_positions(vision, cfg, shape, video_time, picked):
    """(positions int32 [T, S, 3] of the encoded temporal patches, text_start int32: one past the
    largest position of the whole video, both relative to the video's first slot)."""
    grid = vision.grid(shape)
    pos = video_positions(grid, cfg.vision.spatial_merge_size, 1.0 if video_time is None else video_time,
                          cfg.vision.tokens_per_second)
    text_start = pos.max() + 1
    return (pos if picked is None else pos[jnp.asarray(picked, jnp.int32)]), text_start


def _encoder(cfg, params, pixels):
    """(vision module, run_blocks(x, start, stop), with_attention(x, layer, keys), finish(x) →
    features) of the model's encoder for pixels of this shape."""
    vision = family.bind(cfg, params).vision
    if not family.is_qwen(cfg):
        return vision, vision.run_blocks, vision.block_with_attention, lambda x: x
    layout = vision.layout(pixels.shape)
    return (vision, lambda x, a, b: vision.run_blocks(x, layout, a, b),
            lambda x, i, keys: vision.block_with_attention(x, layout, i, keys),
            lambda x: vision.merge(x, layout))


def _pick(pixels, picked, cfg):
    """The input frames (LLaVA-OV) or temporal patches (Qwen2.5-VL: frame pairs) `picked`."""
    if picked is None:
        return pixels
    idx = jnp.asarray(picked, jnp.int32)
    if not family.is_qwen(cfg):
        return pixels[idx]
    tp = cfg.vision.temporal_patch_size
    pairs = pixels.reshape((pixels.shape[0] // tp, tp) + pixels.shape[1:])[idx]
    return pairs.reshape((-1,) + pixels.shape[1:])


def encode_video(params, pixels, cfg: ModelConfig, method=FULL, video_time=None):
    """pixels [T0,3,S,S] → (features [T, N, C] with the first `n` frames valid, n, state);
    T = T0, or the number of frames the method's `input_frames` picks.

    Qwen2.5-VL: pixels [T', 3, H, W] → (merged tokens [T, mh, mw, Ht] in raster order, n,
    state) over T = T'/2 temporal patches (the encoder's frames: stage I merges them), with
    state["positions"] int32 [T, mh·mw, 3] (each merged frame at the temporal position of its
    earliest source, `frame_sources`) and state["text_start"] (`_qwen_positions`);
    video_time: seconds per temporal patch (None = 1)."""
    check_family(cfg, method)
    qwen = family.is_qwen(cfg)
    vcfg = cfg.vision
    vision, run_blocks, with_attention, finish = _encoder(cfg, params, pixels)
    frames = vision.grid(pixels.shape)[0] if qwen else pixels.shape[0]
    picked = method.input_frames(frames)
    if qwen:
        positions, text_start = _qwen_positions(vision, cfg, pixels.shape, video_time, picked)
    pixels = _pick(pixels, picked, cfg)  # static indices: only these frames are ever encoded
    x = vision.embed(pixels)
    t0 = x.shape[0]
    n = jnp.asarray(t0, jnp.int32)
    if method.token_merging:
        return method.encode_tokens(vision, x, cfg), n, method.encoder_init(t0)
    layers = tuple(sorted(i + vcfg.num_layers if i < 0 else i for i in method.encoder_layers))
    keys = method.encoder_keys
    buckets = method.frame_buckets(t0)
    state = method.encoder_init(t0)
    start, merged = 0, False
    for i, layer in enumerate(layers):

        def run(x, start=start, layer=layer):
            return with_attention(run_blocks(x, start, layer), layer, keys)

        x, colmean, *k = _bucketed(run, x, n, buckets if merged else (t0,))
        extra = {"keys": k[0]} if keys else {}
        x, n, state = method.encoder_merge(x, n, colmean, state, last=i == len(layers) - 1, **extra)
        start, merged = layer + 1, True

    def rest(x):
        return (finish(run_blocks(x, start, vcfg.num_layers)),)

    (x,) = _bucketed(rest, x, n, buckets if merged else (t0,))
    if qwen:
        _, gh, gw = vision.grid(pixels.shape)
        m = vcfg.spatial_merge_size
        x = x.reshape(x.shape[0], gh // m, gw // m, x.shape[-1])
        sources = state.get("frame_sources")
        if sources is not None:  # merged frames keep their earliest source's temporal position
            positions = positions[jnp.clip(sources, 0, t0 - 1)]
        state = {**state, "positions": positions, "text_start": text_start}
    return x, n, state


# ----------------------------------------------------------------------------- tokens


def visual_buffer(params, feats, n, state, cfg: ModelConfig, method=FULL):
    """Features [T0, N, C] → (buffer [Vc+1, H], valid [Vc+1], info): the method's selected
    tokens packed at the front, then the newline right after the last kept token.
    LLaVA-Video: the selected tokens frame by frame in raster order, a newline after every
    pooled row that kept a token (`lov.grid_newlines`; every row for a method whose
    `grid_newline_rows` is "all"), padding after them: buffer [`visual_span`, H].
    Qwen2.5-VL: merged tokens [T, mh, mw, H] → (buffer [Vc, H], valid [Vc], info) with no
    newline, info["visual_positions"] int32 [Vc, 3] (each slot's position relative to the
    video: its source token's, `kept_index`) and info["text_start"]; the method's `select`
    gets the grid (mh, mw)."""
    if family.is_qwen(cfg):
        t, mh, mw, h = feats.shape
        buf, valid, info = method.select(feats.reshape(t, mh * mw, h), n, state, cfg, grid=(mh, mw))
        pos = state["positions"].reshape(-1, 3)
        if "kept_index" in info:
            pos = pos[jnp.maximum(info["kept_index"], 0)]
        return buf, valid, {**info, "visual_positions": pos, "text_start": state["text_start"]}
    model = lov.bind(cfg, params)
    if method.pooled:
        # on the smallest frame bucket that holds the n frames left after the encoder's merges
        buckets = method.frame_buckets(feats.shape[0]) if method.encoder_layers else (feats.shape[0],)
        (tokens,) = _bucketed(lambda f: (model.video_tokens(f),), feats, n, buckets)  # [T0, S, H]
    else:
        tokens = model.projector(feats)  # [T0, N', H]
    h = tokens.shape[-1]
    buf, valid, info = method.select(tokens, n, state, cfg)
    if cfg.grid_newlines:  # LLaVA-Video: a newline after each pooled row that kept a token
        t0, s = tokens.shape[:2]
        src = info.get("kept_index")
        if src is None:  # every token of every frame, in order
            src = jnp.where(valid, jnp.arange(buf.shape[0], dtype=jnp.int32), -1)
        every = getattr(method, "grid_newline_rows", "kept") == "all"
        cap = visual_span(cfg, method, t0, s)
        buf, valid = lov.grid_newlines(buf, valid, src, model.newline[...], cfg.pooled_grid, n, cap, every)
        return buf, valid, info
    count = info["count"]
    # elementwise insert (not a dynamic_update_slice): stays exact when the frames, hence
    # the buffer, are sharded over the mesh's data axis
    buf = jnp.concatenate([buf, jnp.zeros((1, h), buf.dtype)], 0)
    at = (jnp.arange(buf.shape[0]) == count)[:, None]
    buf = jnp.where(at, model.newline[...][None].astype(buf.dtype), buf)
    valid = jnp.concatenate([valid, jnp.zeros((1,), bool)]) | at[:, 0]
    if getattr(method, "keep_positions", False):  # FastVID: slots keep their full-sequence positions
        t0, s = tokens.shape[:2]
        src = jnp.concatenate([info["kept_index"], jnp.full((1,), -1, jnp.int32)])
        info = {**info, "visual_positions": jnp.where(at[:, 0], t0 * s, src)}
    return buf, valid, info


def visual_span(cfg: ModelConfig, method, t0: int, s: int) -> int:
    """Static length of the visual buffer `visual_buffer` returns for `t0` frames of `s`
    tokens: the method's capacity Vc, plus the newline after it (LLaVA-OneVision), or plus
    room for LLaVA-Video's grid newlines (a row that keeps a token has at most one: min(Vc,
    T0·g') when only kept rows get one, T0·g' when every row does), or nothing (Qwen2.5-VL)."""
    vc = method.capacity(t0, s)
    if family.is_qwen(cfg):
        return vc
    if not cfg.grid_newlines:
        return vc + 1
    rows = t0 * cfg.pooled_grid
    return vc + (rows if getattr(method, "grid_newline_rows", "kept") == "all" else min(vc, rows))


# ----------------------------------------------------------------------------- LLM


@dataclasses.dataclass
class CacheGroup:
    """KV cache of a contiguous range of layers: k/v [n_layers, B, Lc, Hk, D], valid [B, Lc];
    shift: int32, subtracted from a decoded token's position in these layers (the visual slots an
    earlier stage of a renumbering method dropped, `llm_renumber`; 0 otherwise)."""

    k: Any
    v: Any
    valid: Any
    length: int  # prefill slots used (static); decode writes at length + step
    shift: Any = 0


jax.tree_util.register_dataclass(CacheGroup, data_fields=["k", "v", "valid", "shift"], meta_fields=["length"])


def _alloc(ks, vs, valid, extra: int, shift=0) -> CacheGroup:
    pad = [(0, 0), (0, 0), (0, extra), (0, 0), (0, 0)]
    return CacheGroup(
        jnp.pad(ks, pad), jnp.pad(vs, pad), jnp.pad(valid, ((0, 0), (0, extra))), ks.shape[2],
        jnp.asarray(shift, jnp.int32),
    )


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


def decode_step(params, token, position, caches, step, cfg: ModelConfig):
    """One greedy step. token/position int32 [1]; step int32 scalar (0 for the first new token).
    A generated token's three multimodal positions are equal: the 1-D position serves both families.

    → (logits [V], caches). Compiles once per set of cache lengths.
    """
    text = family.bind(cfg, params).text
    h = text.embed_tokens(token)[:, None]
    out, start = [], 0
    for g in caches:
        nlay = g.k.shape[0]
        h, ck, cv, valid = text.decode_layers(h, position - g.shift, g.k, g.v, g.valid, g.length + step, start)
        out.append(CacheGroup(ck, cv, valid, g.length, g.shift))
        start += nlay
    return text.logits(h[0, -1]), tuple(out)


def split_caches(caches, layer: int):
    """The cache groups cut so that layer `layer` - 1 is a group of its own and a group starts
    at `layer` (hook 4's layout; the pieces of a group have equal valid masks and length)."""
    out, start = [], 0
    for g in caches:
        n = g.k.shape[0]
        cuts = sorted({0, n} | {c - start for c in (layer - 1, layer) if start < c < start + n})
        for j, (a, b) in enumerate(zip(cuts, cuts[1:])):  # own copies of valid/shift: each donatable
            valid, shift = (g.valid, g.shift) if j == 0 else (jnp.copy(g.valid), jnp.copy(g.shift))
            out.append(CacheGroup(g.k[a:b], g.v[a:b], valid, g.length, shift))
        start += n
    return tuple(out)


def decode_span(method, caches, prefix_len: int, suffix_len: int) -> tuple[int, int] | None:
    """Static (start, stop) cache slots of the visual span (tokens and newline) that hook 4
    (`decode_layer`) prunes; None for a method without it. Needs one prefill cache group (no
    hook 3): the prompt's layout, prefix | span | suffix."""
    if getattr(method, "decode_layer", None) is None:
        return None
    if len(caches) != 1:
        raise ValueError("decode-time pruning needs the prompt's cache layout (a method without hook 3)")
    return prefix_len, caches[0].length - suffix_len


def decode_step_pruned(params, token, position, caches, step, cfg: ModelConfig, method, span, state):
    """`decode_step` with hook 4: caches split by `split_caches(caches, method.decode_layer)`;
    span: the visual span's static cache slots (`decode_span`); state: `method.decode_init`'s.
    Layer L - 1 (L = decode_layer) also gives the new token's attention (mean over heads) to the
    span, from which `method.decode_keep` picks the span slots layers L.. attend this step.

    → (logits [V], caches, state, keep bool [span])."""
    text = family.bind(cfg, params).text
    layer = method.decode_layer
    a, b = span
    h = text.embed_tokens(token)[:, None]
    out, start, keep = [], 0, None
    for g in caches:
        nlay, index, pos = g.k.shape[0], g.length + step, position - g.shift
        if start >= layer:  # the step's keep mask on the span, for this step only
            mask = jnp.ones(g.valid.shape, bool).at[:, a:b].set(keep[None])
            h, ck, cv, _ = text.decode_layers(h, pos, g.k, g.v, g.valid & mask, index, start)
            valid = jax.lax.dynamic_update_slice(g.valid, jnp.ones((g.valid.shape[0], 1), bool), (0, index))
        else:
            h_in = h
            h, ck, cv, valid = text.decode_layers(h, pos, g.k, g.v, g.valid, index, start)
            if start + nlay == layer:  # layer L - 1 (a group of its own): its query, re-projected
                lay = text.layer(layer - 1)
                cos, sin = text.rope(pos[:, None])
                q = lay.qkv(rms_norm(h_in, lay.ln1[...], lay.cfg.rms_norm_eps), cos, sin)[0]
                attn = last_row_probs(q, ck[-1], valid)[0]
                keep, state = method.decode_keep(attn[a:b], valid[0, a:b], state)
        out.append(CacheGroup(ck, cv, valid, g.length, g.shift))
        start += nlay
    return text.logits(h[0, -1]), tuple(out), state, keep


# ----------------------------------------------------------------------------- whole


def splice(params, buf, buf_valid, info, prefix_ids, suffix_ids, cfg: ModelConfig, suffix_valid=None):
    """The prompt around the visual buffer → (h [1, L, H], valid [1, L], positions [1, L] or
    [1, L, 3] for Qwen2.5-VL's multimodal RoPE, info)."""
    model = family.bind(cfg, params)
    if family.is_qwen(cfg):
        info = dict(info)
        start = info.pop("text_start")
        return (*model.splice(prefix_ids, buf, buf_valid, info["visual_positions"], suffix_ids, suffix_valid,
                              start), info)
    return (*model.splice(prefix_ids, buf, buf_valid, suffix_ids, suffix_valid, info.get("visual_positions")), info)


def prefill(params, pixels, prefix_ids, suffix_ids, cfg: ModelConfig, method=FULL, max_new: int = 32, suffix_valid=None,
            video_time=None):
    """Video + prompt → (first-token logits [V], caches, next position [1], stats dict).

    prefix_ids/suffix_ids: int32 token ids around the `<video>` placeholder; suffix_valid
    (optional bool [Q]) marks padding at the front of the suffix (see `pad_suffix`);
    video_time: Qwen2.5-VL's seconds per temporal patch (fp32 scalar; None = 1).
    """
    feats, n, state = encode_video(params, pixels, cfg, method, video_time)
    buf, buf_valid, info = visual_buffer(params, feats, n, state, cfg, method)
    h, valid, positions, info = splice(params, buf, buf_valid, info, prefix_ids, suffix_ids, cfg, suffix_valid)
    a = prefix_ids.shape[0]
    span = (a, a + buf.shape[0])
    span_info = llm_span_info(info, method, buf.shape[0], cfg)
    logits, caches, next_pos, llm_info = llm_prefill(params, h, valid, positions, span, cfg, max_new, method, span_info)
    stats = {"frames": n, "visual_tokens": buf_valid.sum(), **info, **llm_info, **method.encoder_stats(state)}
    return logits, caches, next_pos, stats


@functools.partial(jax.jit, static_argnames=("cfg", "method", "max_new"))
def prefill_jit(params, pixels, prefix_ids, suffix_ids, cfg, method=FULL, max_new: int = 32, suffix_valid=None,
                video_time=None):
    return prefill(params, pixels, prefix_ids, suffix_ids, cfg, method, max_new, suffix_valid, video_time)


def pad_suffix(suffix_ids, multiple: int = 32, pad_id: int = 0):
    """Left-pad prompt ids to a multiple of `multiple` so that prompts of similar length share
    one compiled program. → (ids int32 [Q'], valid bool [Q']); padding slots are invalid,
    take no RoPE position and are never attended."""
    q = len(suffix_ids)
    total = max(multiple, -(-q // multiple) * multiple)
    ids = [pad_id] * (total - q) + [int(i) for i in suffix_ids]
    valid = [False] * (total - q) + [True] * q
    return jnp.asarray(ids, jnp.int32), jnp.asarray(valid)


def compile_prefill(params, n_frames: int, prefix_len: int, suffix_len: int, cfg: LlavaOVConfig, method=FULL,
                    max_new: int = 32):
    """Compile ahead of time the one program that serves every video of `n_frames` frames
    and prompts of these lengths, whatever frame count the merges reach (all frame buckets
    are branches inside it). Returns a callable `(params, pixels, prefix_ids, suffix_ids)`."""
    size = cfg.vision.image_size
    pix = jax.ShapeDtypeStruct((n_frames, 3, size, size), params["vision"]["patch_w"].dtype)
    pre = jax.ShapeDtypeStruct((prefix_len,), jnp.int32)
    suf = jax.ShapeDtypeStruct((suffix_len,), jnp.int32)
    return prefill_jit.lower(params, pix, pre, suf, cfg, method, max_new).compile()


decode_step_jit = jax.jit(decode_step, static_argnames=("cfg",), donate_argnames=("caches",))
decode_step_pruned_jit = jax.jit(decode_step_pruned, static_argnames=("cfg", "method", "span"),
                                 donate_argnames=("caches",))


@functools.partial(jax.jit, static_argnames=("cfg", "steps", "method", "span", "trace"))
def decode_loop(params, first_logits, position, caches, cfg, steps: int, eos_ids, method=FULL, span=None,
                trace: bool = False):
    """Greedy decoding of up to `steps` tokens in one device loop (no host sync per token),
    stopping after the first token in `eos_ids`.

    → (tokens int32 [steps], count): the first `count` tokens are the answer, EOS included;
    the first token is argmax(first_logits).

    method, span: a method with hook 4 (`decode_layer`) and its visual span (`decode_span`); any
    other method decodes as without them. trace (hook 4 only): also return keep bool [steps,
    span]: row i the span slots layers L.. attended to produce token i (row 0: the prefill's).
    """
    toks = jnp.zeros((steps,), jnp.int32).at[0].set(jnp.argmax(first_logits).astype(jnp.int32))
    if getattr(method, "decode_layer", None) is not None:
        return _decode_loop_pruned(params, toks, position, caches, cfg, steps, eos_ids, method, span, trace)

    def cond(carry):
        i, toks, _ = carry
        return (i < steps) & ~jnp.isin(toks[i - 1], eos_ids)

    def body(carry):
        i, toks, caches = carry
        logits, caches = decode_step(params, toks[i - 1][None], position + i - 1, caches, i - 1, cfg)
        return i + 1, toks.at[i].set(jnp.argmax(logits).astype(jnp.int32)), caches

    count, toks, _ = jax.lax.while_loop(cond, body, (jnp.asarray(1, jnp.int32), toks, caches))
    return toks, count


def _decode_loop_pruned(params, toks, position, caches, cfg, steps, eos_ids, method, span, trace):
    """`decode_loop`'s loop with hook 4 (`decode_step_pruned`)."""
    if span is None:
        raise ValueError("a method with decode_layer needs the visual span (pipeline.decode_span)")
    width = span[1] - span[0]
    caches = split_caches(caches, method.decode_layer)
    hist = jnp.ones((steps, width), bool) if trace else None

    def cond(carry):
        i, toks = carry[:2]
        return (i < steps) & ~jnp.isin(toks[i - 1], eos_ids)

    def body(carry):
        i, toks, caches, state, hist = carry
        logits, caches, state, keep = decode_step_pruned(params, toks[i - 1][None], position + i - 1, caches, i - 1,
                                                         cfg, method, span, state)
        hist = None if hist is None else hist.at[i].set(keep)
        return i + 1, toks.at[i].set(jnp.argmax(logits).astype(jnp.int32)), caches, state, hist

    init = (jnp.asarray(1, jnp.int32), toks, caches, method.decode_init(width), hist)
    count, toks, _, _, hist = jax.lax.while_loop(cond, body, init)
    return (toks, count, hist) if trace else (toks, count)


def sequence_logits(params, pixels, prefix_ids, suffix_ids, cfg: ModelConfig, video_time=None):
    """Full-token logits at every prompt position [L, V] fp32 (for inspection and parity)."""
    feats, n, state = encode_video(params, pixels, cfg, FULL, video_time)
    buf, buf_valid, info = visual_buffer(params, feats, n, state, cfg)
    h, valid, positions, _ = splice(params, buf, buf_valid, info, prefix_ids, suffix_ids, cfg)
    text = family.bind(cfg, params).text
    h, _, _ = text.run_layers(h, positions, valid, 0, cfg.text.num_layers)
    return text.logits(h[0])


# ----------------------------------------------------------------------------- timing


@functools.partial(jax.jit, static_argnames=("cfg", "method"))
def stage_vision(params, pixels, cfg, method, video_time=None):
    return encode_video(params, pixels, cfg, method, video_time)


@functools.partial(jax.jit, static_argnames=("cfg", "method"))
def stage_tokens(params, feats, n, state, prefix_ids, suffix_ids, cfg, method):
    buf, buf_valid, info = visual_buffer(params, feats, n, state, cfg, method)
    h, valid, positions, info = splice(params, buf, buf_valid, info, prefix_ids, suffix_ids, cfg)
    return h, valid, positions, buf_valid.sum(), info


@functools.partial(jax.jit, static_argnames=("cfg", "method", "span", "max_new"))
def stage_llm(params, h, valid, positions, span, cfg, method, max_new, span_info=None):
    logits, caches, next_pos, info = llm_prefill(params, h, valid, positions, span, cfg, max_new, method, span_info)
    return jnp.argmax(logits), caches, next_pos, info


def staged_prefill(params, pixels, prefix_ids, suffix_ids, cfg: ModelConfig, method=FULL, max_new: int = 32,
                   video_time=None):
    """The prefill split into three jitted stages, each waited for, to see where time goes.

    → (first token, {"vision": s, "tokens": s, "llm": s}). The stages are the same functions
    as `prefill`; their sum exceeds the fused TTFT by the two host round trips.
    """
    import time

    times = {}
    t = time.perf_counter()
    feats, n, state = jax.block_until_ready(stage_vision(params, pixels, cfg, method, video_time))
    times["vision"] = time.perf_counter() - t
    t = time.perf_counter()
    h, valid, positions, _, info = jax.block_until_ready(
        stage_tokens(params, feats, n, state, prefix_ids, suffix_ids, cfg, method)
    )
    times["tokens"] = time.perf_counter() - t
    a = prefix_ids.shape[0]
    span = (a, h.shape[1] - suffix_ids.shape[0])
    span_info = llm_span_info(info, method, span[1] - span[0], cfg)
    t = time.perf_counter()
    tok, *_ = jax.block_until_ready(stage_llm(params, h, valid, positions, span, cfg, method, max_new, span_info))
    times["llm"] = time.perf_counter() - t
    return int(tok), times
