"""LongVideoBench validation set, video-only (lmms-eval task `longvideobench_val_v`), 1337 questions.

Layout (`longvideobench/LongVideoBench`, `videos.tar.part.*` concatenated and extracted)::

    DIR/validation-00000-of-00001.parquet   the questions as lmms-eval reads them (preferred)
    DIR/lvb_val.json                        the same questions as a JSON list (used if the
                                            parquet is absent)
    DIR/videos/<video_path>                 videos
    DIR/subtitles/, DIR/test-*.parquet, DIR/lvb_test_wo_gt.json   (not read)

Fields: id (str, the sample id), video_path (str, relative to videos/), question (str),
correct_choice (int, 0-based), duration_group (int: 15, 60, 600 or 3600), question_category
(str code such as "TOS"); options as `candidates` (list of 4-5 str, json) or `option0`..`option4`
(str, padded with "N/A"; parquet; a null is treated like "N/A"). video_id, duration,
level and topic_category are kept in `meta` when present; other fields are not read.

Prompt (the non-"N/A" options, lettered from A)::

    question + "\\n" + "\\n".join(f"{L}. {opt}") + "\\n"
    + "Answer with the option's letter from the given choices directly.\\n"

Parsing (`parse_answer`): strip; delete every occurrence (case-sensitive) of "The best answer
is", "The correct answer is", "The answer is", "The answer", "The best option is", "The correct
option is", "Best answer:", "Best option:"; then the first upper-case A-E anywhere, even inside
a word ("Answer: D" -> A, "Definitely E" -> D; "E" counts on a 4-option question and is
wrong). No such letter (or more than 10 words without one) -> a random letter among the
question's options (reported as drawn).

Metrics (fractions rounded to 5 decimals, random draws included): `overall` = correct / all,
and accuracy per `duration_group` and per `question_category`.
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
import string

from earlytom_jax.evals.tasks.base import (
    DataError, Sample, Task, check_unique, check_videos, data_root, field, read_json, read_parquet, str_list,
)

PARQUET = "validation-00000-of-00001.parquet"
JSON = "lvb_val.json"
POST_PROMPT = "Answer with the option's letter from the given choices directly.\n"
_META = ("video_id", "duration", "level", "topic_category")

_PREFIXES = ["The best answer is", "The correct answer is", "The answer is", "The answer",
             "The best option is", "The correct option is", "Best answer:", "Best option:"]
_LETTER = re.compile(r"[ABCDE]")


def build_context(question: str, options: list[str]) -> str:
    lines = "\n".join(f"{string.ascii_uppercase[i]}. {opt}" for i, opt in enumerate(options))
    return question + "\n" + lines + "\n" + POST_PROMPT


def parse_answer(output: str) -> str:
    """Letter "A".."E", or "" when none is found (the caller then draws at random)."""
    s = output.strip()
    for prefix in _PREFIXES:
        s = s.replace(prefix, "")
    m = _LETTER.search(s)  # covers the "more than 10 words and no letter" rule too
    return m.group(0) if m else ""


def _options(row: dict, where: str) -> list[str]:
    if "candidates" in row and row["candidates"] is not None:
        return str_list(row, "candidates", where, min_len=2)
    if "option0" not in row:
        raise DataError(f"{where}: neither 'candidates' nor 'option0'..'option4' present; "
                        "the annotation file does not match the LongVideoBench format")
    options = []
    for i in range(5):
        value = row.get(f"option{i}")
        if value is None or value == "N/A":
            continue
        if not isinstance(value, str):
            raise DataError(f"{where}: field 'option{i}' should be str, got {type(value).__name__}")
        options.append(value)
    if len(options) < 2:
        raise DataError(f"{where}: fewer than 2 options besides 'N/A'")
    return options


def _row_sample(root: str, row, where: str) -> Sample:
    options = _options(row, where)
    choice = field(row, "correct_choice", int, where)
    if not 0 <= choice < len(options):
        raise DataError(f"{where}: correct_choice {choice} is outside the {len(options)} options")
    group = field(row, "duration_group", int, where)
    letters = tuple(string.ascii_uppercase[: len(options)])
    meta = {"duration_group": group, "question_category": field(row, "question_category", str, where)}
    meta.update({k: row[k] for k in _META if row.get(k) is not None})
    return Sample(
        id=field(row, "id", str, where),
        video=os.path.join(root, "videos", field(row, "video_path", str, where)),
        context=build_context(field(row, "question", str, where), options),
        gold=letters[choice], letters=letters, meta=meta,
    )


@dataclasses.dataclass(frozen=True)
class LongVideoBench(Task):
    name: str = "longvideobench"
    max_new_tokens: int = 32

    def load(self, data_dir: str) -> list[Sample]:
        root = data_root(data_dir, self.name)
        parquet, js = os.path.join(root, PARQUET), os.path.join(root, JSON)
        if os.path.isfile(parquet):
            path, rows = parquet, read_parquet(parquet)
        elif os.path.isfile(js):
            path, rows = js, read_json(js)
            if not isinstance(rows, list):
                raise DataError(f"{js}: expected a JSON list of question rows, got {type(rows).__name__}")
        else:
            raise DataError(f"{parquet} not found (nor {JSON}); expected the LongVideoBench validation "
                            "questions of longvideobench/LongVideoBench")
        samples = [_row_sample(root, row, f"{path}: row {i}") for i, row in enumerate(rows)]
        check_unique(samples, path)
        check_videos(samples, "concatenate videos.tar.part.* of longvideobench/LongVideoBench and extract "
                              "it into <data>/videos/")
        return samples

    def parse(self, output: str, sample: Sample, rng: random.Random) -> tuple[str, bool]:
        letter = parse_answer(output)
        if letter:
            return letter, False
        return rng.choice(sample.letters), True

    def metrics(self, records: list[dict]) -> dict:
        """{"overall": acc, "duration_group": {"600": acc, ...}, "question_category": {"TOS": acc, ...}}."""
        def acc(rows):
            return round(sum(bool(r["correct"]) for r in rows) / len(rows), 5)

        by_group: dict[str, list[dict]] = {}
        by_category: dict[str, list[dict]] = {}
        for r in records:
            by_group.setdefault(str(r["meta"]["duration_group"]), []).append(r)
            by_category.setdefault(str(r["meta"]["question_category"]), []).append(r)
        groups = sorted(by_group, key=lambda g: (not g.isdigit(), int(g) if g.isdigit() else 0, g))
        return {
            "overall": acc(records) if records else 0.0,
            "duration_group": {g: acc(by_group[g]) for g in groups},
            "question_category": {c: acc(by_category[c]) for c in sorted(by_category)},
        }
