"""Test-only PyTorch reference of FastVID on transformers' LLaVA-OneVision, written from the
official code (LunarShen/FastVID a40a109, `fastvid_llavaonevision/.../modeling_qwen2.py`
l. 900-1000; the same code as viridisGreen/EarlyTom b909322 `fastvid/modeling_qwen2.py`
l. 157-331): dynamic shapes, one loop per segment as there, fp32.

Signals: with `head` (a transformers `SiglipVisionModel` with its head, the original SigLIP
beside the tower), as the official LLaVA-OV code (EarlyTom b909322 `fastvid/llava_arch.py`
l. 211-215, `siglip_encoder.py` `SigLipVisionAbstract` l. 918-921 and the head l. 704-722):
its post_layernorm and attention-pooling head on the tower's output; DySeg's g_t is the
head's pooled output, ATS's attention the probe's attention (nn.MultiheadAttention's weights,
averaged over heads), bilinear-pooled 27 x 27 → 14 x 14 (`get_attn_2dPool`, l. 171-182).
Without it, the Qwen2.5-VL port's signals: DySeg on the mean of each frame's pooled tokens, ATS
on the last SigLIP block's attention received, bilinear-pooled.

Differences from the official code (all shared with earlytom_jax/compression/fastvid.py):
- deterministic ties: top-k (DySeg's c - 1 smallest similarities, ATS, the anchors) take the
  lower index first; density peaks compare (density, lower index) instead of adding
  U(0, 1e-6) noise; the anchor argmax takes the first anchor (torch.argmax);
- fewer than c frames: every boundary is cut (the official top-k would fail).
"""

from __future__ import annotations

import torch

from tests.references.baselines_ref import _encode
from tests.references.earlytom_ref import _vision_parts, bilinear_pool


