"""The public Python API: load a model, ask a question about a video, with any method.

    from earlytom_jax import VideoLLM, EarlyTom
    llm = VideoLLM.load("path/to/llava-onevision-qwen2-0.5b-ov-hf")
    ans = llm.ask("video.mp4", "Describe what's happening in this video.",
                  method=EarlyTom(ratio=0.1), num_frames=32)
    print(ans.text, ans.stats["visual_tokens"], ans.ttft_s)

`llm.method("earlytom", ratio=0.1)` builds a method with the model's own defaults (the
checkpoint's, else the built-in ones scaled to its depth: `compression/defaults.py`), so the
same code runs on the shipped toy model (4 encoder blocks, 4 LLM layers) and on 0.5B.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os

import jax
import numpy as np

from earlytom_jax import pipeline, sharding, xla_setup
from earlytom_jax.architectures import param_shapes
from earlytom_jax.checkpoint.load import load_any, load_any_config
from earlytom_jax.compression import defaults as compression_defaults
from earlytom_jax.compression import registry
from earlytom_jax.config import LlavaOVConfig
from earlytom_jax.errors import ConfigError
from earlytom_jax.generate import Generation, generate
from earlytom_jax.models import stack
from earlytom_jax.prompt import PromptIds, Tokenizer, encode_video_prompt
from earlytom_jax.progress import human_bytes
from earlytom_jax.video import Preprocessor, VideoFrames, load_video

log = logging.getLogger(__name__)


def available_memory() -> int | None:
    """Bytes of host memory available now (Linux: MemAvailable); None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def frames_memory(cfg: LlavaOVConfig, num_frames: int) -> int:
    """A lower bound on the bytes `num_frames` frames take before the LLM: the frames resized
    to the model's size (uint8), their fp32 pixels (host and device copies) and the encoder's
    widest activation over all frames (fp32, input and output of one block)."""
    v = cfg.vision
    side = v.image_size
    frames = num_frames * side * side * 3
    pixels = num_frames * 3 * side * side * 4
    act = num_frames * v.num_patches * max(v.hidden_size, v.intermediate_size) * 4
    return frames + 2 * pixels + 2 * act


def check_frames(cfg: LlavaOVConfig, method, num_frames: int, text_tokens: int, max_new_tokens: int,
                 memory: bool = True) -> None:
    """Before any frame is decoded or any program compiled: the prompt (`text_tokens` of text,
    `method`'s visual buffer for `num_frames` frames, the newline) plus `max_new_tokens`
    within the model's context, and (memory=True) the frames within the memory available
    (`frames_memory`). ConfigError (one line) otherwise."""
    length = text_tokens + method.capacity(num_frames, cfg.tokens_per_frame) + 1
    limit = cfg.text.max_position_embeddings
    if length + max_new_tokens > limit:
        raise ConfigError(
            f"prompt of {length} tokens ({num_frames} frames) plus {max_new_tokens} new tokens "
            f"exceeds the model's context of {limit}; use fewer frames or a shorter prompt"
        )
    need, free = frames_memory(cfg, num_frames), available_memory() if memory else None
    if free is not None and need > free:
        raise ConfigError(
            f"--frames {num_frames}: the frames and the encoder's activations need at least {human_bytes(need)}, "
            f"more than the {human_bytes(free)} of memory available; use fewer frames"
        )


@dataclasses.dataclass
class Answer:
    text: str
    generation: Generation
    video: VideoFrames | None

    @property
    def tokens(self) -> list[int]:
        return self.generation.tokens

    @property
    def stats(self) -> dict:
        return self.generation.stats

    @property
    def ttft_s(self) -> float:
        return self.generation.ttft_s


