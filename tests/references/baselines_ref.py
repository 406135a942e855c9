"""Test-only PyTorch references of the token-budget baselines on transformers' LLaVA-OneVision:
VisionZip, uniform token pooling/sampling, uniform frame subsampling.

Written from the descriptions (spec section 9; for VisionZip the official LLaVA-OV baseline's
choices: attention and keys of the last encoder block, selection after projector and 2x2
bilinear pooling, K = int(b · dominant_ratio), C = b - K). Dynamic shapes, plain Python loops
per frame and per token, fp32; the LLM is transformers' own forward on `inputs_embeds`.

Conventions:
- Budget: B = round(r · T0 · S) tokens, frame t gets floor((t+1)B/T0) - floor(tB/T0).
- Top-K ties: lower index first. Similarity argmax ties: first target (raster order).
- Uniform cells: `earlytom_ref._static_blocks_2d(S, b)`; a cell's centre is its middle row and
  column, (first + last) // 2 each.
- Uniform frames: k = max(1, round(r · T0)) frames at `np.linspace(0, T0 - 1, k).astype(int)`,
  then the unmodified model on those frames.
"""

from __future__ import annotations

import numpy as np
import torch

from tests.references.earlytom_ref import (
    _argmax_first,
    _siglip_block_with_probs,
    _static_blocks_2d,
    _vision_parts,
    bilinear_pool,
)


