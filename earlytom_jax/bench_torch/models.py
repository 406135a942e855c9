"""The transformers model `bench --reference torch` runs: its config written from ours, built
with random weights or loaded from a checkpoint directory."""

from __future__ import annotations

import os

from earlytom_jax.config import ModelConfig, Qwen25VLConfig
from earlytom_jax.errors import CheckpointError, ConfigError
from earlytom_jax.io_utils import read_json
from earlytom_jax.models import family

# LLaVA-Video: transformers' LLaVA-OneVision class and config, its video path LLaVA-NeXT's
# (`llava_video_torch.as_llava_video`)
HF_CLASSES = {"llava_onevision": "LlavaOnevisionForConditionalGeneration",
              "llava_video": "LlavaOnevisionForConditionalGeneration",
              "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}
HF_CONFIGS = {"llava_onevision": "LlavaOnevisionConfig", "llava_video": "LlavaOnevisionConfig",
              "qwen2_5_vl": "Qwen2_5_VLConfig"}


def require():
    """(torch, transformers); ConfigError (one line) when either is not installed."""
    try:
        import torch
        import transformers
    except ImportError as e:
        raise ConfigError(
            f"--reference torch needs torch and transformers ({e.name} is not installed): pip install '.[test]'"
        ) from None
    return torch, transformers


def _torch_dtype(dtype: str):
    torch, _ = require()
    if dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"dtype {dtype!r}: choose float32 or bfloat16")
    return getattr(torch, dtype)


def hf_config_dict(cfg: ModelConfig) -> dict:
    """transformers config kwargs of our config (`HF_CONFIGS[cfg.family]`). LLaVA-OneVision's
    laid out as the llava-hf checkpoints are (SigLIP truncated at the feature depth,
    `vision_feature_layer` -1, full select strategy); Qwen2.5-VL's see `qwen_config_dict`."""
    if family.is_qwen(cfg):
        return qwen_config_dict(cfg)
    v, t = cfg.vision, cfg.text
    return dict(
        vision_config=dict(
            model_type="siglip_vision_model", hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
            num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads, image_size=v.image_size,
            patch_size=v.patch_size, hidden_act="gelu_pytorch_tanh", layer_norm_eps=v.layer_norm_eps,
            vision_use_head=False,
        ),
        text_config=dict(
            model_type="qwen2", hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
            num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
            head_dim=t.head_dim, vocab_size=t.vocab_size, max_position_embeddings=t.max_position_embeddings,
            rope_theta=t.rope_theta, rms_norm_eps=t.rms_norm_eps, tie_word_embeddings=t.tie_word_embeddings,
            hidden_act="silu",
        ),
        image_token_index=cfg.image_token_id,
        video_token_index=cfg.video_token_id,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        tie_word_embeddings=t.tie_word_embeddings,
    )


