"""Video decoding, uniform frame sampling and SigLIP preprocessing (spec section 1, step 1).

Reference behaviour (lmms-eval `llava_onevision`, decord backend): count all frames of the file,
take `np.linspace(0, n - 1, F, dtype=int)` (truncation; duplicates when n < F), resize each
sampled frame straight to SxS with PIL bicubic on uint8 (no crop), scale by 1/255 and normalise
with the checkpoint's `preprocessor_config.json` mean/std. Output is channels-first like
transformers: float32 [F, 3, S, S].

LLaVA-Video (lmms-eval `llava_vid`, whose defaults the official EarlyTom script keeps apart from
max_frames_num=64): frames at `video_fps` = 1 per second (every round(fps)-th frame) unless
that gives more than `max_frames`, or `force_sample`, when it takes
`np.linspace(0, n - 1, max_frames, dtype=int)` (`llava_vid_sampling`); the same SigLIP
preprocessing.

Decoding uses PyAV; every container is opened in a `with` block so no file handle outlives a call.
A file that yields fewer frames than its container declares (truncated, or partly corrupt) is
read as far as it goes, with one warning line naming both counts (logger `earlytom_jax.video`;
with logging unconfigured, Python prints the bare line on stderr).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import numpy as np
from PIL import Image

try:
    import av
except ImportError:  # PyAV reads and writes files only; generated clips and preprocessing run without it
    av = None

from earlytom_jax.errors import CheckpointError, EarlyTomError

log = logging.getLogger(__name__)

class VideoError(EarlyTomError, ValueError):
    """A video file cannot be used: missing, not a video, corrupt, unsupported codec, no frames."""


# --------------------------------------------------------------------------------------------
# decoding


def _check_exists(path: str) -> None:
    if not os.path.exists(path):
        raise VideoError(f"video file not found: {path} (check the data directory)")
    if not os.path.isfile(path):
        raise VideoError(f"video path is not a file: {path}")


def _require_av() -> None:
    if av is None:
        raise VideoError("video files need PyAV, which is not installed: pip install av")


def _open(path: str):
    """Open a container (caller must use it as a context manager)."""
    _require_av()
    _check_exists(path)
    try:
        return av.open(path, mode="r")
    except av.FFmpegError as e:
        raise VideoError(
            f"cannot open {path} as a video ({e.__class__.__name__}: {e}); "
            "the file is not a video or is corrupt, re-download it"
        ) from None


def _video_stream(container, path: str):
    if not container.streams.video:
        raise VideoError(f"{path} has no video stream; pass a video file")
    stream = container.streams.video[0]
    if stream.codec_context is None:
        raise VideoError(f"{path}: video codec is not supported by this FFmpeg build; re-encode it to H.264")
    stream.thread_type = "AUTO"
    return stream


def _stream_fps(stream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 0.0


def _count_packets(path: str) -> int:
    """Number of non-empty video packets (what decord's `len(VideoReader)` counts), demux only."""
    with _open(path) as container:
        stream = _video_stream(container, path)
        try:
            return sum(1 for p in container.demux(stream) if p.size > 0)
        except av.FFmpegError as e:
            raise VideoError(f"{path} is corrupt ({e}); re-download or re-encode it") from None


def _declared_frames(container, stream, fps: float) -> tuple[int, str]:
    """(frames the container declares, how): the stream's frame count when the header holds
    one (mp4, avi), else its duration times the frame rate (Matroska/WebM declare a duration
    only); (0, "") when it declares neither."""
    if stream.frames > 0:
        return int(stream.frames), ""
    if stream.duration and stream.time_base:
        seconds = float(stream.duration * stream.time_base)
    else:
        seconds = (container.duration or 0) / av.time_base
    if seconds <= 0 or fps <= 0:
        return 0, ""
    return round(seconds * fps), f" ({seconds:.1f} s at {fps:g} fps)"


def _warn_if_short(path: str, n: int, declared: tuple[int, str]) -> None:
    """One warning line when decoding stopped more than one frame (and 2%) short of what the
    container declares."""
    count, how = declared
    if count - n > max(1.0, 0.02 * count):
        log.warning(f"warning: {path}: read {n} of the {count} frames the container declares{how}; "
                    "the file is truncated or partly corrupt, so only those are used (re-download or re-encode it)")


def _decode(path: str, keep) -> tuple[dict[int, np.ndarray], int, float, tuple[int, str]]:
    """Decode every frame sequentially; convert to RGB only frames with `keep(i)` true.

    Returns ({index: uint8 [H, W, 3]}, number of decoded frames, fps, `_declared_frames`).
    """
    kept: dict[int, np.ndarray] = {}
    n = 0
    with _open(path) as container:
        stream = _video_stream(container, path)
        fps = _stream_fps(stream)
        declared = _declared_frames(container, stream, fps)
        try:
            for frame in container.decode(stream):
                if keep(n):
                    kept[n] = frame.to_ndarray(format="rgb24")
                n += 1
        except av.FFmpegError as e:
            raise VideoError(
                f"cannot decode {path} ({e.__class__.__name__}: {e}); "
                "the file is corrupt or its codec is unsupported, re-encode it to H.264"
            ) from None
    if n == 0:
        raise VideoError(f"{path} contains zero decodable frames; re-encode or drop this video")
    return kept, n, fps, declared


def _stack(frames: list[np.ndarray], path: str) -> np.ndarray:
    shapes = {f.shape for f in frames}
    if len(shapes) != 1:
        raise VideoError(f"{path}: frame size changes inside the video {sorted(shapes)}; re-encode it")
    return np.stack(frames)


def count_and_decode(path: str) -> np.ndarray:
    """All frames of the video: uint8 [n, H, W, 3] RGB, in presentation order."""
    kept, n, _, declared = _decode(str(path), lambda i: True)
    _warn_if_short(str(path), n, declared)
    return _stack([kept[i] for i in range(n)], str(path))


# --------------------------------------------------------------------------------------------
# sampling


def sample_indices(n_frames: int, num: int) -> np.ndarray:
    """int64 [num]: `np.linspace(0, n_frames - 1, num, dtype=int)` (truncation, repeats if n < num)."""
    if n_frames < 1:
        raise ValueError(f"n_frames must be >= 1, got {n_frames}")
    if num < 1:
        raise ValueError(f"num frames must be >= 1, got {num}")
    return np.linspace(0, n_frames - 1, num, dtype=int)


@dataclasses.dataclass(frozen=True)
class VideoFrames:
    """Sampled frames of one video.

    frames: uint8 [F, H, W, 3] RGB; indices: int [F] into the decoded frame sequence;
    total_frames: frames in the file; fps: average frame rate (0.0 if unknown);
    repeated: True when total_frames < F so some frames repeat (callers print a note).
    """

    frames: np.ndarray
    indices: np.ndarray
    total_frames: int
    fps: float
    repeated: bool
    # LLaVA-Video's sampling (`load_video_llava_vid`): each frame's time and the video's length
    # in seconds, as lmms-eval's `llava_vid` computes them for the time instruction
    times: tuple[float, ...] | None = None
    seconds: float | None = None


def load_video(path: str, num_frames: int) -> VideoFrames:
    """Decode once, keeping only the `num_frames` uniformly sampled frames in memory.

    The frame count comes from the demuxer (cheap); if decoding yields a different count, the
    indices are recomputed from the decoded count and the file is decoded a second time. A
    file that decodes to fewer frames than its container declares is sampled over the frames
    it has, with a warning (truncated or partly corrupt).
    """
    path = str(path)
    n_guess = _count_packets(path)
    if n_guess == 0:
        raise VideoError(f"{path} contains zero frames; re-encode or drop this video")
    indices = sample_indices(n_guess, num_frames)
    wanted = set(indices.tolist())
    kept, n, fps, declared = _decode(path, wanted.__contains__)
    if n != n_guess:
        indices = sample_indices(n, num_frames)
        wanted = set(indices.tolist())
        kept, n, fps, declared = _decode(path, wanted.__contains__)
    _warn_if_short(path, n, declared)
    frames = _stack([kept[int(i)] for i in indices], path)
    return VideoFrames(frames=frames, indices=indices, total_frames=n, fps=fps, repeated=n < num_frames)


def llava_vid_sampling(n_frames: int, fps: float, max_frames: int = 64, video_fps: float = 1,
                       force_sample: bool = False) -> tuple[np.ndarray, tuple[float, ...], float]:
    """lmms-eval `llava_vid.load_video` (= LLaVA-NeXT's LLaVA-Video inference example):
    step = round(fps / video_fps); frames 0, step, 2·step, … with times i / step (sic: in
    seconds when video_fps = 1); if that is more than `max_frames` frames, or `force_sample`,
    instead `np.linspace(0, n - 1, max_frames, dtype=int)` with times i / fps.
    → (int64 indices [F], frame times, video seconds n / fps)."""
    if n_frames < 1:
        raise ValueError(f"n_frames must be >= 1, got {n_frames}")
    if max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    if not fps > 0 or not video_fps > 0:
        raise VideoError(f"frame rate {fps:g} (sampling at {video_fps:g} per second): LLaVA-Video's sampling needs "
                         "the video's frame rate; re-encode the file with one")
    step = max(1, round(fps / video_fps))  # lmms-eval's round(); a step of 0 (fps < video_fps / 2) would not run
    indices = np.arange(0, n_frames, step, dtype=np.int64)
    times = tuple(float(i) / step for i in indices)
    if len(indices) > max_frames or force_sample:
        indices = np.linspace(0, n_frames - 1, max_frames, dtype=int).astype(np.int64)
        times = tuple(float(i) / fps for i in indices)
    return indices, times, n_frames / fps


def load_video_llava_vid(path: str, max_frames: int = 64, video_fps: float = 1,
                         force_sample: bool = False) -> VideoFrames:
    """Frames of a video as lmms-eval's `llava_vid` samples them (`llava_vid_sampling`), with
    their times and the video's length (for `prompt.time_instruction`). Decoded once, keeping
    only the sampled frames (twice when the decoded count differs from the demuxer's)."""
    path = str(path)
    n_guess = _count_packets(path)
    if n_guess == 0:
        raise VideoError(f"{path} contains zero frames; re-encode or drop this video")
    with _open(path) as container:
        fps = _stream_fps(_video_stream(container, path))
    indices, times, seconds = llava_vid_sampling(n_guess, fps, max_frames, video_fps, force_sample)
    kept, n, fps, declared = _decode(path, set(indices.tolist()).__contains__)
    if n != n_guess:
        indices, times, seconds = llava_vid_sampling(n, fps, max_frames, video_fps, force_sample)
        kept, n, fps, declared = _decode(path, set(indices.tolist()).__contains__)
    _warn_if_short(path, n, declared)
    frames = _stack([kept[int(i)] for i in indices], path)
    return VideoFrames(frames=frames, indices=indices, total_frames=n, fps=fps, repeated=n < len(indices),
                       times=times, seconds=seconds)


def load_frame_dir(path: str, num_frames: int) -> VideoFrames:
    """A directory of still frames (.jpg/.jpeg/.png) read as a video (MVBench frame folders):
    files sorted by name, `num_frames` sampled like a video's frames, RGB; fps is 0.0."""
    path = str(path)
    if not os.path.isdir(path):
        raise VideoError(f"frame directory not found: {path} (check the data directory)")
    names = sorted(f for f in os.listdir(path) if f.lower().endswith((".jpg", ".jpeg", ".png")))
    if not names:
        raise VideoError(f"{path} holds no .jpg/.png frames; extract the frames or drop this video")
    indices = sample_indices(len(names), num_frames)
    frames = []
    for i in indices:
        try:
            with Image.open(os.path.join(path, names[int(i)])) as im:
                frames.append(np.asarray(im.convert("RGB")))
        except OSError as e:
            raise VideoError(f"cannot read frame {os.path.join(path, names[int(i)])} ({e}); re-extract it") from None
    return VideoFrames(frames=_stack(frames, path), indices=indices, total_frames=len(names), fps=0.0,
                       repeated=len(names) < num_frames)


# --------------------------------------------------------------------------------------------
# preprocessing


PREPROCESSOR_FILE = "preprocessor_config.json"


def _parse_size(size, file: str) -> int:
    """Square side from `size`: int, {"height", "width"} (must be equal) or {"shortest_edge"}."""
    if isinstance(size, int):
        return size
    if isinstance(size, dict) and "height" in size and "width" in size:
        if size["height"] != size["width"]:
            raise CheckpointError(f"{file}: non-square size {size} is not supported (expected height == width)")
        return int(size["height"])
    if isinstance(size, dict) and "shortest_edge" in size:
        return int(size["shortest_edge"])
    raise CheckpointError(f"{file}: unrecognised 'size' {size!r}; expected an int, height/width or shortest_edge")


def _triple(value, key: str, file: str) -> tuple[float, float, float]:
    vals = tuple(float(v) for v in (value if isinstance(value, (list, tuple)) else [value] * 3))
    if len(vals) != 3:
        raise CheckpointError(f"{file}: '{key}' must have 3 values, got {value!r}")
    return vals


@dataclasses.dataclass(frozen=True)
class Preprocessor:
    """Resize to size x size (PIL bicubic on uint8, no crop), x * rescale, (x - mean) / std.

    size: output side S; mean, std: per RGB channel; rescale: usually 1/255.
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    rescale: float = 1.0 / 255.0

    @classmethod
    def from_dir(cls, checkpoint_dir: str) -> "Preprocessor":
        """Read `checkpoint_dir/preprocessor_config.json` (required: no CLIP defaults)."""
        file = os.path.join(str(checkpoint_dir), PREPROCESSOR_FILE)
        if not os.path.isfile(file):
            raise CheckpointError(
                f"{file} not found; the checkpoint must ship its preprocessor config (mean/std/size)"
            )
        with open(file) as f:
            cfg = json.load(f)
        missing = [k for k in ("image_mean", "image_std", "size") if k not in cfg]
        if missing:
            raise CheckpointError(f"{file}: missing key(s) {missing}")
        return cls(
            size=_parse_size(cfg["size"], file),
            mean=_triple(cfg["image_mean"], "image_mean", file),
            std=_triple(cfg["image_std"], "image_std", file),
            rescale=float(cfg.get("rescale_factor", 1.0 / 255.0)),
        )

    def resize(self, frames: np.ndarray) -> np.ndarray:
        """uint8 [F, H, W, 3] -> uint8 [F, S, S, 3] with PIL bicubic."""
        s = self.size
        return np.stack([np.asarray(Image.fromarray(f).resize((s, s), Image.BICUBIC)) for f in frames])

    def normalize(self, frames: np.ndarray) -> np.ndarray:
        """uint8 [F, S, S, 3] -> float32 [F, 3, S, S]: x * rescale, (x - mean) / std, channels first."""
        x = frames.astype(np.float32) * np.float32(self.rescale)
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        """uint8 [F, H, W, 3] RGB -> float32 pixel values [F, 3, S, S]."""
        frames = np.asarray(frames)
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"expected uint8 frames [F, H, W, 3], got {frames.dtype} {frames.shape}")
        return self.normalize(self.resize(frames))


# --------------------------------------------------------------------------------------------
# test helper


def _encoder_name() -> str:
    _require_av()
    for name in ("libx264", "mpeg4"):
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:  # noqa: BLE001 - codec simply absent from this build
            continue
    raise RuntimeError("this PyAV build has neither libx264 nor mpeg4 encoders")


def write_test_video(path: str, frames: np.ndarray, fps: int = 10) -> str:
    """Encode uint8 [T, H, W, 3] RGB (H, W even) with libx264 (else mpeg4), yuv420p.

    The container follows the extension of `path` (.mp4 normally). T = 0 writes a header with a
    video stream but no frames (use .avi for that: the mp4 muxer drops an empty track).
    Returns the encoder name.
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames [T, H, W, 3], got {frames.dtype} {frames.shape}")
    _, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"yuv420p needs even frame sizes, got {h}x{w}")
    codec = _encoder_name()
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        container.start_encoding()
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return codec
