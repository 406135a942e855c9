"""LLaVA-Video's video path in PyTorch: the reference our JAX model is checked against, and
what `earlytom bench --reference torch` times for a LLaVA-Video model.

transformers (5.23) has no class that runs LLaVA-Video's video path: the llava-hf conversion
of LLaVA-Video-7B-Qwen2 loads as `LlavaOnevisionForConditionalGeneration`, whose video
features are always pooled bilinearly and followed by one newline (LLaVA-OneVision's path),
and `LlavaNextVideo` pools before its projector and adds no newline. So the reference is
transformers' LLaVA-OneVision model (its SigLIP, projector, Qwen2, `image_newline`; the
tensors are the same) with the video features computed as LLaVA-NeXT's `llava_vid` path does
(`llava/model/llava_arch.py` of LLaVA-VL/LLaVA-NeXT, read at commit df17966; written here from
understanding, not copied):

1. `encode_images`: the vision tower's selected hidden state (transformers' config:
   `vision_feature_layer`, the SigLIP truncated to its feature depth as our configs hold it),
   then `mm_projector` on all g x g patches of every frame;
2. `get_2dPool(feature, stride=2)` with `mm_spatial_pool_mode="average"` (lmms-eval's
   `llava_vid` default, also passed by EarlyTom's LLaVA-Video script): `F.avg_pool2d(x, 2)` on
   the [T, H, g, g] map, floor(g/2) a side (27 → 13, the last row and column dropped);
3. `add_token_per_grid` (`mm_newline_position="grid"`): every pooled row of every frame
   followed by `image_newline`, frames in time order: T · g' · (g' + 1) slots (13 x 14 = 182 a
   frame).

The placeholder is repeated that many times in the prompt ids (`placeholder_count`); the rest
(masked scatter into the embeddings, the Qwen2 prefill, the KV cache, `generate`) is
transformers' own. `as_llava_video` turns a transformers LLaVA-OneVision model into this
reference in place (the inner model's class gains the video path above; no tensor changes).
torch and transformers are imported here, at module import: import this module lazily.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import BaseModelOutputWithPooling

LABEL = "LLaVA-NeXT llava_vid path on transformers' LLaVA-OneVision modules (PyTorch)"


def pool_2d(features: torch.Tensor, grid: int, mode: str = "average") -> torch.Tensor:
    """LLaVA-NeXT `get_2dPool` with stride 2: [T, g·g, H] → [T, g'·g', H]; "average":
    `F.avg_pool2d(·, 2)` (g' = floor(g/2)); "bilinear": `F.interpolate` to ceil(g/2) (align_corners
    False: LLaVA-OneVision's)."""
    t, n, h = features.shape
    if n != grid * grid:
        raise ValueError(f"{n} tokens a frame are not a {grid} x {grid} grid")
    x = features.view(t, grid, grid, h).permute(0, 3, 1, 2)
    if mode == "average":
        x = F.avg_pool2d(x, 2)
    elif mode == "bilinear":
        x = F.interpolate(x, size=[-(-grid // 2)] * 2, mode="bilinear")
    else:
        raise ValueError(f"pool mode {mode!r}")
    return x.permute(0, 2, 3, 1).reshape(t, -1, h)


def add_token_per_grid(features: torch.Tensor, newline: torch.Tensor) -> torch.Tensor:
    """LLaVA-NeXT `add_token_per_grid`: [T, g'·g', H] → [T·g'·(g'+1), H], each frame's rows
    in order, every row followed by `newline` [H]."""
    t, s, h = features.shape
    g = int(round(s ** 0.5))
    if g * g != s:
        raise ValueError(f"{s} pooled tokens a frame are not a square grid")
    rows = features.reshape(t, g, g, h)
    nl = newline.to(features.dtype).view(1, 1, 1, h).expand(t, g, 1, h)
    return torch.cat([rows, nl], dim=2).reshape(t * g * (g + 1), h)


def video_features(model, pixel_values: torch.Tensor, pool_mode: str = "average",
                   newline_position: str = "grid") -> torch.Tensor:
    """The visual span of one video [T, 3, S, S] for transformers' LLaVA-OneVision `model`
    (the `LlavaOnevisionModel`, i.e. `…ForConditionalGeneration().model`): vision tower →
    projector → `pool_2d` → `add_token_per_grid` ("grid") or one newline after the video
    ("one_token"). → [L, H] in the projector's dtype."""
    cfg = model.config
    layer = cfg.vision_feature_layer
    if not isinstance(layer, int):
        raise NotImplementedError("one vision_feature_layer only")
    if getattr(cfg, "vision_feature_select_strategy", "full") != "full":
        raise NotImplementedError("vision_feature_select_strategy 'full' only (SigLIP has no CLS token)")
    out = model.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
    feats = model.multi_modal_projector(out.hidden_states[layer])  # [T, g·g, H]
    grid = cfg.vision_config.image_size // cfg.vision_config.patch_size
    pooled = pool_2d(feats, grid, pool_mode)
    if newline_position == "grid":
        return add_token_per_grid(pooled, model.image_newline)
    if newline_position == "one_token":
        return torch.cat([pooled.flatten(0, 1), model.image_newline[None].to(pooled.dtype)], 0)
    raise ValueError(f"newline position {newline_position!r}")


def _video_model_class(base: type) -> type:
    """A subclass of transformers' `LlavaOnevisionModel` (`base`) whose video features are
    `video_features` (no new parameters)."""

    class LlavaVideoModel(base):
        llava_video_pool_mode = "average"
        llava_video_newline_position = "grid"

        def get_video_features(self, pixel_values_videos, vision_feature_layer=None,
                               vision_feature_select_strategy=None, **kwargs):
            """[B, T, 3, S, S] → pooler_output [B, L, H] (the forward flattens the batch)."""
            spans = [video_features(self, video, self.llava_video_pool_mode, self.llava_video_newline_position)
                     for video in pixel_values_videos]
            return BaseModelOutputWithPooling(pooler_output=torch.stack(spans))

    LlavaVideoModel.__name__ = LlavaVideoModel.__qualname__ = "LlavaVideoModel"
    return LlavaVideoModel


_CLASSES: dict[type, type] = {}


def as_llava_video(model, pool_mode: str = "average", newline_position: str = "grid"):
    """transformers' `LlavaOnevisionForConditionalGeneration` → the same object running
    LLaVA-NeXT's video path (`video_features`); returns it. The inner model's class is
    swapped for a subclass that only replaces `get_video_features`."""
    inner = model.model
    base = type(inner)
    if getattr(base, "llava_video_pool_mode", None) is not None:  # already converted: back to its base
        base = base.__mro__[1]
    cls = _CLASSES.setdefault(base, _video_model_class(base))
    inner.__class__ = cls
    inner.llava_video_pool_mode, inner.llava_video_newline_position = pool_mode, newline_position
    model.llava_video_reference = True
    return model


def placeholder_count(cfg, frames: int) -> int:
    """Video placeholder ids the prompt holds for `frames` frames of our config `cfg`
    (LLaVA-Video: T · g' · (g' + 1))."""
    return cfg.visual_slots(frames)


def build_random(cfg, dtype: str = "float32", seed: int = 0, device: str | None = None,
                 attn_implementation: str | None = None):
    """A random reference model of our LLaVA-Video config `cfg` (`bench_torch.build_random`'s
    LLaVA-OneVision model of the same shapes, then `as_llava_video`)."""
    from earlytom_jax import bench_torch
    from earlytom_jax.config import LlavaOVConfig

    base = LlavaOVConfig(vision=cfg.vision, text=cfg.text, video_token_id=cfg.video_token_id,
                         image_token_id=cfg.image_token_id)
    model = bench_torch.build_random(base, dtype, seed, device, attn_implementation)
    return as_llava_video(model, cfg.pool_mode, cfg.newline_position)


def load_pretrained(directory: str, dtype: str = "float32"):
    """A llava-hf / transformers-layout LLaVA-Video directory loaded by transformers (as
    LLaVA-OneVision), then `as_llava_video`. The lmms-lab layout is not a transformers layout."""
    from earlytom_jax import bench_torch

    return as_llava_video(bench_torch.load_pretrained(directory, dtype))
