"""Test-only PyTorch reference of EarlyTom (stages I-III) on transformers' LLaVA-OneVision.

Written from /work/shared/spec/earlytom.md (sections 1-4). Dynamic shapes, plain Python loops,
fp32 throughout; meant to be obviously correct, not fast. Every scalar that decides a branch
(EMA, thresholds, blend weights) is an `np.float32`; tau is rounded to fp32 before comparing.

Conventions chosen where the spec leaves room (see also the docstrings):
- Similarities: `F.cosine_similarity(..., dim=-1, eps=1e-8)` per position, then the fp32 mean.
- EMA coefficients: alpha and (1 - alpha) are formed as Python floats and then rounded to fp32
  (what `alpha * s + (1 - alpha) * s_hat` does in torch on fp32 tensors with a Python alpha).
- Top-k ties (stage II dynamic frames, stage III kept tokens): the lower index wins (stable
  sort on descending score). Argmax ties (static runs/blocks, stage III targets, greedy
  decoding): the first index wins.
- A merge at the last middle pair (nxt = 0, w = 1) is still written as the blend
  `1 * F_i + 0 * F_{i+1}`; `mix` records both entries, the second with weight 0.0.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

_EPS = 1e-8


def _f32(v) -> np.float32:
    """A Python number or 0-d tensor as np.float32 (exact for fp32 tensors)."""
    if isinstance(v, torch.Tensor):
        v = v.item()
    return np.float32(v)


def _sim(a: torch.Tensor, b: torch.Tensor) -> np.float32:
    """Mean over positions of the cosine similarity of two frames [N, C] (fp32)."""
    return _f32(F.cosine_similarity(a.float(), b.float(), dim=-1, eps=_EPS).mean())


# --------------------------------------------------------------------------------------------
# Stage I
# --------------------------------------------------------------------------------------------


def frame_similarity(x: torch.Tensor) -> torch.Tensor:
    """S [T, T] float32, S[a, b] = mean_n cos(x[a, n], x[b, n]); x is [T, N, C]."""
    T = x.shape[0]
    S = torch.zeros((T, T), dtype=torch.float32)
    for a in range(T):
        for b in range(T):
            S[a, b] = float(_sim(x[a], x[b]))
    return S


def segment_frames(x, tau, alpha=0.9, max_window=6, quirks=True) -> list[tuple[int, int]]:
    """Spec 2a: streaming segmentation of x [T, N, C] into inclusive (start, end) pairs.

    quirks=True compares frame i with the segment's first frame (official code);
    quirks=False compares it with frame i-1 (paper prose)."""
    T = x.shape[0]
    if T == 0:
        return []
    if T == 1:
        return [(0, 0)]
    tau32 = _f32(tau)
    a = np.float32(alpha)
    b = np.float32(1.0 - float(alpha))
    segments = []
    start, ref, s_hat = 0, 0, np.float32(1.0)
    for i in range(1, T):
        s = _sim(x[ref], x[i]) if quirks else _sim(x[i - 1], x[i])
        s_hat = np.float32(np.float32(a * s) + np.float32(b * s_hat))
        if s_hat < tau32 or (i - start + 1) >= max_window:
            segments.append((start, i - 1))
            start, ref, s_hat = i, i, np.float32(1.0)
    segments.append((start, T - 1))
    return segments


def merge_middle(frames, tau_merge, quirks=True, weighted=True):
    """Spec 2c on middle frames F_0..F_{m-1} (each [N, C]).

    Returns (out, mix): out[k] is an output frame, mix[k] the list of (middle index, weight)
    that forms it. quirks=True: the last middle frame never reaches `out` (official code).
    quirks=False: it is appended at the end when no merge consumed it (paper prose); a merge
    at the last pair still uses w = 1 in both modes. weighted=False (the paper's ablation
    "weighted merging off"): every merge blends the pair with weight 1/2 each, the last pair's
    merge included; which pairs merge is decided exactly as with weighted=True."""
    m = len(frames)
    if m < 2:
        return list(frames), [[(i, 1.0)] for i in range(m)]
    tm = _f32(tau_merge)
    s = [_sim(frames[i], frames[i + 1]) for i in range(m - 1)]
    out, mix = [], []
    i = 0
    while i < m - 1:
        if i + 1 < m - 1:
            nxt = s[i + 1]
            merge = bool(s[i] > tm) and bool(s[i] > nxt)
        else:
            nxt = np.float32(0.0)
            merge = bool(s[i] > tm)
        if merge:
            if not weighted:
                w = np.float32(0.5)
            else:
                w = np.float32(s[i] / np.float32(s[i] + nxt)) if nxt != 0 else np.float32(1.0)
            w1 = np.float32(np.float32(1.0) - w)
            out.append(float(w) * frames[i] + float(w1) * frames[i + 1])
            mix.append([(i, float(w)), (i + 1, float(w1))])
            i += 2
        else:
            out.append(frames[i])
            mix.append([(i, 1.0)])
            i += 1
    if not quirks and i == m - 1:
        out.append(frames[m - 1])
        mix.append([(m - 1, 1.0)])
    return out, mix


def _apply_mix(frames, mix_row):
    """sum_k w_k * frames[idx_k], in the same operation order as merge_middle's blend."""
    if len(mix_row) == 1 and mix_row[0][1] == 1.0:
        return frames[mix_row[0][0]]
    acc = None
    for idx, w in mix_row:
        term = float(w) * frames[idx]
        acc = term if acc is None else acc + term
    return acc


