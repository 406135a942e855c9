"""Test-only PyTorch reference of EarlyTom on Qwen2.5-VL (docs/qwen-earlytom.md), on
transformers' own Qwen2.5-VL modules, with dynamic shapes as the official EarlyTom code runs:
the batch of temporal patches is truncated after every merge, selection uses Python lists.

Stages I-III reuse the LLaVA-OV reference (tests/references/earlytom_ref.py): `merge_layer`
and `segment_frames` (stage I), `stage2_select` (stage II), `stage3_merge` (stage III). What is
Qwen-specific lives here:

- The encoder. transformers' patch embedding, window reordering (`get_vision_window_index`) and
  rotary tables (`rotary_pos_emb` on `get_vision_position_ids`), recomputed for the current
  number of temporal patches T after each merge. Hidden states are viewed as [T, N, C]: the N
  patches of each temporal patch in window order (one permutation for every temporal patch).
  Blocks outside the compression layers P run as transformers' block modules on the flat
  sequence with the `cu_seqlens` of the current T (windows, or one segment per temporal patch
  for `fullatt_block_indexes`); blocks in P are written out here (norm1, qkv, transformers'
  `apply_rotary_pos_emb_vision`, an eager fp32 softmax, proj, norm2, mlp) to expose the
  attention probabilities as a block-diagonal [T, heads, N, N] matrix (zero outside the
  query's window; dense for a full-attention block).
- Importance: at the last block of P, the merged attention matrix's mean over heads, then over
  all N queries (= (|w|/N) · the window's mean); a merged token's importance is the mean of its
  4 patches', put in raster order of the mh x mw merged grid.
- Frame sources: an output frame of a merge takes the FIRST (smallest) input frame of its mix
  row as its source, composed across layers; its tokens take the 3-D M-RoPE positions the
  uncompressed video gives that source temporal patch at their (row, column). The text after
  the video keeps its uncompressed positions (one past the full video's largest).
- The LLM: transformers' decoder layers with explicit 3-D positions (the text model's own
  rotary embedding) and an explicit causal mask; stage III uses the attention probabilities
  of the last prompt token at layer k-1 (mean over heads; computed here from that layer's
  q/k projections, as the LLaVA-OV reference does with its own layer), over the kept visual
  tokens only (Qwen has no newline token).
"""

from __future__ import annotations

import numpy as np
import torch

from earlytom_jax.bench_torch import qwen_positions as full_positions
from tests.references.earlytom_ref import merge_layer, segment_frames, stage2_select, stage3_merge
from tests.tiny_qwen import flatten


def _transformers_parts():
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as mq
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index

    return mq, get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index


# --------------------------------------------------------------------------------------------
# Vision encoder
# --------------------------------------------------------------------------------------------


