"""Test-only PyTorch reference of PruneVid on transformers' LLaVA-OneVision.

Written from the official code, Visual-AI/PruneVid at commit b12600c6 (its only released
model is PLLaVA): `models/pllava/modeling_pllava.py` (`cluster_dpc_knn`, `refine_clusters`,
`segment_lengths`, `merge_frames_dynamic`, `compute_cluster_vectors`) for the merging after the
projector, and `models/pllava/elastic_cache.py` (`VTPWindowCache`) with `llama.py`
(`LlamaModelVTP.forward`) for the selection inside the LLM. Dynamic shapes and plain Python
loops as in the original; fp32; the LLM layers are `earlytom_ref._qwen_layer`.

Deterministic where the original is not (docs/baselines/prunevid.md):
- DPC-KNN densities get no random noise; a density tie goes to the lower index (j is "denser"
  than i when rho_j > rho_i, or rho_j == rho_i and j < i), so exactly one point has no denser
  neighbour, as with the noise.
- Centres: the cluster_num highest scores, ties to the lower index (stable sort).
- k nearest neighbours: k = min(k, N) (the original needs N >= k).
- LLM selection top-k: ties to the lower index.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tests.references.baselines_ref import _encode
from tests.references.earlytom_ref import _logits, _qwen_layer, _Rope


def dpc_knn(x: torch.Tensor, cluster_num: int, k: int) -> tuple[list[int], list[int]]:
    """x [N, C] → (assign: for each point the rank of its cluster's centre, centres by rank)."""
    n, c = x.shape
    dist = torch.cdist(x[None].float(), x[None].float())[0] / (c ** 0.5)
    near = torch.topk(dist, k=min(k, n), dim=-1, largest=False).values
    density = (-(near ** 2).mean(dim=-1)).exp()
    idx = torch.arange(n)
    denser = (density[None, :] > density[:, None]) | ((density[None, :] == density[:, None]) & (idx[None, :] < idx[:, None]))
    delta = torch.where(denser, dist, dist.max()).min(dim=-1).values
    score = delta * density
    centres = sorted(range(n), key=lambda i: (-float(score[i]), i))[:cluster_num]
    assign = dist[centres].argmin(dim=0).tolist()  # the first centre (by rank) on ties
    for r, ci in enumerate(centres):
        assign[ci] = r
    return assign, centres


def refine(labels: list[int]) -> list[int]:
    """The official `refine_clusters` on one sequence of frame labels: per label keep its
    longest runs (all of them if several tie; none if the longest is one frame), then fill
    each gap left to right with the label of its longer neighbouring run (left on ties, 0
    when it has no neighbour)."""
    n = len(labels)
    runs = []  # (label, start, end)
    for t, lab in enumerate(labels):
        if runs and runs[-1][0] == lab and runs[-1][2] == t - 1:
            runs[-1] = (lab, runs[-1][1], t)
        else:
            runs.append((lab, t, t))
    out = list(labels)
    for lab in set(labels):
        mine = [(s, e) for lb, s, e in runs if lb == lab]
        longest = max(e - s + 1 for s, e in mine)
        for s, e in mine:
            if longest == 1 or e - s + 1 != longest:
                out[s:e + 1] = [-1] * (e - s + 1)
    t = 0
    while t < n:
        if out[t] != -1:
            t += 1
            continue
        start = t
        while t < n and out[t] == -1:
            t += 1
        end = t - 1
        left = right = None
        left_len = right_len = 0
        if start > 0:
            left, j = out[start - 1], start - 1
            while j >= 0 and out[j] == left:
                j -= 1
            left_len = start - 1 - j
        if end < n - 1:
            right, j = out[end + 1], end + 1
            while j < n and out[j] == right:
                j += 1
            right_len = j - end - 1
        if left_len > right_len:
            new = left
        elif right_len > left_len:
            new = right
        else:
            new = left if left is not None else right
        out[start:end + 1] = [0 if new is None else new] * (end - start + 1)
    return out


def _windows(labels: list[int]) -> list[tuple[int, int]]:
    """(start, length) of each run of equal labels (`segment_lengths`)."""
    out = []
    for t, lab in enumerate(labels):
        if out and labels[t - 1] == lab:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((t, 1))
    return out


def _spatial(x: torch.Tensor, positions: list[int], cluster_ratio: float, k: int, frame: int, S: int) -> dict:
    """One set of tokens x [n, H] at `positions` of `frame`: DPC-KNN clusters and their means
    when n > 14 (`spatial_merge_tokens`), else the tokens as they are."""
    n = x.shape[0]
    if n <= 14:
        return dict(tokens=x, kept=[frame * S + p for p in positions], assign=list(range(n)), centres=list(range(n)))
    num = int(n * cluster_ratio)
    assign, centres = dpc_knn(x, num, k)
    a = torch.tensor(assign)
    tokens = torch.stack([x[a == r].mean(0) for r in range(num)])
    return dict(tokens=tokens, kept=[frame * S + positions[c] for c in centres], assign=assign, centres=centres)


@torch.no_grad()
def merge_tokens(x: torch.Tensor, *, temporal_segment_ratio=0.25, k=7, threshold=0.8, cluster_ratio=0.5) -> dict:
    """`merge_frames_dynamic` on pooled tokens x [T, S, H]. Returns dict(tokens [V, H],
    kept (a representative t·S + s per token: its cluster centre, a static token's in the
    window's first frame), labels (DPC-KNN of the frames), refined, windows [(start, len)],
    static (per window the static positions), sets (per window its static set, then one set
    per frame: dicts with assign/centres), groups [(kind, size)] in output order)."""
    T, S, H = x.shape
    labels, _ = dpc_knn(x.mean(dim=1), int(T * temporal_segment_ratio), k)
    refined = refine(labels)
    windows = _windows(refined)
    tokens, kept, static_pos, sets, groups = [], [], [], [], []
    for start, w in windows:
        cur = x[start:start + w]  # [W, S, H]
        xn = F.normalize(cur, p=2, dim=-1)
        sim = torch.einsum("wlc,tlc->wtl", xn, xn)
        sim = (sim.sum(dim=-2) - 1).sum(dim=-2) / (w * (w - 1))  # [S]
        static = (sim > threshold).tolist()
        st = [s for s in range(S) if static[s]]
        dy = [s for s in range(S) if not static[s]]
        static_pos.append(st)
        s_set = _spatial(cur[:, st].mean(dim=0), st, cluster_ratio, k, start, S)
        sets.append(s_set)
        tokens.append(s_set["tokens"])
        kept += s_set["kept"]
        groups.append(("static", s_set["tokens"].shape[0]))
        for j in range(w):
            d_set = _spatial(cur[j, dy], dy, cluster_ratio, k, start + j, S)
            sets.append(d_set)
            tokens.append(d_set["tokens"])
            kept += d_set["kept"]
            groups.append(("dynamic", d_set["tokens"].shape[0]))
    return dict(tokens=torch.cat(tokens, 0), kept=kept, labels=labels, refined=refined, windows=windows,
                static=static_pos, sets=sets, groups=groups)


def select_in_llm(score: torch.Tensor, groups: list[tuple[str, int]], retention_ratio: float) -> list[int]:
    """`VTPWindowCache.process_attention`: in each group (a window's static tokens, or one
    frame's dynamic tokens) the int(size · retention_ratio) of highest score (ties: lower
    index). Returns the kept visual indices, ascending."""
    keep, base = [], 0
    for _, size in groups:
        n = int(size * retention_ratio)
        order = sorted(range(size), key=lambda i: (-float(score[base + i]), i))
        keep += [base + i for i in order[:n]]
        base += size
    return sorted(keep)


@torch.no_grad()
def prunevid_reference(model, pixel_values, prefix_ids, suffix_ids, *, selected_layer=None, retention_ratio=0.4,
                       max_new_tokens=1, **merge_kw) -> dict:
    """Prompt = prefix + merged visual tokens + image_newline + suffix. selected_layer None:
    merging only. Else after layer `selected_layer` (0-based) the attention of the suffix rows
    (max over heads, then over rows) picks the visual tokens kept (`select_in_llm`; the newline
    always stays); hidden states and the KV caches of layers 0..selected_layer keep only the
    kept slots, every slot keeps its original position, and decoding continues at the full
    prompt's length (`LlamaModelVTP`). Returns dict(first_logits, tokens, step_logits (the logits
of each decode step), merge, llm_keep)."""
    if any(p.dtype != torch.float32 for p in model.parameters()):
        raise ValueError("the reference runs fp32 models only")
    pooled, _, _ = _encode(model, pixel_values)
    merge = merge_tokens(pooled, **merge_kw)
    lm = model.model.language_model
    layers = list(lm.layers)
    rope = _Rope(model.config.text_config)
    emb = lm.embed_tokens
    pre = emb(torch.tensor(list(prefix_ids))).float()
    suf = emb(torch.tensor(list(suffix_ids))).float()
    vis = merge["tokens"]
    h = torch.cat([pre, vis, model.model.image_newline[None].float(), suf], 0)
    full_len, a, v = h.shape[0], len(prefix_ids), vis.shape[0]
    pos = list(range(full_len))
    caches = [dict() for _ in layers]
    llm_keep = None
    for li, layer in enumerate(layers):
        want = li == selected_layer
        h, probs = _qwen_layer(layer, h, pos, rope, caches[li], want_probs=want)
        if want:
            rows = probs[:, a + v + 1:, a:a + v]  # suffix rows (after the newline) → visual columns
            score = rows.max(dim=0).values.max(dim=0).values
            llm_keep = select_in_llm(score, merge["groups"], retention_ratio)
            idx = list(range(a)) + [a + j for j in llm_keep] + list(range(a + v, full_len))
            h = h[idx]
            pos = [pos[i] for i in idx]
            for c in caches[:li + 1]:
                c["k"], c["v"] = c["k"][:, idx], c["v"][:, idx]
    logits = _logits(model, h[-1])
    first, tokens, steps, next_pos = logits, [], [], full_len
    for step in range(max_new_tokens):
        tok = int(torch.argmax(logits))
        tokens.append(tok)
        if step == max_new_tokens - 1:
            break
        x = emb(torch.tensor([tok])).float()
        for li, layer in enumerate(layers):
            x, _ = _qwen_layer(layer, x, [next_pos], rope, caches[li])
        logits = _logits(model, x[-1])
        steps.append(logits)
        next_pos += 1
    return dict(first_logits=first, tokens=tokens, step_logits=steps, merge=merge, llm_keep=llm_keep)