def merge_layer(x, attn, tau, alpha=0.9, max_window=6, quirks=True, weighted=True) -> dict:
    """One compression layer (spec 2a-2c) on x [T, N, C] and attn [T, H, N, N] or None.

    Returns dict(x=[T', N, C], attn=[T', H, N, N] or None, segments, mix) where mix[k] lists
    (input frame index, weight) forming output frame k. tau_merge = sim(s, e) per segment
    with quirks=True, = tau with quirks=False. weighted: see `merge_middle`."""
    T = x.shape[0]
    segments = segment_frames(x, tau, alpha, max_window, quirks)
    out_x, out_a, mix = [], [], []
    for s, e in segments:
        L = e - s + 1
        if L <= 2:
            for f in range(s, e + 1):
                out_x.append(x[f])
                out_a.append(None if attn is None else attn[f])
                mix.append([(f, 1.0)])
            continue
        tau_merge = _sim(x[s], x[e]) if quirks else _f32(tau)
        mids = [x[f] for f in range(s + 1, e)]
        mo, mm = merge_middle(mids, tau_merge, quirks=quirks, weighted=weighted)
        out_x.append(x[s])
        out_a.append(None if attn is None else attn[s])
        mix.append([(s, 1.0)])
        amids = None if attn is None else [attn[f] for f in range(s + 1, e)]
        for frame, row in zip(mo, mm):
            out_x.append(frame)
            out_a.append(None if attn is None else _apply_mix(amids, row))
            mix.append([(s + 1 + j, w) for j, w in row])
        out_x.append(x[e])
        out_a.append(None if attn is None else attn[e])
        mix.append([(e, 1.0)])
    x_out = torch.stack(out_x) if out_x else x[:0]
    a_out = None
    if attn is not None:
        a_out = torch.stack(out_a) if out_a else attn[:0]
    assert x_out.shape[0] == len(mix) and T >= x_out.shape[0]
    return dict(x=x_out, attn=a_out, segments=segments, mix=mix)


# --------------------------------------------------------------------------------------------
# Stage II
# --------------------------------------------------------------------------------------------