class _Layout:
    """transformers' window index, cu_seqlens and rotary tables for a grid [T, gh, gw]."""

    def __init__(self, visual, T: int, gh: int, gw: int):
        _, cu_fn, pos_fn, win_fn = _transformers_parts()
        grid = torch.tensor([[T, gh, gw]])
        self.T, self.N = T, gh * gw
        self.unit = visual.spatial_merge_unit
        self.window_index, self.cu_window = win_fn(grid, spatial_merge_size=visual.spatial_merge_size,
                                                   window_size=visual.window_size, patch_size=visual.patch_size)
        self.cu_full = cu_fn(grid)
        self.position_ids = pos_fn(grid, visual.spatial_merge_size)
        S = self.N // self.unit
        # one temporal patch's permutation (merged slot -> merged raster index), the same for all
        self.win1 = self.window_index[:S].clone()
        expect = torch.cat([self.win1 + t * S for t in range(T)])
        assert torch.equal(self.window_index, expect), "window permutation differs between temporal patches"
        self.back = torch.argsort(self.win1)  # merged raster index -> merged slot

    def permute(self, x):
        """[T·N, ...] in processor order → window order (transformers' permute_input_for_window_attn)."""
        n = x.shape[0]
        x = x.reshape(n // self.unit, self.unit, -1)[self.window_index]
        return x.reshape(n, -1)

    def rotary(self, visual, like):
        cos, sin = visual.rotary_pos_emb(like, self.position_ids)
        return self.permute(cos), self.permute(sin)

    def same_window(self) -> torch.Tensor:
        """bool [N, N]: query and key slots (window order) in the same window of a temporal patch."""
        bounds = self.cu_window.tolist()
        wid = torch.zeros(self.N, dtype=torch.long)
        for w, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
            if hi <= self.N:
                wid[lo:hi] = w
        assert self.N in bounds, "a window crosses a temporal patch"
        return wid[:, None] == wid[None, :]


def _vision_block_with_probs(blk, h, cos, sin, same_window):
    """One Qwen2.5-VL vision block on h [T, N, C] (window order), attention written out.

    cos, sin [N, D]: the rotary tables of one temporal patch's slots; same_window bool [N, N]
    or None (full attention within each temporal patch). → (h_out [T, N, C],
    probs [T, heads, N, N] fp32, zero outside the query's window)."""
    mq, *_ = _transformers_parts()
    attn = blk.attn
    T, N, C = h.shape
    x = blk.norm1(h)
    q, k, v = attn.qkv(x).reshape(T, N, 3, attn.num_heads, -1).permute(2, 0, 1, 3, 4).unbind(0)  # [T, N, H, D]
    q, k = mq.apply_rotary_pos_emb_vision(q, k, cos, sin)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [T, H, N, D]
    scores = torch.matmul(q, k.transpose(-1, -2)) * attn.scaling
    if same_window is not None:
        scores = scores.masked_fill(~same_window, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    o = torch.matmul(probs.to(v.dtype), v).transpose(1, 2).reshape(T, N, C)
    h = h + attn.proj(o)
    h = h + blk.mlp(blk.norm2(h))
    return h, probs


def _encode(model, pixels: np.ndarray, method_cfg):
    """Stages I and II on the encoder: (visual embeddings [V, Ht] of the kept tokens, stats)."""
    visual = model.model.visual
    vc = model.config.vision_config
    flat, (T, gh, gw) = flatten(np.asarray(pixels, np.float32), vc.temporal_patch_size, vc.patch_size,
                                       vc.spatial_merge_size)
    unit = visual.spatial_merge_unit
    N = gh * gw
    S = N // unit
    mw = gw // vc.spatial_merge_size
    mh = gh // vc.spatial_merge_size
    lay = _Layout(visual, T, gh, gw)
    h = lay.permute(visual.patch_embed(torch.from_numpy(flat)))  # [T·N, C] window order
    C = h.shape[-1]
    depth = len(visual.blocks)
    full = set(visual.fullatt_block_indexes)

    P = [] if method_cfg is None else sorted(method_cfg.get("layers", []))
    if len(set(P)) != len(P) or (P and (P[0] < 0 or P[-1] >= depth)):
        raise ValueError(f"compression layers {P} outside blocks 0..{depth - 1}")
    if P:
        tau = method_cfg["tau"]
        alpha = method_cfg.get("alpha", 0.9)
        M = method_cfg.get("max_window", 6)
        quirks = method_cfg.get("quirks", True)
        weighted = method_cfg.get("weighted", True)

    stats = dict(frames_after_layer=[], segments=None, dynamic=None, kept=None, sources=list(range(T)),
                 importance=None)
    sources = list(range(T))
    importance = None
    for b in range(depth):
        cos, sin = lay.rotary(visual, h)
        if b in P:
            Tc = lay.T
            h3, probs = _vision_block_with_probs(visual.blocks[b], h.view(Tc, N, C), cos[:N], sin[:N],
                                                 None if b in full else lay.same_window())
            last = b == P[-1]
            res = merge_layer(h3, probs if last else None, tau, alpha, M, quirks, weighted=weighted)
            sources = [sources[min(i for i, _ in row)] for row in res["mix"]]
            Tn = res["x"].shape[0]
            stats["frames_after_layer"].append(Tn)
            if last:
                importance = res["attn"].mean(dim=1).mean(dim=1)  # heads, then all N queries: [T', N]
            h = res["x"].reshape(Tn * N, C)
            if Tn != Tc:
                lay = _Layout(visual, Tn, gh, gw)
        else:
            cu = lay.cu_full if b in full else lay.cu_window
            h = visual.blocks[b](h, cu_seqlens=cu, position_embeddings=(cos, sin))
    Tf = lay.T
    merged = visual.merger(h)  # [Tf·S, Ht], merged slots in window order
    merged = merged.view(Tf, S, -1)[:, lay.back]  # raster order of the mh x mw grid
    stats["sources"] = sources
    if not P:
        stats["kept"] = [list(range(S)) for _ in range(Tf)]
        return merged.reshape(Tf * S, -1), stats, (T, gh, gw)

    imp = importance.view(Tf, S, unit).mean(dim=-1)[:, lay.back]  # [Tf, S] raster order
    segments = segment_frames(h.view(Tf, N, C), tau, alpha, M, quirks)
    sel = stage2_select(imp, segments, T, method_cfg["r"], quirks=quirks,
                        decoupled=method_cfg.get("decoupled", True), grid=(mh, mw))
    stats.update(segments=segments, dynamic=sel["dynamic"], kept=sel["kept"], importance=imp)
    toks = torch.cat([merged[t][sel["kept"][t]] for t in range(Tf)], 0)
    return toks, stats, (T, gh, gw)


# --------------------------------------------------------------------------------------------
# LLM
# --------------------------------------------------------------------------------------------


def _causal_mask(n: int, past: int) -> torch.Tensor:
    """Additive fp32 mask [1, 1, n, past + n]: row i sees the cached rows and new rows 0..i."""
    allowed = torch.ones(n, past + n, dtype=torch.bool)
    allowed[:, past:] = torch.ones(n, n, dtype=torch.bool).tril()
    mask = torch.zeros(n, past + n, dtype=torch.float32).masked_fill(~allowed, torch.finfo(torch.float32).min)
    return mask[None, None]


def _last_row_probs(layer, h, cos, sin) -> torch.Tensor:
    """Attention probabilities of the last row of h [1, n, H] at decoder `layer` (its input),
    mean over heads → [n] fp32. The last row sees every row under the causal mask."""
    mq, *_ = _transformers_parts()
    attn = layer.self_attn
    n = h.shape[1]
    x = layer.input_layernorm(h)
    q = attn.q_proj(x).view(1, n, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(1, n, -1, attn.head_dim).transpose(1, 2)
    q, k = mq.apply_rotary_pos_emb(q, k, cos, sin)
    k = mq.repeat_kv(k, attn.num_key_value_groups)
    scores = torch.matmul(q[:, :, -1:], k.transpose(2, 3)) * attn.scaling
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    return probs[0, :, 0].mean(dim=0)


def _run_layer(lm, li, h, pos, cache, past):
    """Decoder layer li on new rows h [1, n, H] at positions pos [3, n], after `past` cached rows."""
    cos, sin = lm.rotary_emb(h, pos[:, None, :])
    n = h.shape[1]
    mask = _causal_mask(n, past) if n > 1 else None
    return lm.layers[li](h, attention_mask=mask, position_embeddings=(cos, sin), past_key_values=cache,
                         use_cache=True)


def _logits(model, h_last):
    lm = model.model.language_model
    return model.lm_head(lm.norm(h_last))[0, -1].float()


@torch.no_grad()
def qwen_earlytom_reference(model, pixels, prefix_ids, suffix_ids, second_per_grid_t: float = 1.0, *,
                            method_cfg=None, max_new_tokens: int = 1) -> dict:
    """Prompt = prefix_ids + kept visual tokens + suffix_ids on a transformers
    Qwen2_5_VLForConditionalGeneration (fp32, eval).

    pixels [T', 3, H, W] (normalised, T' even); prefix_ids end with <|vision_start|>,
    suffix_ids start with <|vision_end|>. method_cfg None (or layers []): all tokens (equals
    transformers' own forward); else a dict: r, layers, tau, alpha, max_window, quirks,
    decoupled, weighted, llm_layer (None: no stage III), llm_ratio.

    Returns dict(frames_after_layer, segments, dynamic, kept [per final temporal patch, raster
    indices], sources [per final temporal patch], positions [(t, h, w) per kept token relative
    to the video's first position], llm_keep (indices into the kept tokens, or None),
    visual_tokens, first_token, logits [V] fp32, tokens (max_new_tokens greedy tokens, no EOS),
    next_position (the first generated token's position))."""
    if any(p.dtype != torch.float32 for p in model.parameters()):
        raise ValueError("the reference runs fp32 models only")
    cfg = model.config
    vc = cfg.vision_config
    tps = vc.tokens_per_second
    visual, stats, (T, gh, gw) = _encode(model, pixels, method_cfg)
    S = gh * gw // (vc.spatial_merge_size ** 2)

    npre, nsuf = len(prefix_ids), len(suffix_ids)
    full = full_positions(npre, (T, gh, gw), nsuf, second_per_grid_t, tps, vc.spatial_merge_size)
    cols = [npre + stats["sources"][t] * S + s for t, ks in enumerate(stats["kept"]) for s in ks]
    vis_pos = full[:, cols]
    pos = torch.cat([full[:, :npre], vis_pos, full[:, npre + T * S:]], 1)
    stats["positions"] = [tuple(int(v) - npre for v in vis_pos[:, j]) for j in range(vis_pos.shape[1])]

    lm = model.model.language_model
    emb = lm.embed_tokens
    pre = emb(torch.tensor(list(prefix_ids), dtype=torch.long)).float()
    suf = emb(torch.tensor(list(suffix_ids), dtype=torch.long)).float()
    h = torch.cat([pre, visual, suf], 0)[None]
    L_full = h.shape[1]
    vlen = visual.shape[0]
    stats["visual_tokens"] = vlen
    stats["llm_keep"] = None

    nL = len(lm.layers)
    k_llm = None if method_cfg is None else method_cfg.get("llm_layer", None)
    if k_llm is not None:
        if not 1 <= k_llm < nL:
            raise ValueError(f"llm_layer {k_llm} outside 1..{nL - 1}")
        if nsuf == 0:
            raise ValueError("stage III needs a prompt token after the visual span")
        r_in = method_cfg.get("llm_ratio", 0.5)

    from transformers.cache_utils import DynamicCache

    cache = DynamicCache(config=cfg.text_config)
    row = None
    for li in range(nL):
        if k_llm is not None and li == k_llm:
            res = stage3_merge(h[0, npre: npre + vlen], row[npre: npre + vlen], r_in)
            h = torch.cat([h[:, :npre], res["h"][None], h[:, npre + vlen:]], 1)
            keep = torch.tensor(res["keep"], dtype=torch.long)
            pos = torch.cat([pos[:, :npre], pos[:, npre + keep], pos[:, npre + vlen:]], 1)
            stats["llm_keep"] = res["keep"]
        if k_llm is not None and li == k_llm - 1:
            cos, sin = lm.rotary_emb(h, pos[:, None, :])
            row = _last_row_probs(lm.layers[li], h, cos, sin)  # last prompt token's row [L_full]
            assert row.shape[0] == L_full
        h = _run_layer(lm, li, h, pos, cache, 0)
    logits = _logits(model, h)

    tokens = []
    nxt = int(full.max()) + 1
    out = logits
    for step in range(max_new_tokens):
        tok = int(torch.argmax(out))
        tokens.append(tok)
        if step == max_new_tokens - 1:
            break
        x = emb(torch.tensor([[tok]], dtype=torch.long)).float()
        p = torch.full((3, 1), nxt + step, dtype=torch.long)
        for li in range(nL):
            x = _run_layer(lm, li, x, p, cache, cache.get_seq_length(li))
        out = _logits(model, x)
    return dict(frames_after_layer=stats["frames_after_layer"], segments=stats["segments"],
                dynamic=stats["dynamic"], kept=stats["kept"], sources=stats["sources"],
                positions=stats["positions"], llm_keep=stats["llm_keep"], visual_tokens=vlen,
                importance=stats["importance"], first_token=int(torch.argmax(logits)), logits=logits,
                tokens=tokens, next_position=nxt)
