"""The chat prompts of both families and a thin offline wrapper around a checkpoint's
`tokenizer.json`.

LLaVA-OneVision, the qwen_1_5 template (spec section 1, step 6):
    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n<video>\\n
    {question}<|im_end|>\\n<|im_start|>assistant\\n
Qwen2.5-VL, its chat template on lmms-eval's messages (system prompt, then the video and the
question in one user turn; see earlytom_jax/video_qwen.py):
    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n
    <|vision_start|><|video_pad|><|vision_end|>{question}<|im_end|>\\n<|im_start|>assistant\\n
LLaVA-Video (lmms-eval `llava_vid` with conv_template=qwen_1_5) uses LLaVA-OneVision's template;
with `add_time_instruction` the question is preceded by one line about the sampled frames
(`time_instruction`), as LLaVA-Video was trained (LLaVA-NeXT `train.py`, `--add_time_instruction`).
The single video placeholder is later replaced by the visual tokens, so the token ids are kept
as a prefix and a suffix around it (`PromptIds`; Qwen2.5-VL's prefix ends with <|vision_start|>
and its suffix starts with <|vision_end|>).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

from tokenizers import Tokenizer as _HFTokenizer

from earlytom_jax.errors import CheckpointError, EarlyTomError


class PromptError(EarlyTomError, ValueError):
    """A prompt that cannot be built (placeholder missing or repeated, unknown token)."""


QWEN_SYSTEM = "You are a helpful assistant."
VIDEO_PLACEHOLDER = "<video>"
QWEN_VL_PLACEHOLDER = "<|video_pad|>"
TOKENIZER_FILE = "tokenizer.json"
_EOS_TOKENS = ("<|im_end|>", "<|endoftext|>")


def chat_prompt(question: str, placeholder: str = VIDEO_PLACEHOLDER) -> str:
    """The qwen_1_5 prompt with one placeholder line before the question."""
    return (
        f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n"
        f"<|im_start|>user\n{placeholder}\n{question}<|im_end|>\n"
        f"<|im_start|>assistant\n"
    )


def time_instruction(video_seconds: float, frame_times: Sequence[float]) -> str:
    """LLaVA-Video's time instruction (lmms-eval `llava_vid.generate_until` with
    add_time_instruction=True, worded as LLaVA-NeXT's training data): the video's length, the
    number of frames, each frame's time in seconds; no space after the second sentence's period,
    as in the source."""
    times = ",".join(f"{t:.2f}s" for t in frame_times)
    return (f"The video lasts for {video_seconds:.2f} seconds, and {len(frame_times)} frames are uniformly "
            f"sampled from it. These frames are located at {times}.Please answer the following questions "
            "related to this video.")


def with_time_instruction(question: str, video_seconds: float, frame_times: Sequence[float]) -> str:
    """The question as lmms-eval's `llava_vid` passes it with add_time_instruction=True: the
    time instruction, a newline, the question (the placeholder line comes before both)."""
    return f"{time_instruction(video_seconds, frame_times)}\n{question}"


def qwen_vl_prompt(question: str) -> str:
    """Qwen2.5-VL's chat template on lmms-eval's messages: the video, then the question."""
    return (
        f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n"
        f"<|im_start|>user\n<|vision_start|>{QWEN_VL_PLACEHOLDER}<|vision_end|>{question}<|im_end|>\n"
        f"<|im_start|>assistant\n"
    )


class Tokenizer:
    """`tokenizers.Tokenizer` loaded from `tokenizer.json`; no BOS, special tokens kept whole."""

    def __init__(self, tok: _HFTokenizer):
        self._tok = tok

    @classmethod
    def from_dir(cls, checkpoint_dir: str) -> "Tokenizer":
        """Load `checkpoint_dir/tokenizer.json` (offline)."""
        file = os.path.join(str(checkpoint_dir), TOKENIZER_FILE)
        if not os.path.isfile(file):
            raise CheckpointError(f"{file} not found; the checkpoint must ship a tokenizer.json")
        return cls(_HFTokenizer.from_file(file))

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (added/special tokens such as <|im_start|> map to one id)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`, by default without special tokens."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def has_token(self, token: str) -> bool:
        return self._tok.token_to_id(token) is not None

    def token_id(self, token: str) -> int:
        """Id of one vocabulary / added token; ValueError if unknown."""
        i = self._tok.token_to_id(token)
        if i is None:
            raise PromptError(f"token {token!r} is not in the tokenizer vocabulary")
        return i

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Ids of <|im_end|> and <|endoftext|>, those present, in that order."""
        return tuple(self.token_id(t) for t in _EOS_TOKENS if self.has_token(t))

    @property
    def vocab_size(self) -> int:
        """Vocabulary size including added tokens."""
        return self._tok.get_vocab_size(with_added_tokens=True)


