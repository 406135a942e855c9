"""Test-only PyTorch reference of FastVID on LLaVA-Video, written from FastVID's official
LLaVA-Video port (LunarShen/FastVID a40a109, `fastvid_llavavideo/LLaVA-NeXT/llava/model/
language_model/modeling_qwen2.py` l. 893-1085; `llava/model/llava_arch.py` l. 188-223 for the
signals, l. 336-345 for the grid span), on the LLaVA-Video reference path: transformers'
LLaVA-OneVision modules with LLaVA-NeXT's video features (`earlytom_jax.llava_video_torch.
video_features`: projector, `F.avg_pool2d(·, 2)`, `add_token_per_grid`), fp32, dynamic shapes,
one loop per segment and per frame as in the port.

What the port does, step by step (here as written there, generalised from its constants):
1. the full visual span (T frames x g' rows of g' tokens + a newline) loses its newlines:
   `(i + 1) % 14 != 0`, i.e. % (g' + 1); the rest is reshaped to [T, S] (the port: 64 frames
   of 13 x 13, `real_video_token_len = 64 * 13 * 13`);
2. DySeg on the signals' frame features (the c - 1 least similar boundaries and those < tau);
3. per segment of L frames: R = int(S·r), ctx = int(R·L·d), sal = R·L - ctx; L = 1: the frame
   keeps both; else salient spread evenly (the first sal % L frames one more), context over
   ceil(L/p) anchor frames (the last and every p-th before it), evenly, the remainder to the
   last frames first (the list built forwards and reversed);
4. per frame: top-`sal` attention (ATS); among the rest, top-`ctx` density-peak scores
   (cdist / sqrt(H), 4 nearest), sorted by index: the anchors;
5. per anchor frame: every token of the segment that is neither salient (any frame) nor one
   of this frame's anchors joins its most cosine-similar anchor; w = max(1/(joined+1), beta);
6. kept tokens sorted by index, mapped back to their index in the full span; the newline of
   each row that kept a token, `((i // 14) + 1) * 14 - 1` (unique), taken from the span; all
   sorted by span index; `position_ids = keep_indexs`: every kept slot and the text keep their
   positions in the uncompressed sequence.

Signals: with `head` (a transformers `SiglipVisionModel` with its head) the port's
(`encode_images`: the head on the tower's output; `get_attn_2dPool`: avg_pool2d of the probe's
attention): `fastvid_ref.head_signals(..., pool_mode="average")`. Without it, the tower's: the
mean of each frame's pooled tokens and the last block's attention received, average-pooled.

Differences from the port (shared with earlytom_jax/compression/fastvid_video.py): top-k ties
take the lower index first; density peaks compare (density, lower index) instead of adding
U(0, 1e-6) noise; fewer than c frames: every boundary cut.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from earlytom_jax.llava_video_torch import video_features
from tests.references.earlytom_ref import _vision_parts
from tests.references.fastvid_ref import _density_score, _merge, _topk, dyseg, greedy_from, head_signals
from tests.references.llava_video_ref import _last_block


def tower_attention(model, pixel_values) -> torch.Tensor:
    """The last SigLIP block's attention received (heads, then queries mean), average-pooled
    to the token grid → [T, S]."""
    embeddings, blocks = _vision_parts(model)
    h = embeddings(pixel_values.float())
    for b in blocks[:-1]:
        h = b(h, None)
    _, received, _ = _last_block(blocks[-1], h)
    T, N = received.shape
    side = int(round(N**0.5))
    return F.avg_pool2d(received.reshape(T, 1, side, side), 2).reshape(T, -1)


def frame_counts(L: int, R: int, d: float, p: int) -> tuple[list[int], list[int]]:
    """Step 3: (salient, context) per frame of a segment of L frames."""
    seg_ctx = int(R * L * d)
    seg_sal = R * L - seg_ctx
    if L == 1:
        return [seg_sal], [seg_ctx]
    sal = [seg_sal // L + (1 if i < seg_sal % L else 0) for i in range(L)]
    n_anchor = (L + p - 1) // p
    per = [seg_ctx // n_anchor + (1 if j < seg_ctx % n_anchor else 0) for j in range(n_anchor)]
    forward, j = [], 0
    for i in range(L):
        if i % p == 0:
            forward.append(per[j])
            j += 1
        else:
            forward.append(0)
    return sal, forward[::-1]


def prune(video: torch.Tensor, attn: torch.Tensor, sizes: list[int], ratio: float, d: float, p: int,
          beta: float) -> dict:
    """Steps 3-5. video [T, S, H], attn [T, S] → dict(keep (t·S + s, sorted), tokens [K, H],
    salient_per_frame, context_per_frame)."""
    T, S, H = video.shape
    R = int(S * ratio)
    keep, toks, sal_all, ctx_all = [], [], [], []
    start = 0
    for L in sizes:
        seg = video[start:start + L].reshape(L * S, H)
        sal_n, ctx_n = frame_counts(L, R, d, p)
        sal_all += sal_n
        ctx_all += ctx_n
        salient, anchors = [], []
        for f in range(L):
            top = _topk(attn[start + f], sal_n[f]) if sal_n[f] else []
            salient += [f * S + j for j in top]
            if ctx_n[f]:
                rest = [j for j in range(S) if j not in set(top)]
                score = _density_score(video[start + f, rest])
                anchors.append([f * S + rest[k] for k in sorted(_topk(score, ctx_n[f]))])
        if not salient:
            raise ValueError("the port's torch.cat of no salient index fails")
        idx = list(salient)
        out = [seg[j] for j in salient]
        for a in anchors:
            excluded = set(salient) | set(a)
            pool = [u for u in range(L * S) if u not in excluded]
            out += list(_merge(seg[a], seg[pool], beta))
            idx += a
        order = sorted(range(len(idx)), key=lambda i: idx[i])
        keep += [start * S + idx[i] for i in order]
        toks += [out[i] for i in order]
        start += L
    return dict(keep=keep, tokens=torch.stack(toks), salient_per_frame=sal_all, context_per_frame=ctx_all)


@torch.no_grad()
def fastvid_video_reference(model, pixel_values, prefix_ids, suffix_ids, *, ratio: float, dyseg_c: int = 8,
                            tau: float = 0.9, d: float = 0.4, p: int = 4, beta: float = 0.6,
                            keep_positions: bool = True, max_new_tokens: int = 1, head=None) -> dict:
    """FastVID's LLaVA-Video port on an fp32 transformers LLaVA-OneVision `model` run as
    LLaVA-Video; `head`: the original SigLIP for the port's signals. → dict(segments (sizes),
    salient_per_frame, context_per_frame, keep (t·S + s), span_index (each visual slot's index in
    the full grid span, newlines included, sorted), span [V, H] (the visual slots), positions
    (the whole prompt's), first_logits [V], tokens_out (greedy ids))."""
    span = video_features(model.model, pixel_values.float())  # [T·g'(g'+1), H]
    T = pixel_values.shape[0]
    width = span.shape[0] // T
    g = round((width + 0.25) ** 0.5 - 0.5)  # width = g'(g' + 1)
    assert g * (g + 1) == width
    W = g + 1  # the port's 14
    every = torch.arange(span.shape[0])
    is_token = (every + 1) % W != 0
    video = span[is_token].reshape(T, g * g, -1)
    token_at = every[is_token]  # span index of each pooled token, t·S + s order
    if head is not None:
        feats, attn = head_signals(model, head, pixel_values, pool_mode="average")
    else:
        feats, attn = video.mean(dim=1), tower_attention(model, pixel_values)
    sizes = dyseg(feats, dyseg_c, tau)
    sel = prune(video, attn, sizes, ratio, d, p, beta)
    kept_at = token_at[torch.tensor(sel["keep"])]
    newline_at = torch.unique((kept_at // W + 1) * W - 1)
    index = torch.cat([kept_at, newline_at])
    order = torch.argsort(index)
    visual = torch.cat([sel["tokens"], span[newline_at]], 0)[order]
    index = index[order]
    emb = model.get_input_embeddings()
    P, Q, V = len(prefix_ids), len(suffix_ids), visual.shape[0]
    h = torch.cat([emb(torch.tensor(list(prefix_ids))), visual, emb(torch.tensor(list(suffix_ids)))], 0)
    if keep_positions:
        pos = torch.cat([torch.arange(P), P + index, P + span.shape[0] + torch.arange(Q)])
    else:
        pos = torch.arange(P + V + Q)
    first, out = greedy_from(model, h, pos, max_new_tokens)
    return dict(segments=sizes, salient_per_frame=sel["salient_per_frame"],
                context_per_frame=sel["context_per_frame"], keep=sel["keep"], span_index=index.tolist(),
                span=visual, positions=pos[:P + V + Q].tolist(), first_logits=first, tokens_out=out)
