"""Things made in code so that the demo and the tests need no download: character-level
tokenizers with the qwen_1_5 special tokens (and Qwen2.5-VL's), and procedural video clips."""

from __future__ import annotations

import numpy as np

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Qwen2.5-VL's added tokens in id order (151643.. in the released tokenizer)
QWEN_VL_SPECIALS = SPECIALS + ("<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
                               "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
                               "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")


def _chars(n_plain: int, specials: tuple[str, ...]):
    """A character-level `tokenizers.Tokenizer`: plain ids 0..n_plain-1 (one per printable ASCII
    character, space and newline included, then fillers), then `specials` in order."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    chars = ["<unk>", "\n"] + [chr(c) for c in range(32, 127)]
    if n_plain < 2:
        raise ValueError(f"{n_plain} plain ids are too few for a tokenizer")
    vocab = {w: i for i, w in enumerate(chars[:n_plain])}
    vocab.update({f"<|w{i}|>": i for i in range(len(vocab), n_plain)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True) for t in specials])
    return tok


def char_tokenizer(image_token_id: int):
    """A tokenizer laid out like Qwen2's: plain ids 0..image_token_id-4, then `<|endoftext|>`,
    `<|im_start|>`, `<|im_end|>`, `<image>` = image_token_id and `<video>` = image_token_id + 1
    (151643..151647 for the real models)."""
    tok = _chars(image_token_id - len(SPECIALS), SPECIALS + ("<image>", "<video>"))
    assert tok.token_to_id("<video>") == image_token_id + 1
    return tok


def qwen_vl_tokenizer(video_token_id: int):
    """A tokenizer laid out like Qwen2.5-VL's: plain ids, then its 14 added tokens from
    `<|endoftext|>` to `<|video_pad|>` = video_token_id (151643..151656 in the released one,
    whose model pads the vocabulary further)."""
    tok = _chars(video_token_id + 1 - len(QWEN_VL_SPECIALS), QWEN_VL_SPECIALS)
    assert tok.token_to_id("<|video_pad|>") == video_token_id
    return tok


def make_clip(n_frames: int = 32, size: int = 112, seed: int = 0) -> np.ndarray:
    """uint8 [T, size, size, 3]: a square drifting over a still background, a scene change
    (new background and object) at two thirds, and two one-frame flashes. Still stretches
    let temporal merging fold frames; the cut and the flashes must survive it."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    cut = (2 * n_frames) // 3
    flashes = set(rng.choice(np.arange(1, max(2, n_frames - 1)), size=min(2, max(0, n_frames - 2)), replace=False).tolist())
    scenes = [rng.integers(0, 256, 3), rng.integers(0, 256, 3)]
    objects = [rng.integers(0, 256, 3), rng.integers(0, 256, 3)]
    frames = np.empty((n_frames, size, size, 3), np.uint8)
    for t in range(n_frames):
        scene = int(t >= cut)
        img = np.broadcast_to(scenes[scene], (size, size, 3)).astype(np.float32)
        img = img + 25 * np.sin(xx / (7 + 5 * scene))[..., None]  # texture
        side = size // 4
        x0 = int((t / max(1, n_frames - 1)) * (size - side))
        y0 = size // 3 if scene == 0 else size // 2
        img[y0 : y0 + side, x0 : x0 + side] = objects[scene]
        if t in flashes:
            img = 0.5 * img + 127
        frames[t] = np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)
    return frames
