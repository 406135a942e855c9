"""Run transformers and our pipeline on the same inputs; load the benchmark scripts."""

from __future__ import annotations

import functools
import importlib.util
import os

import jax
import numpy as np

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def load_benchmark(name: str):
    """The module of `benchmarks/<name>.py` (a script, not a package), for calling its functions."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(BENCHMARKS, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def hf_logits(model, pixels: np.ndarray, prefix, suffix):
    """transformers' full-token logits [L, V] for prefix + <video>*(T*S+1) + suffix."""
    import torch

    cfg = model.config
    grid = cfg.vision_config.image_size // cfg.vision_config.patch_size
    s = (-(-grid // 2)) ** 2
    ids = list(prefix) + [cfg.video_token_index] * (pixels.shape[0] * s + 1) + list(suffix)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), pixel_values_videos=torch.tensor(pixels)[None])
    return out.logits[0].float().numpy(), ids


def hf_generate(model, pixels: np.ndarray, ids, n: int):
    import torch

    with torch.no_grad():
        g = model.generate(
            input_ids=torch.tensor([ids]),
            pixel_values_videos=torch.tensor(pixels)[None],
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
        )
    return g[0, len(ids) :].tolist()


def random_pixels(n_frames: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n_frames, 3, size, size)).astype(np.float32)


def lmms_lab_name(k: str) -> str:
    """A llava-hf LLaVA-OneVision tensor name as lmms-lab's original layout spells it."""
    for a, b in [
        ("vision_tower.", "model.vision_tower.vision_tower.vision_model."),
        ("multi_modal_projector.linear_1.", "model.mm_projector.0."),
        ("multi_modal_projector.linear_2.", "model.mm_projector.2."),
        ("language_model.model.", "model."),
        ("language_model.lm_head.", "lm_head."),
        ("image_newline", "model.image_newline"),
    ]:
        if k.startswith(a):
            return b + k[len(a):]
    return k


def segments(starts, n: int) -> list[tuple[int, int]]:
    """(first, last) frame of each segment from a [n] segment-start mask."""
    s = [i for i in range(n) if starts[i]]
    return [(a, b - 1) for a, b in zip(s, s[1:] + [n])]


def kept_per_frame(kept_index, n: int, per_frame: int) -> list[list[int]]:
    """Each frame's kept token indices (in `kept_index`'s order) from flat t · S + s indices (-1: padding)."""
    out = [[] for _ in range(n)]
    for i in kept_index:
        if i >= 0:
            out[i // per_frame].append(i % per_frame)
    return out


@functools.partial(jax.jit, static_argnames=("cfg", "method"))
def visual_buffer(params, pixels, cfg, method):
    """The encoder and the method's visual buffer as one program (eagerly, op by op, a 27 x 27
    grid's ToMe took 30 s): (buffer [N, H], valid [N], info)."""
    from earlytom_jax import pipeline

    feats, n, state = pipeline.encode_video(params, pixels, cfg, method)
    return pipeline.visual_buffer(params, feats, n, state, cfg, method)
