"""The video → first token pipeline with three compression hooks, all under jit.

    pixels [T0,3,S,S] ─► SigLIP blocks ─(hook 1: merge frames after chosen blocks)─► features
        ─► projector + 2x pool [Tc, S', H] ─(hook 2: select tokens into a static buffer)─►
        splice into the prompt ─► Qwen2 layers 0..k-1 ─(hook 3: drop/merge visual tokens)─►
        layers k.. ─► logits of the last prompt token, KV caches for decoding.

Shapes stay static: frames live in a buffer of capacity T0 with a valid count `n`; after a
frame merge the following encoder blocks, and then the projector and pooling, run on the
smallest bucket of frames that holds `n` (chosen on device with `lax.switch`, so no host
round trip), or, where the encoder runs frames one at a time anyway (bf16 on CPU,
`stack.frame_by_frame`), on exactly the first `n` frames (a loop whose later steps are
skipped); visual tokens live in a buffer of the method's static capacity with a validity
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

import functools

import jax
import jax.numpy as jnp

from earlytom_jax.compression import registry
from earlytom_jax.config import LlavaOVConfig, ModelConfig
from earlytom_jax.decoding import (FULL, CacheGroup, decode_loop, decode_loop_batch, decode_span, decode_step,
                                   decode_step_jit, decode_step_pruned, decode_step_pruned_jit, split_caches)
from earlytom_jax.llm_stages import llm_prefill, llm_prefill_bucketed, llm_span_info
from earlytom_jax.models import family, stack
from earlytom_jax.models import llava_onevision as lov
from earlytom_jax.models.qwen2_5_vl import video_positions
from earlytom_jax.models.siglip_head import KEY as SIGLIP_HEAD

# the LLM's prefill hook (llm_stages) and decoding (decoding) live in their own modules; callers
# reach them through this one as well
__all__ = ["BATCH", "CacheGroup", "FULL", "check_family", "compile_prefill", "decode_loop", "decode_loop_batch",
           "decode_span", "decode_step", "decode_step_jit", "decode_step_pruned", "decode_step_pruned_jit",
           "encode_video", "grid_positions", "llm_prefill", "llm_prefill_bucketed", "llm_span_info", "pad_suffix",
           "pad_suffixes", "prefill", "prefill_batch", "prefill_jit", "sequence_logits", "splice", "split_caches",
           "stage_llm", "stage_tokens", "stage_vision", "staged_prefill", "visual_buffer", "visual_span"]

# ----------------------------------------------------------------------------- vision


BATCH = "batch"  # the vmapped axis of `prefill_batch`


def _bucketed(fn, x, n, buckets, batch_axis=None):
    """Run fn on the first b frames of x for the smallest bucket b >= n; pad back to capacity.
    Where the encoder runs frames one at a time (`stack.frame_by_frame`), on the first n
    frames exactly (`stack.map_frames_upto`), the rest zeros.

    fn(x [b, ...]) → tuple of arrays with leading frame axis b. Under `vmap` over `batch_axis`
    the bucket holds the largest `n` of the batch: its index is the same for every sample, so
    the switch stays one branch run for the batch rather than every branch for every sample.
    """
    cap = x.shape[0]
    if len(buckets) == 1 and buckets[0] == cap:
        return fn(x)
    if batch_axis is not None:
        n = jax.lax.pmax(n, batch_axis)
    if stack.frame_by_frame(x):  # one frame at a time anyway: a loop over the n frames left, no bucket's padding
        return stack.map_frames_upto(fn, x, n)

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


def encode_video(params, pixels, cfg: ModelConfig, method=FULL, video_time=None, batch_axis=None):
    """pixels [T0,3,S,S] → (features [T, N, C] with the first `n` frames valid, n, state);
    T = T0, or the number of frames the method's `input_frames` picks.

    Qwen2.5-VL: pixels [T', 3, H, W] → (merged tokens [T, mh, mw, Ht] in raster order, n,
    state) over T = T'/2 temporal patches (the encoder's frames: stage I merges them), with
    state["positions"] int32 [T, mh·mw, 3] (each merged frame at the temporal position of its
    earliest source, `frame_sources`) and state["text_start"] (`_qwen_positions`);
    video_time: seconds per temporal patch (None = 1). batch_axis: the vmapped axis name when
    called per sample of a batch (`prefill_batch`)."""
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

        x, colmean, *k = _bucketed(run, x, n, buckets if merged else (t0,), batch_axis)
        extra = {"keys": k[0]} if keys else {}
        if keys == "heads":  # Qwen2.5-VL: per-head rotated keys and queries
            extra["queries"] = k[1]
        x, n, state = method.encoder_merge(x, n, colmean, state, last=i == len(layers) - 1, **extra)
        start, merged = layer + 1, True

    def rest(x):
        return (finish(run_blocks(x, start, vcfg.num_layers)),)

    (x,) = _bucketed(rest, x, n, buckets if merged else (t0,), batch_axis)
    if not qwen and hasattr(method, "head_signals"):  # FastVID: the original SigLIP's head on the tower's output
        state = method.head_signals(params.get(SIGLIP_HEAD), x, state, cfg)
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


def visual_buffer(params, feats, n, state, cfg: ModelConfig, method=FULL, batch_axis=None):
    """Features [T0, N, C] → (buffer [Vc+1, H], valid [Vc+1], info): the method's selected
    tokens packed at the front, then the newline right after the last kept token.
    LLaVA-Video: the selected tokens frame by frame in raster order, a newline after every
    pooled row that kept a token (`lov.grid_newlines`; every row for a method whose
    `grid_newline_rows` is "all"), padding after them: buffer [`visual_span`, H]; with the
    method's `keep_positions` (FastVID), info["visual_positions"] int32 (each slot's position in
    the full grid span, `grid_positions`) and info["text_start"] (the full span's length).
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
        (tokens,) = _bucketed(lambda f: (model.video_tokens(f),), feats, n, buckets, batch_axis)  # [T0, S, H]
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
        if getattr(method, "keep_positions", False):  # FastVID: slots keep their full-sequence positions
            info = {**info, "visual_positions": grid_positions(src, valid, cfg.pooled_grid, n, cap, every),
                    "text_start": jnp.int32(cfg.visual_slots(t0))}
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


def grid_positions(src, valid, pooled_grid: int, frames, capacity: int, every_row: bool = False):
    """Each slot's position in the uncompressed grid span (`add_token_per_grid`: frame t's
    pooled row r at (t·g' + r)·(g' + 1), its newline g' after) for the layout `lov.grid_newlines`
    gives the selected slots src int32 [Vc] (t·S + s), valid [Vc]. → int32 [capacity] (0 on
    padding), relative to the video's first slot."""
    g = pooled_grid
    # the same layout of the source indices themselves (-1 marks a newline)
    lay, ok = lov.grid_newlines(src[:, None], valid, src, jnp.full((1,), -1, jnp.int32), g, frames, capacity,
                                every_row)
    lay = lay[:, 0]
    tok, nl = ok & (lay >= 0), ok & (lay < 0)
    if every_row:  # the k-th newline closes row k
        row = jnp.cumsum(nl.astype(jnp.int32)) - 1
    else:  # a newline closes the row of the token before it
        row = jax.lax.cummax(jnp.where(tok, lay, -1)) // g
    return jnp.where(tok, lay + lay // g, jnp.where(nl, row * (g + 1) + g, 0)).astype(jnp.int32)


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
    info = dict(info)
    start = info.pop("text_start", None)  # LLaVA-Video with FastVID: the text after the full grid span
    return (*model.splice(prefix_ids, buf, buf_valid, suffix_ids, suffix_valid, info.get("visual_positions"), start),
            info)


def prefill(params, pixels, prefix_ids, suffix_ids, cfg: ModelConfig, method=FULL, max_new: int = 32, suffix_valid=None,
            video_time=None, batch_axis=None):
    """Video + prompt → (first-token logits [V], caches, next position [1], stats dict).

    prefix_ids/suffix_ids: int32 token ids around the `<video>` placeholder; suffix_valid
    (optional bool [Q]) marks padding at the front of the suffix (see `pad_suffix`);
    video_time: Qwen2.5-VL's seconds per temporal patch (fp32 scalar; None = 1); batch_axis:
    see `prefill_batch`.
    """
    feats, n, state = encode_video(params, pixels, cfg, method, video_time, batch_axis)
    buf, buf_valid, info = visual_buffer(params, feats, n, state, cfg, method, batch_axis)
    h, valid, positions, info = splice(params, buf, buf_valid, info, prefix_ids, suffix_ids, cfg, suffix_valid)
    a = prefix_ids.shape[0]
    span = (a, a + buf.shape[0])
    span_info = llm_span_info(info, method, buf.shape[0], cfg)
    logits, caches, next_pos, llm_info = llm_prefill_bucketed(params, h, valid, positions, span, cfg, max_new, method,
                                                              span_info, batch_axis)
    stats = {"frames": n, "visual_tokens": buf_valid.sum(), **info, **llm_info, **method.encoder_stats(state)}
    return logits, caches, next_pos, stats


@functools.partial(jax.jit, static_argnames=("cfg", "method", "max_new"))
def prefill_jit(params, pixels, prefix_ids, suffix_ids, cfg, method=FULL, max_new: int = 32, suffix_valid=None,
                video_time=None):
    return prefill(params, pixels, prefix_ids, suffix_ids, cfg, method, max_new, suffix_valid, video_time)


@functools.partial(jax.jit, static_argnames=("cfg", "method", "max_new"))
def prefill_batch(params, pixels, prefix_ids, suffix_ids, cfg, method=FULL, max_new: int = 32, suffix_valid=None,
                  video_time=None):
    """`prefill` for B videos of one shape in one program, each with its own compression.

    pixels [B, T0, ...]; prefix_ids [P] (shared); suffix_ids int32 and suffix_valid bool [B, Q]
    (each prompt left-padded to the batch's length: `pad_suffix`); video_time fp32 [B] or None.
    → (logits [B, V], caches with a leading batch axis on every array, next position [B, 1],
    stats with a leading batch axis). Sample i's outputs are `prefill` of sample i alone: the
    per-sample stages are vmapped; where a stage runs on a bucket of frames, the batch shares
    the bucket of its largest frame count (`_bucketed`).
    """
    def one(pixels, suffix_ids, suffix_valid, video_time):
        return prefill(params, pixels, prefix_ids, suffix_ids, cfg, method, max_new, suffix_valid, video_time, BATCH)

    if suffix_valid is None:
        suffix_valid = jnp.ones(suffix_ids.shape, bool)
    axis = None if video_time is None else 0
    return jax.vmap(one, in_axes=(0, 0, 0, axis), axis_name=BATCH)(pixels, suffix_ids, suffix_valid, video_time)


def pad_suffix(suffix_ids, multiple: int = 32, pad_id: int = 0):
    """Left-pad prompt ids to a multiple of `multiple` so that prompts of similar length share
    one compiled program. → (ids int32 [Q'], valid bool [Q']); padding slots are invalid,
    take no RoPE position and are never attended."""
    q = len(suffix_ids)
    total = max(multiple, -(-q // multiple) * multiple)
    ids = [pad_id] * (total - q) + [int(i) for i in suffix_ids]
    valid = [False] * (total - q) + [True] * q
    return jnp.asarray(ids, jnp.int32), jnp.asarray(valid)


def pad_suffixes(suffixes, multiple: int = 32, pad_id: int = 0):
    """Several prompts left-padded to one length (the longest's `pad_suffix` length), for
    `prefill_batch`. → (ids int32 [B, Q'], valid bool [B, Q'])."""
    total = max(max(multiple, -(-len(q) // multiple) * multiple) for q in suffixes)
    ids = [[pad_id] * (total - len(q)) + [int(i) for i in q] for q in suffixes]
    valid = [[False] * (total - len(q)) + [True] * len(q) for q in suffixes]
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
    logits, caches, next_pos, info = llm_prefill_bucketed(params, h, valid, positions, span, cfg, max_new, method,
                                                          span_info)
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
