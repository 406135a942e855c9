"""Test-only PyTorch references of the token-budget baselines on transformers' own Qwen2.5-VL:
uniform tokens (pool / sample), uniform frames, FastV and VisionZip.

Written from the methods' descriptions (earlytom_jax/compression/uniform.py, fastv.py and
visionzip.py module docstrings), not from their code: dynamic shapes, Python lists per temporal
patch, fp32. What comes from transformers:

- the merged tokens: `model.model.visual(flat, grid_thw=...)` (its `pooler_output`: the 2x2
  merged tokens of each temporal patch in raster order of the mh x mw merged grid);
- VisionZip's signals: the input of the LAST vision block's attention module, captured by a
  forward pre-hook during that same forward (its RMSNorm'd hidden states in transformers'
  window order, `cu_seqlens`, rotary tables); the queries and keys are recomputed from it with
  the module's own `qkv` and transformers' `apply_rotary_pos_emb_vision`, the probabilities
  per attention chunk of `cu_seqlens` (a window, or a whole temporal patch for a full-attention
  block) with an fp32 softmax. Attention a patch receives = mean over heads, summed over the
  queries of its chunk, divided by the N patches of a temporal patch (zero from queries outside
  its window). Keys = the rotated keys averaged over heads. Both put back in the processor's
  order with `argsort(window_index)` (transformers' `get_vision_window_index`); a merged token's
  importance / key = the mean over its 4 patches;
- the LLM: transformers' decoder layers, run one by one with explicit 3-D positions (the text
  model's own rotary embedding) and an explicit causal mask, so FastV can drop rows between
  layers; greedy decoding through a `DynamicCache` (the layers after FastV's drop hold fewer
  rows), each new token at (full video's largest position + 1 + step) on all three axes.

Positions (Qwen2.5-VL's rule as trained, transformers 4.x `get_rope_index`): text 0..P-1; the
merged token at temporal patch t, row r, column c at (P + floor(t · interval), P + r, P + c),
interval = fp32(second_per_grid_t) · tokens_per_second; the text after the video from one past
the largest position of the FULL video, whatever was dropped. A kept token keeps its own
position; a pooled cell takes its centre token's; a VisionZip contextual token its target's.

Selection rules (conventions shared with tests/references/baselines_ref.py):
- budget B = round(r · T · S) merged tokens, temporal patch t gets floor((t+1)B/T) - floor(tB/T);
- uniform cells: `earlytom_ref._static_blocks_grid(mh, mw, b)`; a cell's centre is its middle row
  and column ((first + last) // 2 each); "pool" = the cell's mean, "sample" = the centre token;
- uniform frames: k = max(1, round(r · T)) temporal patches at `np.linspace(0, T - 1, k).astype(int)`;
- VisionZip per temporal patch: K = int(b · dominant_ratio), C = b - K, then
  `baselines_ref.visionzip_frame` on the merged tokens, their importance and keys;
- FastV: at layer K - 1, the attention of the last prompt token (mean over heads) over the
  visual span; the round(V · (1 - drop)) highest (ties: lower index) survive from layer K on.
"""

from __future__ import annotations

import numpy as np
import torch

from earlytom_jax.bench_torch import qwen_positions as full_positions
from tests.references.baselines_ref import frame_budgets, visionzip_frame
from tests.references.earlytom_ref import _static_blocks_grid
from tests.references.qwen_earlytom_ref import _last_row_probs
from tests.tiny_qwen import flatten


def picked_patches(T: int, r: float) -> list[int]:
    k = max(1, round(r * T))
    return [int(i) for i in np.linspace(0, T - 1, k).astype(int)]


