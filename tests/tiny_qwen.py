"""Tiny random transformers Qwen2.5-VL models, and transformers run on our inputs.

Positions: transformers 5.x starts the text after a video at P + max(rows, columns) merged
(its `get_rope_index`), where Qwen2.5-VL as trained and transformers 4.x start it one past the
largest position (`reference_positions`: the torch reference's statement of transformers 4.51's
`Qwen2_5_VLForConditionalGeneration.get_rope_index`); the helpers below hand transformers
these positions explicitly, for the prefill and for every decoding step.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

VOCAB = 300
VIDEO, IMAGE, VSTART, VEND = 299, 298, 295, 296  # synthetic.qwen_vl_tokenizer(299)'s ids
PREPROCESSOR = {  # Qwen/Qwen2.5-VL-7B-Instruct's preprocessor_config.json
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
}


def build(seed: int = 0, vision_layers: int = 4, vision_hidden: int = 48, vision_heads: int = 3,
          window: int = 56, fullatt=(1,), text_hidden: int = 64, heads: int = 4, kv_heads: int = 2,
          text_layers: int = 2, mrope=(2, 3, 3), tie: bool = False, tokens_per_second: float = 2,
          scale: float = 0.1):
    """A transformers Qwen2_5_VLForConditionalGeneration with random N(0, scale) weights (the
    init's 0.02 leaves every attention near uniform, which would hide position errors)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    head_dim = text_hidden // heads
    cfg = Qwen2_5_VLConfig(
        vision_config=dict(depth=vision_layers, hidden_size=vision_hidden, intermediate_size=vision_hidden * 3 // 2 + 2,
                           num_heads=vision_heads, patch_size=14, temporal_patch_size=2, spatial_merge_size=2,
                           window_size=window, fullatt_block_indexes=list(fullatt), out_hidden_size=text_hidden,
                           tokens_per_second=tokens_per_second, hidden_act="silu"),
        text_config=dict(hidden_size=text_hidden, intermediate_size=text_hidden * 3 // 2 + 2,
                         num_hidden_layers=text_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         head_dim=head_dim, vocab_size=VOCAB, max_position_embeddings=8192, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "mrope_section": list(mrope), "rope_theta": 1e6},
                         tie_word_embeddings=tie, bos_token_id=None, eos_token_id=None),
        video_token_id=VIDEO, image_token_id=IMAGE, vision_start_token_id=VSTART, vision_end_token_id=VEND,
        tie_word_embeddings=tie,
    )
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name and "ln_q" not in name:
                p.normal_(0.0, scale)
        if tie:
            model.lm_head.weight = model.model.language_model.embed_tokens.weight
    return model


def save(model, directory: str, **kw) -> str:
    model.save_pretrained(directory, **kw)
    return directory


def write_assets(directory: str) -> str:
    """tokenizer.json (character level, Qwen2.5-VL's added tokens) and preprocessor_config.json."""
    from earlytom_jax.synthetic import qwen_vl_tokenizer

    qwen_vl_tokenizer(VIDEO).save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "preprocessor_config.json"), "w") as f:
        json.dump(PREPROCESSOR, f)
    return directory


