"""Qwen2.5-VL video input as EarlyTom's evaluation prepares it (numpy; PyAV for files).

EarlyTom's official script (`scripts/eval_qwen2_5_vl.sh`) runs lmms-eval's `qwen2_5_vl` model with
`max_num_frames=32, min_pixels=37632, max_pixels=200704`. The behaviour followed here is lmms-eval
v0.7.2, `lmms_eval/models/simple/qwen2_5_vl.py` (`Qwen2_5_VL.generate_until`); EarlyTom pins
lmms-eval commit 36393e93 (first released in v0.6) and vendors the same file, and the video path
is unchanged from v0.5 to v0.7.2. Around it: qwen-vl-utils 0.0.14 `vision_process.py` (decord
backend) and transformers' Qwen2.5-VL processor (EarlyTom pins 4.51.3; the layout is the same in
5.23's `Qwen2VLVideoProcessor`).

Frames of a clip of N frames at F fps (N as decord's `len`, F its average rate):
1. qwen-vl-utils `smart_nframes` (no `fps`/`nframes` in the message, so FPS = 2.0):
   n = floor2(min(max(N / F * 2.0, 4), floor2(min(768, N)), N)), floor2(x) = floor(x / 2) * 2;
   n must lie in [2, N] (a 1-frame clip is an error there).
2. qwen-vl-utils indices: `torch.linspace(0, N - 1, n).round()` (float32, halves to even).
3. qwen-vl-utils resizes those n frames (below) and reports sample_fps = n / N * F.
4. lmms-eval keeps j = np.unique(np.linspace(0, n - 1, frames, dtype=int)) of them, plus n - 1
   if missing: all n when n <= frames (no frame repeats), else exactly `frames` (2 when
   frames = 1). The video indices are idx[j]: T = min(n, frames) frames.
5. The processor pads T to a multiple of temporal_patch_size by repeating the last frame.

Frame size: `smart_resize(H, W, 28, min_pixels, cap)` with qwen-vl-utils' per-frame cap
cap = min(max_pixels, max(min(768 * 28 * 28, 128000 * 28 * 28 * 0.9 / n * 2), int(1.05 * min_pixels))),
n from step 1 (with 32 frames and max_pixels 200704 the cap is always 200704). The resize is
torchvision's `transforms.functional.resize(uint8 video, BICUBIC, antialias=True)`, which on a
tensor runs `torch.nn.functional.interpolate(float32, "bicubic", antialias=True,
align_corners=False)`, clamps to [0, 255] and rounds (torchvision `_functional_tensor.resize`).
The processor's own resize (smart_resize with the same min/max pixels) leaves those sizes as
they are. Then x / 255 (float64, stored float32), (x - mean) / std in float32, channels first.

Timing: lmms-eval calls `process_vision_info` without `return_video_kwargs`, so no fps reaches
the processor and transformers uses its default fps 2.0: second_per_grid_t = temporal_patch_size
/ 2.0 = 1.0 for every video, whatever sample_fps was.

Prompt (not built here): lmms-eval strips "<image>" from the task context and sends
[{"role": "system", "content": "You are a helpful assistant."},
 {"role": "user", "content": [{"type": "video", "video": path, "max_pixels": 200704,
  "min_pixels": 37632}, {"type": "text", "text": context}]}],
which Qwen2.5-VL's chat template (add_generation_prompt=True) renders as
"<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n"
"<|vision_start|><|video_pad|><|vision_end|>{context}<|im_end|>\\n<|im_start|>assistant\\n";
the processor repeats <|video_pad|> grid_t * grid_h * grid_w / merge_size**2 times. Only paths
ending in .mp4, .avi or .mov are sent as video (`VIDEO_SUFFIXES`); others are dropped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np

from earlytom_jax.aa_resize import check_rgb_frames, resize_frames
from earlytom_jax.errors import CheckpointError, ConfigError
from earlytom_jax.video import VideoError, _decode, _open, _stack, _stream_fps, _video_stream, _warn_if_short, av

FACTOR = 28
MAX_RATIO = 200
FRAME_FACTOR = 2
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768
VIDEO_FRAME_MAX_PIXELS = 768 * 28 * 28
VIDEO_TOTAL_PIXELS = 128000 * 28 * 28 * 0.9
PROCESSOR_FPS = 2.0
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov")
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESSOR_FILES = ("video_preprocessor_config.json", "preprocessor_config.json")


@dataclasses.dataclass(frozen=True)
class QwenVideoSettings:
    """frames: lmms-eval `max_num_frames`; min_pixels, max_pixels: per frame, lmms-eval's model
    args (passed in the video message and to the processor); fps: qwen-vl-utils' sampling rate."""

    frames: int = 32
    min_pixels: int = 37632
    max_pixels: int = 200704
    fps: float = 2.0

    def __post_init__(self):
        if self.frames < 1:
            raise ConfigError(f"--frames {self.frames}: need at least 1 frame")
        if self.min_pixels < 1:
            raise ConfigError(f"--min-pixels {self.min_pixels}: must be >= 1")
        if self.max_pixels < self.min_pixels:
            raise ConfigError(f"--max-pixels {self.max_pixels} is below --min-pixels {self.min_pixels}; raise it")
        if not self.fps > 0:
            raise ConfigError(f"sampling fps {self.fps} must be > 0")


