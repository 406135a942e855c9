"""Typed, frozen model configuration read from a checkpoint's `config.json`.

Three model families. LLaVA-OneVision arrives in three layouts (see docs/algorithm.md):
llava-hf / transformers `llava_onevision` configs with `vision_config` and `text_config`, and
the lmms-lab originals (`llava_qwen`), whose config is a flat Qwen2 config plus `mm_*` keys and
whose SigLIP is the so400m/14-384. LLaVA-Video is the same model and layouts with LLaVA-NeXT's
other video settings (average pooling, a newline per grid row), told apart by the config's
`mm_newline_position` ("grid"). Qwen2.5-VL (`model_type` "qwen2_5_vl") arrives as Qwen's
release writes it (text settings at the top level, `rope_scaling.mrope_section`) or as
transformers 5's `save_pretrained` does (`text_config`, `rope_parameters`).
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
    # Qwen2.5-VL's multimodal RoPE: frequencies [0, s0) rotate by the temporal position, the
    # next s1 by the height position, the last s2 by the width position (sum = head_dim / 2)
    mrope_section: tuple[int, ...] | None = None


POOL_MODES = ("bilinear", "average")
NEWLINE_POSITIONS = ("one_token", "grid")


@dataclasses.dataclass(frozen=True)
class LlavaOVConfig:
    """LLaVA-OneVision's video path as transformers and lmms-eval's `llava_onevision` run it:
    2x bilinear pooling (LLaVA-NeXT's `mm_spatial_pool_mode="bilinear"`) and one newline after
    the whole video (`mm_newline_position="one_token"`). The two switches are LLaVA-NeXT's own;
    `LlavaVideoConfig` is the same model with the other settings (docs/llava-video.md)."""

    vision: SiglipConfig
    text: Qwen2Config
    video_token_id: int = 151647
    image_token_id: int = 151646
    # LLaVA-NeXT `get_2dPool` with stride 2: "bilinear" (F.interpolate to ceil(g/2)) or
    # "average" (F.avg_pool2d(2): floor(g/2), the last row and column of an odd grid dropped)
    pool_mode: str = "bilinear"
    # LLaVA-NeXT `mm_newline_position`: "one_token" (one newline after the video) or "grid"
    # (a newline after every row of every frame's pooled map, `add_token_per_grid`)
    newline_position: str = "one_token"

    family = "llava_onevision"

    def __post_init__(self):
        if self.pool_mode not in POOL_MODES:
            raise CheckpointError(f"pool mode {self.pool_mode!r}: choose one of {', '.join(POOL_MODES)}")
        if self.newline_position not in NEWLINE_POSITIONS:
            raise CheckpointError(f"newline position {self.newline_position!r}: choose one of "
                                  f"{', '.join(NEWLINE_POSITIONS)}")
        if self.pool_mode == "average" and self.vision.grid < 2:
            raise CheckpointError(f"a {self.vision.grid} x {self.vision.grid} patch grid cannot be average-pooled 2 x 2")

    @property
    def pooled_grid(self) -> int:
        """Side of the pooled per-frame map: ceil(grid / 2) bilinear (14 for 27), grid // 2
        average (13 for 27)."""
        g = self.vision.grid
        return -(-g // 2) if self.pool_mode == "bilinear" else g // 2

    @property
    def tokens_per_frame(self) -> int:
        """Pooled tokens of a frame, newlines not counted (196 bilinear, 169 average at 384 px)."""
        return self.pooled_grid**2

    @property
    def grid_newlines(self) -> bool:
        """A newline after every row of every frame (True) or one after the video (False)."""
        return self.newline_position == "grid"

    def visual_slots(self, frames: int) -> int:
        """Length of the full (uncompressed) visual span of `frames` frames, newlines included:
        T·S + 1 (one_token) or T·g'·(g' + 1) (grid: 182 a frame at 384 px)."""
        if self.grid_newlines:
            return frames * self.pooled_grid * (self.pooled_grid + 1)
        return frames * self.tokens_per_frame + 1


@dataclasses.dataclass(frozen=True)
class LlavaVideoConfig(LlavaOVConfig):
    """LLaVA-Video (lmms-lab/LLaVA-Video-7B-Qwen2): the LLaVA-OneVision model (SigLIP, the
    same projector, Qwen2) whose video path is LLaVA-NeXT's as lmms-eval's `llava_vid` runs it:
    2x2 average pooling (27 x 27 → 13 x 13) and a newline after every pooled row of every
    frame (13 x 14 = 182 slots a frame). Settings and their sources: docs/llava-video.md."""

    pool_mode: str = "average"
    newline_position: str = "grid"

    family = "llava_video"

    def __post_init__(self):
        super().__post_init__()
        if self.newline_position != "grid":
            raise CheckpointError(f"LLaVA-Video places its newlines per grid row, not {self.newline_position!r}")


@dataclasses.dataclass(frozen=True)
class QwenVisionConfig:
    """Qwen2.5-VL's vision encoder (defaults: the 7B's). Blocks attend within windows of
    `window_size` pixels (`window_merged` merged tokens a side), except the
    `fullatt_block_indexes`, which attend over a whole temporal patch."""

    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_layers: int = 32
    num_heads: int = 16
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    out_hidden_size: int = 3584
    tokens_per_second: float = 2.0
    hidden_act: str = "silu"
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def merge_unit(self) -> int:
        """Patches per merged token (4 for 2x2)."""
        return self.spatial_merge_size**2

    @property
    def window_merged(self) -> int:
        """Merged tokens per window side (112 // 2 // 14 = 4)."""
        return self.window_size // self.spatial_merge_size // self.patch_size

    @property
    def factor(self) -> int:
        """Frame sides are multiples of this many pixels (28)."""
        return self.patch_size * self.spatial_merge_size


@dataclasses.dataclass(frozen=True)
class Qwen25VLConfig:
    vision: QwenVisionConfig
    text: Qwen2Config
    video_token_id: int = 151656
    image_token_id: int = 151655
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653

    family = "qwen2_5_vl"


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


ModelConfig = LlavaOVConfig | LlavaVideoConfig | Qwen25VLConfig
FAMILIES = {"llava_onevision": "LLaVA-OneVision", "llava_video": "LLaVA-Video", "qwen2_5_vl": "Qwen2.5-VL"}
_OTHER_FAMILIES = {"qwen2_vl": "Qwen2-VL", "qwen3_vl": "Qwen3-VL", "qwen3_vl_moe": "Qwen3-VL-MoE",
                   "llava": "LLaVA-1.5", "llava_next": "LLaVA-NeXT", "llava_next_video": "LLaVA-NeXT-Video",
                   "internvl": "InternVL", "gemma3": "Gemma 3", "idefics3": "Idefics3", "smolvlm": "SmolVLM"}


def _mrope_section(rope: dict, head_dim: int) -> tuple[int, ...]:
    section = rope.get("mrope_section")
    if not isinstance(section, (list, tuple)) or len(section) != 3 or not all(isinstance(s, int) and s > 0 for s in section):
        raise CheckpointError(f"mrope_section={section!r}: Qwen2.5-VL needs three positive counts (temporal, height, width)")
    if sum(section) != head_dim // 2:
        raise CheckpointError(
            f"mrope_section={list(section)} sums to {sum(section)}, not half the head size ({head_dim} / 2 = "
            f"{head_dim // 2}); the checkpoint's config.json is inconsistent"
        )
    return tuple(section)


def _qwen25vl_from_dict(d: dict) -> Qwen25VLConfig:
    t = dict(d.get("text_config") or {k: v for k, v in d.items() if k != "vision_config"})
    rope = t.get("rope_parameters") or t.get("rope_scaling") or d.get("rope_scaling") or {}
    t.setdefault("rope_theta", d.get("rope_theta", 1_000_000.0))
    tie = bool(d.get("tie_word_embeddings", False) or t.get("tie_word_embeddings", False))
    text = _qwen2_from_dict(t, tie)
    text = dataclasses.replace(text, mrope_section=_mrope_section(rope, text.head_dim))
    v = d["vision_config"]
    act = v.get("hidden_act", "silu")
    if act not in ("silu", "gelu", "gelu_pytorch_tanh", "quick_gelu"):
        raise CheckpointError(f"vision_config.hidden_act={act!r}: not an activation this model knows")
    vision = QwenVisionConfig(
        hidden_size=int(v.get("hidden_size", 1280)),
        intermediate_size=int(v.get("intermediate_size", 3420)),
        num_layers=int(v.get("depth", v.get("num_hidden_layers", 32))),
        num_heads=int(v.get("num_heads", v.get("num_attention_heads", 16))),
        patch_size=int(v.get("patch_size", 14)),
        temporal_patch_size=int(v.get("temporal_patch_size", 2)),
        spatial_merge_size=int(v.get("spatial_merge_size", 2)),
        window_size=int(v.get("window_size", 112)),
        fullatt_block_indexes=tuple(int(i) for i in v.get("fullatt_block_indexes", (7, 15, 23, 31))),
        out_hidden_size=int(v.get("out_hidden_size", text.hidden_size)),
        tokens_per_second=float(v.get("tokens_per_second", 2)),
        hidden_act=act,
        rope_theta=float((v.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
    )
    if vision.out_hidden_size != text.hidden_size:
        raise CheckpointError(f"vision_config.out_hidden_size={vision.out_hidden_size} differs from the LLM's "
                              f"hidden_size={text.hidden_size}")
    if vision.window_merged < 1:
        raise CheckpointError(f"vision_config.window_size={vision.window_size} is smaller than one merged token "
                              f"({vision.factor} pixels)")
    bad = [i for i in vision.fullatt_block_indexes if not 0 <= i < vision.num_layers]
    if bad:
        raise CheckpointError(f"vision_config.fullatt_block_indexes {bad} name no block of {vision.num_layers}")
    return Qwen25VLConfig(
        vision=vision, text=text,
        video_token_id=int(d.get("video_token_id", 151656)),
        image_token_id=int(d.get("image_token_id", 151655)),
        vision_start_token_id=int(d.get("vision_start_token_id", 151652)),
        vision_end_token_id=int(d.get("vision_end_token_id", 151653)),
    )


def _llava_class(d: dict):
    """LLaVA-OneVision or LLaVA-Video, by LLaVA-NeXT's `mm_newline_position` in config.json:
    "grid" is LLaVA-Video's (its training script passes `--mm_newline_position grid`, which
    LLaVA-NeXT writes into the saved config); "one_token" or no key is LLaVA-OneVision's. The
    pooling follows the family as lmms-eval runs it (llava_onevision: bilinear; llava_vid:
    average), not the config's `mm_spatial_pool_mode`, which both harnesses override."""
    position = d.get("mm_newline_position") or "one_token"
    if position == "grid":
        return LlavaVideoConfig
    if position == "one_token":
        return LlavaOVConfig
    raise CheckpointError(f"mm_newline_position={position!r}: supported are 'one_token' (LLaVA-OneVision) and "
                          "'grid' (LLaVA-Video)")


def config_from_dict(d: dict) -> ModelConfig:
    """Build the config from a parsed config.json (any of the supported layouts)."""
    try:
        return _config_from_dict(d)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"incomplete config ({e.__class__.__name__}: {e} missing or invalid)") from None


def _config_from_dict(d: dict) -> ModelConfig:
    kind = d.get("model_type")
    if kind == "qwen2_5_vl":
        return _qwen25vl_from_dict(d)
    if kind in _OTHER_FAMILIES:
        raise CheckpointError(f"model_type {kind!r} ({_OTHER_FAMILIES[kind]}) is not a supported family; "
                              f"supported: {', '.join(FAMILIES.values())}")
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
        return _llava_class(d)(
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
        return _llava_class(d)(
            vision=vision,
            text=_qwen2_from_dict(d, bool(d.get("tie_word_embeddings", False))),
            video_token_id=int(d.get("video_token_index", 151647)),
            image_token_id=int(d.get("image_token_index", 151646)),
        )
    raise CheckpointError(
        f"config.json (model_type {kind!r}) is neither a llava_onevision config (vision_config + text_config), "
        "an lmms-lab llava_qwen config (mm_vision_tower) nor a qwen2_5_vl config"
    )


def load_config(directory: str) -> ModelConfig:
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
