"""Our parameter tree → a HuggingFace `llava_onevision` checkpoint (transformers 5 names), so
that a model trained here loads in transformers as well as in this project.

The inverse of loading (`checkpoint.table`): every tensor goes back to its torch layout
([out, in] linears, flat head dimensions, [C, 3, p, p] patch kernel) and per-layer stacks are
split again.
"""

from __future__ import annotations

import os

import numpy as np

from earlytom_jax.checkpoint import table
from earlytom_jax.config import LlavaOVConfig

# canonical prefix → transformers 5 `save_pretrained` prefix
_HF_PREFIX = (
    ("vision.", "model.vision_tower.vision_model."),
    ("projector.1.", "model.multi_modal_projector.linear_1."),
    ("projector.2.", "model.multi_modal_projector.linear_2."),
    ("newline", "model.image_newline"),
    ("text.", "model.language_model."),
    ("lm_head.", "lm_head."),
)


def hf_name(canonical: str, prefixes=_HF_PREFIX) -> str:
    """A canonical name (see hf.canonical_name) in an HF layout given by (ours, theirs) prefix
    pairs; default: transformers 5 names."""
    for ours, theirs in prefixes:
        if canonical.startswith(ours):
            return theirs + canonical[len(ours):]
    raise ValueError(f"no HF name for {canonical!r}")


def hf_tensors(params: dict, cfg: LlavaOVConfig) -> dict[str, np.ndarray]:
    """name → fp32 numpy tensor in the HF layout (SigLIP post-layernorm as identity, unused by
    the video path's features but expected by transformers)."""
    out = {}
    for row in table.rows(cfg):
        value = params
        for k in row.path:
            value = value[k]
        value = np.asarray(value, np.float32)
        layers = [value[i] for i in range(row.layers)] if row.layers else [value]
        for name, layer in zip(row.sources(), layers):
            out[hf_name(name)] = np.ascontiguousarray(row.to_source(layer))
    c = cfg.vision.hidden_size
    out[hf_name("vision.post_layernorm.weight")] = np.ones((c,), np.float32)
    out[hf_name("vision.post_layernorm.bias")] = np.zeros((c,), np.float32)
    return out


def hf_config(cfg: LlavaOVConfig) -> dict:
    """config.json of a transformers `LlavaOnevisionForConditionalGeneration` for `cfg`."""
    v, t = cfg.vision, cfg.text
    return {
        "architectures": ["LlavaOnevisionForConditionalGeneration"],
        "model_type": "llava_onevision",
        "vision_config": {
            "model_type": "siglip_vision_model", "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size, "num_hidden_layers": v.num_layers,
            "num_attention_heads": v.num_heads, "image_size": v.image_size, "patch_size": v.patch_size,
            "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": v.layer_norm_eps, "vision_use_head": False,
        },
        "text_config": {
            "model_type": "qwen2", "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_layers, "num_attention_heads": t.num_heads,
            "num_key_value_heads": t.num_kv_heads, "head_dim": t.head_dim, "vocab_size": t.vocab_size,
            "max_position_embeddings": t.max_position_embeddings, "rope_theta": t.rope_theta,
            "rms_norm_eps": t.rms_norm_eps, "tie_word_embeddings": t.tie_word_embeddings,
            "hidden_act": "silu",
        },
        "image_token_index": cfg.image_token_id,
        "video_token_index": cfg.video_token_id,
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "full",
        "tie_word_embeddings": t.tie_word_embeddings,
        # LLaVA-NeXT's key, which transformers ignores: "grid" marks a LLaVA-Video directory
        **({"mm_newline_position": cfg.newline_position} if cfg.grid_newlines else {}),
    }


def save_hf(params: dict, cfg: LlavaOVConfig, directory: str) -> None:
    """Write `config.json` and `model.safetensors` into `directory` (atomically each)."""
    import json

    from safetensors.numpy import save_file

    from earlytom_jax.io_utils import atomic_write_text, readable_by_all

    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, ".tmp-model.safetensors")
    save_file(hf_tensors(params, cfg), tmp, metadata={"format": "pt"})
    readable_by_all(tmp)
    os.replace(tmp, os.path.join(directory, "model.safetensors"))
    atomic_write_text(os.path.join(directory, "config.json"), json.dumps(hf_config(cfg), indent=2) + "\n")
