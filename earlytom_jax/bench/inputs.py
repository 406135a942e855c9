"""What a benchmark runs on: the paper's prompt ids, the clip (`bench_video`: preprocessed for
either family), a named architecture's random weights and preprocessing, a method by name, and
the benchmark scripts' shared flags."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from earlytom_jax.compression.registration import DEFAULT_RATIO
from earlytom_jax.models import family


def prompt_ids(cfg=None) -> tuple[list[int], list[int]]:
    """Token ids standing in for the paper's prompt around the video, as the qwen_1_5 template
    lays it out: 14 before the video, 25 after (speed depends on the lengths only). For
    Qwen2.5-VL (`cfg` a Qwen25VLConfig) the same lengths, the prefix ending with
    <|vision_start|> and the suffix starting with <|vision_end|>, as its chat template has them."""
    prefix, suffix = list(range(14)), list(range(100, 125))
    if cfg is not None and family.is_qwen(cfg):
        prefix[-1], suffix[0] = cfg.vision_start_token_id, cfg.vision_end_token_id
    return prefix, suffix


def add_input_args(ap) -> None:
    """The benchmark scripts' shared flags (an argparse parser): --arch, --dtype, --frames,
    --video, --method, --ratio; see `random_inputs` and `named_method`."""
    ap.add_argument("--arch", default="llava-ov-0.5b")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--video", default=None, help="a video file (default: a generated clip)")
    ap.add_argument("--method", default="earlytom")
    ap.add_argument("--ratio", type=float, default=DEFAULT_RATIO)


def clip_frames(video: str | None, frames: int):
    """The frames a benchmark times: `frames` sampled from `video`, or a generated clip."""
    from earlytom_jax.synthetic import make_clip
    from earlytom_jax.video import load_video

    return load_video(video, frames).frames if video else make_clip(frames, 112)


def random_preprocessor(cfg, settings=None):
    """The preprocessing of a named architecture with random weights (a checkpoint directory
    brings its own: `Preprocessor.from_dir`, `QwenPreprocessor.from_dir`): SigLIP's, or
    Qwen2.5-VL's with the pixel bounds of `settings` (a `QwenVideoSettings`; default the
    official script's)."""
    if family.is_qwen(cfg):
        from earlytom_jax.video_qwen import QwenPreprocessor, QwenVideoSettings

        settings = settings or QwenVideoSettings()
        return QwenPreprocessor(min_pixels=settings.min_pixels, max_pixels=settings.max_pixels)
    from earlytom_jax.video import Preprocessor

    return Preprocessor(size=cfg.vision.image_size, mean=(0.5,) * 3, std=(0.5,) * 3)


@dataclasses.dataclass(frozen=True)
class BenchVideo:
    """The clip a benchmark times, preprocessed: pixels float32 [T, 3, S, S] (LLaVA-OneVision)
    or [T', 3, H, W] (Qwen2.5-VL); video_time: Qwen2.5-VL's seconds per temporal patch (None
    for LLaVA-OneVision); meta: how it was made, for the JSON (Qwen2.5-VL: the pixel bounds,
    frame size, grid and visual tokens; {} for LLaVA-OneVision)."""

    pixels: np.ndarray
    video_time: float | None = None
    meta: dict = dataclasses.field(default_factory=dict)


def qwen_clip(video: str | None, settings):
    """uint8 frames [T, h, w, 3] for Qwen2.5-VL and, for a file, the indices of the frames taken:
    `video` sampled and resized as qwen-vl-utils and lmms-eval do (`video_qwen.load_video_qwen`,
    T = min(qwen-vl-utils' frame count, settings.frames)), or the generated clip of
    settings.frames frames (every one; the processor resizes it). → (frames, indices or None)."""
    if video is None:
        from earlytom_jax.synthetic import make_clip

        return make_clip(settings.frames, 112), None
    from earlytom_jax.video_qwen import load_video_qwen

    clip = load_video_qwen(video, settings)
    return clip.frames, clip.indices.tolist()


def bench_video(cfg, video: str | None, frames: int, model_dir: str | None = None, settings=None) -> BenchVideo:
    """The clip preprocessed as `cfg`'s family reads it: `frames` frames of `video` (default: a
    generated clip) through the checkpoint's preprocessing (`model_dir`) or the named
    architecture's (`random_preprocessor`). Qwen2.5-VL: sampled and sized within the pixel bounds
    of `settings` (a `QwenVideoSettings`; its frame count is replaced by `frames`)."""
    if not family.is_qwen(cfg):
        from earlytom_jax.video import Preprocessor

        pre = Preprocessor.from_dir(model_dir) if model_dir else random_preprocessor(cfg)
        return BenchVideo(pre(clip_frames(video, frames)))
    from earlytom_jax.video_qwen import QwenPreprocessor, QwenVideoSettings

    settings = dataclasses.replace(settings or QwenVideoSettings(), frames=frames)
    pre = QwenPreprocessor.from_dir(model_dir, settings) if model_dir else random_preprocessor(cfg, settings)
    picked, indices = qwen_clip(video, settings)
    x = pre(picked)
    t, gh, gw = x.grid_thw
    meta = {"min_pixels": settings.min_pixels, "max_pixels": settings.max_pixels, "sampled_frames": len(picked),
            "frame_indices": indices, "frame_size": list(x.pixels.shape[2:]), "grid_thw": [t, gh, gw],
            "second_per_grid_t": x.second_per_grid_t, "visual_tokens": t * gh * gw // pre.merge_size**2}
    return BenchVideo(x.pixels, x.second_per_grid_t, meta)


def random_inputs(arch: str, dtype: str, frames: int, video: str | None = None):
    """What the benchmark scripts run on: the named architecture with random weights in
    `dtype` (packed as the pipeline holds them), `frames` frames of `video` (default: a
    generated clip) preprocessed (`bench_video`; Qwen2.5-VL's seconds per temporal patch are
    1, as lmms-eval gives every video, which is the pipeline's default), and the prompt ids.
    → (cfg, params, pixels, prefix, suffix)."""
    from earlytom_jax.architectures import architecture, random_params
    from earlytom_jax.models import stack

    cfg = architecture(arch)
    params = stack.pack(random_params(cfg, dtype=jnp.dtype(dtype)))
    pixels = jnp.asarray(bench_video(cfg, video, frames).pixels, dtype)
    prefix, suffix = (jnp.asarray(ids, jnp.int32) for ids in prompt_ids(cfg))
    return cfg, params, pixels, prefix, suffix


def named_method(name: str, ratio: float, cfg):
    """A method by name at `ratio` (full tokens: none), its default settings scaled to a
    shallow model as `earlytom bench` scales them (`compression.defaults.settings`)."""
    from earlytom_jax.compression import defaults, registry

    name = registry.canonical(name)
    if name == "full":
        return registry.build(name, None, cfg)
    return registry.build(name, ratio, cfg, **defaults.settings(name, cfg)[0])
