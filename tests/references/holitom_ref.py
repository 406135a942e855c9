"""Test-only PyTorch reference of HoliTom on transformers' LLaVA-OneVision, written from the
official code (viridisGreen/EarlyTom b909322 `holitom/llava_arch.py` and
`holitom/modeling_qwen2.py`, identical to cokeshao/HoliTom e9b2972). Dynamic shapes, plain
Python loops over segments and frames, Python floats for the retention arithmetic, fp32.

Departures (the same ones earlytom_jax makes, docs/baselines/holitom.md):
- DPC-KNN's `torch.rand(...) * 1e-6` density noise is replaced by an index tie-break: of two
  equal densities the lower index counts as denser; equal scores: the lower index becomes a
  centre first (stable sort). Attention top-k ties: the lower index (stable sort).
- The official in-LLM step (`Qwen2Model_holitom.forward`) is written for one batch row, as here.
- D > 0 (`merge_tokens_by_attention_density`, l. 152-197): the official line 174 takes the
  contextual tokens' positions with `pos.masked_select(mask.unsqueeze(-1))`, which broadcasts
  pos [W, n] against [W, n, 1] and fails (a size error, or W·n·n elements for one frame) on any
  input; here, as evidently meant, `pos.masked_select(mask)`: the non-dominant tokens'
  positions, of which the centres' are taken (l. 177). The features do not depend on it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tests.references.baselines_ref import _encode, _last_block
from tests.references.earlytom_ref import _logits, _qwen_layer, _Rope, _vision_parts
from tests.references.llava_video_ref import avg_pool, grid_sequence


def _top(values: torch.Tensor, k: int) -> list[int]:
    """Indices of the k largest values (lower index first on ties), in increasing order."""
    vals = [float(v) for v in values.tolist()]
    return sorted(sorted(range(len(vals)), key=lambda i: (-vals[i], i))[:k])


def static_windows(feature_sim: torch.Tensor, tau: float, max_window: int):
    """`select_static_windows`: the segmentation maximising the tokens saved. feature_sim
    [T-1, S]. → (segments [(start, end)], total saved)."""
    T = feature_sim.shape[0] + 1

    def saved(a, b):  # tokens static over frames a..b, times (b - a)
        if b <= a:
            return 0.0
        ok = torch.ones(feature_sim.shape[1], dtype=torch.bool)
        for p in range(a, b):
            ok &= feature_sim[p] > tau
        return float(ok.sum()) * (b - a)

    dp, prev = [0.0] * T, [0] * T
    for i in range(T):
        best, best_start = (dp[i - 1] if i > 0 else 0.0), i
        for w in range(2, min(i + 1, max_window) + 1):
            j = i - w
            val = (dp[j] if j >= 0 else 0.0) + saved(j + 1, i)
            if val > best:
                best, best_start = val, j + 1
        dp[i], prev[i] = best, best_start
    segs, i = [], T - 1
    while i >= 0:
        segs.append((prev[i], i))
        i = prev[i] - 1
    return segs[::-1], dp[-1]


def dpc_knn(x: torch.Tensor, cluster_num: int, k: int):
    """`cluster_dpc_knn` on one set x [N, D] with the index tie-break. → (sorted centres, dist)."""
    N, D = x.shape
    dist = torch.cdist(x[None].float(), x[None].float())[0] / (D**0.5)
    nearest = torch.topk(dist, k, dim=-1, largest=False).values
    density = (-(nearest**2).mean(dim=-1)).exp()
    idx = torch.arange(N)
    denser = (density[None, :] > density[:, None]) | (
        (density[None, :] == density[:, None]) & (idx[None, :] < idx[:, None]))
    mask = denser.float()
    delta = (dist * mask + dist.max() * (1 - mask)).min(dim=-1).values
    return _top(delta * density, cluster_num), dist


def merge_clusters(x: torch.Tensor, centres: list[int], dist: torch.Tensor, beta: float):
    """`merge_tokens_by_clustering`: (tokens [C, D], {centre: [members]})."""
    others = [i for i in range(x.shape[0]) if i not in set(centres)]
    groups = {c: [] for c in centres}
    for i in others:
        groups[centres[int(torch.argmin(dist[i, centres]))]].append(i)
    out = []
    for c in centres:
        m = groups[c]
        out.append(beta * x[c] + (1 - beta) * x[m].mean(dim=0) if m else x[c])
    return torch.stack(out) if out else x[:0], groups


def attention_density(feat, attn_row, pos: list[int], retain: float, D: float, beta: float, K: int):
    """`merge_tokens_by_attention_density` for one frame: feat [n, H], attn_row [n], pos the
    tokens' positions. c = ceil(n·r'); dominant: the round(c·(1 - D)) of highest attention,
    raster order; contextual: c minus that many DPC-KNN cluster tokens of the other tokens
    (centres in raster order, merged as `merge_tokens_by_clustering`), after the dominant ones.
    → (tokens [c, H], positions, {centre: [members]} (positions))."""
    c = math.ceil(len(pos) * retain)
    n_dom = round(c * (1 - D))
    n_ctx = c - n_dom
    chosen = _top(attn_row, n_dom) if n_dom > 0 else []
    toks, kept, groups = [feat[chosen]], [pos[i] for i in chosen], {}
    if n_ctx > 0:
        rest = [i for i in range(len(pos)) if i not in set(chosen)]
        centres, dist = dpc_knn(feat[rest], n_ctx, min(K, n_ctx))
        merged, g = merge_clusters(feat[rest], centres, dist, beta)
        toks.append(merged)
        kept += [pos[rest[c]] for c in centres]
        groups = {pos[rest[c]]: [pos[rest[m]] for m in ms] for c, ms in g.items()}
    return torch.cat(toks, 0), kept, groups


def holitom_tokens(pooled, attn, ratio: float, tau: float, beta=0.6, K=7, max_window=1024, D=0.0) -> dict:
    """HoliTom after the projector: pooled [T, S, H], pooled attention [T, S]. Returns dict(
    visual [V, H], kept (t·S + s per token), segments, saved, retain, static {start: [positions]},
    groups {start: {centre: [members]}} (positions), dynamic {t: [kept positions]},
    context {t: {centre: [members]}} (positions; D > 0))."""
    T, S, _ = pooled.shape
    normed = F.normalize(pooled, p=2, dim=-1)
    feature_sim = F.cosine_similarity(normed[:-1], normed[1:], dim=-1)
    segs, saved = static_windows(feature_sim, tau, max_window)
    total = T * S
    retain = min(ratio / ((total - saved) / total), 1)
    toks, kept, static, groups, dynamic, context = [], [], {}, {}, {}, {}
    for a, b in segs:
        if b > a:
            mask = torch.all(feature_sim[a:b] > tau, dim=0)
        else:
            mask = torch.zeros(S, dtype=torch.bool)
        pos = [s for s in range(S) if mask[s]]
        static[a] = pos
        if pos:
            feat = pooled[a:b + 1][:, mask].mean(dim=0)
            n_cl = round(len(pos) * retain)
            if n_cl > 0:
                centres, dist = dpc_knn(feat, n_cl, min(K, n_cl))
                merged, g = merge_clusters(feat, centres, dist, beta)
                toks.append(merged)
                kept += [a * S + pos[c] for c in centres]
                groups[a] = {pos[c]: [pos[m] for m in ms] for c, ms in g.items()}
        dyn = [s for s in range(S) if not mask[s]]
        for t in range(a, b + 1):
            feat, chosen, ctx = attention_density(pooled[t, dyn], attn[t, dyn], dyn, retain, D, beta, K)
            dynamic[t], context[t] = chosen, ctx
            toks.append(feat)
            kept += [t * S + s for s in chosen]
    return dict(visual=torch.cat(toks, 0), kept=kept, segments=segs, saved=saved, retain=retain,
                static=static, groups=groups, dynamic=dynamic, context=context)


def llm_merge(h: torch.Tensor, attn_row: torch.Tensor, r: float) -> dict:
    """`Qwen2Model_holitom.forward` at layer K on the visual span h [L, C]: keep the
    round(L·(1 - r)) rows of highest attention; each other row, in increasing order, is averaged
    into its most similar kept row (dot / (norm · norm) on the states before merging)."""
    L = h.shape[0]
    keep = _top(attn_row, round(L * (1 - r)))
    drop = [i for i in range(L) if i not in set(keep)]
    h = h.clone()
    if keep and drop:
        a, b = h[drop], h[keep]
        sim = (a @ b.T) / (a.norm(dim=-1, keepdim=True) * b.norm(dim=-1, keepdim=True).T)
        best = torch.max(sim, dim=-1).indices
        for i, j in enumerate(drop):
            t = keep[int(best[i])]
            h[t] = (h[t] + h[j]) / 2
    return dict(h=h[keep], keep=keep)


def _encode_video(model, pixel_values):
    """LLaVA-Video: pooled tokens [T, S, H] and attention received [T, S], both 2x2
    average-pooled (`mm_spatial_pool_mode=average`; an odd grid's last row/column dropped)."""
    embeddings, blocks = _vision_parts(model)
    h = embeddings(pixel_values.float())
    for b in blocks[:-1]:
        h = b(h, None)
    h, received, _ = _last_block(blocks[-1], h)
    T, g = h.shape[0], model.config.vision_config.image_size // model.config.vision_config.patch_size

    def pool(x):
        y = avg_pool(x.reshape(T, g, g, -1))
        return y.reshape(T, -1, y.shape[-1])

    return pool(model.model.multi_modal_projector(h)), pool(received[..., None])[..., 0]


@torch.no_grad()
def holitom_reference(model, pixel_values, prefix_ids, suffix_ids, *, ratio, tau, llm_layer, llm_ratio=0.5,
                      max_new_tokens=4, grid=False, D=0.0) -> dict:
    """prompt = prefix + HoliTom's visual tokens + image_newline + suffix (grid=True,
    LLaVA-Video: the tokens frame by frame by position, a cluster token on its segment's first
    frame, a newline after each row that kept one, as `add_newline_token`); the in-LLM merge at
    `llm_layer` (None: off) over the visual span with its newlines; D: the contextual share.
    Greedy tokens (no EOS)."""
    if grid:
        pooled, attn = _encode_video(model, pixel_values)
    else:
        pooled, attn, _ = _encode(model, pixel_values)
    sel = holitom_tokens(pooled, attn, ratio, tau, D=D)
    lm = model.model.language_model
    layers, rope = list(lm.layers), _Rope(model.config.text_config)
    emb = lm.embed_tokens
    newline = model.model.image_newline.float()
    if grid:
        T, S = pooled.shape[:2]
        frames = [[] for _ in range(T)]
        for i, tok in zip(sel["kept"], sel["visual"]):
            frames[i // S].append((i % S, tok))
        visual = grid_sequence(frames, int(round(S**0.5)), newline)
    else:
        visual = torch.cat([sel["visual"], newline[None]], 0)
    h = torch.cat([emb(torch.tensor(list(prefix_ids))).float(), visual, emb(torch.tensor(list(suffix_ids))).float()], 0)
    L, vs, vlen = h.shape[0], len(prefix_ids), visual.shape[0]
    caches = [dict() for _ in layers]
    pos, keep, probs = list(range(L)), None, None
    for li, layer in enumerate(layers):
        if llm_layer is not None and li == llm_layer:
            res = llm_merge(h[vs:vs + vlen], probs[:, -1, :].mean(dim=0)[vs:vs + vlen], llm_ratio)
            h = torch.cat([h[:vs], res["h"], h[vs + vlen:]], 0)
            keep = res["keep"]
            pos = pos[:vs] + [vs + j for j in keep] + pos[vs + vlen:]
        want = llm_layer is not None and li == llm_layer - 1
        h, probs = _qwen_layer(layer, h, pos, rope, caches[li], want_probs=want)
    logits = first = _logits(model, h[-1])
    tokens, nxt = [], L
    for step in range(max_new_tokens):
        tokens.append(int(torch.argmax(logits)))
        if step == max_new_tokens - 1:
            break
        x = emb(torch.tensor([tokens[-1]])).float()
        for li, layer in enumerate(layers):
            x, _ = _qwen_layer(layer, x, [nxt], rope, caches[li])
        logits, nxt = _logits(model, x[-1]), nxt + 1
    return dict(first_logits=first, tokens=tokens, llm_keep=keep, **sel)
