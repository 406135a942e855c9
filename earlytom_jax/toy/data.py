"""Procedural video-QA: short clips with four-way multiple-choice questions whose answers a
tiny model can learn and that compression can hurt or spare.

Five question types (`KINDS`), each a function of one integer seed:

    colour   appearance control: the colour of a square visible in every frame
    count    short events: how many one-frame white flashes the clip holds (1-4)
    order    temporal order: which of two squares, shown one after the other, comes first
    motion   motion: which way a square travels from the middle, i.e. at which edge it ends
             up (left, right, up, down), on one fixed background
    scene    timing: in which quarter of the clip the screen goes dark (the frame dims to a
             fifth of its brightness from then on)

Clips are uint8 [T, S, S, 3] (16 frames of 48 px by default). Each type has four fixed options
(four colours, one to four, four directions, four quarters) in a fixed order. A sample's seed
fixes its clip and question, so a held-out set is a range of seeds the training never uses.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from earlytom_jax.errors import ConfigError

KINDS = ("colour", "count", "order", "motion", "scene")
LETTERS = "ABCD"
INSTRUCTION = "Answer with the option's letter from the given choices directly."

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 80, 235),
    "yellow": (230, 220, 40),
}
BACKGROUNDS = ((40, 40, 40), (90, 70, 50), (30, 60, 90), (70, 90, 60), (110, 110, 110), (60, 30, 70))
COUNTS = ("one", "two", "three", "four")
DIRECTIONS = ("left", "right", "up", "down")
QUARTERS = ("at the start", "before the middle", "after the middle", "at the end")
# change frame k (first frame of the new background) per quarter, with gaps between bins
_CHANGE_FRAMES = ((2, 3), (6, 7), (9, 10), (13, 14))

QUESTIONS = {
    "colour": "What colour is the square?",
    "count": "How many times does the screen flash?",
    "order": "Which colour of square appears first?",
    "motion": "Which way does the square move?",
    "scene": "When does the screen go dark?",
}


@dataclasses.dataclass(frozen=True)
class Sample:
    kind: str
    seed: int
    frames: np.ndarray  # uint8 [T, S, S, 3]
    question: str  # the question line only
    options: tuple[str, ...]  # four options, in display order
    answer: str  # "A".."D"
    meta: dict

    @property
    def prompt(self) -> str:
        """Question, lettered options and the instruction (the text after `<video>\\n`)."""
        lines = [self.question] + [f"{l}. {o}" for l, o in zip(LETTERS, self.options)]
        return "\n".join(lines + [INSTRUCTION])


def _canvas(bg, t: int, size: int) -> np.ndarray:
    img = np.empty((t, size, size, 3), np.float32)
    img[:] = np.asarray(bg, np.float32)
    return img


def _square(img, x: float, y: float, side: int, colour) -> None:
    size = img.shape[0]
    x0, y0 = int(round(x)), int(round(y))
    x0, y0 = min(max(x0, 0), size - side), min(max(y0, 0), size - side)
    img[y0 : y0 + side, x0 : x0 + side] = colour


def _finish(img, rng) -> np.ndarray:
    return np.clip(img + rng.normal(0.0, 3.0, img.shape), 0, 255).astype(np.uint8)


def _options(rng, answer: str, pool) -> tuple[tuple[str, ...], str]:
    """The four options of a question type, always in the same order (so a letter means one
    thing per type, which a model of a million parameters learns in minutes; shuffled
    options ask it to copy a letter from the prompt, which it learns far more slowly)."""
    options = tuple(pool)
    return options, LETTERS[options.index(answer)]


def _colour(rng, t, size):
    name = str(rng.choice(list(COLOURS)))
    img = _canvas(BACKGROUNDS[rng.integers(len(BACKGROUNDS))], t, size)
    side = int(rng.integers(10, 15))
    x, y = rng.uniform(0, size - side, 2)
    vx, vy = rng.uniform(-0.6, 0.6, 2)
    for i in range(t):
        _square(img[i], x + vx * i, y + vy * i, side, COLOURS[name])
    options, letter = _options(rng, name, list(COLOURS))
    return img, options, letter, {"colour": name}


def _count(rng, t, size):
    # at most 4 flashes, and no more than fit non-adjacent in 1..t-2 (clips of 9+ frames: the
    # draws the toy model was trained on; fewer frames would loop forever looking for room)
    n = int(rng.integers(1, min(4, (t - 1) // 2) + 1))
    # distinct, non-adjacent flash frames in 1..t-2
    while True:
        frames = np.sort(rng.choice(np.arange(1, t - 1), size=n, replace=False))
        if n == 1 or np.diff(frames).min() > 1:
            break
    img = _canvas(BACKGROUNDS[rng.integers(len(BACKGROUNDS))], t, size)
    colour = COLOURS[str(rng.choice(list(COLOURS)))]
    side = int(rng.integers(10, 15))
    x, y = rng.uniform(0, size - side, 2)
    for i in range(t):
        _square(img[i], x, y, side, colour)
    img[frames] = 235.0
    options, letter = _options(rng, COUNTS[n - 1], COUNTS)
    return img, options, letter, {"flash_frames": frames.tolist(), "count": n}


def _order(rng, t, size):
    first, second = (str(c) for c in rng.choice(list(COLOURS), size=2, replace=False))
    img = _canvas(BACKGROUNDS[rng.integers(len(BACKGROUNDS))], t, size)
    half = t // 2
    a0 = int(rng.integers(0, half - 3))
    a1 = int(rng.integers(a0 + 3, half + 1))
    b0 = int(rng.integers(max(a1, half - 1), t - 3))
    b1 = int(rng.integers(b0 + 3, t + 1))
    side = int(rng.integers(10, 15))
    pa, pb = rng.uniform(0, size - side, 2), rng.uniform(0, size - side, 2)
    for i in range(a0, a1):
        _square(img[i], *pa, side, COLOURS[first])
    for i in range(b0, b1):
        _square(img[i], *pb, side, COLOURS[second])
    options, letter = _options(rng, first, list(COLOURS))
    return img, options, letter, {"first": first, "second": second, "windows": [a0, a1, b0, b1]}


def _motion(rng, t, size):
    # from near the middle to an edge, where the square stays for the last third or more of
    # the clip, on one fixed background: "this token shows the square" is then a plain feature
    # of the token and the square's end cell is visible in many frames. With random
    # backgrounds and a square that only reached the edge at the last frame, seed 1 of the
    # 1 M-parameter model never learned this question in 6,500 steps (BENCHMARKS.md).
    d = int(rng.integers(4))
    img = _canvas(MOTION_BACKGROUND, t, size)
    colour = COLOURS[str(rng.choice(list(COLOURS)))]
    side = int(rng.integers(10, 13))
    cx, cy = (size - side) / 2 + rng.uniform(-3, 3, 2)
    speed = rng.uniform(1.7, 2.3) * 16 / t  # reaches the edge by about frame 11 of 16
    dx, dy = ((-1, 0), (1, 0), (0, -1), (0, 1))[d]
    for i in range(t):
        _square(img[i], cx + dx * speed * i, cy + dy * speed * i, side, colour)
    options, letter = _options(rng, DIRECTIONS[d], DIRECTIONS)
    return img, options, letter, {"direction": DIRECTIONS[d]}


MOTION_BACKGROUND = BACKGROUNDS[0]


def _scene(rng, t, size):
    # dark from frame k on: the quarter follows from how many frames are dark, which the
    # model reads as it counts flashes (a change between two random backgrounds needs the
    # order of the frames, which the 1 M-parameter model did not learn in 45 minutes)
    q = int(rng.integers(4))
    scale = t / 16
    k = int(round(rng.choice(_CHANGE_FRAMES[q]) * scale))
    img = _canvas(BACKGROUNDS[rng.integers(len(BACKGROUNDS))], t, size)
    colour = COLOURS[str(rng.choice(list(COLOURS)))]
    side = int(rng.integers(10, 15))
    x, y = rng.uniform(0, size - side, 2)
    for i in range(t):
        _square(img[i], x, y, side, colour)
    img[k:] *= DARK
    options, letter = _options(rng, QUARTERS[q], QUARTERS)
    return img, options, letter, {"change_frame": k, "quarter": QUARTERS[q]}


DARK = 0.2  # brightness of the frames after the screen goes dark


_MAKERS = {"colour": _colour, "count": _count, "order": _order, "motion": _motion, "scene": _scene}


MIN_FRAMES = 8  # the ordering clip needs two windows of 3+ frames, one in each half


def make_sample(kind: str, seed: int, num_frames: int = 16, size: int = 48) -> Sample:
    """One clip and its question; identical for identical (kind, seed, num_frames, size)."""
    if kind not in _MAKERS:
        raise ValueError(f"unknown question type {kind!r}; choose one of {', '.join(KINDS)}")
    if num_frames < MIN_FRAMES:
        raise ConfigError(f"the toy clips need at least {MIN_FRAMES} frames (--frames {num_frames}); "
                          "ask for more, or pass --video")
    rng = np.random.default_rng([KINDS.index(kind), seed])
    img, options, letter, meta = _MAKERS[kind](rng, num_frames, size)
    return Sample(kind, seed, _finish(img, rng), QUESTIONS[kind], tuple(options), letter, meta)


# Held-out questions use seeds from here on; training draws seeds below VALIDATION_START,
# and the training's own checks (when to stop) use the validation seeds in between.
HELD_OUT_START = 1_000_000_000
VALIDATION_START = 900_000_000


def held_out(kind: str, n: int, num_frames: int = 16, size: int = 48) -> list[Sample]:
    return [make_sample(kind, HELD_OUT_START + i, num_frames, size) for i in range(n)]


def validation(kind: str, n: int, num_frames: int = 16, size: int = 48) -> list[Sample]:
    return [make_sample(kind, VALIDATION_START + i, num_frames, size) for i in range(n)]


def vocabulary() -> list[str]:
    """Every word the prompts can hold (the toy tokenizer's plain vocabulary), sorted."""
    from earlytom_jax.prompt import QWEN_SYSTEM

    texts = [QWEN_SYSTEM, INSTRUCTION, "user", "assistant", "system", "video", *QUESTIONS.values(), *LETTERS,
             *COLOURS, *COUNTS, *DIRECTIONS, *QUARTERS]
    words: set[str] = set()
    for text in texts:
        words.update(_split(text))
    return sorted(words)


def _split(text: str) -> list[str]:
    """The toy tokenizer's pre-tokenization (tokenizers' `Whitespace`: \\w+|[^\\w\\s]+)."""
    import re

    return re.findall(r"\w+|[^\w\s]+", text)
