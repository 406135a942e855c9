"""Tiny random LLaVA-OneVision checkpoints built with transformers, for parity tests.

Nothing here downloads anything: configs are written in code, weights are random, the tokenizer
is a small word-level `tokenizers` model that knows the qwen_1_5 special tokens.
"""

from __future__ import annotations

import json
import os

import numpy as np


def tiny_config_dict(
    *,
    image_size: int = 56,
    patch_size: int = 14,
    vision_layers: int = 4,
    vision_hidden: int = 32,
    vision_heads: int = 4,
    text_hidden: int = 64,
    text_layers: int = 4,
    q_heads: int = 4,
    kv_heads: int = 2,
    text_intermediate: int = 96,
    vocab_size: int = 160,
    tie: bool = False,
    vision_feature_layer: int = -1,
) -> dict:
    """A LlavaOnevisionConfig kwargs dict of a tiny model (token ids fit `vocab_size`)."""
    return dict(
        vision_config=dict(
            model_type="siglip_vision_model",
            hidden_size=vision_hidden,
            intermediate_size=vision_hidden * 2 + 8,
            num_hidden_layers=vision_layers,
            num_attention_heads=vision_heads,
            image_size=image_size,
            patch_size=patch_size,
            hidden_act="gelu_pytorch_tanh",
            layer_norm_eps=1e-6,
            vision_use_head=False,
        ),
        text_config=dict(
            model_type="qwen2",
            hidden_size=text_hidden,
            intermediate_size=text_intermediate,
            num_hidden_layers=text_layers,
            num_attention_heads=q_heads,
            num_key_value_heads=kv_heads,
            vocab_size=vocab_size,
            max_position_embeddings=4096,
            rope_theta=1000000.0,
            rms_norm_eps=1e-6,
            tie_word_embeddings=tie,
            hidden_act="silu",
        ),
        image_token_index=vocab_size - 4,
        video_token_index=vocab_size - 3,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy="full",
        tie_word_embeddings=tie,
    )


def build_tiny_model(seed: int = 0, **kwargs):
    """A random `LlavaOnevisionForConditionalGeneration` in fp32 eval mode."""
    import torch
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    torch.manual_seed(seed)
    cfg = LlavaOnevisionConfig(**tiny_config_dict(**kwargs))
    model = LlavaOnevisionForConditionalGeneration(cfg).eval()
    # Random init leaves some tensors at exact zero/one (biases, norms, newline); perturb them
    # so that a loader that forgets one of them is caught by the parity tests.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "image_newline" in name:
                p.add_(0.05 * torch.randn_like(p))
    return model


def write_tokenizer(directory: str, vocab_size: int = 160) -> None:
    """tokenizer.json (character level, qwen_1_5 specials; `<video>` = vocab_size - 3)."""
    from earlytom_jax.synthetic import char_tokenizer

    char_tokenizer(vocab_size - 4).save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, f)


def write_preprocessor(directory: str, image_size: int) -> None:
    with open(os.path.join(directory, "preprocessor_config.json"), "w") as f:
        json.dump(
            {
                "image_mean": [0.5, 0.5, 0.5],
                "image_std": [0.5, 0.5, 0.5],
                "size": {"height": image_size, "width": image_size},
                "resample": 3,
                "rescale_factor": 1 / 255,
            },
            f,
        )


def save_tiny_checkpoint(model, directory: str, max_shard_size: str | None = None) -> str:
    """save_pretrained + tokenizer + preprocessor config; returns the directory."""
    os.makedirs(directory, exist_ok=True)
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(directory, **kw)
    vocab = model.config.text_config.vocab_size
    write_tokenizer(directory, vocab)
    write_preprocessor(directory, model.config.vision_config.image_size)
    return directory


def random_video(n_frames: int, height: int, width: int, seed: int = 0, *, static: bool = False):
    """uint8 frames [T, H, W, 3]; smooth blobs that drift, so neighbouring frames are similar."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(0, 255, size=(3,))
    frames = []
    cx, cy = rng.uniform(0, width), rng.uniform(0, height)
    vx, vy = rng.normal(0, 2, size=2)
    for t in range(n_frames):
        if not static:
            cx, cy = cx + vx, cy + vy
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (0.05 * height * width))
        img = base[None, None, :] * (1 - blob[..., None]) + 255 * blob[..., None] * (t % 3 == 0)
        img = img + rng.normal(0, 8, size=img.shape)
        frames.append(np.clip(img, 0, 255).astype(np.uint8))
    return np.stack(frames)


def real_layout_model(directory: str, seed: int, vision_layers: int):
    """A tiny random model with SigLIP-384's patch layout (378 px / 14 → 27 x 27 patches, pooled
    to 14 x 14 = 196 tokens per frame), saved to `directory` and loaded by us.
    → (transformers model, our config, our params)."""
    from earlytom_jax.checkpoint.load import load_hf

    model = build_tiny_model(seed=seed, image_size=378, vision_layers=vision_layers)
    cfg, params = load_hf(save_tiny_checkpoint(model, directory))
    assert cfg.tokens_per_frame == 196
    return model, cfg, params


def tiny_siglip(vision_config, directory: str, seed: int = 5, use_head: bool = True):
    """The original SigLIP beside a tiny LLaVA-OneVision's tower (FastVID's signals): a random
    transformers `SiglipVisionModel` with the tower's sizes (one block: only its post-LayerNorm
    and head are read), its head on (`use_head`), saved to `directory`. Biases and norms are
    perturbed and the probe scaled so that its attention is far from uniform.
    → (the model in fp32 eval mode, directory)."""
    import torch
    from transformers import SiglipVisionConfig, SiglipVisionModel

    v = vision_config
    torch.manual_seed(seed)
    cfg = SiglipVisionConfig(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=1,
                             num_attention_heads=v.num_attention_heads, image_size=v.image_size,
                             patch_size=v.patch_size, layer_norm_eps=v.layer_norm_eps, hidden_act=v.hidden_act,
                             vision_use_head=use_head)
    model = SiglipVisionModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.05 * torch.randn_like(p))
            if "probe" in name:
                p.mul_(30.0)
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory)
    return model, directory