def flatten(pixels: np.ndarray, tp: int = 2, p: int = 14, merge: int = 2):
    """Pixels [T', 3, H, W] → transformers' pixel_values_videos [t·h·w, 3·tp·p·p] and grid (t, h, w)."""
    t, _, hh, ww = pixels.shape
    gt, gh, gw = t // tp, hh // p, ww // p
    x = pixels.reshape(gt, tp, 3, gh // merge, merge, p, gw // merge, merge, p)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(gt * gh * gw, 3 * tp * p * p)
    return x, (gt, gh, gw)


def reference_positions(prefix_len: int, grid, suffix_len: int, second_per_grid_t: float,
                        tokens_per_second: float, merge: int = 2) -> np.ndarray:
    """int64 [3, L]: Qwen's rule as the torch reference states it (`bench_torch.qwen_positions`:
    text 0..P-1; video (P + floor(t · interval), P + r, P + c); text after from max + 1)."""
    from earlytom_jax.bench_torch import qwen_positions

    return qwen_positions(prefix_len, grid, suffix_len, second_per_grid_t, tokens_per_second, merge).numpy()


def inputs(pixels: np.ndarray, prefix, suffix, second_per_grid_t: float, tokens_per_second: float):
    """(ids, flat pixels, grid, positions [3, L]) of prefix + video pads + suffix."""
    flat, grid = flatten(pixels)
    n = grid[0] * grid[1] * grid[2] // 4
    ids = list(prefix) + [VIDEO] * n + list(suffix)
    pos = reference_positions(len(prefix), grid, len(suffix), second_per_grid_t, tokens_per_second)
    return ids, flat, grid, pos


def logits(model, pixels, prefix, suffix, second_per_grid_t: float = 1.0):
    """transformers' logits [L, V] (fp32) at every position, and the ids."""
    tps = model.config.vision_config.tokens_per_second
    ids, flat, grid, pos = inputs(pixels, prefix, suffix, second_per_grid_t, tps)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), pixel_values_videos=torch.from_numpy(flat).to(model.dtype),
                    video_grid_thw=torch.tensor([grid]), second_per_grid_ts=torch.tensor([second_per_grid_t]),
                    position_ids=torch.from_numpy(pos)[:, None])
    return out.logits[0].float().numpy(), ids


def greedy(model, pixels, prefix, suffix, n: int, second_per_grid_t: float = 1.0) -> list[int]:
    """n greedy tokens from transformers with a KV cache, each step at position max + 1 + step
    (transformers' own `rope_deltas` rule for decoding)."""
    tps = model.config.vision_config.tokens_per_second
    ids, flat, grid, pos = inputs(pixels, prefix, suffix, second_per_grid_t, tps)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), pixel_values_videos=torch.from_numpy(flat).to(model.dtype),
                    video_grid_thw=torch.tensor([grid]), second_per_grid_ts=torch.tensor([second_per_grid_t]),
                    position_ids=torch.from_numpy(pos)[:, None], use_cache=True)
        toks = [int(out.logits[0, -1].argmax())]
        cache, nxt = out.past_key_values, int(pos.max()) + 1
        for i in range(n - 1):
            p = torch.full((3, 1, 1), nxt + i, dtype=torch.long)
            out = model(input_ids=torch.tensor([[toks[-1]]]), past_key_values=cache, position_ids=p, use_cache=True)
            cache = out.past_key_values
            toks.append(int(out.logits[0, -1].argmax()))
    return toks


# The two tiny configurations the Qwen method tests share (conftest's `qwen_win_full`):
WIN_AND_FULL = {
    # 3 blocks, the last a window block (windows of 2x2 merged tokens), 2 text layers
    "win": dict(seed=21, vision_layers=3, fullatt=(1,), window=56),
    # 3 blocks, the last a full-attention block; 3 text layers, GQA 4, another M-RoPE split
    "full": dict(seed=22, vision_layers=3, fullatt=(2,), window=56, text_layers=3, kv_heads=1, mrope=(2, 4, 2)),
}


def loader(tmp_path_factory, models: dict, tag: str):
    """get(name) → (transformers model, our cfg, our params) of `models[name]` (kwargs of `build`),
    built, saved and loaded once per name (cached for the calling fixture's scope)."""
    from earlytom_jax.checkpoint.load import load_hf

    cache = {}

    def get(name):
        if name not in cache:
            model = build(**models[name])
            cfg, params = load_hf(save(model, str(tmp_path_factory.mktemp(f"{tag}-{name}"))))
            cache[name] = model, cfg, params
        return cache[name]

    return get


def random_pixels(frames: int, h: int, w: int, seed: int) -> np.ndarray:
    """Normal random preprocessed pixels [frames, 3, h, w] fp32."""
    return np.random.default_rng(seed).normal(size=(frames, 3, h, w)).astype(np.float32)
