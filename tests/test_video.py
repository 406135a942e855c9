"""Video decoding, frame sampling and preprocessing (spec section 1, step 1)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from PIL import Image

from earlytom_jax.errors import CheckpointError
from earlytom_jax.video import (
    Preprocessor,
    VideoError,
    count_and_decode,
    load_video,
    sample_indices,
    write_test_video,
)
from tests.tiny_models import random_video, write_preprocessor


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A 23-frame 48x64 mp4 and its source frames."""
    frames = random_video(23, 48, 64, seed=1)
    path = tmp_path_factory.mktemp("vid") / "clip.mp4"
    write_test_video(path, frames, fps=10)
    return path, frames


# ------------------------------------------------------------------ sampling


@pytest.mark.parametrize("n,num", [(524, 32), (100, 32), (32, 32), (33, 32), (7, 32), (1, 4), (10, 1)])
def test_sample_indices_linspace_rule(n, num):
    idx = sample_indices(n, num)
    np.testing.assert_array_equal(idx, np.linspace(0, n - 1, num, dtype=int))
    assert idx[0] == 0 and idx[-1] == (n - 1 if num > 1 else 0)
    assert len(idx) == num


def test_sample_indices_truncates():
    # 0, 16.9..., 33.8... -> truncation, not rounding
    np.testing.assert_array_equal(sample_indices(52, 4), [0, 17, 34, 51])
    np.testing.assert_array_equal(sample_indices(10, 4), [0, 3, 6, 9])
    np.testing.assert_array_equal(sample_indices(5, 3), [0, 2, 4])
    np.testing.assert_array_equal(sample_indices(8, 3), [0, 3, 7])  # 3.5 -> 3


def test_sample_indices_rejects_empty():
    with pytest.raises(ValueError):
        sample_indices(0, 4)


# ------------------------------------------------------------------ decoding


def test_decode_all_frames(clip):
    path, frames = clip
    decoded = count_and_decode(path)
    assert decoded.dtype == np.uint8 and decoded.shape == frames.shape
    # lossy codec: close on average, and frame order preserved (each frame nearest its source)
    assert np.abs(decoded.astype(int) - frames).mean() < 12
    err = np.abs(decoded[:, None].astype(int) - frames[None]).mean(axis=(2, 3, 4))
    np.testing.assert_array_equal(err.argmin(axis=1), np.arange(len(frames)))


def test_load_video_keeps_sampled_frames(clip):
    path, _ = clip
    v = load_video(path, 8)
    all_frames = count_and_decode(path)
    np.testing.assert_array_equal(v.indices, np.linspace(0, 22, 8, dtype=int))
    assert v.total_frames == 23 and not v.repeated
    assert v.frames.shape == (8, 48, 64, 3) and v.frames.dtype == np.uint8
    np.testing.assert_array_equal(v.frames, all_frames[v.indices])
    assert v.fps == pytest.approx(10.0)


def test_load_video_repeats_when_short(clip):
    path, _ = clip
    v = load_video(path, 32)
    assert v.repeated and v.total_frames == 23
    np.testing.assert_array_equal(v.indices, np.linspace(0, 22, 32, dtype=int))
    assert len(set(v.indices.tolist())) == 23
    np.testing.assert_array_equal(v.frames, count_and_decode(path)[v.indices])


def test_missing_file(tmp_path):
    with pytest.raises(VideoError, match="not found"):
        load_video(tmp_path / "nope.mp4", 4)
    with pytest.raises(VideoError, match="not found"):
        count_and_decode(tmp_path / "nope.mp4")


def test_text_file_renamed_mp4(tmp_path):
    p = tmp_path / "fake.mp4"
    p.write_text("this is not a video\n" * 10)
    with pytest.raises(VideoError, match="fake.mp4"):
        load_video(p, 4)


