"""The toy model's training batches: prompts to token ids, clips to pixels, and compression
drawn as augmentation, per clip on the host, as arrays of fixed shape so that every training
step runs the one compiled program:

- frame merging inside the encoder: runs of alike consecutive frames averaged after a random
  block and only the first frame of each run kept (what EarlyTom's stage I hands the LLM);
  not for scene timing, whose answer (how long the screen stays dark) merging erases;
- frame dropping, rare and light (fewer frames, as frame subsampling gives);
- token subsets: a random share of each frame's pooled tokens kept (stage II, VisionZip,
  uniform pooling, FastV all hand the LLM a subset), sometimes with contextual tokens (a
  kept slot holding a group of dropped ones, as VisionZip's contextual tokens);
- pruning inside the LLM: from a random layer on, only a random share of the visual tokens
  is attended (FastV's layout; positions unchanged).

40% of the clips go through unaugmented. Dropped slots are padding: invalid, no RoPE
position, never attended, exactly how the inference pipeline holds its static buffers.
"""

from __future__ import annotations

import numpy as np

from earlytom_jax.prompt import chat_prompt
from earlytom_jax.toy import data
from earlytom_jax.toy.model import IMAGE_SIZE, TOY_CONFIG, tokenizer
from earlytom_jax.video import Preprocessor

SUFFIX_LEN = 48  # question + options + instruction + chat tail, left-padded