def frame_budgets(T0: int, r: float, S: int) -> list[int]:
    B = round(r * T0 * S)
    return [(t + 1) * B // T0 - t * B // T0 for t in range(T0)]


def _last_block(layer, h):
    """The last SigLIP block written out: (h_out, attention received [T, N] (mean over heads,
    then queries), keys [T, N, d] (mean over heads))."""
    attn = layer.self_attn
    T, N, _ = h.shape
    k = attn.k_proj(layer.layer_norm1(h)).view(T, N, attn.num_heads, attn.head_dim).transpose(1, 2)
    h_out, probs = _siglip_block_with_probs(layer, h)
    return h_out, probs.mean(dim=1).mean(dim=1), k.mean(dim=1)


def _encode(model, pixel_values):
    """Pooled LLM-space tokens [T, S, H], pooled attention received [T, S], pooled keys
    [T, S, d] (vision_feature_layer -1: every block)."""
    cfg = model.config
    if cfg.vision_feature_layer != -1:
        raise NotImplementedError("the reference runs every encoder block")
    embeddings, blocks = _vision_parts(model)
    h = embeddings(pixel_values.float())
    for b in blocks[:-1]:
        h = b(h, None)
    h, received, keys = _last_block(blocks[-1], h)
    T = h.shape[0]
    g = cfg.vision_config.image_size // cfg.vision_config.patch_size
    p = -(-g // 2)

    def pool(x):
        return bilinear_pool(x.reshape(T, g, g, -1), p, p).reshape(T, p * p, -1)

    return pool(model.model.multi_modal_projector(h)), pool(received[..., None])[..., 0], pool(keys)


def visionzip_frame(x, received, keys, K: int, C: int, quirks: bool = True) -> dict:
    """One frame: x [S, H], received [S], keys [S, d]. Returns dict(tokens [K + C, H],
    dominant, targets (raster indices), groups {target: [merged indices]})."""
    S = x.shape[0]
    vals = [float(v) for v in received.tolist()]
    order = sorted(range(S), key=lambda j: (-vals[j], j))
    dominant = sorted(order[:K])
    rest = [j for j in range(S) if j not in set(dominant)]
    targets, groups = [], {}
    if C > 0:
        step = max(1, len(rest) // C)
        targets = rest[::step][:C]
        groups = {t: [] for t in targets}
        kn = keys / keys.norm(dim=-1, keepdim=True)
        for j in rest:
            if j in groups:
                continue
            sims = [float(torch.dot(kn[j], kn[t])) for t in targets]
            groups[targets[_argmax_first(sims, list(range(len(targets))))]].append(j)
    ctx = []
    for t in targets:
        g = groups[t]
        if quirks:
            ctx.append(x[t] + (x[g].sum(0) / len(g) if g else 0.0))
        else:
            ctx.append((x[t] + x[g].sum(0)) / (1 + len(g)))
    tokens = torch.cat([x[dominant]] + ([torch.stack(ctx)] if ctx else []), 0)
    return dict(tokens=tokens, dominant=dominant, targets=targets, groups=groups)


def uniform_frame(x, b: int, mode: str) -> dict:
    """One frame's b cells: tokens [b, H] (cell means or centre tokens), centres, cells."""
    S = x.shape[0]
    g = int(round(S**0.5))
    cells = _static_blocks_2d(S, b) if b else []
    centres = []
    for cell in cells:
        ys, xs = [i // g for i in cell], [i % g for i in cell]
        centres.append(((min(ys) + max(ys)) // 2) * g + (min(xs) + max(xs)) // 2)
    if mode == "pool":
        tokens = [x[cell].mean(0) for cell in cells]
    else:
        tokens = [x[c] for c in centres]
    return dict(tokens=torch.stack(tokens) if tokens else x[:0], centres=centres, cells=cells)


def picked_frames(T0: int, r: float) -> list[int]:
    k = max(1, round(r * T0))
    return [int(i) for i in np.linspace(0, T0 - 1, k).astype(int)]


def _first_logits(model, prefix_ids, visual, suffix_ids):
    """transformers' forward on embed(prefix) + visual + image_newline + embed(suffix)."""
    emb = model.get_input_embeddings()
    h = torch.cat([
        emb(torch.tensor(list(prefix_ids))),
        visual,
        model.model.image_newline[None],
        emb(torch.tensor(list(suffix_ids))),
    ], 0)
    return model(inputs_embeds=h[None].float()).logits[0, -1].float()


@torch.no_grad()
def baseline_reference(model, pixel_values, prefix_ids, suffix_ids, method: str, ratio: float, **kw) -> dict:
    """method "visionzip" (kw: dominant_ratio, quirks), "uniform_tokens" (kw: mode) or
    "uniform_frames". Returns dict(first_logits [V], visual_tokens, frames: per kept frame a
    dict of its selection (visionzip / uniform_tokens) or the kept frame indices)."""
    if any(p.dtype != torch.float32 for p in model.parameters()):
        raise ValueError("the reference runs fp32 models only")
    T0 = pixel_values.shape[0]
    if method == "uniform_frames":
        idx = picked_frames(T0, ratio)
        pooled, _, _ = _encode(model, pixel_values[idx])
        visual = pooled.reshape(-1, pooled.shape[-1])
        return dict(first_logits=_first_logits(model, prefix_ids, visual, suffix_ids),
                    visual_tokens=visual.shape[0], frames=idx)
    pooled, received, keys = _encode(model, pixel_values)
    S = pooled.shape[1]
    per = []
    for t, b in enumerate(frame_budgets(T0, ratio, S)):
        if method == "visionzip":
            K = int(b * kw.get("dominant_ratio", 54 / 64))
            per.append(visionzip_frame(pooled[t], received[t], keys[t], K, b - K, kw.get("quirks", True)))
        elif method == "uniform_tokens":
            per.append(uniform_frame(pooled[t], b, kw.get("mode", "pool")))
        else:
            raise ValueError(method)
    visual = torch.cat([f["tokens"] for f in per], 0)
    return dict(first_logits=_first_logits(model, prefix_ids, visual, suffix_ids),
                visual_tokens=visual.shape[0], frames=per)


# ------------------------------------------------------------------------------ ToMe


def tome_schedule(n: int, c: int, depth: int) -> list[int] | None:
    """The smallest constant r whose schedule (each block capped by the tokens left above c
    and by half the tokens) takes n to c in `depth` blocks; None if none does."""
    for r in range(1, n + 1):
        left, out = n, []
        for _ in range(depth):
            m = min(r, left - c, left // 2)
            out.append(m)
            left -= m
        if left == c:
            return out
    return None


def _tome_block(layer, h, size, patch, r: int):
    """One SigLIP block on one frame with ToMe: h [N, C], size [N], patch (list of N ints).
    Proportional attention, then bipartite soft matching on the head-averaged keys (A = even
    positions, B = odd; every A token's most similar B token, first on ties; the r A tokens of
    highest similarity, first position on ties, merge into their B token by size-weighted
    average), then the MLP. Returns (h, size, patch) with N - r tokens."""
    attn = layer.self_attn
    N, C = h.shape
    nh, hd = attn.num_heads, attn.head_dim
    x = layer.layer_norm1(h)
    q = attn.q_proj(x).view(N, nh, hd).transpose(0, 1)
    k = attn.k_proj(x).view(N, nh, hd).transpose(0, 1)
    v = attn.v_proj(x).view(N, nh, hd).transpose(0, 1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * attn.scale + torch.log(size)[None, None, :]
    o = torch.matmul(torch.softmax(scores, dim=-1), v).transpose(0, 1).reshape(N, C)
    h = h + attn.out_proj(o)
    if r:
        metric = k.mean(dim=0)
        metric = metric / metric.norm(dim=-1, keepdim=True)
        A, B = list(range(0, N, 2)), list(range(1, N, 2))
        sim = metric[A] @ metric[B].T
        best = [max(range(len(B)), key=lambda j, i=i: (sim[i, j].item(), -j)) for i in range(len(A))]
        order = sorted(range(len(A)), key=lambda i: (-sim[i, best[i]].item(), i))
        sums = [h[b] * size[b] for b in B]
        sizes = [size[b].clone() for b in B]
        for i in order[:r]:
            sums[best[i]] = sums[best[i]] + h[A[i]] * size[A[i]]
            sizes[best[i]] = sizes[best[i]] + size[A[i]]
        keep = order[r:]
        h = torch.stack([h[A[i]] for i in keep] + [s / z for s, z in zip(sums, sizes)])
        size = torch.stack([size[A[i]] for i in keep] + sizes)
        patch = [patch[A[i]] for i in keep] + [patch[b] for b in B]
    h = h + layer.mlp(layer.layer_norm2(h))
    return h, size, patch


@torch.no_grad()
def tome_reference(model, pixel_values, prefix_ids, suffix_ids, ratio: float) -> dict:
    """ToMe in every encoder block, c = max(1, round(r · S)) tokens per frame, projector
    without pooling, tokens in the raster order of the patch each kept. Returns
    dict(first_logits [V], visual [T·c, H], patches per frame, schedule)."""
    cfg = model.config
    embeddings, blocks = _vision_parts(model)
    g = cfg.vision_config.image_size // cfg.vision_config.patch_size
    S = (-(-g // 2)) ** 2
    c = max(1, round(ratio * S))
    sched = tome_schedule(g * g, c, len(blocks))
    tokens, patches = [], []
    for frame in pixel_values.float():
        h = embeddings(frame[None])[0]
        size, patch = torch.ones(h.shape[0]), list(range(h.shape[0]))
        for layer, r in zip(blocks, sched):
            h, size, patch = _tome_block(layer, h, size, patch, r)
        order = sorted(range(len(patch)), key=lambda i: patch[i])
        tokens.append(model.model.multi_modal_projector(h[order]))
        patches.append(sorted(patch))
    visual = torch.cat(tokens, 0)
    return dict(first_logits=_first_logits(model, prefix_ids, visual, suffix_ids), visual=visual,
                patches=patches, schedule=sched)
