"""Test-only PyTorch reference of PyramidDrop on transformers' LLaVA-OneVision (fp32, dynamic shapes).

Written from the official code (Cooperx521/PyramidDrop @ 6444f304, llava/model/modeling_llama_pdrop.py:
`pdrop_forward`, `pdrop_rank_drop`; the inference path, batch 1, no padding):
- the prompt is prefix + the N visual tokens (every pooled token of every frame, then the newline)
  + suffix; `ratio_list` = [1, λ, λ², ...];
- after layer index l with l + 1 = K_s in `layer_list` (s = 0, 1, ...), in prefill: layer K_s's
  input norm, q/k projections and RoPE on the current sequence, the causal softmax (fp32) of the
  last prompt token's query against every key, mean over heads, read on the current visual span
  of int(N · ratio_list[s]) slots; the top int(N · ratio_list[s+1]) slots (ties: lower index
  first, where the official `topk` leaves them to the kernel), sorted; the sequence is rebuilt
  (prefix, kept, text) and renumbered 0..len-1;
- decoding: every layer attends its own (pruned) KV cache; the new token's position in the layers
  of stage s is the full prompt length + step minus the slots dropped by stages 0..s.

The decoder layers are transformers' own `Qwen2DecoderLayer` modules with a `DynamicCache`; the
visual tokens are `earlytom_ref._visual_tokens` with no compression (transformers' features).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

from tests.references.earlytom_ref import _visual_tokens


def _causal_mask(n: int, dtype) -> torch.Tensor:
    m = torch.full((n, n), torch.finfo(dtype).min, dtype=dtype).triu(1)
    return m[None, None]


def _rank(layer, h, pos_emb, span_start: int, span_len: int, rows: str = "last") -> torch.Tensor:
    """The official rank signal: [span_len] attention of the last row, mean over heads
    (rows "suffix": of each row after the span, causal, mean over heads, then over those rows)."""
    attn = layer.self_attn
    x = layer.input_layernorm(h)  # [1, L, C]
    L = h.shape[1]
    q = attn.q_proj(x).view(1, L, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(1, L, -1, attn.head_dim).transpose(1, 2)
    cos, sin = pos_emb
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = k.repeat_interleave(attn.num_key_value_groups, dim=1)
    if rows == "suffix":
        first = span_start + span_len
        out = []
        for r in range(first, L):
            sc = (q[0, :, r : r + 1] @ k[0, :, : r + 1].transpose(1, 2)) / attn.head_dim**0.5  # [H, 1, r+1]
            out.append(torch.softmax(sc, dim=-1, dtype=torch.float32).mean(dim=0)[0, span_start:first])
        return torch.stack(out).mean(dim=0)
    w = torch.matmul(q[:, :, -1:], k.transpose(2, 3)) / attn.head_dim**0.5  # [1, H, 1, L]
    w = torch.softmax(w, dim=-1, dtype=torch.float32)  # the last row sees every key (causal)
    return w[0].mean(dim=0)[0, span_start : span_start + span_len]


@torch.no_grad()
def pdrop_reference(model, pixel_values, prefix_ids, suffix_ids, layer_list, lam: float, max_new_tokens: int,
                    rows: str = "last", prune_caches: bool = False) -> dict:
    """→ dict(first_logits [V], tokens (greedy, exactly max_new_tokens), visual_tokens N,
    kept: per stage the kept slots as indices into the N visual slots entering the LLM,
    step_logits: the logits [V] after each decoded token but the last).

    Two variants beyond the official method (hook 3's other options, for their test): rows
    "suffix" ranks by the suffix rows' attention (`_rank`); prune_caches removes, after prefill,
    from every layer's KV cache the visual slots a later stage dropped."""
    if any(p.dtype != torch.float32 for p in model.parameters()):
        raise ValueError("the reference runs fp32 models only")
    lm = model.model.language_model
    layers = list(lm.layers)
    ratios = [1.0] + [lam ** (s + 1) for s in range(len(layer_list))]
    visual, _ = _visual_tokens(model, pixel_values, None)
    emb = lm.embed_tokens
    pre = emb(torch.tensor(list(prefix_ids)))
    suf = emb(torch.tensor(list(suffix_ids)))
    h = torch.cat([pre, visual, suf], 0)[None].float()
    a, N, full_len = len(prefix_ids), visual.shape[0], h.shape[1]
    src = list(range(N))  # each current visual slot's index among the N
    cache = DynamicCache()
    pos = torch.arange(h.shape[1])[None]
    kept, layer_src = [], []
    for li, layer in enumerate(layers):
        layer_src.append(list(src))
        pe = lm.rotary_emb(h, pos)
        h = layer(h, attention_mask=_causal_mask(h.shape[1], h.dtype), position_ids=pos, past_key_values=cache,
                  use_cache=True, position_embeddings=pe)
        if li + 1 in layer_list:
            s = layer_list.index(li + 1)
            cur, keep_n = int(N * ratios[s]), int(N * ratios[s + 1])
            nxt = layers[li + 1]
            score = _rank(nxt, h, lm.rotary_emb(h, pos), a, cur, rows)
            order = sorted(range(cur), key=lambda j: (-float(score[j]), j))[:keep_n]
            top = sorted(order)
            h = torch.cat([h[:, :a], h[:, [a + j for j in top]], h[:, a + cur :]], 1)
            src = [src[j] for j in top]
            kept.append(list(src))
            pos = torch.arange(h.shape[1])[None]  # renumbered, as the official rank & drop
    logits = model.lm_head(lm.norm(h[:, -1:]))[0, -1].float()
    first = logits
    if prune_caches:  # each layer's cache without the visual slots dropped after it ran
        alive = set(src)
        for li, lay in enumerate(cache.layers):
            keep = [j for j in range(lay.keys.shape[2])
                    if not a <= j < a + len(layer_src[li]) or layer_src[li][j - a] in alive]
            lay.keys, lay.values = lay.keys[:, :, keep], lay.values[:, :, keep]

    drops = [int(N * ratios[s]) - int(N * ratios[s + 1]) for s in range(len(layer_list))]  # per stage
    tokens, step_logits = [], []
    for step in range(max_new_tokens):
        tok = int(torch.argmax(logits))
        tokens.append(tok)
        if step == max_new_tokens - 1:
            break
        x = emb(torch.tensor([[tok]])).float()
        for li, layer in enumerate(layers):
            gone = sum(d for s, d in enumerate(drops) if layer_list[s] <= li)
            p = torch.tensor([[full_len + step - gone]])
            x = layer(x, attention_mask=None, position_ids=p, past_key_values=cache, use_cache=True,
                      position_embeddings=lm.rotary_emb(x, p))
        logits = model.lm_head(lm.norm(x))[0, -1].float()
        step_logits.append(logits)
    return dict(first_logits=first, tokens=tokens, visual_tokens=N, kept=kept, step_logits=step_logits)