def head_signals(model, head, pixel_values, pool_mode: str = "bilinear") -> tuple[torch.Tensor, torch.Tensor]:
    """The original SigLIP's signals on the tower's output (every block of the tiny LLaVA-OV's
    tower, no post-LayerNorm, as LLaVA-OV's features). → (g [T, C]: the head's pooled output,
    attention [T, S]: the probe's, averaged over heads, pooled to the token grid: bilinear
    (LLaVA-OV's `get_attn_2dPool`) or "average" (`F.avg_pool2d(·, 2)`, FastVID's LLaVA-Video
    port, `fastvid_llavavideo/.../llava_arch.py` l. 188-197))."""
    embeddings, blocks = _vision_parts(model)
    h = embeddings(pixel_values.float())
    for b in blocks:
        h = b(h, None)
    if isinstance(h, tuple):
        h = h[0]
    vm = getattr(head, "vision_model", head)
    x = vm.post_layernorm(h)
    pool = vm.head
    probe = pool.probe.repeat(x.shape[0], 1, 1)
    out, weights = pool.attention(probe, x, x)  # weights [T, 1, N], mean over heads (torch's default)
    g = (out + pool.mlp(pool.layernorm(out)))[:, 0]
    assert torch.equal(g, pool(x)), "the head written out differs from transformers' forward"
    T, N = weights.shape[0], weights.shape[-1]
    side = int(round(N**0.5))
    maps = weights.reshape(T, side, side, 1)
    if pool_mode == "average":
        p = side // 2
        attn = torch.nn.functional.avg_pool2d(maps.permute(0, 3, 1, 2), 2).reshape(T, p * p)
    else:
        p = -(-side // 2)
        attn = bilinear_pool(maps, p, p).reshape(T, p * p)
    return g, attn


def _topk(values: torch.Tensor, k: int, largest: bool = True) -> list[int]:
    """Indices of the k largest (smallest) of a 1-D tensor, lower index first on ties, in
    order of value."""
    vals = values.tolist()
    sign = -1.0 if largest else 1.0
    return sorted(range(len(vals)), key=lambda j: (sign * vals[j], j))[:k]


def dyseg(global_feats: torch.Tensor, c: int, tau: float) -> list[int]:
    """Segment sizes, in time order."""
    T = global_feats.shape[0]
    g = global_feats / global_feats.norm(dim=1, keepdim=True)
    sim = (g[:-1] * g[1:]).sum(dim=1)
    cuts = set(_topk(sim, min(c - 1, T - 1), largest=False))
    cuts |= set(torch.nonzero(sim < tau, as_tuple=False).squeeze(1).tolist())
    bounds = [-1] + sorted(cuts) + [T - 1]
    return [b - a for a, b in zip(bounds[:-1], bounds[1:])]


def _density_score(x: torch.Tensor) -> torch.Tensor:
    """x [M, H] → density-peak score [M] (the official parallel computation, one frame)."""
    M, H = x.shape
    dist = torch.cdist(x[None], x[None])[0] / (H**0.5)
    nearest = torch.topk(dist, k=4, dim=-1, largest=False).values
    density = (-(nearest**2).mean(dim=-1)).exp()
    idx = torch.arange(M)
    denser = (density[None, :] > density[:, None]) | (
        (density[None, :] == density[:, None]) & (idx[None, :] < idx[:, None]))
    dmax = dist.max()
    dist0 = torch.where(denser, dist, dmax).min(dim=-1).values
    return dist0 * density


def _merge(anchors: torch.Tensor, pool: torch.Tensor, beta: float) -> torch.Tensor:
    """Every token of pool [U, H] joins its most cosine-similar anchor (first on ties);
    anchor = w·anchor + (1-w)·mean(joined), w = max(1/(joined+1), beta)."""
    pn = pool / pool.norm(dim=-1, keepdim=True)
    an = anchors / anchors.norm(dim=-1, keepdim=True)
    assign = (pn @ an.T).argmax(dim=1)
    onehot = torch.zeros(pool.shape[0], anchors.shape[0])
    onehot[torch.arange(pool.shape[0]), assign] = 1.0
    joined = onehot.sum(0)[:, None]
    w = (1 / (joined + 1)).clamp(min=beta)
    agg = (onehot.T @ pool) / joined.clamp(min=1)
    return w * anchors + (1 - w) * agg


def stprune(video: torch.Tensor, attn: torch.Tensor, sizes: list[int], r: float, d: float, p: int,
            beta: float) -> dict:
    """video [T, S, H], attn [T, S], segment sizes → dict(tokens [K, H] and keep [K] (t·S + s),
    sorted by keep; context_per_frame [T])."""
    T, S, _ = video.shape
    R = int(S * r)
    sal = R - int(R * d)
    ctx = R - sal
    counts = [0] * T
    offset = 0
    for L in sizes:
        n_anchor = (L + p - 1) // p
        for i in range(L):
            if (L - 1 - i) % p == 0:
                counts[offset + i] = ctx * L // n_anchor
        offset += L
    out, keep = [], []
    filtered, filt_idx, scores = [], [], []
    for t in range(T):
        salient = _topk(attn[t], sal)
        out += [video[t, j] for j in salient]
        keep += [t * S + j for j in salient]
        rest = [j for j in range(S) if j not in set(salient)]
        filt_idx.append(rest)
        filtered.append(video[t, rest])
        scores.append(_density_score(video[t, rest]) if ctx else None)
    # single-frame DTM: frames whose count is ctx merge their own tokens
    for t in range(T):
        if ctx and counts[t] == ctx:
            a = _topk(scores[t], ctx)
            out += list(_merge(filtered[t][a], filtered[t], beta))
            keep += [t * S + filt_idx[t][j] for j in a]
    # multi-frame DTM: each anchor frame (count > ctx) merges every filtered token of its segment
    start = 0
    for L in sizes:
        if L > 1:
            pool = torch.cat(filtered[start:start + L], 0)
            for t in range(start, start + L):
                if counts[t] > ctx:
                    a = _topk(scores[t], counts[t])
                    out += list(_merge(filtered[t][a], pool, beta))
                    keep += [t * S + filt_idx[t][j] for j in a]
        start += L
    order = sorted(range(len(keep)), key=lambda i: keep[i])
    return dict(tokens=torch.stack([out[i] for i in order]), keep=[keep[i] for i in order],
                context_per_frame=counts)


def _forward(model, h: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    ones = torch.ones(1, h.shape[0], dtype=torch.long)  # explicit mask: no packed-sequence guess from gaps
    return model(inputs_embeds=h[None].float(), position_ids=pos[None], attention_mask=ones).logits[0, -1].float()


def greedy_from(model, h: torch.Tensor, pos: torch.Tensor, max_new_tokens: int):
    """Greedy decoding by full recomputation from embeddings h [L, H] at positions pos [L]; each new
    token takes the next position. Returns (first logits [V], greedy ids)."""
    emb = model.get_input_embeddings()
    logits = first = _forward(model, h, pos)
    out = []
    for _ in range(max_new_tokens):
        tok = int(logits.argmax())
        out.append(tok)
        h = torch.cat([h, emb(torch.tensor([tok]))], 0)
        pos = torch.cat([pos, pos[-1:] + 1])
        logits = _forward(model, h, pos)
    return first, out


@torch.no_grad()
def fastvid_reference(model, pixel_values, prefix_ids, suffix_ids, *, ratio: float, dyseg_c: int = 8,
                      tau: float = 0.9, d: float = 0.4, p: int = 4, beta: float = 0.6,
                      keep_positions: bool = True, max_new_tokens: int = 1, head=None) -> dict:
    """FastVID on transformers' fp32 LLaVA-OneVision; `head`: the original SigLIP (a
    `SiglipVisionModel` with its head) for the official signals. Returns dict(segments (sizes),
    keep (t·S + s, sorted), tokens [K, H], first_logits [V], tokens_out (greedy ids))."""
    video, attn, _ = _encode(model, pixel_values)
    T, S, _ = video.shape
    g = video.mean(dim=1)
    if head is not None:
        g, attn = head_signals(model, head, pixel_values)
    sizes = dyseg(g, dyseg_c, tau)
    sel = stprune(video, attn, sizes, ratio, d, p, beta)
    emb = model.get_input_embeddings()
    P, Q = len(prefix_ids), len(suffix_ids)
    h = torch.cat([emb(torch.tensor(list(prefix_ids))), sel["tokens"], model.model.image_newline[None],
                   emb(torch.tensor(list(suffix_ids)))], 0)
    if keep_positions:  # the official code: position ids of the full sequence
        vis = [P + k for k in sel["keep"]] + [P + T * S]
        pos = torch.tensor(list(range(P)) + vis + list(range(P + T * S + 1, P + T * S + 1 + Q)))
    else:
        pos = torch.arange(h.shape[0])
    first, out = greedy_from(model, h, pos, max_new_tokens)
    return dict(segments=sizes, keep=sel["keep"], tokens=sel["tokens"], first_logits=first, tokens_out=out,
                context_per_frame=sel["context_per_frame"])