class Encoder:
    """Prompt → (prefix ids, left-padded suffix ids + answer slot) with the toy tokenizer."""

    def __init__(self):
        self.tok = tokenizer()
        text = chat_prompt("{Q}")
        pre, post = text.split("<video>")
        self.prefix = np.asarray(self._ids(pre), np.int32)
        self.post = post
        self.letter_ids = {l: self.tok.token_to_id(l) for l in data.LETTERS}
        self.eos = self.tok.token_to_id("<|im_end|>")

    def _ids(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def suffix(self, prompt: str, answer: str) -> tuple[np.ndarray, np.ndarray]:
        """ids int32 [SUFFIX_LEN + 1] (left padding, then the prompt tail, then the answer
        letter) and valid bool [SUFFIX_LEN + 1]."""
        ids = self._ids(self.post.replace("{Q}", prompt))
        if len(ids) > SUFFIX_LEN:
            raise ValueError(f"prompt of {len(ids)} tokens exceeds SUFFIX_LEN={SUFFIX_LEN}")
        pad = SUFFIX_LEN - len(ids)
        out = np.zeros(SUFFIX_LEN + 1, np.int32)
        out[pad:SUFFIX_LEN] = ids
        out[SUFFIX_LEN] = self.letter_ids[answer]
        valid = np.zeros(SUFFIX_LEN + 1, bool)
        valid[pad:] = True
        return out, valid


# the shipped preprocessor_config.json; clips are made at the model's size, so no resize
PREPROCESSOR = Preprocessor(size=IMAGE_SIZE, mean=(0.5,) * 3, std=(0.5,) * 3)


def frame_changes(frames: np.ndarray) -> np.ndarray:
    """Mean absolute difference of each frame from the one before it, float [T - 1]."""
    f = frames.astype(np.float32)
    return np.abs(np.diff(f, axis=0)).mean(axis=(1, 2, 3))


def draw_augmentation(rng: np.random.Generator, changes: np.ndarray, s: int, layers: int, llm_layers: int,
                      augment: bool, merge: bool = True) -> dict:
    """One clip's augmentation, as arrays of fixed shape (T frames, s pooled tokens a frame):

    seg_start bool [T], merge_at int: frames whose run starts elsewhere are averaged into the
        run after encoder block `merge_at` (`layers`: no merge) and only run starts are kept;
    frame_keep bool [T]: frames not dropped;
    token_keep bool [T, s]: tokens handed to the LLM;
    token_mix float [T, s, s]: each frame's tokens become token_mix @ tokens (identity, or
        contextual tokens: a kept slot that absorbs a group of dropped ones, as VisionZip's
        contextual tokens and EarlyTom's merges do);
    llm_drop_at int, llm_keep bool [T, s]: from LLM layer `llm_drop_at` on (`llm_layers`:
        never) only `llm_keep` tokens are attended, as FastV prunes inside the LLM.

    Merges join a frame to the run before it only where the two are alike (`changes` below
    SIMILAR), as EarlyTom's stage I does, so flashes and cuts stay their own frames; drops
    are rare and light, so the answer usually survives them (a model trained on inputs whose
    answer is gone learns to guess). For the same reason `merge=False` (question types whose
    answer is a duration, which merging alike frames erases) draws no merges."""
    t = changes.shape[0] + 1
    seg_start = np.ones(t, bool)
    frame_keep = np.ones(t, bool)
    token_keep = np.ones((t, s), bool)
    token_mix = np.broadcast_to(np.eye(s, dtype=np.float32), (t, s, s)).copy()
    llm_keep = np.ones((t, s), bool)
    merge_at, llm_drop_at = layers, llm_layers  # past the last block / layer: none
    if augment and rng.random() > 0.4:
        if rng.random() < 0.6 and merge:
            join = (changes < SIMILAR) & (rng.random(t - 1) < rng.uniform(0.3, 1.0))
            seg_start[1:] = ~join
            run = 0
            for i in range(t):  # runs of at most MAX_RUN frames (EarlyTom's window M)
                run = 1 if seg_start[i] or run == MAX_RUN else run + 1
                seg_start[i] = run == 1
            merge_at = int(rng.integers(0, layers))
        if rng.random() < 0.15:
            frame_keep = rng.random(t) > rng.uniform(0.05, 0.3)
        if rng.random() < 0.5:
            token_keep = rng.random((t, s)) < rng.uniform(0.15, 1.0)
            if rng.random() < 0.4:
                _contextual_tokens(rng, token_keep, token_mix)
        kept = seg_start & frame_keep
        if not kept.any():
            frame_keep[0] = seg_start[0] = True
        for i in np.flatnonzero(seg_start & frame_keep):
            if not token_keep[i].any():
                token_keep[i, rng.integers(s)] = True
        if rng.random() < 0.25:
            llm_drop_at = int(rng.integers(1, llm_layers))
            visible = (seg_start & frame_keep)[:, None] & token_keep
            llm_keep = visible & (rng.random((t, s)) < rng.uniform(0.1, 0.7))
            if not llm_keep.any():
                llm_keep.flat[rng.choice(np.flatnonzero(visible))] = True
    return {"seg_start": seg_start, "merge_at": merge_at, "frame_keep": frame_keep, "token_keep": token_keep,
            "token_mix": token_mix, "llm_drop_at": llm_drop_at, "llm_keep": llm_keep}


def _contextual_tokens(rng, token_keep, token_mix) -> None:
    """In place, per frame: the dropped tokens go to 1 or 2 targets drawn among them, and each
    target (now kept) becomes the mean of its group, or target + mean of the others as the
    official VisionZip computes it (half the clips each)."""
    quirk = rng.random() < 0.5
    for i in range(token_keep.shape[0]):
        dropped = np.flatnonzero(~token_keep[i])
        if dropped.size < 2:
            continue
        targets = rng.choice(dropped, size=min(int(rng.integers(1, 3)), dropped.size - 1), replace=False)
        group = targets[rng.integers(targets.size, size=dropped.size)]
        group[np.searchsorted(dropped, targets)] = targets  # a target belongs to its own group
        for tgt in targets:
            members = dropped[group == tgt]
            others = members[members != tgt]
            row = np.zeros(token_keep.shape[1], np.float32)
            if quirk and others.size:
                row[others] = 1.0 / others.size
                row[tgt] += 1.0
            else:
                row[members] = 1.0 / members.size
            token_mix[i, tgt] = row
            token_keep[i, tgt] = True


DURATION_KINDS = ("scene",)  # the answer is how many frames are dark
SIMILAR = 6.0  # mean |difference| of consecutive uint8 frames below which they may merge
MAX_RUN = 6
AUGMENTATION_KEYS = ("seg_start", "merge_at", "frame_keep", "token_keep", "token_mix", "llm_drop_at", "llm_keep")


def make_batch(samples, enc: Encoder, rng, augment: bool) -> dict:
    cfg = TOY_CONFIG
    out = {k: [] for k in ("pixels", "suffix", "suffix_valid") + AUGMENTATION_KEYS}
    for smp in samples:
        ids, valid = enc.suffix(smp.prompt, smp.answer)
        aug = draw_augmentation(rng, frame_changes(smp.frames), cfg.tokens_per_frame, cfg.vision.num_layers,
                                cfg.text.num_layers, augment, merge=smp.kind not in DURATION_KINDS)
        for k, v in dict(aug, pixels=PREPROCESSOR.normalize(smp.frames), suffix=ids, suffix_valid=valid).items():
            out[k].append(v)
    return {k: np.stack(v) for k, v in out.items()}