@dataclasses.dataclass(frozen=True)
class PromptIds:
    """Token ids before and after the single video placeholder."""

    prefix: tuple[int, ...]
    suffix: tuple[int, ...]

    def expanded(self, placeholder_id: int, n: int) -> list[int]:
        """prefix + [placeholder_id] * n + suffix."""
        if n < 0:
            raise PromptError(f"placeholder count must be >= 0, got {n}")
        return [*self.prefix, *([placeholder_id] * n), *self.suffix]


def split_at_placeholder(ids: Sequence[int], placeholder_id: int) -> PromptIds:
    """Split `ids` at its one occurrence of `placeholder_id` (ValueError unless exactly one)."""
    ids = [int(i) for i in ids]
    where = [k for k, i in enumerate(ids) if i == placeholder_id]
    if len(where) != 1:
        raise PromptError(f"prompt must contain exactly one placeholder id {placeholder_id}, found {len(where)}")
    k = where[0]
    return PromptIds(prefix=tuple(ids[:k]), suffix=tuple(ids[k + 1 :]))


def expand_placeholder(ids: Sequence[int], placeholder_id: int, n: int) -> list[int]:
    """The single placeholder repeated n times (what transformers' processor does for a video)."""
    return split_at_placeholder(ids, placeholder_id).expanded(placeholder_id, n)


def encode_video_prompt(
    tokenizer: Tokenizer, question: str, placeholder_id: int, placeholder: str = VIDEO_PLACEHOLDER
) -> PromptIds:
    """Ids of `chat_prompt(question)` split around the placeholder.

    The text before and after the placeholder string is encoded separately (LLaVA-NeXT's
    `tokenizer_image_token`), which equals encoding the whole string when the tokenizer knows the
    placeholder as a special token, and also works with tokenizers that do not (lmms-lab).
    """
    if tokenizer.has_token(placeholder) and tokenizer.token_id(placeholder) != placeholder_id:
        raise PromptError(
            f"tokenizer maps {placeholder!r} to {tokenizer.token_id(placeholder)}, "
            f"but the model's placeholder id is {placeholder_id}"
        )
    before, after = chat_prompt(question, placeholder).split(placeholder, 1)
    prefix, suffix = tokenizer.encode(before), tokenizer.encode(after)
    if placeholder_id in prefix or placeholder_id in suffix:
        raise PromptError(f"the question contains the placeholder {placeholder!r}; remove it")
    return PromptIds(prefix=tuple(prefix), suffix=tuple(suffix))


def encode_qwen_vl_prompt(tokenizer: Tokenizer, question: str, cfg) -> PromptIds:
    """Ids of `qwen_vl_prompt(question)` split around <|video_pad|>; the tokenizer's vision
    tokens must carry the ids of the model's config (`cfg`: a Qwen25VLConfig)."""
    for token, want in (("<|vision_start|>", cfg.vision_start_token_id), ("<|vision_end|>", cfg.vision_end_token_id),
                        (QWEN_VL_PLACEHOLDER, cfg.video_token_id)):
        got = tokenizer.token_id(token)
        if got != want:
            raise PromptError(f"tokenizer maps {token!r} to {got}, but the model's config says {want}; "
                              "the tokenizer.json belongs to another checkpoint")
    before, after = qwen_vl_prompt(question).split(QWEN_VL_PLACEHOLDER, 1)
    prefix, suffix = tokenizer.encode(before), tokenizer.encode(after)
    if cfg.video_token_id in prefix or cfg.video_token_id in suffix:
        raise PromptError(f"the question contains the placeholder {QWEN_VL_PLACEHOLDER!r}; remove it")
    return PromptIds(prefix=tuple(prefix), suffix=tuple(suffix))


def encode_prompt(tokenizer: Tokenizer, question: str, cfg) -> PromptIds:
    """The prompt ids of `cfg`'s family around its video placeholder."""
    if cfg.family == "qwen2_5_vl":
        return encode_qwen_vl_prompt(tokenizer, question, cfg)
    return encode_video_prompt(tokenizer, question, cfg.video_token_id)
