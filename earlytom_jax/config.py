"""Typed, frozen model configuration read from a checkpoint's `config.json`.

Three layouts reach us (see docs/algorithm.md): llava-hf / transformers `llava_onevision`
configs with `vision_config` and `text_config`, and the lmms-lab originals (`llava_qwen`),
whose config is a flat Qwen2 config plus `mm_*` keys and whose SigLIP is the so400m/14-384.
"""

from __future__ import annotations

import dataclasses
import os

from earlytom_jax.errors import CheckpointError
from earlytom_jax.io_utils import read_json


@dataclasses.dataclass(frozen=True)
class SiglipConfig:
    """SigLIP vision tower. `num_layers` is the number of blocks we run (the feature depth)."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_layers: int = 26
    num_heads: int = 16
    image_size: int = 384
    patch_size: int = 14
    layer_norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid(self) -> int:
        """Patches per side (27 for 384/14)."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid


@dataclasses.dataclass(frozen=True)
class Qwen2Config:
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_layers: int = 24
    num_heads: int = 14
    num_kv_heads: int = 2
    head_dim: int = 64
    vocab_size: int = 151936
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 32768


@dataclasses.dataclass(frozen=True)
class LlavaOVConfig:
    vision: SiglipConfig
    text: Qwen2Config
    video_token_id: int = 151647
    image_token_id: int = 151646

    @property
    def pooled_grid(self) -> int:
        """Side of the pooled per-frame map: ceil(grid / 2) (14 for 27)."""
        return -(-self.vision.grid // 2)

    @property
    def tokens_per_frame(self) -> int:
        return self.pooled_grid**2


def _rope_theta(d: dict) -> float:
    params = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(d.get("rope_theta", 1_000_000.0))


def _qwen2_from_dict(d: dict, tie: bool) -> Qwen2Config:
    heads = int(d["num_attention_heads"])
    hidden = int(d["hidden_size"])
    return Qwen2Config(
        hidden_size=hidden,
        intermediate_size=int(d["intermediate_size"]),
        num_layers=int(d["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(d.get("num_key_value_heads", heads)),
        head_dim=int(d.get("head_dim") or hidden // heads),
        vocab_size=int(d["vocab_size"]),
        rope_theta=_rope_theta(d),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(tie),
        max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
    )


def _feature_depth(stored_layers: int, feature_layer: int) -> int:
    """Blocks to run so that the output is `hidden_states[feature_layer]` (index 0 = embeddings)."""
    depth = stored_layers + 1 + feature_layer if feature_layer < 0 else feature_layer
    if not 1 <= depth <= stored_layers:
        raise CheckpointError(
            f"vision_feature_layer={feature_layer} selects no encoder block of {stored_layers}"
        )
    return depth


_SO400M = dict(
    hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
    image_size=384, patch_size=14, layer_norm_eps=1e-6,
)


def _siglip_from_dict(v: dict, depth: int) -> SiglipConfig:
    return SiglipConfig(
        hidden_size=int(v.get("hidden_size", 1152)),
        intermediate_size=int(v.get("intermediate_size", 4304)),
        num_layers=depth,
        num_heads=int(v.get("num_attention_heads", 16)),
        image_size=int(v.get("image_size", 384)),
        patch_size=int(v.get("patch_size", 14)),
        layer_norm_eps=float(v.get("layer_norm_eps", 1e-6)),
    )


def config_from_dict(d: dict) -> LlavaOVConfig:
    """Build the config from a parsed config.json (any of the supported layouts)."""
    try:
        return _config_from_dict(d)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"incomplete config ({e.__class__.__name__}: {e} missing or invalid)") from None


def _config_from_dict(d: dict) -> LlavaOVConfig:
    if "vision_config" in d and "text_config" in d:
        strategy = d.get("vision_feature_select_strategy", "full")
        if strategy != "full":
            raise CheckpointError(
                f"vision_feature_select_strategy={strategy!r}: the video path needs 'full' "
                "(SigLIP has no CLS token to drop)"
            )
        feature_layer = d.get("vision_feature_layer", -1)
        if not isinstance(feature_layer, int):
            raise CheckpointError(f"vision_feature_layer={feature_layer!r}: only one layer is supported")
        v = d["vision_config"]
        vision = _siglip_from_dict(v, _feature_depth(int(v.get("num_hidden_layers", 26)), feature_layer))
        t = d["text_config"]
        tie = bool(d.get("tie_word_embeddings", False) or t.get("tie_word_embeddings", False))
        return LlavaOVConfig(
            vision=vision,
            text=_qwen2_from_dict(t, tie),
            video_token_id=int(d.get("video_token_index", d.get("video_token_id", 151647))),
            image_token_id=int(d.get("image_token_index", d.get("image_token_id", 151646))),
        )
    if "mm_vision_tower" in d or d.get("model_type") in ("llava", "llava_qwen"):
        # lmms-lab original: the config names the vision tower but not its shape; it is SigLIP
        # so400m/14-384 with 27 stored blocks unless a `vision_config` says otherwise. Features
        # come from hidden_states[mm_vision_select_layer] (-2 in every release: 26 blocks).
        v = {**_SO400M, **d.get("vision_config", {})}
        select = int(d.get("mm_vision_select_layer", -2))
        vision = _siglip_from_dict(v, _feature_depth(int(v["num_hidden_layers"]), select))
        return LlavaOVConfig(
            vision=vision,
            text=_qwen2_from_dict(d, bool(d.get("tie_word_embeddings", False))),
            video_token_id=int(d.get("video_token_index", 151647)),
            image_token_id=int(d.get("image_token_index", 151646)),
        )
    raise CheckpointError(
        "config.json is neither a llava_onevision config (vision_config + text_config) "
        "nor an lmms-lab llava_qwen config (mm_vision_tower)"
    )


def load_config(directory: str) -> LlavaOVConfig:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no config.json; point --model at a checkpoint directory")
    d = read_json(path)
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: valid JSON but not an object (a {type(d).__name__}); a checkpoint's "
                              "config.json holds one object of settings (fix the file or point --model elsewhere)")
    try:
        return config_from_dict(d)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
