"""The model families: which module a config builds, and binding a parameter tree to it."""

from __future__ import annotations

from earlytom_jax.config import ModelConfig
from earlytom_jax.models import params as params_lib
from earlytom_jax.models.llava_onevision import LlavaOneVision
from earlytom_jax.models.qwen2_5_vl import Qwen25VL

# LLaVA-Video is LLaVA-OneVision's module with its config's other pooling and newlines
MODULES = {"llava_onevision": LlavaOneVision, "llava_video": LlavaOneVision, "qwen2_5_vl": Qwen25VL}


def module(cfg: ModelConfig):
    """The NNX module class of `cfg`'s family."""
    return MODULES[cfg.family]


def bind(cfg: ModelConfig, params: dict):
    """The model `cfg` over the parameter tree `params` (models/params.py `bind`)."""
    return params_lib.bind(module(cfg), cfg, params)


def is_qwen(cfg: ModelConfig) -> bool:
    return cfg.family == "qwen2_5_vl"


def is_llava(cfg: ModelConfig) -> bool:
    """LLaVA-OneVision or LLaVA-Video (one module, `LlavaOneVision`)."""
    return cfg.family in ("llava_onevision", "llava_video")
