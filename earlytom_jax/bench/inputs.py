"""What a benchmark runs on: the paper's prompt ids, the clip, a named architecture's random
weights and preprocessing, a method by name, and the benchmark scripts' shared flags."""

from __future__ import annotations

import jax.numpy as jnp

from earlytom_jax.compression.registration import DEFAULT_RATIO


def prompt_ids() -> tuple[list[int], list[int]]:
    """Token ids standing in for the paper's prompt around the video, as the qwen_1_5 template
    lays it out: 14 before the video, 25 after (speed depends on the lengths only)."""
    return list(range(14)), list(range(100, 125))


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


def random_preprocessor(cfg):
    """SigLIP's preprocessing for a named architecture with random weights (a checkpoint
    directory brings its own: `Preprocessor.from_dir`)."""
    from earlytom_jax.video import Preprocessor

    return Preprocessor(size=cfg.vision.image_size, mean=(0.5,) * 3, std=(0.5,) * 3)


def random_inputs(arch: str, dtype: str, frames: int, video: str | None = None):
    """What the benchmark scripts run on: the named architecture with random weights in
    `dtype` (packed as the pipeline holds them), `frames` frames of `video` (default: a
    generated clip) preprocessed, and the prompt ids. → (cfg, params, pixels, prefix, suffix)."""
    from earlytom_jax.architectures import architecture, random_params
    from earlytom_jax.models import stack

    cfg = architecture(arch)
    params = stack.pack(random_params(cfg, dtype=jnp.dtype(dtype)))
    pixels = jnp.asarray(random_preprocessor(cfg)(clip_frames(video, frames)), dtype)
    prefix, suffix = (jnp.asarray(ids, jnp.int32) for ids in prompt_ids())
    return cfg, params, pixels, prefix, suffix


def named_method(name: str, ratio: float, cfg):
    """A method by name at `ratio` (full tokens: none), its default settings scaled to a
    shallow model as `earlytom bench` scales them (`compression.defaults.settings`)."""
    from earlytom_jax.compression import defaults, registry

    name = registry.canonical(name)
    if name == "full":
        return registry.build(name, None, cfg)
    return registry.build(name, ratio, cfg, **defaults.settings(name, cfg)[0])
