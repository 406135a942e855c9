"""Test-only PyTorch reference of FastVID on transformers' own Qwen2.5-VL, written from FastVID's
official Qwen2.5-VL port (LunarShen/FastVID a40a109,
`fastvid_qwen25vl/lmms-eval/lmms_eval/models/qwenvlutils/modeling_qwen2_5_vl.py`), not from
earlytom_jax/compression/fastvid_qwen.py: dynamic shapes, one loop per segment and per frame as
there, fp32.

- signals (port l. 192-203, 584-594, 1835-1836): a forward pre-hook on the LAST vision block's
  attention captures its input (window order) and rotary tables during transformers' own
  forward; the queries and keys are recomputed with the module's `qkv` and transformers'
  `apply_rotary_pos_emb_vision`; per head the mean query of each temporal patch against the
  mean key of each group of 4 consecutive patches (a merge unit), softmax over the temporal
  patch's units, mean over heads, put back in raster order with `argsort(window_index)`; the
  frame feature is the mean of the temporal patch's merged tokens (`pooler_output`);
- DySeg, the per-segment budgets, sub-segments (`dyseg_ignore`), ATS, density anchors and the
  merge: the port's l. 1897-2085, step for step;
- the LLM: `qwen_baselines_ref._run` (transformers' decoder layers with explicit 3-D positions),
  each kept token at its own position in the full sequence (the port's
  `position_ids[:, :, keep_indexs]`), the text after the video at its full-sequence positions,
  decoding from one past the full sequence's largest position (the port's `rope_deltas`).

Differences from the port (shared with our implementation, docs/baselines/fastvid.md):
deterministic ties (top-k: lower index first; density peaks by (density, lower index) instead of
U(0, 1e-6) noise); fewer than c temporal patches: every boundary is cut (the port's top-k fails).
"""

from __future__ import annotations

import torch

from earlytom_jax.bench_torch import qwen_positions as full_positions
from tests.references.fastvid_ref import _density_score, _merge, _topk, dyseg
from tests.references.qwen_baselines_ref import _grid_sizes, _run, last_block_qk


