"""Test-only PyTorch reference of DyCoke on transformers' LLaVA-OneVision, written from the
official code (KD-TAO/DyCoke, commit dd74634: `llava/model/llava_arch.py` `dycole_ttm`;
`llava/model/language_model/modeling_qwen2.py` `PrunableDynamicCache` and the decoder loop of
`Qwen2Model.forward`). Dynamic shapes as there: TTM really drops tokens, and a pruning decode step
really gathers the kept KV entries for layers L.. (the cache itself keeps everything).

Conventions where the official code leaves a choice: `torch.topk` as the official code calls it
(random fp32 data has no ties); the similarity state starts empty for each video (the official
`DycokeConfigs` keeps the last video's attention across `generate` calls); the visual span starts
after the prompt's prefix (the official `image_token_start_index` = 14 is the qwen_1_5 system
prompt's length); fp32 throughout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tests.references.baselines_ref import _encode
from tests.references.earlytom_ref import _logits, _qwen_layer, _rms, _Rope, _rotate_half


def ttm(feats: torch.Tensor, S: int, k: float) -> tuple[torch.Tensor, list[int]]:
    """`dycole_ttm`: feats [T·S, H] → (kept tokens [V, H], their source indices t·S + s)."""
    T = feats.shape[0] // S
    keep_n = int((1 - k) * S)
    frame = [feats[t * S:(t + 1) * S] for t in range(T)]
    idx = [list(range(t * S, (t + 1) * S)) for t in range(T)]
    out, src = [], []
    for i in range(0, T - 1, 2):  # stage 1: each odd frame against the even frame before it
        sim = F.cosine_similarity(F.normalize(frame[i], p=2, dim=1), F.normalize(frame[i + 1], p=2, dim=1), dim=1)
        low = sim.topk(keep_n, largest=False).indices.tolist()
        out += [frame[i], frame[i + 1][low]]
        src += [idx[i], [idx[i + 1][j] for j in low]]
    for i in range(0, T - 4, 4):  # stage 2: frame i + 2 against frame i
        sim = F.cosine_similarity(frame[i], frame[i + 2], dim=1)
        low = sim.topk(keep_n, largest=False).indices.tolist()
        out[i], src[i] = frame[i], idx[i]
        out[i + 2], src[i + 2] = frame[i + 2][low], [idx[i + 2][j] for j in low]
    return torch.cat(out, 0), [j for s in src for j in s]


def _decode_layer(layer, x, pos: int, rope, cache: dict, gather: list[int] | None):
    """One Qwen2 layer on the new token x [1, H]: appends its key/value to `cache` (all slots),
    attends the slots `gather` (None: all). → (h [1, H], probs [heads, kv] over all slots)."""
    attn = layer.self_attn
    hd = attn.head_dim
    h = _rms(layer.input_layernorm, x)
    q = attn.q_proj(h).view(1, -1, hd).transpose(0, 1)
    k = attn.k_proj(h).view(1, -1, hd).transpose(0, 1)
    v = attn.v_proj(h).view(1, -1, hd).transpose(0, 1)
    cos, sin = rope([pos])
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    cache["k"] = torch.cat([cache["k"], k], 1)
    cache["v"] = torch.cat([cache["v"], v], 1)
    rep = q.shape[0] // k.shape[0]
    full_k = cache["k"].repeat_interleave(rep, 0)
    probs = torch.softmax(torch.matmul(q, full_k.transpose(-1, -2)) / hd**0.5, -1)[:, 0]  # calculate_attention_weights
    ks, vs = cache["k"], cache["v"]
    if gather is not None:
        ks, vs = ks[:, gather], vs[:, gather]
    ks, vs = ks.repeat_interleave(rep, 0), vs.repeat_interleave(rep, 0)
    p = torch.softmax(torch.matmul(q, ks.transpose(-1, -2)) * attn.scaling, -1, dtype=torch.float32)
    o = torch.matmul(p, vs).transpose(0, 1).reshape(1, -1)
    x = x + attn.o_proj(o)
    x = x + layer.mlp(_rms(layer.post_attention_layernorm, x))
    return x, probs


@torch.no_grad()
def dycoke_reference(model, pixel_values, prefix_ids, suffix_ids, *, k=0.7, layer=3, p=0.8, threshold=0.9,
                     max_new_tokens=6) -> dict:
    """→ dict(kept: TTM's source indices, first_logits [V] (our layer loop), hf_logits [V]
    (transformers' forward on the same embeddings), tokens (greedy, exactly max_new_tokens),
    pruned: per decode step the kept candidate offsets in the visual span (sorted), or None
    for a step that kept every visual token), step_logits: each decode step's logits [V])."""
    if any(q.dtype != torch.float32 for q in model.parameters()):
        raise ValueError("the reference runs fp32 models only")
    lm = model.model.language_model
    layers = list(lm.layers)
    rope = _Rope(model.config.text_config)
    pooled, _, _ = _encode(model, pixel_values)
    T, S, H = pooled.shape
    visual, kept = ttm(pooled.reshape(T * S, H), S, k)
    emb = lm.embed_tokens
    pre = emb(torch.tensor(list(prefix_ids))).float()
    suf = emb(torch.tensor(list(suffix_ids))).float()
    h = torch.cat([pre, visual, model.model.image_newline[None], suf], 0)
    hf_logits = model(inputs_embeds=h[None]).logits[0, -1].float()

    caches = [dict() for _ in layers]
    for li, lay in enumerate(layers):
        h, _ = _qwen_layer(lay, h, list(range(h.shape[0])), rope, caches[li])
    first_logits = logits = _logits(model, h[-1])

    start, img_len = len(prefix_ids), visual.shape[0] - 1  # the official image_token_length
    seen = h.shape[0]
    previous, tokens, pruned, step_logits = None, [], [], []
    for step in range(max_new_tokens):
        tokens.append(int(torch.argmax(logits)))
        if step == max_new_tokens - 1:
            break
        x = emb(torch.tensor([tokens[-1]])).float()
        total = seen + 1  # seq_length_with_past
        gather = probs = None
        for li, lay in enumerate(layers):
            if li < layer:
                gather = None
            elif li == layer:  # dycoke_pruning on layer L - 1's attention
                image_attention = probs.mean(0)[start:start + img_len]
                sim = 0 if previous is None else F.cosine_similarity(image_attention, previous, dim=0)
                previous = image_attention
                if sim < threshold:
                    n_keep = int(img_len * (1 - p))
                    top = torch.topk(image_attention, n_keep, sorted=False)[1] + start
                    gather = list(range(start)) + top.tolist() + list(range(start + img_len, total))
                pruned.append(None if gather is None else sorted(j - start for j in top.tolist()))
            x, probs = _decode_layer(lay, x, seen, rope, caches[li], gather)
        logits = _logits(model, x[-1])
        step_logits.append(logits)
        seen = total
    return dict(kept=kept, first_logits=first_logits, hf_logits=hf_logits, tokens=tokens, pruned=pruned,
                step_logits=step_logits)
