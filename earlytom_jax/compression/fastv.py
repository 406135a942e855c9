"""FastV (a baseline inside the LLM): after layer K, drop the visual tokens that received the
least attention from the last prompt token at layer K-1, for all later layers; merge nothing.
All frames and all tokens reach the LLM (hooks 1 and 2 are the full model's). On LLaVA-Video
the visual span holds every grid newline (T0 · 13 · 14 slots), and the drop acts on all of them.

Qwen2.5-VL: the same rule over the visual span of the T·S merged tokens (no newline follows the
video on this family); the survivors keep their 3-D M-RoPE positions, and the text after the
video keeps its own (one past the full video's largest position)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from earlytom_jax.compression.base import NoHooks
from earlytom_jax.compression.llm_merge import keep_count_table, keep_mask
from earlytom_jax.compression.registration import register
from earlytom_jax.config import LlavaOVConfig
from earlytom_jax.errors import ConfigError


@register(name="fastv", label="FastV", settings=("layer",))
@dataclasses.dataclass(frozen=True)
class FastV(NoHooks):
    """layer: K (tokens are dropped from layer K on); drop: share of the visual span
    (selected tokens and the newline; Qwen2.5-VL: the merged tokens, no newline) dropped, kept
    count round(L·(1 - drop))."""

    families = ("llava_onevision", "llava_video", "qwen2_5_vl")

    layer: int = 2
    drop: float = 0.5
    name = "fastv"

    def __post_init__(self):
        if not 0.0 <= self.drop < 1.0:
            raise ConfigError(f"FastV drop ratio {self.drop} is outside [0, 1)")

    @classmethod
    def from_ratio(cls, ratio, cfg, layer: int = 2) -> "FastV":
        """At retention `ratio` of the visual span: drop = 1 - ratio."""
        return cls(layer=layer, drop=1.0 - ratio).check(cfg)

    def check(self, cfg: LlavaOVConfig) -> "FastV":
        if not 1 <= self.layer < cfg.text.num_layers:
            raise ConfigError(f"FastV layer {self.layer} must be in 1..{cfg.text.num_layers - 1}")
        return self

    @property
    def llm_layer(self) -> int:
        return self.layer

    def llm_capacity(self, span: int) -> int:
        return int(keep_count_table(span, self.drop).max())

    def llm_merge(self, h, attn, valid):
        n_keep = jnp.asarray(keep_count_table(h.shape[0], self.drop))[valid.sum()]
        return h, keep_mask(attn, valid, n_keep)
