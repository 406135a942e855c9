"""The public Python API: load a model, ask a question about a video, with any method.

    from earlytom_jax import VideoLLM, EarlyTom
    llm = VideoLLM.load("path/to/llava-onevision-qwen2-0.5b-ov-hf")
    ans = llm.ask("video.mp4", "Describe what's happening in this video.",
                  method=EarlyTom(ratio=0.1), num_frames=32)
    print(ans.text, ans.stats["visual_tokens"], ans.ttft_s)
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from earlytom_jax import pipeline, sharding
from earlytom_jax.architectures import param_shapes
from earlytom_jax.checkpoint.load import load_any, load_any_config
from earlytom_jax.config import LlavaOVConfig
from earlytom_jax.errors import ConfigError
from earlytom_jax.generate import Generation, generate
from earlytom_jax.prompt import PromptIds, Tokenizer, encode_video_prompt
from earlytom_jax.video import Preprocessor, VideoFrames, load_video


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

    @classmethod
    def load(cls, directory: str, dtype: str = "float32", mesh: str | None = None) -> "VideoLLM":
        """An HF checkpoint directory (safetensors, any supported layout) or a converted one
        (`earlytom convert`). `mesh` such as "data=2,model=4" places every weight straight
        into its shard on the devices (see earlytom_jax.sharding)."""
        m = sharding.parse_mesh(mesh) if mesh else None
        shardings = None
        if m is not None:
            shapes = param_shapes(load_any_config(directory))
            shardings, _ = sharding.plan_shardings(shapes, m)
        cfg, params = load_any(directory, dtype, shardings)
        return cls(cfg, params, Tokenizer.from_dir(directory), Preprocessor.from_dir(directory), m)

    def prompt_ids(self, question: str) -> PromptIds:
        return encode_video_prompt(self.tokenizer, question, self.cfg.video_token_id)

    def pixels(self, frames: np.ndarray):
        """uint8 frames [T, H, W, 3] → normalised pixels [T, 3, S, S] (on the mesh, frames
        over its data axis, when the model is sharded)."""
        pix = self.preprocessor(frames)
        if self.mesh is not None:
            return jax.device_put(pix, sharding.frames_sharding(self.mesh, pix.shape[0]))
        return pix

    def ask(
        self,
        video: str | np.ndarray,
        question: str,
        method=pipeline.FULL,
        num_frames: int = 32,
        max_new_tokens: int = 32,
        on_token=None,
    ) -> Answer:
        """Answer `question` about `video` (a file path or uint8 frames [T, H, W, 3])."""
        if hasattr(method, "check"):
            method = method.check(self.cfg)
        vf = load_video(video, num_frames) if isinstance(video, str) else None
        frames = vf.frames if vf is not None else np.asarray(video)
        ids = self.prompt_ids(question)
        length = len(ids.prefix) + len(ids.suffix) + method.capacity(len(frames), self.cfg.tokens_per_frame) + 1
        limit = self.cfg.text.max_position_embeddings
        if length + max_new_tokens > limit:
            raise ConfigError(
                f"prompt of {length} tokens ({len(frames)} frames) plus {max_new_tokens} new tokens "
                f"exceeds the model's context of {limit}; use fewer frames or a shorter prompt"
            )
        gen = generate(
            self.params, self.cfg, self.pixels(frames), ids.prefix, ids.suffix, method,
            max_new_tokens, self.tokenizer.eos_ids,
            on_token=None if on_token is None else (lambda t: on_token(self.tokenizer.decode([t]))),
        )
        return Answer(self.tokenizer.decode(gen.tokens).strip(), gen, vf)