def uniform_cells(mh: int, mw: int, b: int):
    """(cells: raster index lists, centres) of b uniform cells of an mh x mw grid."""
    cells = _static_blocks_grid(mh, mw, b) if b else []
    centres = []
    for cell in cells:
        rows, cols = [i // mw for i in cell], [i % mw for i in cell]
        centres.append(((min(rows) + max(rows)) // 2) * mw + (min(cols) + max(cols)) // 2)
    return cells, centres


# --------------------------------------------------------------------------------------------
# vision
# --------------------------------------------------------------------------------------------


def _grid_sizes(model, grid):
    vc = model.config.vision_config
    _, gh, gw = grid
    m = vc.spatial_merge_size
    return gh // m, gw // m, m * m


def merged_tokens(model, pixels: np.ndarray):
    """transformers' merged tokens [T, S, Ht] (raster order per temporal patch) and the grid."""
    vc = model.config.vision_config
    flat, grid = flatten(np.asarray(pixels, np.float32), vc.temporal_patch_size, vc.patch_size,
                         vc.spatial_merge_size)
    out = model.model.visual(torch.from_numpy(flat), grid_thw=torch.tensor([grid])).pooler_output
    mh, mw, _ = _grid_sizes(model, grid)
    return out.reshape(grid[0], mh * mw, -1), grid


def last_block_qk(model, pixels: np.ndarray):
    """One forward of transformers' vision tower that captures its last block's attention input:
    (merged tokens [T, S, Ht], grid, q and k [L, heads, D] after the vision rotary (window
    order), cu_seqlens of that block, back: the merged index -> window slot permutation)."""
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as mq
    from transformers.vision_utils import get_vision_window_index

    visual = model.model.visual
    vc = model.config.vision_config
    captured = {}

    def hook(module, args, kwargs):
        captured["x"] = args[0] if args else kwargs["hidden_states"]
        captured["cu"] = kwargs["cu_seqlens"]
        captured["rope"] = kwargs["position_embeddings"]

    handle = visual.blocks[-1].attn.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        tokens, grid = merged_tokens(model, pixels)
    finally:
        handle.remove()
    attn = visual.blocks[-1].attn
    x = captured["x"]
    L = x.shape[0]
    q, k, _ = attn.qkv(x).reshape(L, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)  # [L, heads, D]
    cos, sin = captured["rope"]
    q, k = mq.apply_rotary_pos_emb_vision(q, k, cos, sin)
    window_index, _ = get_vision_window_index(torch.tensor([grid]), spatial_merge_size=vc.spatial_merge_size,
                                              window_size=vc.window_size, patch_size=vc.patch_size)
    return tokens, grid, q, k, captured["cu"], torch.argsort(window_index)


def merged_tokens_and_signals(model, pixels: np.ndarray):
    """(merged tokens [T, S, Ht], importance [T, S], keys [T, S, D], grid): VisionZip's signals
    from the last vision block (module docstring)."""
    tokens, grid, q, k, cu, back = last_block_qk(model, pixels)
    scaling = model.model.visual.blocks[-1].attn.scaling
    L = q.shape[0]
    T, gh, gw = grid
    N = gh * gw
    received = torch.zeros(L, dtype=torch.float32)
    bounds = [int(v) for v in cu.tolist()]
    for lo, hi in zip(bounds, bounds[1:]):
        if hi == lo:
            continue
        qs, ks = q[lo:hi].transpose(0, 1).float(), k[lo:hi].transpose(0, 1).float()  # [heads, n, D]
        probs = torch.softmax(torch.matmul(qs, ks.transpose(-1, -2)) * scaling, dim=-1, dtype=torch.float32)
        received[lo:hi] = probs.mean(dim=0).sum(dim=0) / N
    keys = k.float().mean(dim=1)  # [L, D]
    mh, mw, unit = _grid_sizes(model, grid)
    S = mh * mw
    received = received.view(L // unit, unit)[back].view(T, S, unit).mean(-1)
    keys = keys.view(L // unit, unit, -1)[back].view(T, S, unit, -1).mean(2)
    return tokens, received, keys, grid


# --------------------------------------------------------------------------------------------
# LLM
# --------------------------------------------------------------------------------------------


def _causal_mask(n: int, past: int) -> torch.Tensor:
    """Additive fp32 mask [1, 1, n, past + n]: row i sees the cached rows and new rows 0..i."""
    allowed = torch.ones(n, past + n, dtype=torch.bool)
    allowed[:, past:] = torch.ones(n, n, dtype=torch.bool).tril()
    return torch.zeros(n, past + n).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]


def _layer(lm, li, h, pos, cache):
    cos, sin = lm.rotary_emb(h, pos[:, None, :])
    past = cache.get_seq_length(li)
    mask = _causal_mask(h.shape[1], past) if h.shape[1] > 1 else None
    return lm.layers[li](h, attention_mask=mask, position_embeddings=(cos, sin), past_key_values=cache, use_cache=True)


def _run(model, h, pos, npre: int, V: int, next_position: int, fastv, max_new_tokens: int):
    """Prefill h [1, L, H] at positions pos [3, L] (visual span npre..npre+V), then greedy decoding."""
    from transformers.cache_utils import DynamicCache

    lm = model.model.language_model
    nL = len(lm.layers)
    cache = DynamicCache(config=model.config.text_config)
    keep = None
    for li in range(nL):
        if fastv is not None and li == fastv[0] - 1:
            cos, sin = lm.rotary_emb(h, pos[:, None, :])
            row = _last_row_probs(lm.layers[li], h, cos, sin)[npre: npre + V]
            n_keep = round(V * (1.0 - fastv[1]))
            vals = [float(v) for v in row.tolist()]
            keep = sorted(sorted(range(V), key=lambda j: (-vals[j], j))[:n_keep])
        if fastv is not None and li == fastv[0]:
            idx = torch.tensor([*range(npre), *(npre + j for j in keep), *range(npre + V, h.shape[1])])
            h, pos = h[:, idx], pos[:, idx]
        h = _layer(lm, li, h, pos, cache)
    out = model.lm_head(lm.norm(h))[0, -1].float()
    logits, tokens = out, []
    emb = model.get_input_embeddings()
    for step in range(max_new_tokens):
        tokens.append(int(torch.argmax(out)))
        if step == max_new_tokens - 1:
            break
        x = emb(torch.tensor([[tokens[-1]]])).float()
        p = torch.full((3, 1), next_position + step, dtype=torch.long)
        for li in range(nL):
            x = _layer(lm, li, x, p, cache)
        out = model.lm_head(lm.norm(x))[0, -1].float()
    return logits, tokens, keep


# --------------------------------------------------------------------------------------------
# the methods
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def qwen_baseline_reference(model, pixels, prefix_ids, suffix_ids, second_per_grid_t: float = 1.0, *,
                            method: str = "full", ratio: float | None = None, max_new_tokens: int = 1, **kw) -> dict:
    """Prompt = prefix_ids + the method's visual tokens + suffix_ids on a transformers
    Qwen2_5_VLForConditionalGeneration (fp32, eval). pixels [T', 3, H, W] normalised, T' even.

    method: "full", "uniform_tokens" (kw mode), "uniform_frames", "fastv" (kw layer, drop) or
    "visionzip" (kw dominant_ratio, quirks). → dict(kept_index [flat t·S + s of each visual slot's
    source token; uniform frames: over the picked patches], positions [(t, h, w) of each slot,
    relative to the video's first position], visual_tokens, logits [V] fp32, first_token,
    tokens (max_new_tokens greedy), next_position, llm_keep (FastV: indices into the visual
    span), picked (uniform frames), frames (per temporal patch selection details), importance)."""
    if any(p.dtype != torch.float32 for p in model.parameters()):
        raise ValueError("the reference runs fp32 models only")
    vc = model.config.vision_config
    pixels = np.asarray(pixels, np.float32)
    T = pixels.shape[0] // vc.temporal_patch_size
    picked = list(range(T))
    importance = None
    if method == "uniform_frames":
        picked = picked_patches(T, ratio)
        pairs = pixels.reshape((T, vc.temporal_patch_size) + pixels.shape[1:])[picked].reshape((-1,) + pixels.shape[1:])
        tokens, _ = merged_tokens(model, pairs)
        grid = (T, pixels.shape[2] // vc.patch_size, pixels.shape[3] // vc.patch_size)
    elif method == "visionzip":
        tokens, importance, keys, grid = merged_tokens_and_signals(model, pixels)
    else:
        tokens, grid = merged_tokens(model, pixels)
    mh, mw, _ = _grid_sizes(model, grid)
    S = mh * mw

    frames = []
    if method in ("full", "fastv", "uniform_frames"):
        visual = tokens.reshape(-1, tokens.shape[-1])
        sources = [picked[t] * S + s for t in range(len(picked)) for s in range(S)]  # in the full video
        kept_index = list(range(len(sources)))
    elif method == "uniform_tokens":
        mode = kw.get("mode", "pool")
        rows, sources = [], []
        for t, b in enumerate(frame_budgets(T, ratio, S)):
            cells, centres = uniform_cells(mh, mw, b)
            for cell, c in zip(cells, centres):
                rows.append(tokens[t][cell].mean(0) if mode == "pool" else tokens[t][c])
                sources.append(t * S + c)
            frames.append(dict(cells=cells, centres=centres))
        visual = torch.stack(rows)
        kept_index = list(sources)
    elif method == "visionzip":
        dr, quirks = kw.get("dominant_ratio", 54 / 64), kw.get("quirks", True)
        parts, sources = [], []
        for t, b in enumerate(frame_budgets(T, ratio, S)):
            K = int(b * dr)
            f = visionzip_frame(tokens[t], importance[t], keys[t], K, b - K, quirks)
            parts.append(f["tokens"])
            sources += [t * S + j for j in f["dominant"] + f["targets"]]
            frames.append(f)
        visual = torch.cat(parts, 0)
        kept_index = list(sources)
    else:
        raise ValueError(method)

    npre, nsuf, V = len(prefix_ids), len(suffix_ids), visual.shape[0]
    full = full_positions(npre, grid, nsuf, second_per_grid_t, vc.tokens_per_second, vc.spatial_merge_size)
    vis_pos = full[:, [npre + j for j in sources]]
    pos = torch.cat([full[:, :npre], vis_pos, full[:, npre + T * S:]], 1)
    emb = model.get_input_embeddings()
    h = torch.cat([emb(torch.tensor(list(prefix_ids))), visual, emb(torch.tensor(list(suffix_ids)))], 0)[None].float()
    nxt = int(full.max()) + 1
    fastv = (kw["layer"], kw["drop"]) if method == "fastv" else None
    logits, toks, keep = _run(model, h, pos, npre, V, nxt, fastv, max_new_tokens)
    return dict(kept_index=kept_index, positions=[tuple(int(v) - npre for v in vis_pos[:, j]) for j in range(V)],
                visual_tokens=V, logits=logits, first_token=int(torch.argmax(logits)), tokens=toks,
                next_position=nxt, llm_keep=keep, picked=picked, frames=frames, importance=importance)