@dataclasses.dataclass
class VideoLLM:
    """A LLaVA-OneVision model with its tokenizer and preprocessor."""

    cfg: LlavaOVConfig
    params: dict
    tokenizer: Tokenizer
    preprocessor: Preprocessor
    mesh: object = None  # jax.sharding.Mesh or None (one device)
    info: compression_defaults.ModelInfo = dataclasses.field(default_factory=compression_defaults.ModelInfo)

    @classmethod
    def load(cls, directory: str, dtype: str = "float32", mesh=None) -> "VideoLLM":
        """An HF checkpoint directory (safetensors, any supported layout) or a converted one
        (`earlytom convert`). `mesh` (a spec such as "data=2,model=4", or a jax Mesh) places
        every weight straight into its shard on the devices (see earlytom_jax.sharding).
        On CPU, bf16 layer stacks are held in the forms `models.stack.pack` gives."""
        xla_setup.apply_cpu_flags(dtype)  # takes effect only if no JAX backend is open yet
        m = sharding.parse_mesh(mesh) if isinstance(mesh, str) and mesh else (mesh or None)
        shardings = None
        if m is not None:
            shapes = param_shapes(load_any_config(directory))
            shardings, _ = sharding.plan_shardings(shapes, m)
        cfg, params = load_any(directory, dtype, shardings)
        params = stack.pack(params)
        info = compression_defaults.read_model_info(directory)
        return cls(cfg, params, Tokenizer.from_dir(directory), Preprocessor.from_dir(directory), m, info)

    def method(self, name: str = "earlytom", ratio: float | None = None, preset: str | None = None, **settings):
        """The compression method `name` at `ratio` (default: --preset TASK@R's, else 0.1) for
        this model: `settings` given here first, then `preset`'s, then the checkpoint's own
        defaults, then the built-in ones scaled to the model's depth
        (`compression.defaults.settings`, the command line's precedence)."""
        name = registry.canonical(name)
        if name == "full":
            return registry.build("full", None, self.cfg)
        kw, notes = compression_defaults.settings(name, self.cfg, settings, preset, self.info)
        for line in notes:
            log.info(line)
        ratio = ratio if ratio is not None else registry.default_ratio(preset)
        return registry.build(name, ratio, self.cfg, **kw)

    def placed(self, mesh) -> "VideoLLM":
        """The same model with its weights copied onto another mesh (device to device)."""
        params = stack.unpack(self.params)  # the plain stacks, which the mesh plan names
        shardings, _ = sharding.plan_shardings(params, mesh)
        params = stack.pack(jax.tree.map(jax.device_put, params, shardings))
        return dataclasses.replace(self, params=params, mesh=mesh)

    def check_request(self, num_frames: int, question: str, method=pipeline.FULL, max_new_tokens: int = 32,
                      pad_multiple: int | None = None) -> None:
        """Cheap checks before any frame is decoded: at least one frame and one new token, the
        prompt with `num_frames` frames' visual tokens within the model's context, and those
        frames within the memory available. ConfigError (one line) otherwise."""
        if num_frames < 1:
            raise ConfigError(f"--frames {num_frames}: need at least 1")
        if max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens {max_new_tokens}: need at least 1 (the first token is the answer's start)")
        if hasattr(method, "check"):
            method = method.check(self.cfg)
        ids = self.prompt_ids(question)
        text = len(ids.prefix) + len(ids.suffix)
        if pad_multiple:
            text = len(ids.prefix) + max(pad_multiple, -(-len(ids.suffix) // pad_multiple) * pad_multiple)
        check_frames(self.cfg, method, num_frames, text, max_new_tokens)

    def _check_length(self, t0: int, text_tokens: int, method, max_new_tokens: int) -> None:
        if max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens {max_new_tokens}: need at least 1 (the first token is the answer's start)")
        check_frames(self.cfg, method, t0, text_tokens, max_new_tokens, memory=False)

    def prompt_ids(self, question: str) -> PromptIds:
        return encode_video_prompt(self.tokenizer, question, self.cfg.video_token_id)

    def ask(
        self,
        video: str | np.ndarray,
        question: str,
        method=pipeline.FULL,
        num_frames: int = 32,
        max_new_tokens: int = 32,
        on_token=None,
    ) -> Answer:
        """Answer `question` about `video` (a file path or uint8 frames [T, H, W, 3]). The
        request (frames against the context and memory, max_new_tokens) is checked before the
        video is decoded."""
        if hasattr(method, "check"):
            method = method.check(self.cfg)
        if isinstance(video, (str, os.PathLike)):
            self.check_request(num_frames, question, method, max_new_tokens)
        vf = load_video(os.fspath(video), num_frames) if isinstance(video, (str, os.PathLike)) else None
        frames = vf.frames if vf is not None else np.asarray(video)
        ans = self.answer(self.preprocessor(frames), question, method, max_new_tokens, on_token)
        return dataclasses.replace(ans, video=vf)

    def answer(self, pixels: np.ndarray, question: str, method=pipeline.FULL, max_new_tokens: int = 32,
               on_token=None, pad_multiple: int | None = None) -> Answer:
        """Answer about preprocessed pixels [T, 3, S, S] (see `self.preprocessor`).

        pad_multiple: left-pad the prompt after the video to a multiple of this many tokens,
        so that questions of nearby lengths reuse one compiled program (evaluation loops).
        """
        if hasattr(method, "check"):
            method = method.check(self.cfg)
        ids = self.prompt_ids(question)
        suffix, suffix_valid = ids.suffix, None
        if pad_multiple:
            suffix, suffix_valid = pipeline.pad_suffix(ids.suffix, pad_multiple)
        self._check_length(pixels.shape[0], len(ids.prefix) + len(suffix), method, max_new_tokens)
        if self.mesh is not None:
            pixels = jax.device_put(pixels, sharding.frames_sharding(self.mesh, pixels.shape[0]))
        with contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh):
            gen = generate(
                self.params, self.cfg, pixels, ids.prefix, suffix, method,
                max_new_tokens, self.tokenizer.eos_ids,
                on_token=None if on_token is None else (lambda t: on_token(self.tokenizer.decode([t]))),
                suffix_valid=suffix_valid,
            )
        return Answer(self.tokenizer.decode(gen.tokens).strip(), gen, None)
