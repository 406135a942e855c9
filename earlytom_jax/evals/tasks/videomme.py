"""VideoMME without subtitles (lmms-eval task `videomme`): 900 videos x 3 questions.

Layout (`lmms-lab/Video-MME`, the video zips extracted in place)::

    DIR/videomme/test-00000-of-00001.parquet   the 2700 questions
    DIR/data/<videoID>.mp4                     videos (also accepted: .MP4, .mkv)
    DIR/subtitle/, DIR/*.zip, DIR/README.md    (not read)

Parquet columns (str unless noted): video_id ("001"), duration (short/medium/long), domain,
sub_category, url, videoID (file name stem), question_id ("001-1", the sample id), task_type,
question, options (list of 4 str already prefixed "A. ".."D. "), answer ("A".."D").
domain, sub_category and task_type must be among lmms-eval's fixed lists (DOMAINS,
SUB_CATEGORIES, TASK_TYPES); lmms-eval fails on any other value, so loading refuses it.

Prompt (the text mentions subtitles although none are given; blank line before the last
sentence)::

    "Select the best answer to the following multiple-choice question based on the video and
    the subtitles. Respond with only the letter (A, B, C, or D) of the correct option."
    + "\\n" + question + "\\n" + "\\n".join(options) + "\\n"
    + "\\nAnswer with the option's letter from the given choices directly."

Parsing (`parse_answer`): strip; delete every occurrence (case-sensitive) of "The best answer
is", "The correct answer is", "The answer is", "The answer", and of the two glued strings
"The best option isThe correct option is" and "Best answer:Best option:" (missing commas in
lmms-eval's list: "Best answer:" alone is NOT removed); if more than 10 words remain and none
of A-D occurs -> ""; else the first upper-case A, B, C or D anywhere, even inside a word
("Answer: C" -> A, "Definitely B" -> D); none -> "" (wrong). Lower-case letters never count,
there is no `</think>` handling and no random fallback.

Metrics (percent): `overall` = 100 * correct / all samples (an empty parse is wrong), unrounded
as lmms-eval returns it; per `duration`, `domain`, `sub_category` and `task_type` as lmms-eval
logs them (rounded to 0.1; a group collects the samples whose key
"{duration}_{domain}_{sub_category}_{task_type}" contains its name as a substring). Groups
without samples are left out.
"""

from __future__ import annotations

import dataclasses
import os
import random
import re

from earlytom_jax.evals.tasks.base import (
    DataError, Sample, Task, check_unique, check_videos, data_root, field, read_parquet, require_file, str_list,
)

ANNOTATIONS = os.path.join("videomme", "test-00000-of-00001.parquet")
VIDEO_EXTENSIONS = (".mp4", ".MP4", ".mkv")

DURATIONS = ["short", "medium", "long"]
DOMAINS = ["Knowledge", "Film & Television", "Sports Competition", "Artistic Performance", "Life Record",
           "Multilingual"]
SUB_CATEGORIES = [
    "Humanity & History", "Literature & Art", "Biology & Medicine", "Finance & Commerce", "Astronomy", "Geography",
    "Law", "Life Tip", "Technology", "Animation", "Movie & TV Show", "Documentary", "News Report", "Esports",
    "Basketball", "Football", "Athletics", "Other Sports", "Stage Play", "Magic Show", "Variety Show", "Acrobatics",
    "Handicraft", "Food", "Fashion", "Daily Life", "Travel", "Pet & Animal", "Exercise", "Multilingual",
]
TASK_TYPES = [
    "Temporal Perception", "Spatial Perception", "Attribute Perception", "Action Recognition", "Object Recognition",
    "OCR Problems", "Counting Problem", "Temporal Reasoning", "Spatial Reasoning", "Action Reasoning",
    "Object Reasoning", "Information Synopsis",
]

INSTRUCTION = ("Select the best answer to the following multiple-choice question based on the video and the "
               "subtitles. Respond with only the letter (A, B, C, or D) of the correct option.")
POST_PROMPT = "\nAnswer with the option's letter from the given choices directly."

