"""Qwen2.5-VL video preprocessing (earlytom_jax.video_qwen) against the reference rules.

References restated here, independently of the module: qwen-vl-utils 0.0.14 (`smart_resize`,
`smart_nframes`, `torch.linspace(...).round()`, the per-frame pixel cap), lmms-eval's re-sampling
to `max_num_frames`, torchvision's uint8 resize (torch interpolate + clamp + round) and the steps
of transformers 5.23's `Qwen2VLVideoProcessor` (its module needs torchvision, which is not
installed, so its torch steps are restated); transformers' torch-free PIL image processor
checks normalisation and patch layout on a still clip.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from earlytom_jax.errors import CheckpointError, ConfigError
from earlytom_jax.video import VideoError, count_and_decode, write_test_video
from earlytom_jax.video_qwen import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    QwenPreprocessor,
    QwenVideoSettings,
    clip_from_frames,
    flatten_patches,
    frame_size,
    linspace_round,
    lmms_resample,
    load_video_qwen,
    plan_frames,
    resize_frames,
    smart_nframes,
    smart_resize,
)

# ------------------------------------------------------------------ reference restatements


def ref_smart_resize(h, w, factor, lo, hi):
    if max(h, w) / min(h, w) > 200:
        raise ValueError
    hb, wb = max(factor, round(h / factor) * factor), max(factor, round(w / factor) * factor)
    if hb * wb > hi:
        b = math.sqrt(h * w / hi)
        hb, wb = math.floor(h / b / factor) * factor, math.floor(w / b / factor) * factor
    elif hb * wb < lo:
        b = math.sqrt(lo / (h * w))
        hb, wb = math.ceil(h * b / factor) * factor, math.ceil(w * b / factor) * factor
    return hb, wb


def ref_nframes(total, fps, target=2.0):
    max_frames = math.floor(min(768, total) / 2) * 2
    n = min(max(total / fps * target, 4), max_frames, total)
    return math.floor(n / 2) * 2


def ref_indices(total, fps, frames):
    """qwen-vl-utils' indices, then lmms-eval's selection of `frames` of them."""
    n = ref_nframes(total, fps)
    idx = torch.linspace(0, total - 1, n).round().long().numpy()
    sel = np.unique(np.linspace(0, n - 1, frames, dtype=int))
    if n - 1 not in sel:
        sel = np.unique(np.append(sel, n - 1))
    return idx[sel]


def torch_resize_u8(frames, h, w):
    """torchvision `resize(uint8 tensor, BICUBIC, antialias=True)`: float32 interpolate, clamp, round."""
    x = torch.from_numpy(np.ascontiguousarray(frames.transpose(0, 3, 1, 2))).float()
    y = torch.nn.functional.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
    return y.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def torch_video_processor(frames_u8, tp=2, p=14, m=2):
    """Qwen2VLVideoProcessor on frames already at their size: fused rescale/normalise
    ((x - 255 mean) / (255 std), float32), pad with the last frame, patchify."""
    x = torch.from_numpy(np.ascontiguousarray(frames_u8.transpose(0, 3, 1, 2)))[None].float()
    mean = (torch.tensor(OPENAI_CLIP_MEAN) * (1.0 / (1 / 255))).view(1, 1, 3, 1, 1)
    std = (torch.tensor(OPENAI_CLIP_STD) * (1.0 / (1 / 255))).view(1, 1, 3, 1, 1)
    x = (x - mean) / std
    if pad := -x.shape[1] % tp:
        x = torch.cat([x, x[:, -1:].expand(-1, pad, -1, -1, -1)], dim=1)
    b, t, c, h, w = x.shape
    gt, gh, gw = t // tp, h // p, w // p
    x = x.view(b, gt, tp, c, gh // m, m, p, gw // m, m, p).permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    return x.reshape(gt * gh * gw, c * tp * p * p).numpy(), (gt, gh, gw)


def random_frames(t, h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (t, h, w, 3), dtype=np.uint8)


# ------------------------------------------------------------------ sizes


SIZES = [(360, 640), (480, 854), (1080, 1920), (240, 320), (100, 100), (57, 91), (720, 1280),
         (1280, 720), (28, 5000), (13, 2000), (336, 588), (300, 2)]


@pytest.mark.parametrize("h,w", SIZES)
@pytest.mark.parametrize("lo,hi", [(37632, 200704), (3136, 12845056), (128 * 784, 768 * 784), (37632, 39513.6)])
def test_smart_resize_matches_qwen_vl_utils(h, w, lo, hi):
    ref = ref_smart_resize(h, w, 28, lo, hi)
    if 0 in ref:  # qwen-vl-utils returns an empty size, which its resize then rejects
        with pytest.raises(ValueError, match="shrinks to 0x"):
            smart_resize(h, w, 28, lo, hi)
    else:
        assert smart_resize(h, w, 28, lo, hi) == ref


@pytest.mark.parametrize("h,w", [(360, 640), (480, 854), (1080, 1920), (240, 320), (100, 100), (720, 1280)])
def test_smart_resize_agrees_with_transformers(h, w):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    assert smart_resize(h, w, 28, 37632, 200704) == hf_smart_resize(h, w, 28, 37632, 200704)
    out = smart_resize(h, w)
    assert out[0] % 28 == 0 and out[1] % 28 == 0 and 37632 <= out[0] * out[1] <= 200704


def test_smart_resize_errors():
    with pytest.raises(ValueError, match="aspect ratio 201.0, above Qwen2.5-VL's limit of 200"):
        smart_resize(10, 2010)
    with pytest.raises(ValueError, match="max_pixels 100 is below min_pixels 200"):
        smart_resize(100, 100, 28, 200, 100)
    with pytest.raises(ValueError, match="shrinks to 0x"):
        smart_resize(15, 2900, 28, 37632, 39000)


def test_frame_size_applies_total_pixel_cap():
    wide = QwenVideoSettings(max_pixels=10**7)
    # 768 frames: 128000 * 784 * 0.9 / 768 * 2 = 235200 pixels per frame
    assert frame_size(1080, 1920, 768, wide) == ref_smart_resize(1080, 1920, 28, 37632, 235200)
    assert frame_size(1080, 1920, 4, wide) == ref_smart_resize(1080, 1920, 28, 37632, 768 * 784)
    for n in (2, 64, 768):
        assert frame_size(1080, 1920, n, QwenVideoSettings()) == (336, 588)


# ------------------------------------------------------------------ sampling


@pytest.mark.parametrize("total", [2, 3, 4, 5, 7, 8, 9, 23, 31, 100, 101, 777, 3001, 54000])
@pytest.mark.parametrize("fps", [1.0, 10.0, 23.976, 25.0, 29.97, 60.0])
def test_smart_nframes(total, fps):
    assert smart_nframes(total, fps) == ref_nframes(total, fps)


def test_smart_nframes_rejects_unusable_clips():
    with pytest.raises(VideoError, match="clip of 1 frame"):
        smart_nframes(1, 30.0)
    with pytest.raises(VideoError, match="frame rate is unknown"):
        smart_nframes(100, 0.0)


def test_linspace_round_matches_torch():
    cases = [(N, n) for N in range(2, 700, 3) for n in range(2, min(N, 80) + 1, 2)]
    cases += [(10631, 768), (10698, 768), (10956, 730), (11125, 740), (54000, 768), (9, 9), (5, 1)]
    for N, n in cases:
        np.testing.assert_array_equal(linspace_round(N, n), torch.linspace(0, N - 1, n).round().long().numpy(),
                                      err_msg=f"N={N} n={n}")


@pytest.mark.parametrize("total,fps,frames", [
    (2, 30.0, 32), (3, 30.0, 32), (5, 1.0, 32), (23, 10.0, 32), (75, 25.0, 32), (301, 29.97, 32),
    (480, 30.0, 32), (3000, 30.0, 32), (54001, 29.97, 32), (999, 23.976, 31), (640, 8.0, 1), (100, 4.0, 7),
])
def test_plan_matches_qwen_vl_utils_then_lmms_eval(total, fps, frames):
    plan = plan_frames(total, fps, QwenVideoSettings(frames=frames))
    np.testing.assert_array_equal(plan.indices, ref_indices(total, fps, frames))
    n = ref_nframes(total, fps)
    assert plan.n == n and plan.sample_fps == pytest.approx(n / total * fps, rel=1e-12)
    assert len(plan.indices) == (min(n, frames) if frames > 1 else 2)
    assert len(np.unique(plan.indices)) == len(plan.indices)


def test_short_clip_keeps_every_sampled_frame_once():
    plan = plan_frames(23, 10.0, QwenVideoSettings())
    np.testing.assert_array_equal(plan.indices, [0, 7, 15, 22])
    np.testing.assert_array_equal(lmms_resample(4, 32), [0, 1, 2, 3])
    np.testing.assert_array_equal(lmms_resample(200, 32), np.linspace(0, 199, 32, dtype=int))


def test_settings_are_validated():
    with pytest.raises(ConfigError, match="--frames 0"):
        QwenVideoSettings(frames=0)
    with pytest.raises(ConfigError, match="--max-pixels 100 is below --min-pixels 37632"):
        QwenVideoSettings(max_pixels=100)


# ------------------------------------------------------------------ resize


@pytest.mark.parametrize("src,dst", [
    ((360, 640), (336, 588)), ((480, 854), (308, 560)), ((720, 1280), (308, 560)), ((1080, 1920), (336, 588)),
    ((240, 320), (224, 308)), ((100, 150), (224, 336)), ((57, 91), (196, 280)), ((256, 340), (224, 308)),
    ((90, 60), (60, 90)), ((336, 600), (336, 588)), ((200, 300), (420, 300)),
])
def test_resize_matches_torchvision_uint8_formula(src, dst):
    frames = random_frames(2, *src, seed=src[0] * 7 + dst[1])
    mine, ref = resize_frames(frames, *dst), torch_resize_u8(frames, *dst)
    assert mine.shape == ref.shape == (2, *dst, 3)
    diff = np.abs(mine.astype(int) - ref.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-4, (diff.max(), int((diff > 0).sum()))


def test_resize_same_size_is_identity():
    frames = random_frames(1, 56, 84, seed=3)
    np.testing.assert_array_equal(resize_frames(frames, 56, 84), frames)


def test_resize_rejects_bad_input():
    with pytest.raises(ValueError, match=r"expected uint8 RGB frames \[T>=1, H, W, 3\], got float32"):
        resize_frames(np.zeros((1, 8, 8, 3), np.float32), 4, 4)
    with pytest.raises(ValueError, match="target size 0x4 is empty"):
        resize_frames(np.zeros((1, 8, 8, 3), np.uint8), 0, 4)


# ------------------------------------------------------------------ processor


@pytest.mark.parametrize("t,h,w", [(5, 90, 160), (4, 336, 588), (1, 300, 200)])
def test_preprocessor_matches_video_processor_steps(t, h, w):
    frames = random_frames(t, h, w, seed=t + h)
    proc = QwenPreprocessor()
    out = proc(frames)
    sh, sw = ref_smart_resize(h, w, 28, 37632, 200704)
    ref_flat, ref_grid = torch_video_processor(torch_resize_u8(frames, sh, sw) if (sh, sw) != (h, w) else frames)
    flat = proc.flatten(out.pixels)
    assert out.pixels.dtype == np.float32 and out.pixels.shape == (t + t % 2, 3, sh, sw)
    assert out.grid_thw == ref_grid and out.second_per_grid_t == 1.0
    assert flat.shape == ref_flat.shape
    np.testing.assert_allclose(flat, ref_flat, rtol=0, atol=1e-6)
    if t % 2:
        np.testing.assert_array_equal(out.pixels[-1], out.pixels[-2])


def test_preprocessor_matches_transformers_image_processor_on_a_still_clip():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    frame = random_frames(1, 224, 308, seed=11)
    ref = Qwen2VLImageProcessorPil(min_pixels=37632, max_pixels=200704)(frame[0], return_tensors="np")
    out = QwenPreprocessor()(frame)
    np.testing.assert_array_equal(ref["image_grid_thw"][0], out.grid_thw)
    np.testing.assert_array_equal(flatten_patches(out.pixels), ref["pixel_values"])


def test_flatten_layout():
    pixels = np.arange(4 * 3 * 56 * 28, dtype=np.float32).reshape(4, 3, 56, 28)
    flat = flatten_patches(pixels)
    assert flat.shape == (2 * 4 * 2, 3 * 2 * 14 * 14)
    # row 5: t=0, merge block (row 1, col 0), inside it (row 0, col 1) -> patch row 2, col 1
    np.testing.assert_array_equal(flat[5].reshape(3, 2, 14, 14), pixels[0:2, :, 28:42, 14:28].transpose(1, 0, 2, 3))
    with pytest.raises(ValueError, match="T must be a multiple of 2 and H, W of 28"):
        flatten_patches(pixels[:3])


def test_from_dir_reads_config(tmp_path):
    assert QwenPreprocessor.from_dir(tmp_path) == QwenPreprocessor()
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.5, 0.5, 0.5], "image_std": 0.25, "patch_size": 16, "temporal_patch_size": 2,
         "merge_size": 2, "min_pixels": 3136, "max_pixels": 12845056}))
    proc = QwenPreprocessor.from_dir(tmp_path, QwenVideoSettings(min_pixels=50000, max_pixels=90000))
    assert (proc.mean, proc.std, proc.patch_size, proc.factor) == ((0.5,) * 3, (0.25,) * 3, 16, 32)
    assert (proc.min_pixels, proc.max_pixels) == (50000, 90000)
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps({"image_mean": [0.1, 0.2, 0.3]}))
    assert QwenPreprocessor.from_dir(tmp_path).mean == (0.1, 0.2, 0.3)
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps({"image_std": [1, 2]}))
    with pytest.raises(CheckpointError, match="'image_std' must have 3 values"):
        QwenPreprocessor.from_dir(tmp_path)
    (tmp_path / "video_preprocessor_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="video_preprocessor_config.json is not readable JSON"):
        QwenPreprocessor.from_dir(tmp_path)


# ------------------------------------------------------------------ files


@pytest.fixture(scope="module")
def video_file(tmp_path_factory):
    frames = random_frames(47, 96, 128, seed=5)
    path = tmp_path_factory.mktemp("qwen") / "clip.mp4"
    write_test_video(path, frames, fps=12)
    return path


def test_load_video_whole_path(video_file):
    clip = load_video_qwen(video_file)
    decoded = count_and_decode(str(video_file))
    n = ref_nframes(47, 12.0)
    np.testing.assert_array_equal(clip.indices, ref_indices(47, 12.0, 32))
    assert (clip.total_frames, clip.video_fps, clip.n) == (47, 12.0, n)
    assert clip.sample_fps == pytest.approx(n / 47 * 12.0)
    h, w = ref_smart_resize(96, 128, 28, 37632, 200704)
    np.testing.assert_array_equal(clip.frames, torch_resize_u8(decoded[clip.indices], h, w))
    same = clip_from_frames(decoded, 12.0)
    np.testing.assert_array_equal(same.frames, clip.frames)

    inputs = QwenPreprocessor()(clip.frames)
    assert inputs.pixels.shape == (n + n % 2, 3, h, w)
    assert inputs.grid_thw == ((n + n % 2) // 2, h // 14, w // 14) and inputs.second_per_grid_t == 1.0
    ref_flat, _ = torch_video_processor(clip.frames)
    np.testing.assert_allclose(flatten_patches(inputs.pixels), ref_flat, rtol=0, atol=1e-6)


def test_load_video_errors(tmp_path):
    with pytest.raises(VideoError, match="video file not found"):
        load_video_qwen(tmp_path / "missing.mp4")
    (tmp_path / "text.mp4").write_text("not a video")
    with pytest.raises(VideoError, match="cannot open"):
        load_video_qwen(tmp_path / "text.mp4")
    one = tmp_path / "one.mp4"
    write_test_video(one, random_frames(1, 32, 32, seed=0), fps=5)
    with pytest.raises(VideoError, match="clip of 1 frame"):
        load_video_qwen(one)
