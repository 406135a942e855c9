"""Antialiased bicubic resizing (a = -0.5) as torchvision resizes a uint8 video tensor on CPU:
torch's float32 kernel (`interpolate(mode="bicubic", antialias=True, align_corners=False)`),
width pass then height pass, then clamp and round; in numpy, so that Qwen2.5-VL's input
(earlytom_jax/video_qwen.py) needs neither torch nor torchvision at run time. Against torch
2.13 on this CPU: 1 value in 26 million off by one level (tests/test_video_qwen.py)."""

from __future__ import annotations

import math

import numpy as np


def _fma(a, b, c) -> np.ndarray:
    """float32 a * b + c with one rounding (exact products of float32 values in float64)."""
    return (np.asarray(a, np.float64) * b + c).astype(np.float32)


def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys cubic, a = -0.5, on float32 |x| (torch `aa_filter`, as compiled with fused multiply-adds)."""
    x = np.abs(x).astype(np.float32)
    near = _fma(_fma(1.5, x, -2.5) * x, x, 1.0)
    far = _fma(_fma(_fma(-0.5, x, 2.5), x, -4.0), x, 2.0)
    return np.where(x < 1, near, np.where(x < 2, far, np.float32(0))).astype(np.float32)


def _aa_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(index int64 [out, taps], weight float32 [out, taps], fused bool [out]) of one axis.

    torch's `_compute_indices_min_size_weights_aa` in float32: scale = in / out; support and
    filter width grow with scale when downscaling; window [xmin, xmin + size) around
    center = scale * (i + 0.5); weights normalised to sum 1; unused taps get weight 0.
    fused marks windows of at most 4 taps, which torch's compiled loop sums with fused
    multiply-adds (larger windows: separate multiply and add)."""
    scale = np.float32(in_size) / np.float32(out_size)
    support = np.float32(2.0 * np.float64(scale)) if scale >= 1 else np.float32(2.0)
    invscale = np.float32(1.0 / np.float64(scale)) if scale >= 1 else np.float32(1.0)
    taps = int(math.ceil(support)) * 2 + 1
    center = (np.float64(scale) * (np.arange(out_size) + 0.5)).astype(np.float32)
    lo = np.trunc((center - support).astype(np.float64) + 0.5).astype(np.int64)
    hi = np.trunc((center + support).astype(np.float64) + 0.5).astype(np.int64)
    xmin = np.maximum(lo, 0)
    size = np.clip(np.minimum(hi, in_size) - xmin, 0, taps)
    j = np.arange(taps)
    offset = ((j + xmin[:, None]).astype(np.float32) - center[:, None]).astype(np.float32)
    weight = _cubic(((offset.astype(np.float64) + 0.5) * np.float64(invscale)).astype(np.float32))
    weight = np.where(j < size[:, None], weight, np.float32(0))
    total = np.zeros(out_size, np.float32)
    for k in range(taps):
        total = total + weight[:, k]
    weight = np.where(total[:, None] != 0, weight / np.where(total == 0, 1, total)[:, None], weight)
    index = np.minimum(xmin[:, None] + j, in_size - 1)
    return index, weight.astype(np.float32), size <= 4


def _resample(x: np.ndarray, size: int, axis: int) -> np.ndarray:
    """float32 `x` resampled to `size` along `axis` (one separable pass of torch's kernel)."""
    if x.shape[axis] == size:
        return x
    index, weight, fused = _aa_weights(x.shape[axis], size)
    shape = [1] * x.ndim
    shape[axis] = size
    fused = fused.reshape(shape)
    acc = np.take(x, index[:, 0], axis=axis) * weight[:, 0].reshape(shape)
    for k in range(1, index.shape[1]):
        src, w = np.take(x, index[:, k], axis=axis), weight[:, k].reshape(shape)
        plain = acc + src * w
        acc = plain if not fused.any() else np.where(fused, _fma(src, w, acc), plain)
    return acc


def resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [T, H, W, 3] -> uint8 [T, height, width, 3]: antialiased bicubic (a = -0.5) as
    torchvision resizes a uint8 tensor: float32, width pass then height pass (torch's order),
    clamp to [0, 255], round half to even."""
    frames = check_rgb_frames(frames)
    if height < 1 or width < 1:
        raise ValueError(f"target size {height}x{width} is empty")
    out = np.empty((frames.shape[0], height, width, 3), np.uint8)
    for t, frame in enumerate(frames):
        x = np.ascontiguousarray(frame.transpose(2, 0, 1), dtype=np.float32)
        x = _resample(_resample(x, width, 2), height, 1)
        out[t] = np.rint(np.clip(x, 0, 255)).astype(np.uint8).transpose(1, 2, 0)
    return out


def check_rgb_frames(frames) -> np.ndarray:
    """`frames` as a uint8 RGB array [T>=1, H, W, 3]; ValueError (one line) otherwise."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise ValueError(f"expected uint8 RGB frames [T>=1, H, W, 3], got {frames.dtype} {frames.shape}")
    return frames