def qwen_config_dict(cfg: Qwen25VLConfig) -> dict:
    """`Qwen2_5_VLConfig` kwargs of our config, as transformers 5 saves a Qwen2.5-VL checkpoint
    (`text_config` with `rope_parameters` holding the multimodal RoPE sections)."""
    v, t = cfg.vision, cfg.text
    if t.head_dim * t.num_heads != t.hidden_size:
        raise ConfigError(f"head_dim {t.head_dim} x {t.num_heads} heads is not the hidden size {t.hidden_size}: "
                          "transformers' Qwen2.5-VL cannot express this shape")
    if v.rope_theta != 10000.0:
        raise ConfigError(f"vision rope_theta {v.rope_theta}: transformers' Qwen2.5-VL encoder uses 10000 only")
    if v.tokens_per_second != int(v.tokens_per_second):
        raise ConfigError(f"tokens_per_second {v.tokens_per_second}: transformers' Qwen2.5-VL config takes "
                          "whole numbers")
    return dict(
        vision_config=dict(
            depth=v.num_layers, hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
            num_heads=v.num_heads, in_channels=3, patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size,
            spatial_merge_size=v.spatial_merge_size, window_size=v.window_size,
            fullatt_block_indexes=list(v.fullatt_block_indexes), out_hidden_size=v.out_hidden_size,
            tokens_per_second=int(v.tokens_per_second), hidden_act=v.hidden_act,
        ),
        text_config=dict(
            hidden_size=t.hidden_size, intermediate_size=t.intermediate_size, num_hidden_layers=t.num_layers,
            num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads, vocab_size=t.vocab_size,
            max_position_embeddings=t.max_position_embeddings, rms_norm_eps=t.rms_norm_eps, hidden_act="silu",
            rope_parameters={"rope_type": "default", "mrope_section": list(t.mrope_section),
                             "rope_theta": t.rope_theta},
            tie_word_embeddings=t.tie_word_embeddings, bos_token_id=None, eos_token_id=None,
        ),
        video_token_id=cfg.video_token_id,
        image_token_id=cfg.image_token_id,
        vision_start_token_id=cfg.vision_start_token_id,
        vision_end_token_id=cfg.vision_end_token_id,
        tie_word_embeddings=t.tie_word_embeddings,
    )


def build_random(cfg: ModelConfig, dtype: str = "float32", seed: int = 0, device: str | None = None,
                 attn_implementation: str | None = None):
    """A random transformers model of our architecture (either family), in eval mode and
    `dtype`, built and its weights drawn on `device` (default the CPU; "cuda": the 7B shape's
    15 GB never pass through the host). attn_implementation: transformers' (e.g. "sdpa");
    default its own choice. LLaVA-Video: LLaVA-OneVision's model of the same shapes turned into
    LLaVA-NeXT's video path (`llava_video_torch.build_random`)."""
    torch, transformers = require()
    if cfg.family == "llava_video":
        from earlytom_jax import llava_video_torch

        return llava_video_torch.build_random(cfg, dtype, seed, device, attn_implementation)
    torch.manual_seed(seed)
    hf_cfg = getattr(transformers, HF_CONFIGS[cfg.family])(**hf_config_dict(cfg))
    kw = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    # built straight in `dtype`: the 7B shape in bf16 (15 GB) never exists in fp32 (30 GB); under
    # the device context every parameter and buffer is allocated, and initialised, on `device`
    with torch.device(device or "cpu"):
        model = getattr(transformers, HF_CLASSES[cfg.family])._from_config(hf_cfg, dtype=_torch_dtype(dtype), **kw)
    return model.eval()


def hf_class_name(directory: str) -> str:
    """The transformers class that loads a checkpoint directory, by its config.json's
    `model_type` (`qwen2_5_vl`: Qwen2.5-VL; anything else: LLaVA-OneVision, llava-hf layout)."""
    path = os.path.join(directory, "config.json")
    d = read_json(path) if os.path.isfile(path) else None
    if not isinstance(d, dict):
        raise CheckpointError(f"--reference torch: {path} is missing or not a JSON object; point --model at a "
                              "transformers checkpoint directory")
    return HF_CLASSES["qwen2_5_vl" if d.get("model_type") == "qwen2_5_vl" else "llava_onevision"]


def load_pretrained(directory: str, dtype: str = "float32", family_name: str | None = None):
    """transformers' own loading of a checkpoint directory (llava-hf or Qwen2.5-VL layout,
    `hf_class_name`); family_name "llava_video" (our config's family): then turned into
    LLaVA-NeXT's video path (`llava_video_torch.as_llava_video`)."""
    torch, transformers = require()
    if family_name == "llava_video":
        from earlytom_jax import llava_video_torch

        return llava_video_torch.load_pretrained(directory, dtype)
    cls = getattr(transformers, hf_class_name(directory))
    try:
        model = cls.from_pretrained(directory, dtype=_torch_dtype(dtype))
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"--reference torch: transformers cannot load {directory} ({e.__class__.__name__}: {e})") from None
    return model.eval()