# --------------------------------------------------------------------------------------------
# sizes and frame sampling


def _floor_by(x: float, f: int) -> int:
    return math.floor(x / f) * f


def _ceil_by(x: float, f: int) -> int:
    return math.ceil(x / f) * f


def smart_resize(height: int, width: int, factor: int = FACTOR, min_pixels: float = 37632,
                 max_pixels: float = 200704) -> tuple[int, int]:
    """(h, w), multiples of `factor`, h * w within [min_pixels, max_pixels], aspect kept
    (qwen-vl-utils 0.0.14 `smart_resize`; equal to transformers' for sizes of at least
    `factor` and aspect ratios it accepts)."""
    if min(height, width) < 1:
        raise ValueError(f"frame size {height}x{width} is empty; pass frames of at least 1x1 pixel")
    if max_pixels < min_pixels:
        raise ValueError(f"max_pixels {max_pixels} is below min_pixels {min_pixels}; raise max_pixels")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_RATIO:
        raise ValueError(f"frame {height}x{width} has aspect ratio {ratio:.1f}, above Qwen2.5-VL's limit "
                         f"of {MAX_RATIO}; crop or pad the video")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = _floor_by(height / beta, factor), _floor_by(width / beta, factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = _ceil_by(height * beta, factor), _ceil_by(width * beta, factor)
    if h == 0 or w == 0:
        raise ValueError(f"frame {height}x{width} shrinks to {h}x{w} under max_pixels {max_pixels}; "
                         "crop the video to a less extreme aspect ratio")
    return h, w


def smart_nframes(total_frames: int, video_fps: float, fps: float = 2.0) -> int:
    """Frames qwen-vl-utils reads from a clip of `total_frames` at `video_fps` (rule 1 above)."""
    if not video_fps > 0:
        raise VideoError(f"video frame rate is unknown ({video_fps}); qwen-vl-utils samples by fps, "
                         "re-encode the video with a frame rate")
    max_frames = _floor_by(min(FPS_MAX_FRAMES, total_frames), FRAME_FACTOR)
    n = total_frames / video_fps * fps
    n = _floor_by(min(max(n, _ceil_by(FPS_MIN_FRAMES, FRAME_FACTOR)), max_frames, total_frames), FRAME_FACTOR)
    if not FRAME_FACTOR <= n <= total_frames:
        raise VideoError(f"a clip of {total_frames} frame(s) cannot be sampled: qwen-vl-utils needs at "
                         f"least {FRAME_FACTOR} frames; drop this video")
    return n


def linspace_round(total_frames: int, n: int) -> np.ndarray:
    """int64 [n]: `torch.linspace(0, total_frames - 1, n).round()` in float32, halves to even.

    torch's CPU kernel computes start + step * i for the first n // 2 values and
    end - step * (n - 1 - i) for the rest, the latter with one rounding (fused multiply-add as
    compiled); this reproduces torch 2.13's float32 values bit for bit."""
    if n < 1:
        raise ValueError(f"need at least 1 index, got {n}")
    if n == 1:
        return np.zeros(1, np.int64)
    end = np.float32(total_frames - 1)
    step = np.float64(end / np.float32(n - 1))
    i = np.arange(n)
    low = (step * i).astype(np.float32)
    high = (np.float64(end) - step * (n - 1 - i)).astype(np.float32)
    return np.rint(np.where(i < n // 2, low, high)).astype(np.int64)


def lmms_resample(n: int, frames: int) -> np.ndarray:
    """int64 positions lmms-eval keeps of the n frames qwen-vl-utils returned (rule 4 above)."""
    keep = np.unique(np.linspace(0, n - 1, frames, dtype=int))
    if n - 1 not in keep:
        keep = np.unique(np.append(keep, n - 1))
    return keep.astype(np.int64)


def frame_size(height: int, width: int, n: int, settings: QwenVideoSettings) -> tuple[int, int]:
    """(h, w) qwen-vl-utils resizes each frame to when it reads n frames of height x width."""
    cap = max(min(VIDEO_FRAME_MAX_PIXELS, VIDEO_TOTAL_PIXELS / n * FRAME_FACTOR), int(settings.min_pixels * 1.05))
    return smart_resize(height, width, FACTOR, settings.min_pixels, min(settings.max_pixels, cap))


@dataclasses.dataclass(frozen=True)
class FramePlan:
    """indices: int64 [T] into the clip's frames; n: qwen-vl-utils' frame count (before lmms-eval
    keeps T = min(n, frames) of them); sample_fps: n / N * F as qwen-vl-utils reports it."""

    indices: np.ndarray
    n: int
    sample_fps: float


def plan_frames(total_frames: int, video_fps: float, settings: QwenVideoSettings) -> FramePlan:
    """Which frames of a clip of `total_frames` at `video_fps` reach the model (rules 1-4)."""
    n = smart_nframes(total_frames, video_fps, settings.fps)
    indices = linspace_round(total_frames, n)[lmms_resample(n, settings.frames)]
    return FramePlan(indices=indices, n=n, sample_fps=n / max(total_frames, 1e-6) * video_fps)


# --------------------------------------------------------------------------------------------
# clips


@dataclasses.dataclass(frozen=True)
class QwenClip:
    """frames: uint8 [T, h, w, 3] sampled and resized (what lmms-eval hands the processor);
    indices: int64 [T] into the video's frames; total_frames, video_fps: the video's N and F;
    n: qwen-vl-utils' frame count; sample_fps: its n / N * F (informational: lmms-eval does
    not pass it on, see `QwenPreprocessor.fps`)."""

    frames: np.ndarray
    indices: np.ndarray
    total_frames: int
    video_fps: float
    n: int
    sample_fps: float


def clip_from_frames(frames: np.ndarray, video_fps: float,
                     settings: QwenVideoSettings = QwenVideoSettings()) -> QwenClip:
    """A clip from all frames of a video, uint8 [N, H, W, 3] at `video_fps`."""
    frames = check_rgb_frames(frames)
    plan = plan_frames(frames.shape[0], video_fps, settings)
    return _finish(frames[plan.indices], plan, frames.shape[0], video_fps, settings)


def _finish(picked: np.ndarray, plan: FramePlan, total: int, fps: float, settings: QwenVideoSettings) -> QwenClip:
    h, w = frame_size(picked.shape[1], picked.shape[2], plan.n, settings)
    return QwenClip(frames=resize_frames(picked, h, w), indices=plan.indices, total_frames=total,
                    video_fps=fps, n=plan.n, sample_fps=plan.sample_fps)


def _probe(path: str) -> tuple[int, float]:
    """(non-empty video packets, i.e. decord's frame count; average fps), demux only."""
    with _open(path) as container:
        stream = _video_stream(container, path)
        fps = _stream_fps(stream)
        try:
            return sum(1 for p in container.demux(stream) if p.size > 0), fps
        except av.FFmpegError as e:
            raise VideoError(f"{path} is corrupt ({e}); re-download or re-encode it") from None


def load_video_qwen(path: str, settings: QwenVideoSettings = QwenVideoSettings()) -> QwenClip:
    """Decode a video file with PyAV, keeping only the planned frames, and resize them.

    The frame count comes from the demuxer, as decord counts; if decoding yields another count
    the plan is recomputed from the decoded count and the file decoded again (a truncated file
    also logs one warning, see `earlytom_jax.video`)."""
    path = str(path)
    total, fps = _probe(path)
    if total == 0:
        raise VideoError(f"{path} contains zero frames; re-encode or drop this video")
    plan = plan_frames(total, fps, settings)
    kept, n, fps, declared = _decode(path, set(plan.indices.tolist()).__contains__)
    if n != total:
        total, plan = n, plan_frames(n, fps, settings)
        kept, n, fps, declared = _decode(path, set(plan.indices.tolist()).__contains__)
    _warn_if_short(path, n, declared)
    return _finish(_stack([kept[int(i)] for i in plan.indices], path), plan, total, fps, settings)


# --------------------------------------------------------------------------------------------
# processor


@dataclasses.dataclass(frozen=True)
class QwenVideoInputs:
    """pixels: float32 [T', 3, H, W] normalised, T' a multiple of the temporal patch size;
    grid_thw: (T' / tp, H / patch, W / patch); second_per_grid_t: seconds per temporal patch."""

    pixels: np.ndarray
    grid_thw: tuple[int, int, int]
    second_per_grid_t: float


def _triple(value, key: str, file: str) -> tuple[float, float, float]:
    vals = value if isinstance(value, (list, tuple)) else [value] * 3
    if len(vals) != 3:
        raise CheckpointError(f"{file}: '{key}' must have 3 values, got {value!r}")
    return tuple(float(v) for v in vals)


@dataclasses.dataclass(frozen=True)
class QwenPreprocessor:
    """Qwen2.5-VL's processor for one video: smart_resize with min/max pixels (frames already at
    such a size are left alone), x * rescale, (x - mean) / std, pad T to a multiple of
    temporal_patch_size with the last frame. fps: what the processor assumes for
    second_per_grid_t = temporal_patch_size / fps (2.0: lmms-eval passes none)."""

    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    rescale: float = 1 / 255
    min_pixels: int = 37632
    max_pixels: int = 200704
    fps: float = PROCESSOR_FPS

    def __post_init__(self):
        if min(self.patch_size, self.temporal_patch_size, self.merge_size) < 1 or not self.fps > 0:
            raise ValueError(f"patch sizes ({self.patch_size}, {self.temporal_patch_size}, {self.merge_size}) "
                             f"and fps ({self.fps}) must be positive")
        if 0 in self.std:
            raise ValueError(f"image_std {self.std} has a zero; normalising would divide by zero")

    @classmethod
    def from_dir(cls, checkpoint_dir: str, settings: QwenVideoSettings = QwenVideoSettings()) -> "QwenPreprocessor":
        """Mean, std, patch sizes and rescale factor from `video_preprocessor_config.json`, else
        `preprocessor_config.json`, else Qwen2.5-VL's defaults; min/max pixels from `settings`
        (lmms-eval passes its own to the processor, so the files' values are not used)."""
        kwargs = {"min_pixels": settings.min_pixels, "max_pixels": settings.max_pixels}
        for name in PREPROCESSOR_FILES:
            file = os.path.join(str(checkpoint_dir), name)
            if not os.path.isfile(file):
                continue
            try:
                with open(file) as f:
                    cfg = json.load(f)
            except (OSError, ValueError) as e:
                raise CheckpointError(f"{file} is not readable JSON ({e}); re-download it") from None
            if not isinstance(cfg, dict):
                raise CheckpointError(f"{file} must hold a JSON object")
            try:
                for key, field in (("image_mean", "mean"), ("image_std", "std")):
                    if key in cfg:
                        kwargs[field] = _triple(cfg[key], key, file)
                for key in ("patch_size", "temporal_patch_size", "merge_size"):
                    if key in cfg:
                        kwargs[key] = int(cfg[key])
                if "rescale_factor" in cfg:
                    kwargs["rescale"] = float(cfg["rescale_factor"])
            except (TypeError, ValueError) as e:
                raise CheckpointError(f"{file}: bad value ({e}); expected numbers") from None
            try:
                return cls(**kwargs)
            except ValueError as e:
                raise CheckpointError(f"{file}: {e}") from None
        return cls(**kwargs)

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def __call__(self, frames: np.ndarray) -> QwenVideoInputs:
        """uint8 [T, H, W, 3] RGB -> `QwenVideoInputs` with pixels float32 [T', 3, H', W']."""
        frames = check_rgb_frames(frames)
        h, w = smart_resize(frames.shape[1], frames.shape[2], self.factor, self.min_pixels, self.max_pixels)
        if (h, w) != frames.shape[1:3]:
            frames = resize_frames(frames, h, w)
        x = (frames.astype(np.float64) * self.rescale).astype(np.float32)
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        pad = -x.shape[0] % self.temporal_patch_size
        if pad:
            x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
        pixels = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        grid = (pixels.shape[0] // self.temporal_patch_size, h // self.patch_size, w // self.patch_size)
        return QwenVideoInputs(pixels=pixels, grid_thw=grid, second_per_grid_t=self.temporal_patch_size / self.fps)

    def flatten(self, pixels: np.ndarray) -> np.ndarray:
        """`flatten_patches` with this processor's patch sizes."""
        return flatten_patches(pixels, self.temporal_patch_size, self.patch_size, self.merge_size)


def flatten_patches(pixels: np.ndarray, temporal_patch_size: int = 2, patch_size: int = 14,
                    merge_size: int = 2) -> np.ndarray:
    """float [T', C, H, W] -> transformers' `pixel_values_videos` [t * h * w, C * tp * p * p].

    Rows in the order (t, h / merge, w / merge, merge row, merge column), each row ordered
    (C, tp, p, p); t = T' / tp, h = H / p, w = W / p (transformers' Qwen2-VL `patchify`)."""
    pixels = np.asarray(pixels)
    if pixels.ndim != 4:
        raise ValueError(f"expected pixels [T, C, H, W], got shape {pixels.shape}")
    T, C, H, W = pixels.shape
    tp, p, m = temporal_patch_size, patch_size, merge_size
    if T % tp or H % (p * m) or W % (p * m):
        raise ValueError(f"pixels {pixels.shape}: T must be a multiple of {tp} and H, W of {p * m}; "
                         "run QwenPreprocessor first")
    t, h, w = T // tp, H // p, W // p
    x = pixels.reshape(t, tp, C, h // m, m, p, w // m, m, p)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return np.ascontiguousarray(x).reshape(t * h * w, C * tp * p * p)
