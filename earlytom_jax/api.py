"""The public Python API: load a model, ask a question about a video, with any method.

    from earlytom_jax import VideoLLM, EarlyTom
    llm = VideoLLM.load("path/to/llava-onevision-qwen2-0.5b-ov-hf")
    ans = llm.ask("video.mp4", "Describe what's happening in this video.",
                  method=EarlyTom(ratio=0.1), num_frames=32)
    print(ans.text, ans.stats["visual_tokens"], ans.ttft_s)

`llm.method("earlytom", ratio=0.1)` builds a method with the model's own defaults (the
checkpoint's, else the built-in ones scaled to its depth: `compression/defaults.py`), so the
same code runs on the shipped toy model (4 encoder blocks, 4 LLM layers) and on 0.5B.

Both families load the same way; the family (`cfg.family`, read from config.json) decides the
video sampling, the preprocessing and the prompt: LLaVA-OneVision as lmms-eval's
`llava_onevision` (`video.load_video`, `video.Preprocessor`), Qwen2.5-VL as lmms-eval's
`qwen2_5_vl` with qwen-vl-utils (`video_qwen`, at `QwenVideoSettings`' pixel bounds).
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
from earlytom_jax.checkpoint import siglip_head as siglip_head_lib
from earlytom_jax.checkpoint.hub import resolve_model
from earlytom_jax.checkpoint.load import load_any, load_any_config
from earlytom_jax.compression import defaults as compression_defaults
from earlytom_jax.compression import registry
from earlytom_jax.config import FAMILIES, ModelConfig
from earlytom_jax.errors import ConfigError
from earlytom_jax.generate import Generation, generate, generate_batch
from earlytom_jax.models import family, stack
from earlytom_jax.prompt import PromptIds, Tokenizer, encode_prompt, with_time_instruction
from earlytom_jax.progress import human_bytes
from earlytom_jax.video import Preprocessor, VideoFrames, load_video, load_video_llava_vid
from earlytom_jax.video_qwen import QwenClip, QwenPreprocessor, QwenVideoSettings, load_video_qwen, smart_resize

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


def visual_grid(cfg: ModelConfig, num_frames: int, settings: QwenVideoSettings | None = None) -> tuple[int, int]:
    """(frames the encoder sees, tokens per such frame at most) for `num_frames` frames: T0 and
    the pooled tokens of a frame for LLaVA-OneVision; for Qwen2.5-VL the temporal patches
    (pairs of frames) and the merged tokens of one at the largest size `settings` allow."""
    if not family.is_qwen(cfg):
        return num_frames, cfg.tokens_per_frame
    settings = settings or QwenVideoSettings()
    v = cfg.vision
    return -(-num_frames // v.temporal_patch_size), settings.max_pixels // v.factor**2


def sized_settings(settings: QwenVideoSettings, pixel_shape) -> QwenVideoSettings:
    """Qwen2.5-VL's bounds narrowed to preprocessed pixels of `pixel_shape` [T', 3, H, W]: the
    largest frame is theirs, so `visual_grid` counts exactly their tokens."""
    return dataclasses.replace(settings, max_pixels=max(settings.min_pixels, pixel_shape[2] * pixel_shape[3]))


def frames_memory(cfg: ModelConfig, num_frames: int, settings: QwenVideoSettings | None = None) -> int:
    """A lower bound on the bytes `num_frames` frames take before the LLM: the frames resized
    to the model's size (uint8), their fp32 pixels (host and device copies) and the encoder's
    widest activation over all frames (fp32, input and output of one block)."""
    v = cfg.vision
    if family.is_qwen(cfg):
        t, s = visual_grid(cfg, num_frames, settings)
        side2 = s * v.factor**2  # pixels of a frame at the largest size
        patches = t * s * v.merge_unit
        frames = t * v.temporal_patch_size * side2 * 3
        act = patches * max(v.hidden_size, v.intermediate_size) * 4
        return frames + 2 * frames * 4 + 2 * act
    side = v.image_size
    frames = num_frames * side * side * 3
    pixels = num_frames * 3 * side * side * 4
    act = num_frames * v.num_patches * max(v.hidden_size, v.intermediate_size) * 4
    return frames + 2 * pixels + 2 * act


def check_frames(cfg: ModelConfig, method, num_frames: int, text_tokens: int, max_new_tokens: int,
                 memory: bool = True, settings: QwenVideoSettings | None = None) -> None:
    """Before any frame is decoded or any program compiled: the prompt (`text_tokens` of text,
    `method`'s visual span for `num_frames` frames, newlines included: `pipeline.visual_span`)
    plus `max_new_tokens` within the model's context, and (memory=True) the frames within the
    memory available (`frames_memory`). ConfigError (one line) otherwise."""
    t, s = visual_grid(cfg, num_frames, settings)
    length = text_tokens + pipeline.visual_span(cfg, method, t, s)
    limit = cfg.text.max_position_embeddings
    if length + max_new_tokens > limit:
        raise ConfigError(
            f"prompt of {length} tokens ({num_frames} frames) plus {max_new_tokens} new tokens "
            f"exceeds the model's context of {limit}; use fewer frames or a shorter prompt"
        )
    need, free = frames_memory(cfg, num_frames, settings), available_memory() if memory else None
    if free is not None and need > free:
        raise ConfigError(
            f"--frames {num_frames}: the frames and the encoder's activations need at least {human_bytes(need)}, "
            f"more than the {human_bytes(free)} of memory available; use fewer frames"
        )


@dataclasses.dataclass
class Answer:
    text: str
    generation: Generation
    video: VideoFrames | QwenClip | None

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
    """A video LLM (LLaVA-OneVision or Qwen2.5-VL) with its tokenizer and preprocessor;
    `video`: Qwen2.5-VL's sampling and pixel bounds (unused by LLaVA-OneVision, whose frames
    are resized to the encoder's square)."""

    cfg: ModelConfig
    params: dict
    tokenizer: Tokenizer
    preprocessor: Preprocessor | QwenPreprocessor
    mesh: object = None  # jax.sharding.Mesh or None (one device)
    info: compression_defaults.ModelInfo = dataclasses.field(default_factory=compression_defaults.ModelInfo)
    video: QwenVideoSettings = QwenVideoSettings()
    # LLaVA-Video: lmms-eval `llava_vid`'s add_time_instruction (off there and in EarlyTom's script)
    time_instruction: bool = False

    @classmethod
    def load(cls, directory: str, dtype: str = "float32", mesh=None, video: QwenVideoSettings | None = None,
             time_instruction: bool = False, siglip_head: str | None = None) -> "VideoLLM":
        """An HF checkpoint directory (safetensors, any supported layout), a converted one
        (`earlytom convert`), or a Hugging Face hub id such as
        "llava-hf/llava-onevision-qwen2-0.5b-ov-hf" (from the HF cache, downloaded when
        online; a local directory of that name wins: `checkpoint.hub.resolve_model`).
        `mesh` (a spec such as "data=2,model=4", or a jax Mesh) places every weight straight
        into its shard on the devices (see earlytom_jax.sharding).
        On CPU, bf16 layer stacks are held in the forms `models.stack.pack` gives.
        video: Qwen2.5-VL's pixel bounds (default: the official EarlyTom script's).
        time_instruction: LLaVA-Video only, the question opens with the video's length and the
        sampled frames' times (`prompt.with_time_instruction`), as lmms-eval's `llava_vid` with
        add_time_instruction=True; ConfigError (one line) on another family.
        siglip_head: LLaVA-OneVision/LLaVA-Video only, a directory of the original SigLIP
        (google/siglip-so400m-patch14-384, HF layout, safetensors) whose post-LayerNorm and
        attention-pooling head FastVID's official signals need (`params["siglip_head"]`,
        checkpoint/siglip_head.py); without it, the head of `directory` itself when that
        checkpoint carries one. ConfigError (one line) for a directory that does not give it."""
        xla_setup.apply_cpu_flags(dtype)  # takes effect only if no JAX backend is open yet
        directory = resolve_model(directory)
        m = sharding.parse_mesh(mesh) if isinstance(mesh, str) and mesh else (mesh or None)
        shardings = None
        if m is not None:
            shapes = param_shapes(load_any_config(directory))
            shardings, _ = sharding.plan_shardings(shapes, m)
        cfg, params = load_any(directory, dtype, shardings)
        head = siglip_head_lib.model_head(cfg, directory, siglip_head, "float32" if dtype is None else dtype, m)
        params = siglip_head_lib.with_head(stack.pack(params), head)
        info = compression_defaults.read_model_info(directory)
        video = video or QwenVideoSettings()
        pre = QwenPreprocessor.from_dir(directory, video) if family.is_qwen(cfg) else Preprocessor.from_dir(directory)
        if time_instruction and cfg.family != "llava_video":
            raise ConfigError(f"--time-instruction is LLaVA-Video's ({directory} is {FAMILIES[cfg.family]}); leave it out")
        return cls(cfg, params, Tokenizer.from_dir(directory), pre, m, info, video, time_instruction)

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
        if hasattr(method, "uses_head") and family.is_llava(self.cfg):  # FastVID: signals="head" needs the head
            method.uses_head(siglip_head_lib.KEY in self.params)
        ids = self.prompt_ids(question)
        text = len(ids.prefix) + len(ids.suffix)
        if pad_multiple:
            text = len(ids.prefix) + max(pad_multiple, -(-len(ids.suffix) // pad_multiple) * pad_multiple)
        check_frames(self.cfg, method, num_frames, text, max_new_tokens, settings=self.video)

    def _check_length(self, pixels, text_tokens: int, method, max_new_tokens: int) -> None:
        """The prompt around these pixels' visual tokens (Qwen2.5-VL: at their actual frame size)."""
        if max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens {max_new_tokens}: need at least 1 (the first token is the answer's start)")
        settings = sized_settings(self.video, pixels.shape) if family.is_qwen(self.cfg) else self.video
        check_frames(self.cfg, method, pixels.shape[0], text_tokens, max_new_tokens, memory=False, settings=settings)

    def prompt_ids(self, question: str) -> PromptIds:
        return encode_prompt(self.tokenizer, question, self.cfg)

    def load_video(self, path: str, num_frames: int) -> VideoFrames | QwenClip:
        """`num_frames` frames of a video file as this model's family samples them (Qwen2.5-VL:
        qwen-vl-utils' frames, at most `num_frames`, already resized to its pixel bounds;
        LLaVA-Video: lmms-eval `llava_vid`'s, one a second, `num_frames` evenly spaced when that
        gives more, with their times)."""
        if family.is_qwen(self.cfg):
            return load_video_qwen(path, dataclasses.replace(self.video, frames=num_frames))
        if self.cfg.family == "llava_video":
            return load_video_llava_vid(path, max_frames=num_frames)
        return load_video(path, num_frames)

    def question_for(self, question: str, video: VideoFrames | QwenClip | None) -> str:
        """The question as this model's harness asks it about `video` (what `load_video` gave):
        with `time_instruction` (LLaVA-Video) the video's length and its frames' times first;
        otherwise as it is. Frames handed over as an array carry no times: then as it is too."""
        times = getattr(video, "times", None)
        if self.time_instruction and times:
            return with_time_instruction(question, video.seconds, times)
        return question

    def token_grid(self, frames: np.ndarray) -> tuple[tuple[int, int], int]:
        """((rows, columns) of one encoded frame's tokens, sampled frames per encoded frame) for
        frames uint8 [T, H, W, 3] as this model encodes them (what `visualize.render` draws)."""
        if family.is_qwen(self.cfg):
            v = self.cfg.vision
            h, w = smart_resize(frames.shape[1], frames.shape[2], v.factor, self.video.min_pixels, self.video.max_pixels)
            return (h // v.factor, w // v.factor), v.temporal_patch_size
        return (self.cfg.pooled_grid, self.cfg.pooled_grid), 1

    def prepare(self, frames: np.ndarray) -> tuple[np.ndarray, float | None]:
        """uint8 frames [T, H, W, 3] → (pixels, video_time): pixels [T, 3, S, S] and None for
        LLaVA-OneVision; [T', 3, H', W'] (T' even) and seconds per temporal patch for Qwen2.5-VL."""
        out = self.preprocessor(frames)
        if family.is_qwen(self.cfg):
            return out.pixels, out.second_per_grid_t
        return out, None

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
        vf = self.load_video(os.fspath(video), num_frames) if isinstance(video, (str, os.PathLike)) else None
        frames = vf.frames if vf is not None else np.asarray(video)
        pixels, video_time = self.prepare(frames)
        question = self.question_for(question, vf)
        ans = self.answer(pixels, question, method, max_new_tokens, on_token, video_time=video_time)
        return dataclasses.replace(ans, video=vf)

    def ask_batch(self, videos, questions, method=pipeline.FULL, num_frames: int = 32, max_new_tokens: int = 32,
                  batch_size: int = 4) -> list[Answer]:
        """`ask` for several videos (file paths or uint8 frames [T, H, W, 3]) and questions, up to
        `batch_size` at a time in one jitted prefill and one decode loop (`answer_batch`); videos
        whose pixels differ in shape (Qwen2.5-VL's frame sizes, LLaVA-Video's frame counts) go in
        separate batches. Answers come back in the input order; each equals `ask` on its own
        (tokens identical in fp32)."""
        if len(videos) != len(questions):
            raise ConfigError(f"{len(videos)} videos but {len(questions)} questions; give one question per video")
        if batch_size < 1:
            raise ConfigError(f"--batch-size {batch_size}: need at least 1")
        if hasattr(method, "check"):
            method = method.check(self.cfg)
        prepared = []
        for video, question in zip(videos, questions):
            path = isinstance(video, (str, os.PathLike))
            if path:
                self.check_request(num_frames, question, method, max_new_tokens)
            vf = self.load_video(os.fspath(video), num_frames) if path else None
            pixels, video_time = self.prepare(vf.frames if vf is not None else np.asarray(video))
            prepared.append((pixels, video_time, self.question_for(question, vf), vf))
        answers: list[Answer | None] = [None] * len(prepared)
        groups: dict[tuple, list[int]] = {}
        for i, (pixels, *_) in enumerate(prepared):
            groups.setdefault(tuple(pixels.shape), []).append(i)
        for idx in groups.values():
            for j in range(0, len(idx), batch_size):
                part = idx[j : j + batch_size]
                got = self.answer_batch([prepared[i][0] for i in part], [prepared[i][2] for i in part], method,
                                        max_new_tokens, batch_size=batch_size,
                                        video_times=[prepared[i][1] for i in part])
                for i, ans in zip(part, got):
                    answers[i] = dataclasses.replace(ans, video=prepared[i][3])
        return answers

    def answer_batch(self, pixels: list[np.ndarray], questions: list[str], method=pipeline.FULL,
                     max_new_tokens: int = 32, pad_multiple: int = 32, batch_size: int | None = None,
                     video_times: list[float | None] | None = None) -> list[Answer]:
        """Answer about several preprocessed videos of one pixel shape (`prepare`) in one batch:
        one prefill (`pipeline.prefill_batch`), one decode loop, each sample stopping at its own
        EOS. Prompts are left-padded to one length (a multiple of `pad_multiple`). batch_size: the
        compiled batch (default: len(pixels)); fewer videos fill it with copies of the last,
        whose answers are dropped, so a last, partial batch reuses the program. Each answer's
        ttft_s is the batch's prefill."""
        if hasattr(method, "check"):
            method = method.check(self.cfg)
        pipeline.check_family(self.cfg, method)
        n = len(pixels)
        b = batch_size or n
        if not 1 <= n <= b or len(questions) != n:
            raise ConfigError(f"{n} videos and {len(questions)} questions for a batch of {b}; give 1 to {b} of each")
        shapes = {tuple(p.shape) for p in pixels}
        if len(shapes) > 1:
            raise ConfigError(f"a batch needs pixels of one shape, got {sorted(shapes)}; batch them apart (ask_batch does)")
        ids = [self.prompt_ids(q) for q in questions]
        if any(list(x.prefix) != list(ids[0].prefix) for x in ids):
            raise ConfigError("the questions' prompts differ before the video; batch them apart")
        suffix, suffix_valid = pipeline.pad_suffixes([x.suffix for x in ids] + [ids[-1].suffix] * (b - n), pad_multiple)
        for p in pixels:
            self._check_length(p, len(ids[0].prefix) + suffix.shape[1], method, max_new_tokens)
        batch = np.stack(list(pixels) + [pixels[-1]] * (b - n))
        times = None
        if family.is_qwen(self.cfg):
            vt = list(video_times or [None] * n) + [None] * (b - n)
            vt = vt[:n] + [vt[n - 1]] * (b - n)
            times = np.asarray([1.0 if t is None else t for t in vt], np.float32)
        if self.mesh is not None:
            batch = jax.device_put(batch, sharding.batch_sharding(self.mesh, batch.shape))
        with contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh):
            gens = generate_batch(self.params, self.cfg, batch, ids[0].prefix, suffix, suffix_valid, method,
                                  max_new_tokens, self.tokenizer.eos_ids, times, samples=n)
        return [Answer(self.tokenizer.decode(g.tokens).strip(), g, None) for g in gens]

    def answer(self, pixels: np.ndarray, question: str, method=pipeline.FULL, max_new_tokens: int = 32,
               on_token=None, pad_multiple: int | None = None, video_time: float | None = None) -> Answer:
        """Answer about preprocessed pixels (see `prepare`; video_time: Qwen2.5-VL's seconds per
        temporal patch).

        pad_multiple: left-pad the prompt after the video to a multiple of this many tokens,
        so that questions of nearby lengths reuse one compiled program (evaluation loops).
        """
        if hasattr(method, "check"):
            method = method.check(self.cfg)
        pipeline.check_family(self.cfg, method)
        ids = self.prompt_ids(question)
        suffix, suffix_valid = ids.suffix, None
        if pad_multiple:
            suffix, suffix_valid = pipeline.pad_suffix(ids.suffix, pad_multiple)
        self._check_length(pixels, len(ids.prefix) + len(suffix), method, max_new_tokens)
        if self.mesh is not None:
            pixels = jax.device_put(pixels, sharding.frames_sharding(self.mesh, pixels.shape[0]))
        with contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh):
            gen = generate(
                self.params, self.cfg, pixels, ids.prefix, suffix, method,
                max_new_tokens, self.tokenizer.eos_ids,
                on_token=None if on_token is None else (lambda t: on_token(self.tokenizer.decode([t]))),
                suffix_valid=suffix_valid,
                video_time=None if video_time is None else np.float32(video_time),
            )
        return Answer(self.tokenizer.decode(gen.tokens).strip(), gen, None)
