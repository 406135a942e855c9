"""earlytom-jax: EarlyTom visual-token compression for LLaVA-OneVision video LLMs, in JAX."""

from earlytom_jax.xla_setup import apply_cpu_flags

apply_cpu_flags()  # before anything below touches a JAX backend

from earlytom_jax.api import Answer, VideoLLM
from earlytom_jax.compression.base import FullTokens
from earlytom_jax.compression.earlytom import EarlyTom
from earlytom_jax.config import LlavaOVConfig, Qwen2Config, SiglipConfig
from earlytom_jax.errors import CheckpointError, ConfigError, EarlyTomError

__all__ = [
    "Answer", "VideoLLM", "FullTokens", "EarlyTom", "LlavaOVConfig", "Qwen2Config",
    "SiglipConfig", "CheckpointError", "ConfigError", "EarlyTomError",
]
