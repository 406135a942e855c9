"""Test-only PyTorch reference of LLaVA-Video's video path, full tokens and with EarlyTom,
VisionZip or FastV, on transformers' LLaVA-OneVision modules (the same tensors).

Written from LLaVA-NeXT's `llava/model/llava_arch.py` (LLaVA-VL/LLaVA-NeXT at df17966) and the
official EarlyTom code (viridisGreen/EarlyTom at b909322), not from our JAX code:
- pooling: `get_2dPool` with `mm_spatial_pool_mode="average"`: `F.avg_pool2d(x, 2)` on each
  frame's g x g map (features, and for the methods the attention and keys maps alike:
  `earlytom/llava_arch.py` l. 389-392, `visionzip/llava_arch.py` l. 81-86);
- newlines: `mm_newline_position="grid"`. Full tokens: `add_token_per_grid`, every pooled row
  followed by `image_newline`. EarlyTom: `add_newline_token(feat, pos, grid_size, newline)`
  as it is written to work (per frame, for each pooled row that kept a token: the row's kept
  tokens in raster order, then one newline; a row that kept nothing gets none). The official
  `spatial_compression` calls it on flattened 2-D tensors (one newline after every token for a
  segment of one or two frames) and, for longer segments, on the first frame's tokens alone
  (the middle and last frames are lost): the "wrong tensor" of issue 35, which never ran in
  the published evaluation (`llava_vid` never applies the wrapper); this reference follows
  the evident intent instead. VisionZip's grid branch (`visionzip/llava_arch.py` l. 153-174):
  the frame's dominant and contextual tokens sorted by position (a contextual token at its
  target's), a newline after every row, also a row that kept nothing;
- the EarlyTom stages themselves are `earlytom_ref`'s (stage I merges, stage II selection with
  S = the pooled tokens of a frame, stage III over the whole visual span, newlines included,
  as the official code's `image_tokens` counts it). Budget: r of T0·S pooled tokens, S = 169 at
  384 px; the newlines are not part of it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tests.references.baselines_ref import frame_budgets, visionzip_frame
from tests.references.earlytom_ref import (
    _Rope,
    _feature_block,
    _logits,
    _qwen_layer,
    _siglip_block_with_probs,
    _vision_parts,
    fastv_drop,
    greedy_tokens,
    merge_layer,
    segment_frames,
    stage2_select,
    stage3_merge,
)


def avg_pool(x: torch.Tensor) -> torch.Tensor:
    """[T, g, g, C] → [T, g//2, g//2, C]: `F.avg_pool2d(·, 2)` (an odd grid's last row and
    column dropped)."""
    return F.avg_pool2d(x.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1).contiguous()


def grid_sequence(frames, pooled_grid: int, newline: torch.Tensor, every_row: bool = False) -> torch.Tensor:
    """frames: per output frame in time order a list of (raster position, token [H]); → the
    visual span [L, H]: per frame, per pooled row, that row's tokens by position, then a newline
    if the row kept one (every_row: always)."""
    out = []
    for items in frames:
        items = sorted(items, key=lambda p: p[0])
        for row in range(pooled_grid):
            toks = [t for p, t in items if p // pooled_grid == row]
            out.extend(toks)
            if toks or every_row:
                out.append(newline)
    return torch.stack(out)


def _last_block(layer, h):
    """Block with its attention written out: (h_out, received [T, N] (heads, then queries
    mean), keys [T, N, d] (heads mean))."""
    attn = layer.self_attn
    T, N, _ = h.shape
    k = attn.k_proj(layer.layer_norm1(h)).view(T, N, attn.num_heads, attn.head_dim).transpose(1, 2)
    h_out, probs = _siglip_block_with_probs(layer, h)
    return h_out, probs.mean(dim=1).mean(dim=1), k.mean(dim=1)


def _visual_span(model, pixel_values, method: str | None, settings: dict):
    """Stages before the LLM → (visual span [L, H] with its newlines, stats)."""
    cfg = model.config
    embeddings, blocks = _vision_parts(model)
    fblock = _feature_block(cfg, len(blocks))
    T0 = pixel_values.shape[0]
    g = cfg.vision_config.image_size // cfg.vision_config.patch_size
    pg = g // 2
    S = pg * pg
    newline = model.model.image_newline.float()
    proj = model.model.multi_modal_projector
    stats = dict(frames_after_layer=[], segments=None, dynamic=None, kept=None)
    h = embeddings(pixel_values.float())

    def pool(x, T):
        return avg_pool(x.reshape(T, g, g, -1)).reshape(T, S, -1)

    if method in (None, "fastv"):
        for b in range(fblock + 1):
            h = blocks[b](h, None)
        pooled = pool(proj(h), T0)
        stats["kept"] = [list(range(S)) for _ in range(T0)]
        frames = [[(s, pooled[t, s]) for s in range(S)] for t in range(T0)]
        return grid_sequence(frames, pg, newline), stats

    if method == "visionzip":
        if fblock != len(blocks) - 1:
            raise NotImplementedError("the reference runs every encoder block")
        for b in blocks[:-1]:
            h = b(h, None)
        h, received, keys = _last_block(blocks[-1], h)
        pooled, rec, ks = pool(proj(h), T0), pool(received[..., None], T0)[..., 0], pool(keys, T0)
        frames, per = [], []
        for t, b in enumerate(frame_budgets(T0, settings["ratio"], S)):
            K = int(b * settings.get("dominant_ratio", 54 / 64))
            sel = visionzip_frame(pooled[t], rec[t], ks[t], K, b - K, settings.get("quirks", True))
            positions = list(sel["dominant"]) + list(sel["targets"])
            frames.append(list(zip(positions, sel["tokens"])))
            per.append(sorted(positions))
        stats["kept"] = per
        return grid_sequence(frames, pg, newline, every_row=True), stats

    if method != "earlytom":
        raise ValueError(method)
    P = sorted(settings["layers"])
    tau, alpha, M = settings["tau"], settings.get("alpha", 0.9), settings.get("max_window", 6)
    quirks = settings.get("quirks", True)
    importance = None
    for b in range(fblock + 1):
        if b in P:
            h, probs = _siglip_block_with_probs(blocks[b], h)
            last = b == P[-1]
            res = merge_layer(h, probs if last else None, tau, alpha, M, quirks)
            h = res["x"]
            stats["frames_after_layer"].append(h.shape[0])
            if last:
                importance = res["attn"].mean(dim=1).mean(dim=1)  # [T', N]
        else:
            h = blocks[b](h, None)
    segments = segment_frames(h, tau, alpha, M, quirks)
    Tp = h.shape[0]
    pooled = pool(proj(h), Tp)
    imp = pool(importance[..., None], Tp)[..., 0]
    sel = stage2_select(imp, segments, T0, settings["ratio"], quirks=quirks)
    frames = [[(s, pooled[f, s]) for s in sel["kept"][f]] for f in range(Tp)]
    stats.update(segments=segments, dynamic=sel["dynamic"], kept=sel["kept"])
    return grid_sequence(frames, pg, newline), stats


@torch.no_grad()
def llava_video_reference(model, pixel_values, prefix_ids, suffix_ids, *, method: str | None = None,
                          settings: dict | None = None, max_new_tokens: int = 1) -> dict:
    """prompt = prefix_ids + the visual span (tokens and grid newlines) + suffix_ids on an fp32
    transformers LLaVA-OneVision `model`, positions 0..L-1, greedy decoding of max_new_tokens.

    method None: full tokens; "earlytom" (settings: ratio, tau, layers, alpha, max_window,
    quirks, llm_layer, llm_ratio, llm_noncausal); "visionzip" (ratio, dominant_ratio, quirks);
    "fastv" (llm_layer, drop). → dict(first_logits, tokens, stats)."""
    if any(p.dtype != torch.float32 for p in model.parameters()):
        raise ValueError("the reference runs fp32 models only")
    settings = dict(settings or {})
    lm = model.model.language_model
    layers = list(lm.layers)
    nL = len(layers)
    rope = _Rope(model.config.text_config)
    visual, stats = _visual_span(model, pixel_values, method, settings)
    emb = lm.embed_tokens
    pre = emb(torch.tensor(list(prefix_ids), dtype=torch.long)).float()
    suf = emb(torch.tensor(list(suffix_ids), dtype=torch.long)).float()
    h = torch.cat([pre, visual, suf], 0)
    L_full = h.shape[0]
    vs, vlen = len(prefix_ids), visual.shape[0]
    stats.update(visual_tokens=vlen, visual_tokens_after_llm=None, keep_llm=None)
    k_llm = settings.get("llm_layer") if method in ("earlytom", "fastv") else None
    noncausal = settings.get("llm_noncausal", False)

    caches = [dict() for _ in range(nL)]
    pos = list(range(L_full))
    row_probs = None
    for li in range(nL):
        if k_llm is not None and li == k_llm:
            row = row_probs[:, L_full - 1, :].mean(dim=0)
            if method == "fastv":
                res = fastv_drop(h[vs:vs + vlen], row[vs:vs + vlen], settings["drop"])
            else:
                res = stage3_merge(h[vs:vs + vlen], row[vs:vs + vlen], settings.get("llm_ratio", 0.5))
            h = torch.cat([h[:vs], res["h"], h[vs + vlen:]], 0)
            pos = pos[:vs] + [vs + j for j in res["keep"]] + pos[vs + vlen:]
            stats.update(visual_tokens_after_llm=len(res["keep"]), keep_llm=res["keep"])
        if k_llm is not None and li == k_llm - 1:
            h, row_probs = _qwen_layer(layers[li], h, pos, rope, caches[li], causal=not noncausal, want_probs=True)
        else:
            h, _ = _qwen_layer(layers[li], h, pos, rope, caches[li])
    first = _logits(model, h[-1])
    return dict(first_logits=first, tokens=greedy_tokens(model, layers, rope, caches, first, L_full, max_new_tokens),
                stats=stats)