def test_truncated_mp4(clip, tmp_path):
    data = clip[0].read_bytes()
    p = tmp_path / "trunc.mp4"
    p.write_bytes(data[: len(data) // 2])  # moov atom (at the end) is lost
    with pytest.raises(VideoError, match="trunc.mp4"):
        load_video(p, 4)


@pytest.mark.parametrize("ext", ["avi", "mkv"])  # a frame count in the header; a duration only
def test_truncated_video_warns_with_frames_read_and_declared(tmp_path, caplog, ext):
    """A file cut short after its header is read as far as it goes, with one warning naming the
    frames read and the frames the container declares; the whole file gives none."""
    whole = tmp_path / f"whole.{ext}"
    write_test_video(whole, random_video(30, 48, 64, seed=5), fps=10)
    data = whole.read_bytes()
    cut = tmp_path / f"cut.{ext}"
    cut.write_bytes(data[: int(len(data) * 0.7)])
    with caplog.at_level(logging.WARNING, logger="earlytom_jax.video"):
        assert load_video(whole, 8).total_frames == 30
        assert not caplog.records
        v = load_video(cut, 8)
        assert 0 < v.total_frames < 28
        np.testing.assert_array_equal(v.indices, np.linspace(0, v.total_frames - 1, 8, dtype=int))
        assert len(count_and_decode(cut)) == v.total_frames
    assert len(caplog.records) == 2  # one per call
    line = caplog.records[0].getMessage()
    assert "cut." + ext in line and f"read {v.total_frames} of the 30 frames the container declares" in line
    assert "truncated or partly corrupt" in line and "\n" not in line


def test_truncated_video_warning_is_one_line_on_stderr(tmp_path):
    """With logging left unconfigured (as the command line leaves it) the warning is one bare
    line on stderr."""
    import os
    import subprocess
    import sys

    p = tmp_path / "cut.avi"
    write_test_video(p, random_video(30, 48, 64, seed=6), fps=10)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    code = f"from earlytom_jax.video import load_video; print(load_video({str(p)!r}, 4).total_frames)"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root)
    assert r.returncode == 0, r.stderr
    n = int(r.stdout)
    assert [line for line in r.stderr.splitlines() if "declares" in line] == [
        f"warning: {p}: read {n} of the 30 frames the container declares; the file is truncated or partly "
        "corrupt, so only those are used (re-download or re-encode it)"]


def unsupported_codec_copy(src, dst):
    """Copy of an mp4 whose sample entry names a codec no decoder knows ('zzzz')."""
    data = open(src, "rb").read()
    tags = [t for t in (b"avc1", b"mp4v") if t in data]
    assert tags, "the test encoder wrote neither H.264 nor MPEG-4"
    with open(dst, "wb") as f:
        f.write(data.replace(tags[0], b"zzzz"))
    return dst


def test_unsupported_codec(clip, tmp_path):
    p = unsupported_codec_copy(clip[0], tmp_path / "odd.mp4")
    with pytest.raises(VideoError, match="odd.mp4: video codec is not supported"):
        load_video(p, 4)


def test_zero_frames(tmp_path):
    p = tmp_path / "empty.avi"  # the mp4 muxer drops an empty track; avi keeps it
    write_test_video(p, np.zeros((0, 16, 16, 3), np.uint8))
    with pytest.raises(VideoError, match="zero"):
        load_video(p, 4)
    with pytest.raises(VideoError, match="zero"):
        count_and_decode(p)


def test_write_test_video_rejects_odd_size(tmp_path):
    with pytest.raises(ValueError, match="even"):
        write_test_video(tmp_path / "odd.mp4", np.zeros((2, 15, 16, 3), np.uint8))


# ------------------------------------------------------------------ preprocessing


def _reference(frames, size, mean, std, rescale=1 / 255):
    out = []
    for f in frames:
        r = np.asarray(Image.fromarray(f).resize((size, size), resample=Image.Resampling.BICUBIC))
        x = (r.astype(np.float64) * rescale - np.array(mean)) / np.array(std)
        out.append(x.transpose(2, 0, 1))
    return np.stack(out)


def test_preprocessor_from_file_and_values(tmp_path):
    write_preprocessor(tmp_path, 28)
    pre = Preprocessor.from_dir(tmp_path)
    assert pre == Preprocessor(size=28, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), rescale=1 / 255)
    frames = random_video(3, 40, 60, seed=2)
    out = pre(frames)
    assert out.dtype == np.float32 and out.shape == (3, 3, 28, 28)
    np.testing.assert_allclose(out, _reference(frames, 28, [0.5] * 3, [0.5] * 3), atol=1e-6)


def test_preprocessor_mean_std_come_from_file(tmp_path):
    mean, std = [0.1, 0.2, 0.3], [0.25, 0.5, 0.75]
    cfg = {"image_mean": mean, "image_std": std, "size": {"shortest_edge": 14}, "rescale_factor": 1 / 255}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg))
    pre = Preprocessor.from_dir(tmp_path)
    assert pre.size == 14 and pre.mean == tuple(mean) and pre.std == tuple(std)
    frames = random_video(2, 20, 30, seed=3)
    np.testing.assert_allclose(pre(frames), _reference(frames, 14, mean, std), atol=1e-5)

    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**cfg, "size": 21}))
    assert Preprocessor.from_dir(tmp_path).size == 21


def test_preprocessor_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="preprocessor_config.json"):
        Preprocessor.from_dir(tmp_path)


def test_preprocessor_rejects_non_square(tmp_path):
    cfg = {"image_mean": [0.5] * 3, "image_std": [0.5] * 3, "size": {"height": 10, "width": 12}}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="non-square"):
        Preprocessor.from_dir(tmp_path)


def test_preprocessor_matches_transformers_pil_siglip():
    """transformers' PIL-backend SigLIP processor also resizes uint8 with PIL: they agree."""
    pil_mod = pytest.importorskip("transformers.models.siglip.image_processing_pil_siglip")
    from transformers.image_utils import PILImageResampling

    hf = pil_mod.SiglipImageProcessorPil(
        do_resize=True,
        size={"height": 28, "width": 28},
        resample=PILImageResampling.BICUBIC,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )
    frames = np.random.default_rng(4).integers(0, 256, size=(3, 40, 60, 3), dtype=np.uint8)
    ref = hf(list(frames), return_tensors="np")["pixel_values"]
    ours = Preprocessor(size=28, mean=(0.5,) * 3, std=(0.5,) * 3)(frames)
    assert ref.shape == ours.shape
    np.testing.assert_allclose(ours, ref, atol=1e-6)


def test_end_to_end_pixel_values(clip, tmp_path):
    path, _ = clip
    write_preprocessor(tmp_path, 28)
    v = load_video(path, 4)
    px = Preprocessor.from_dir(tmp_path)(v.frames)
    assert px.shape == (4, 3, 28, 28) and px.dtype == np.float32
    assert -1.0 <= px.min() and px.max() <= 1.0