# two pairs are glued together: lmms-eval's list lacks the commas between them
_PREFIXES = ["The best answer is", "The correct answer is", "The answer is", "The answer",
             "The best option isThe correct option is", "Best answer:Best option:"]
_LETTER = re.compile(r"[ABCD]")


def build_context(question: str, options: list[str]) -> str:
    return INSTRUCTION + "\n" + question + "\n" + "\n".join(options) + "\n" + POST_PROMPT


def parse_answer(output: str) -> str:
    """Letter "A".."D" or "" (see the module docstring)."""
    s = output.strip()
    for prefix in _PREFIXES:
        s = s.replace(prefix, "")
    m = _LETTER.search(s)
    if m is None:  # includes the "more than 10 words and no letter" rule
        return ""
    return m.group(0)


def _video_path(root: str, video_id: str) -> str:
    base = os.path.join(root, "data", video_id)
    for ext in VIDEO_EXTENSIONS:
        if os.path.isfile(base + ext):
            return base + ext
    return base + ".mp4"


def _one_of(row: dict, name: str, allowed: list[str], where: str) -> str:
    value = field(row, name, str, where)
    if value not in allowed:
        raise DataError(f"{where}: {name} {value!r} is not one of lmms-eval's {len(allowed)} values; "
                        "the annotation file is not the Video-MME release lmms-eval reads")
    return value


@dataclasses.dataclass(frozen=True)
class VideoMME(Task):
    name: str = "videomme"
    max_new_tokens: int = 16

    def load(self, data_dir: str) -> list[Sample]:
        root = data_root(data_dir, self.name)
        path = require_file(os.path.join(root, ANNOTATIONS),
                            "the Video-MME questions (videomme/test-00000-of-00001.parquet of lmms-lab/Video-MME)")
        samples = []
        for i, row in enumerate(read_parquet(path)):
            where = f"{path}: row {i}"
            options = str_list(row, "options", where, min_len=4)
            answer = field(row, "answer", str, where)
            letters = ("A", "B", "C", "D")
            if answer not in letters:
                raise DataError(f"{where}: answer {answer!r:.40} should be one of A, B, C, D")
            meta = {
                "duration": _one_of(row, "duration", DURATIONS, where),
                "domain": _one_of(row, "domain", DOMAINS, where),
                "sub_category": _one_of(row, "sub_category", SUB_CATEGORIES, where),
                "task_type": _one_of(row, "task_type", TASK_TYPES, where),
                "video_id": field(row, "video_id", str, where),
                "videoID": field(row, "videoID", str, where),
            }
            samples.append(Sample(
                id=field(row, "question_id", str, where),
                video=_video_path(root, meta["videoID"]),
                context=build_context(field(row, "question", str, where), options),
                gold=answer, letters=letters, meta=meta,
            ))
        check_unique(samples, path)
        check_videos(samples, "extract videos_chunked_*.zip of lmms-lab/Video-MME into <data>/data/")
        return samples

    def parse(self, output: str, sample: Sample, rng: random.Random) -> tuple[str, bool]:
        return parse_answer(output), False

    def metrics(self, records: list[dict]) -> dict:
        """{"overall": %, "duration": {..}, "domain": {..}, "sub_category": {..}, "task_type": {..}}."""
        per_key: dict[str, list[int]] = {}
        for r in records:
            m = r["meta"]
            c = per_key.setdefault(f"{m['duration']}_{m['domain']}_{m['sub_category']}_{m['task_type']}", [0, 0])
            c[0] += bool(r["correct"])
            c[1] += 1

        def groups(names: list[str]) -> dict:
            out = {}
            for name in names:
                hits = [c for key, c in per_key.items() if name in key]
                n = sum(c[1] for c in hits)
                if n:
                    out[name] = round(100.0 * sum(c[0] for c in hits) / n, 1)
            return out

        n = sum(c[1] for c in per_key.values())
        overall = 100.0 * sum(c[0] for c in per_key.values()) / n if n else 0.0
        return {"overall": overall, "duration": groups(DURATIONS), "domain": groups(DOMAINS),
                "sub_category": groups(SUB_CATEGORIES), "task_type": groups(TASK_TYPES)}