def _static_blocks_2d(S: int, n: int) -> list[list[int]]:
    """quirks=False static frames: n 2-D blocks of the g x g grid (g = sqrt(S)), raster order.

    rows = max(floor(sqrt(n)), ceil(n / g)) horizontal bands (the second term only matters
    when floor(sqrt(n)) bands would need more than g columns, e.g. g = 2, n = 3); the g grid
    rows are split over the bands as evenly as possible, the first g % rows bands one row
    taller. Band b gets n // rows columns, plus one for the first n % rows bands; inside a band
    the g grid columns are split as evenly as possible, the first ones one column wider.
    Blocks are listed band by band, left to right; each block's token list is in raster
    order."""
    g = math.isqrt(S)
    if g * g != S:
        raise ValueError(f"2-D static blocks need a square token count, got {S}")
    rows = max(math.isqrt(n), -(-n // g))

    def split(total, parts):
        base, extra = divmod(total, parts)
        edges, lo = [], 0
        for p in range(parts):
            hi = lo + base + (1 if p < extra else 0)
            edges.append((lo, hi))
            lo = hi
        return edges

    blocks = []
    for b, (r0, r1) in enumerate(split(g, rows)):
        cols = n // rows + (1 if b < n % rows else 0)
        for c0, c1 in split(g, cols):
            blocks.append([r * g + c for r in range(r0, r1) for c in range(c0, c1)])
    assert len(blocks) == n and all(blocks)
    return blocks


def _static_blocks_grid(rows: int, cols: int, n: int) -> list[list[int]]:
    """quirks=False static frames on a rows x cols grid (not necessarily square): n 2-D blocks.

    bands = min(rows, max(floor(sqrt(n)), ceil(n / cols))) horizontal bands; the grid rows
    split over the bands as evenly as possible, the first rows % bands bands one row taller;
    band b holds n // bands blocks, one more for the first n % bands bands, its cols columns
    split as evenly as possible (the first ones one column wider). Blocks are listed band by
    band, left to right; each block's token list (indices r * cols + c) is in raster order.
    On a square grid this is exactly `_static_blocks_2d`."""
    if not 1 <= n <= rows * cols:
        raise ValueError(f"{n} static blocks on a {rows} x {cols} grid")
    bands = min(rows, max(math.isqrt(n), -(-n // cols)))

    def split(total, parts):
        base, extra = divmod(total, parts)
        edges, lo = [], 0
        for p in range(parts):
            hi = lo + base + (1 if p < extra else 0)
            edges.append((lo, hi))
            lo = hi
        return edges

    blocks = []
    for b, (r0, r1) in enumerate(split(rows, bands)):
        nb = n // bands + (1 if b < n % bands else 0)
        for c0, c1 in split(cols, nb):
            blocks.append([r * cols + c for r in range(r0, r1) for c in range(c0, c1)])
    assert len(blocks) == n and all(blocks)
    return blocks


def _static_runs_1d(S: int, n: int) -> list[list[int]]:
    base, extra = divmod(S, n)
    runs, lo = [], 0
    for p in range(n):
        hi = lo + base + (1 if p < extra else 0)
        runs.append(list(range(lo, hi)))
        lo = hi
    return runs


def _argmax_first(values: list[float], idx: list[int]) -> int:
    best = idx[0]
    for j in idx[1:]:
        if values[j] > values[best]:
            best = j
    return best


def stage2_select(importance, segments, T0, r, quirks=True, decoupled=True, grid=None) -> dict:
    """Spec section 3 steps 2-5 on pooled importance [T', S] (fp32).

    decoupled=False (the ablation "decoupled selection off"): every frame is dynamic (top-k).
    grid: (rows, cols) of the S tokens for quirks=False's 2-D static blocks
    (`_static_blocks_grid`); None: the square grid of `_static_blocks_2d`.
    Returns dict(kept=[per frame ascending pooled indices], dynamic=[bool per frame])."""
    Tp, S = importance.shape
    if sum(e - s + 1 for s, e in segments) != Tp:
        raise ValueError("segments do not cover the frames")
    r_eff = min(r / ((T0 * S - (T0 - Tp) * S) / (T0 * S)), 1)
    dynamic = [False] * Tp
    for s, e in segments:
        for f in range(s, e + 1):
            dynamic[f] = (not decoupled) or (e - s + 1) <= 2 or f in (s, e)
    k_dyn = math.ceil(S * r_eff)
    n_static = max(1, round(S * r_eff))
    if quirks:
        groups = _static_runs_1d(S, n_static)
    elif grid is None:
        groups = _static_blocks_2d(S, n_static)
    else:
        if grid[0] * grid[1] != S:
            raise ValueError(f"grid {grid} does not hold {S} tokens")
        groups = _static_blocks_grid(grid[0], grid[1], n_static)
    kept = []
    for f in range(Tp):
        vals = [float(v) for v in importance[f].float().tolist()]
        if dynamic[f]:
            order = sorted(range(S), key=lambda j: (-vals[j], j))
            kept.append(sorted(order[:k_dyn]))
        else:
            kept.append(sorted(_argmax_first(vals, g) for g in groups))
    return dict(kept=kept, dynamic=dynamic)


def bilinear_pool(x: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """[T, h, w, C] -> [T, out_h, out_w, C], bilinear, align_corners=False, no antialias."""
    y = F.interpolate(x.permute(0, 3, 1, 2), size=(out_h, out_w), mode="bilinear", align_corners=False)
    return y.permute(0, 2, 3, 1).contiguous()


# --------------------------------------------------------------------------------------------
# Stage III
# --------------------------------------------------------------------------------------------


def stage3_merge(h: torch.Tensor, attn_row: torch.Tensor, r_in: float) -> dict:
    """Spec section 4 steps 2-3 on the visual span h [L, C] with attention row [L].

    Keeps round(L * (1 - r_in)) rows (highest attention, lower index on ties); every dropped
    row j, in increasing order, is averaged into its most cosine-similar kept row t
    (similarities from the original h, first index on ties): h[t] = (h[t] + h[j]) / 2.
    With nothing kept (tiny L) every row is dropped and nothing is merged."""
    L = h.shape[0]
    n_keep = round(L * (1 - r_in))
    vals = [float(v) for v in attn_row.float().tolist()]
    order = sorted(range(L), key=lambda j: (-vals[j], j))
    keep = sorted(order[:n_keep])
    drop = sorted(order[n_keep:])
    h = h.float().clone()
    if keep and drop:
        orig = h.clone()
        sims = {}
        for j in drop:
            sims[j] = [float(F.cosine_similarity(orig[j], orig[t], dim=0, eps=_EPS)) for t in keep]
        for j in drop:
            t = keep[_argmax_first(sims[j], list(range(len(keep))))]
            h[t] = (h[t] + orig[j]) / 2
    return dict(h=h[keep], keep=keep, drop=drop)


# --------------------------------------------------------------------------------------------
# End to end on transformers' LlavaOnevisionForConditionalGeneration
# --------------------------------------------------------------------------------------------


def _vision_parts(model):
    vt = model.model.vision_tower
    vm = getattr(vt, "vision_model", vt)
    return vm.embeddings, list(vm.encoder.layers)


def _siglip_block_with_probs(layer, h):
    """One SigLIP block on h [T, N, C], attention written out: returns (h_out, probs [T,H,N,N])."""
    attn = layer.self_attn
    T, N, C = h.shape
    nh, hd = attn.num_heads, attn.head_dim
    x = layer.layer_norm1(h)
    q = attn.q_proj(x).view(T, N, nh, hd).transpose(1, 2)
    k = attn.k_proj(x).view(T, N, nh, hd).transpose(1, 2)
    v = attn.v_proj(x).view(T, N, nh, hd).transpose(1, 2)
    probs = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * attn.scale, dim=-1, dtype=torch.float32)
    o = torch.matmul(probs, v).transpose(1, 2).reshape(T, N, C)
    h = h + attn.out_proj(o)
    h = h + layer.mlp(layer.layer_norm2(h))
    return h, probs


def _feature_block(cfg, depth: int) -> int:
    """Index of the encoder block whose output is the feature (hidden_states[vfl] semantics);
    -1 means the embeddings."""
    vfl = cfg.vision_feature_layer
    if not isinstance(vfl, int):
        raise NotImplementedError("only a single int vision_feature_layer is supported")
    idx = vfl if vfl >= 0 else depth + 1 + vfl  # index into hidden_states (0 = embeddings)
    if not 0 <= idx <= depth:
        raise ValueError(f"vision_feature_layer {vfl} out of range for {depth} blocks")
    return idx - 1


def _rms(norm, x):
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * xf.to(x.dtype)


class _Rope:
    def __init__(self, tcfg):
        rp = getattr(tcfg, "rope_parameters", None) or {}
        rtype = rp.get("rope_type", rp.get("type", "default"))
        if rtype != "default":
            raise NotImplementedError(f"rope type {rtype}")
        theta = rp.get("rope_theta", getattr(tcfg, "rope_theta", None))
        self.dim = getattr(tcfg, "head_dim", None) or tcfg.hidden_size // tcfg.num_attention_heads
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, self.dim, 2, dtype=torch.float) / self.dim))

    def __call__(self, pos: list[int]):
        freqs = torch.tensor(pos, dtype=torch.long)[:, None].float() * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


def _rotate_half(x):
    d = x.shape[-1] // 2
    return torch.cat((-x[..., d:], x[..., :d]), dim=-1)


def _qwen_layer(layer, h, pos, rope, cache, causal=True, want_probs=False):
    """One Qwen2 decoder layer on new rows h [n, H] at position ids `pos`, appending to `cache`
    (a dict with 'k', 'v' [kvh, len, d] or empty). The new rows come after the cached ones;
    row i sees every cached row and new rows 0..i (all new rows when causal=False)."""
    attn = layer.self_attn
    n = h.shape[0]
    hd = attn.head_dim
    x = _rms(layer.input_layernorm, h)
    q = attn.q_proj(x).view(n, -1, hd).transpose(0, 1)
    k = attn.k_proj(x).view(n, -1, hd).transpose(0, 1)
    v = attn.v_proj(x).view(n, -1, hd).transpose(0, 1)
    cos, sin = rope(pos)
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    if cache:
        k = torch.cat([cache["k"], k], dim=1)
        v = torch.cat([cache["v"], v], dim=1)
    cache["k"], cache["v"] = k, v
    rep = q.shape[0] // k.shape[0]
    kr = k.repeat_interleave(rep, dim=0)
    vr = v.repeat_interleave(rep, dim=0)
    scores = torch.matmul(q, kr.transpose(-1, -2)) * attn.scaling
    past = k.shape[1] - n
    if causal:
        allowed = torch.ones(n, k.shape[1], dtype=torch.bool)
        allowed[:, past:] = torch.ones(n, n, dtype=torch.bool).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    o = torch.matmul(probs, vr).transpose(0, 1).reshape(n, -1)
    h = h + attn.o_proj(o)
    h = h + layer.mlp(_rms(layer.post_attention_layernorm, h))
    return (h, probs) if want_probs else (h, None)


def _logits(model, h_last):
    lm = model.model.language_model
    return model.lm_head(_rms(lm.norm, h_last[None]))[0].float()


def _visual_tokens(model, pixel_values, method_cfg):
    """Stages I and II: (visual embeddings [V + 1, H] incl. newline, stats dict)."""
    cfg = model.config
    if getattr(cfg, "vision_feature_select_strategy", "full") != "full":
        raise NotImplementedError("only vision_feature_select_strategy='full'")
    embeddings, blocks = _vision_parts(model)
    depth = len(blocks)
    fblock = _feature_block(cfg, depth)
    T0 = pixel_values.shape[0]
    h = embeddings(pixel_values.float())  # [T0, N, C]
    g = cfg.vision_config.image_size // cfg.vision_config.patch_size
    assert h.shape[1] == g * g
    ph, pw = math.ceil(g / 2), math.ceil(g / 2)
    stats = dict(frames_after_layer=[], segments=None, dynamic=None, kept=None)

    if method_cfg is None or method_cfg.get("layers") == []:  # no stage I/II (FastV alone)
        for b in range(fblock + 1):
            h = blocks[b](h, None)
        feats = model.model.multi_modal_projector(h)
        pooled = bilinear_pool(feats.view(T0, g, g, -1), ph, pw).reshape(T0 * ph * pw, -1)
        stats["kept"] = [list(range(ph * pw)) for _ in range(T0)]
        return torch.cat([pooled, model.model.image_newline[None].float()], 0), stats

    P = list(method_cfg["layers"])
    if not P:
        raise ValueError("stage I needs at least one compression layer")
    if len(set(P)) != len(P):
        raise ValueError(f"duplicate compression layers {P}")
    P = sorted(P)
    if P[0] < 0 or P[-1] > fblock:
        raise ValueError(f"compression layers {P} outside blocks 0..{fblock}")
    tau = method_cfg["tau"]
    alpha = method_cfg.get("alpha", 0.9)
    M = method_cfg.get("max_window", 6)
    quirks = method_cfg.get("quirks", True)

    importance = None
    for b in range(fblock + 1):
        if b in P:
            h, probs = _siglip_block_with_probs(blocks[b], h)
            last = b == P[-1]
            # Only the last layer's attention is ever used (importance), so the earlier layers
            # pass none to the merge; the official code merges it everywhere to no effect.
            res = merge_layer(h, probs if last else None, tau, alpha, M, quirks)
            h = res["x"]
            stats["frames_after_layer"].append(h.shape[0])
            if last:
                importance = res["attn"].mean(dim=1).mean(dim=1)  # heads, then queries: [T', N]
        else:
            h = blocks[b](h, None)
    segments = segment_frames(h, tau, alpha, M, quirks)
    Tp = h.shape[0]

    feats = model.model.multi_modal_projector(h)  # [T', N, H]
    pooled = bilinear_pool(feats.view(Tp, g, g, -1), ph, pw).reshape(Tp, ph * pw, -1)
    imp = bilinear_pool(importance.view(Tp, g, g, 1), ph, pw).reshape(Tp, ph * pw)
    sel = stage2_select(imp, segments, T0, method_cfg["r"], quirks=quirks)
    toks = [pooled[f][sel["kept"][f]] for f in range(Tp)]
    toks.append(model.model.image_newline[None].float())
    stats.update(segments=segments, dynamic=sel["dynamic"], kept=sel["kept"])
    return torch.cat(toks, 0), stats


@torch.no_grad()
def earlytom_reference(model, pixel_values, prefix_ids, suffix_ids, *, method_cfg, max_new_tokens) -> dict:
    """Full pipeline: prompt = prefix_ids + visual tokens (+ newline) + suffix_ids.

    method_cfg None: full tokens, no compression (matches transformers' own forward); then
    stats segments/dynamic are None and kept lists every pooled index of every frame.
    Greedy decoding produces exactly max_new_tokens tokens (no EOS stop). The model must be
    fp32 (eval mode)."""
    if any(p.dtype != torch.float32 for p in model.parameters()):
        raise ValueError("the reference runs fp32 models only")
    lm = model.model.language_model
    tcfg = model.config.text_config
    layers = list(lm.layers)
    nL = len(layers)
    rope = _Rope(tcfg)

    visual, stats = _visual_tokens(model, pixel_values, method_cfg)
    emb = lm.embed_tokens
    pre = emb(torch.tensor(list(prefix_ids), dtype=torch.long)).float()
    suf = emb(torch.tensor(list(suffix_ids), dtype=torch.long)).float()
    h = torch.cat([pre, visual, suf], 0)
    L_full = h.shape[0]
    vs, vlen = len(prefix_ids), visual.shape[0]
    stats["visual_tokens"] = vlen
    stats["visual_tokens_after_llm"] = None
    stats["keep_llm"] = None

    k_llm = None if method_cfg is None else method_cfg.get("llm_layer", None)
    if k_llm is not None:
        if not 1 <= k_llm < nL:
            raise ValueError(f"llm_layer {k_llm} outside 1..{nL - 1}")
        if len(suffix_ids) == 0:
            raise ValueError("stage III needs a prompt token after the visual span")
        r_in = method_cfg.get("llm_ratio", 0.5)
        noncausal = method_cfg.get("llm_noncausal", False)

    caches = [dict() for _ in range(nL)]
    pos = list(range(L_full))
    for li in range(nL):
        if k_llm is not None and li == k_llm:
            row = row_probs[:, L_full - 1, :].mean(dim=0)  # heads mean, last prompt token's row
            res = stage3_merge(h[vs : vs + vlen], row[vs : vs + vlen], r_in)
            h = torch.cat([h[:vs], res["h"], h[vs + vlen :]], 0)
            pos = pos[:vs] + [vs + j for j in res["keep"]] + pos[vs + vlen :]
            stats["visual_tokens_after_llm"] = len(res["keep"])
            stats["keep_llm"] = res["keep"]
        if k_llm is not None and li == k_llm - 1:
            h, row_probs = _qwen_layer(layers[li], h, pos, rope, caches[li], causal=not noncausal, want_probs=True)
        else:
            h, _ = _qwen_layer(layers[li], h, pos, rope, caches[li])
    first_logits = _logits(model, h[-1])
    tokens = greedy_tokens(model, layers, rope, caches, first_logits, L_full, max_new_tokens)
    return dict(first_logits=first_logits, tokens=tokens, stats=stats)


def greedy_tokens(model, layers, rope, caches, first_logits, next_pos: int, max_new_tokens: int) -> list[int]:
    """Exactly `max_new_tokens` greedy tokens (no EOS stop) after a prefill whose per-layer
    caches are `caches` and last logits `first_logits`; the new tokens at 1-D positions from
    `next_pos` on."""
    emb = model.model.language_model.embed_tokens
    tokens, logits = [], first_logits
    for step in range(max_new_tokens):
        tok = int(torch.argmax(logits))
        tokens.append(tok)
        if step == max_new_tokens - 1:
            break
        x = emb(torch.tensor([tok], dtype=torch.long)).float()
        for li in range(len(layers)):
            x, _ = _qwen_layer(layers[li], x, [next_pos], rope, caches[li])
        logits = _logits(model, x[-1])
        next_pos += 1
    return tokens


def fastv_drop(h: torch.Tensor, attn_row: torch.Tensor, r_drop: float) -> dict:
    """FastV (a baseline, same interface as stage3_merge): keep the round(L·(1-r)) positions
    of highest attention (ties: lower index), drop the rest, merge nothing."""
    L = h.shape[0]
    n_keep = round(L * (1.0 - r_drop))
    order = sorted(range(L), key=lambda i: (-float(attn_row[i]), i))
    keep = sorted(order[:n_keep])
    drop = [i for i in range(L) if i not in set(keep)]
    return dict(h=h[keep].clone(), keep=keep, drop=drop)
