"""Test-only PyTorch reference of PyramidDrop on transformers' own Qwen2.5-VL (fp32, dynamic shapes).

Written from the official rules (Cooperx521/PyramidDrop @ 6444f304,
llava/model/modeling_llama_pdrop.py: `pdrop_forward`, `pdrop_rank_drop`; the inference path,
batch 1, no padding) as docs/baselines/pdrop.md states them, and from the LLaVA-OV reference
(tests/references/pdrop_ref.py), not from earlytom_jax/compression/pdrop.py:

- the prompt is prefix + the V = T·S merged tokens of the whole video (transformers'
  `pooler_output`, no newline) + suffix; `ratio_list` = [1, λ, λ², ...];
- after layer index l with l + 1 = K_s in `layer_list`, in prefill: layer K_s's input RMSNorm,
  q/k projections and M-RoPE on the current (already shortened) sequence at its current 3-D
  positions, the fp32 softmax of the last prompt token's query over every key (causal: the last
  row sees all), mean over heads, read on the current visual span of int(V · ratio_list[s])
  slots; the top int(V · ratio_list[s+1]) slots (ties: lower index first, where the official
  `topk` leaves them to the kernel), in their order; the rows really removed;
- positions: Qwen2.5-VL's 3-D rule as trained (`bench_torch.qwen_positions`, as
  tests/references/qwen_baselines_ref.py). The official code renumbers its 1-D ids after a drop;
  docs/baselines/pdrop.md ("Differences from the original") states that on Qwen2.5-VL the 3-D
  ids are NOT renumbered: each survivor keeps its own (t, h, w), the text keeps its own, and a
  decoded token sits at (the full video's largest position + 1 + suffix length + step) on all
  three axes in every layer, as FastV on this family;
- decoding: every layer attends its own (shortened) KV cache in a `DynamicCache`.

`renumber=True` is NOT the documented rule: the official 1-D renumbering applied to each of the
three axes (a survivor and the text after it move back by the visual tokens dropped before them;
a decoded token in the layers of stage s moves back by the tokens dropped by stages 0..s). It
exists only so that the parity test can show it tells the two position rules apart.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers.cache_utils import DynamicCache

from earlytom_jax.bench_torch import qwen_positions
from tests.references.qwen_baselines_ref import _layer, merged_tokens
from tests.references.qwen_earlytom_ref import _last_row_probs


def _logits(model, h) -> torch.Tensor:
    lm = model.model.language_model
    return model.lm_head(lm.norm(h[:, -1:]))[0, -1].float()


@torch.no_grad()
def qwen_pdrop_reference(model, pixels, prefix_ids, suffix_ids, second_per_grid_t: float, layer_list, lam: float,
                         max_new_tokens: int, renumber: bool = False) -> dict:
    """pixels [T', 3, H, W] normalised (T' even) on a transformers Qwen2_5_VLForConditionalGeneration (fp32).

    → dict(visual_tokens V, kept: per stage the kept slots as indices into the V merged tokens
    (t·S + s), kept_positions: the (t, h, w) of the final survivors relative to the video's
    first position, first_logits [V] fp32, tokens (exactly max_new_tokens greedy), next_position
    (the first decoded token's position), step_logits (the logits after each decoded token but
    the last))."""
    if any(p.dtype != torch.float32 for p in model.parameters()):
        raise ValueError("the reference runs fp32 models only")
    layer_list = [int(k) for k in layer_list]
    lm = model.model.language_model
    n_layers = len(lm.layers)
    if sorted(set(layer_list)) != layer_list or layer_list[0] < 1 or layer_list[-1] >= n_layers:
        raise ValueError(f"stage layers {layer_list} must increase within 1..{n_layers - 1}")
    vc = model.config.vision_config
    tokens, grid = merged_tokens(model, np.asarray(pixels, np.float32))
    visual = tokens.reshape(-1, tokens.shape[-1])
    V = visual.shape[0]
    ratios = [1.0] + [lam ** (s + 1) for s in range(len(layer_list))]
    npre, nsuf = len(prefix_ids), len(suffix_ids)
    pos = qwen_positions(npre, grid, nsuf, second_per_grid_t, vc.tokens_per_second, vc.spatial_merge_size)  # [3, L]
    full, next_position = pos, int(pos.max()) + 1
    emb = model.get_input_embeddings()
    h = torch.cat([emb(torch.tensor(list(prefix_ids))), visual, emb(torch.tensor(list(suffix_ids)))], 0)[None].float()

    cache = DynamicCache(config=model.config.text_config)
    src = list(range(V))  # each current visual slot's index among the V merged tokens
    kept, drops = [], []
    for li in range(n_layers):
        h = _layer(lm, li, h, pos, cache)
        if li + 1 not in layer_list:
            continue
        s = layer_list.index(li + 1)
        cur, keep_n = int(V * ratios[s]), int(V * ratios[s + 1])
        assert cur == len(src)
        cos, sin = lm.rotary_emb(h, pos[:, None, :])
        row = _last_row_probs(lm.layers[li + 1], h, cos, sin)[npre: npre + cur]  # layer K_s's own attention
        vals = [float(v) for v in row.tolist()]
        top = sorted(sorted(range(cur), key=lambda j: (-vals[j], j))[:keep_n])
        idx = torch.tensor([*range(npre), *(npre + j for j in top), *range(npre + cur, h.shape[1])])
        h, new_pos = h[:, idx], pos[:, idx]
        if renumber:  # the 1-D rule on every axis: back by the visual slots dropped before each row
            gone = torch.zeros(pos.shape[1], dtype=torch.long)
            gone[npre: npre + cur] = 1
            gone[[npre + j for j in top]] = 0
            new_pos = new_pos - torch.cumsum(gone, 0)[idx][None]
        pos = new_pos
        src = [src[j] for j in top]
        kept.append(list(src))
        drops.append(cur - keep_n)
    logits = first = _logits(model, h)
    kept_positions = [tuple(int(v) - npre for v in full[:, npre + j]) for j in src]

    toks, step_logits = [], []
    for step in range(max_new_tokens):
        toks.append(int(torch.argmax(logits)))
        if step == max_new_tokens - 1:
            break
        x = emb(torch.tensor([[toks[-1]]])).float()
        for li in range(n_layers):
            gone = sum(d for k, d in zip(layer_list, drops) if k <= li) if renumber else 0
            p = torch.full((3, 1), next_position + step - gone, dtype=torch.long)
            x = _layer(lm, li, x, p, cache)
        logits = _logits(model, x)
        step_logits.append(logits)
    return {"visual_tokens": V, "kept": kept, "kept_positions": kept_positions, "first_logits": first,
            "tokens": toks, "next_position": next_position, "step_logits": step_logits}