def port_signals(model, pixels):
    """(merged tokens [T, S, Ht], ATS attention [T, S] (raster order), grid) from one forward of
    transformers' vision tower (module docstring)."""
    tokens, grid, q, k, _, back = last_block_qk(model, pixels)
    T, gh, gw = grid
    heads, D = q.shape[1], q.shape[2]
    q_mean = q.transpose(0, 1).reshape(heads, T, gh * gw, D).mean(-2, keepdim=True)  # [heads, T, 1, D]
    k_unit = k.transpose(0, 1).reshape(heads, T, gh * gw // 4, 4, D).mean(-2)  # [heads, T, S, D]
    w = torch.softmax(q_mean @ k_unit.transpose(-2, -1) / D**0.5, dim=-1, dtype=torch.float32)
    w = w.mean(2).mean(0)  # [T, S], window order
    w = w.reshape(-1)[back].reshape(T, -1)
    return tokens, w, grid


def _sizes(cuts: list[int], n: int) -> list[int]:
    bounds = [-1] + sorted(cuts) + [n - 1]
    return [b - a for a, b in zip(bounds[:-1], bounds[1:])]


def segment_budgets(L: int, sims: list[float], S: int, R: int, d: float, p: int, ignore: float):
    """(salient, context) counts of each frame of a segment of L frames; sims: the L - 1
    neighbour similarities inside it (port l. 1926-1989)."""
    retain = R * L
    ctx = max(int(retain * d), 1)
    sal = retain - ctx
    if L == 1:
        return [sal], [ctx]
    sub = _sizes([i for i in range(L - 1) if sims[i] < ignore], L)
    V = len(sub)
    sal_sub = [sal // V + (1 if i < sal % V else 0) for i in range(V)]
    n_anchor = (V + p - 1) // p
    per_anchor = [ctx // n_anchor + (1 if j < ctx % n_anchor else 0) for j in range(n_anchor)]
    ctx_sub, j = [], 0
    for i in range(V):
        if i % p == 0:
            ctx_sub.append(min(per_anchor[j], S // 2))
            j += 1
        else:
            ctx_sub.append(0)
    ctx_sub.reverse()  # the anchors sit on the last sub-segment and every p-th before it
    sal_f, ctx_f = [], []
    for i in range(V):
        sal_f += [0] * (sub[i] - 1)
        ctx_f += [0] * (sub[i] - 1)
        if ctx_sub[i] == 0:
            sal_f.append(min(sal_sub[i], S))
            ctx_f.append(0)
        else:
            c = min(ctx_sub[i], S // 2)
            ctx_f.append(c)
            sal_f.append(min(sal_sub[i], S - c))
    return sal_f, ctx_f


def stprune(video, attn, sizes, sims, R: int, d: float, p: int, beta: float, ignore: float) -> dict:
    """video [T, S, H], attn [T, S], DySeg sizes, neighbour similarities [T - 1] → dict(tokens
    [K, H] and keep [K] (t·S + s, sorted), salient / context per frame, sub-segment starts)."""
    T, S, H = video.shape
    out, keep, sal_all, ctx_all, sub_starts = [], [], [], [], []
    start = 0
    for L in sizes:
        sal, ctx = segment_budgets(L, sims[start:start + L - 1], S, R, d, p, ignore)
        sal_all += sal
        ctx_all += ctx
        sub_starts += [True] + [bool(sims[start + i] < ignore) for i in range(L - 1)]
        flat = video[start:start + L].reshape(L * S, H)
        salient, contexts = [], []
        for f in range(L):
            top = _topk(attn[start + f], sal[f]) if sal[f] > 0 else []
            salient += [f * S + j for j in top]
            if ctx[f] > 0:
                rest = [j for j in range(S) if j not in set(top)]
                score = _density_score(video[start + f, rest])
                contexts.append([f * S + rest[a] for a in sorted(_topk(score, ctx[f]))])
        out += [flat[i] for i in salient]
        keep += [start * S + i for i in salient]
        for anchors in contexts:  # each context frame merges the segment's other non-salient tokens
            gone = set(salient) | set(anchors)
            pool = [u for u in range(L * S) if u not in gone]
            out += list(_merge(flat[anchors], flat[pool], beta))
            keep += [start * S + a for a in anchors]
        start += L
    order = sorted(range(len(keep)), key=lambda i: keep[i])
    return dict(tokens=torch.stack([out[i] for i in order]), keep=[keep[i] for i in order],
                salient_per_frame=sal_all, context_per_frame=ctx_all, sub_starts=sub_starts)


@torch.no_grad()
def qwen_fastvid_reference(model, pixels, prefix_ids, suffix_ids, second_per_grid_t: float = 1.0, *, ratio: float,
                           dyseg_c: int = 8, tau: float = 0.84, dyseg_ignore: float = 0.95, d: float = 0.4,
                           p: int = 4, beta: float = 0.6, max_new_tokens: int = 1) -> dict:
    """FastVID (the Qwen2.5-VL port) on a transformers Qwen2_5_VLForConditionalGeneration
    (fp32, eval). pixels [T', 3, H, W] normalised, T' even. → dict(segments (sizes), sims,
    keep (t·S + s, sorted), positions ((t, h, w) of each kept token, relative to the video's
    first position), salient_per_frame, context_per_frame, sub_starts, importance [T, S],
    logits [V] fp32, tokens (greedy), next_position)."""
    if any(q.dtype != torch.float32 for q in model.parameters()):
        raise ValueError("the reference runs fp32 models only")
    vc = model.config.vision_config
    video, attn, grid = port_signals(model, pixels)
    mh, mw, _ = _grid_sizes(model, grid)
    T, S = grid[0], mh * mw
    g = video.mean(1)
    sizes = dyseg(g, dyseg_c, tau)
    gn = g / g.norm(dim=1, keepdim=True)
    sims = [float(v) for v in (gn[:-1] * gn[1:]).sum(1)]
    sel = stprune(video, attn, sizes, sims, int(S * ratio), d, p, beta, dyseg_ignore)

    npre, nsuf, V = len(prefix_ids), len(suffix_ids), len(sel["keep"])
    full = full_positions(npre, grid, nsuf, second_per_grid_t, vc.tokens_per_second, vc.spatial_merge_size)
    vis_pos = full[:, [npre + j for j in sel["keep"]]]
    pos = torch.cat([full[:, :npre], vis_pos, full[:, npre + T * S:]], 1)
    emb = model.get_input_embeddings()
    h = torch.cat([emb(torch.tensor(list(prefix_ids))), sel["tokens"], emb(torch.tensor(list(suffix_ids)))],
                  0)[None].float()
    nxt = int(full.max()) + 1
    logits, toks, _ = _run(model, h, pos, npre, V, nxt, None, max_new_tokens)
    return dict(segments=sizes, sims=sims, keep=sel["keep"], importance=attn,
                positions=[tuple(int(v) - npre for v in vis_pos[:, j]) for j in range(V)],
                salient_per_frame=sel["salient_per_frame"], context_per_frame=sel["context_per_frame"],
                sub_starts=sel["sub_starts"], visual_tokens=V, logits=logits, first_token=int(torch.argmax(logits)),
                tokens=toks, next_position=nxt)
