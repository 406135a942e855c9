"""EgoSchema: `egoschema` (full set, 5031 questions, unlabelled: writes a submission for the
EgoSchema server) and `egoschema_subset` (the 500 labelled questions, scored locally).

Layout (`lmms-lab/egoschema`, the video zips extracted in place)::

    DIR/GENERATION/test-00000-of-00001.parquet   full set (what lmms-eval's `egoschema` reads;
                                                 MC/test-00000-of-00001.parquet, same questions,
                                                 is used if GENERATION is absent)
    DIR/Subset/test-00000-of-00001.parquet       the labelled subset (`egoschema_subset`)
    DIR/videos/<video_idx>.mp4                   videos (also accepted: .MP4)
    DIR/MC_PPL/, DIR/*.zip, DIR/README.md        (not read)

Columns: question_idx (str uuid, the sample id), question (str), video_idx (str uuid),
option (list of 5 str prefixed "A. ".."E. "), answer (index "0".."4", str or int; used only in
the subset, ignored in the full set).

Prompt::

    question + "".join("\\n" + opt for opt in option)
    + "\\nAnswer with the option's letter from the given choices directly."

max_new_tokens: 1024, the harness default lmms-eval used (the EgoSchema yaml sets no limit);
the caller may cap it.

Parsing (`parse_answer`, MMMU style): strip `,` `.` `!` `?` `;` `:` `'` from both ends, one mark
after the other in that order; pad with a space on each side. Candidates, in this order over
A-E: every "(X)" present, every "X " (upper-case letter then space) present, every "X."
present. If there is none and the text has more than 5 words, every option whose full text
(with its "X. " prefix), lower-cased, occurs in the lower-cased text. One candidate -> its
letter; several -> the candidate whose last occurrence comes first (ties: the earlier found);
none -> a random letter among A-E (reported as drawn). So "A, B" -> B ("A," is no candidate),
"C is cooking, so the answer is A" -> C, "ABCDE" -> E, "b" -> random.

Metrics: subset `score` = correct / number of records (a fraction; random draws included).
Full set: no local score (`submitted` = number of records); `submission` gives
{video_idx: option index 0-4} for https://validation-server.onrender.com/api/upload/
(lmms-eval's vendored subset yaml also writes one; here only the full set does).
"""

from __future__ import annotations

import dataclasses
import os
import random

from earlytom_jax.evals.tasks.base import (
    DataError, Sample, Task, check_unique, check_videos, data_root, field, read_parquet, str_list,
)

LETTERS = ("A", "B", "C", "D", "E")
PARQUET = "test-00000-of-00001.parquet"
POST_PROMPT = "\nAnswer with the option's letter from the given choices directly."


def build_context(question: str, options: list[str]) -> str:
    return question + "".join("\n" + opt for opt in options) + POST_PROMPT


def parse_answer(output: str, options: list[str]) -> str:
    """Letter "A".."E", or "" when nothing is found (the caller then draws at random)."""
    text = output
    for mark in [",", ".", "!", "?", ";", ":", "'"]:
        text = text.strip(mark)
    text = " " + text + " "
    candidates = [f"({x})" for x in LETTERS if f"({x})" in text]
    candidates += [f"{x} " for x in LETTERS if f"{x} " in text]
    candidates += [f"{x}." for x in LETTERS if f"{x}." in text]
    by_content = False
    if not candidates and len(text.split()) > 5:
        low = text.lower()
        candidates = [x for x, opt in zip(LETTERS, options) if opt.strip().lower() in low]
        by_content = True
    if not candidates:
        return ""
    if by_content:
        low = text.lower()
        last = [low.rfind(options[LETTERS.index(c)].strip().lower()) for c in candidates]
    else:
        last = [text.rfind(c) for c in candidates]
    best = candidates[last.index(min(last))]
    return best.replace("(", "").replace(")", "").replace(".", "").strip()


@dataclasses.dataclass(frozen=True)
class EgoSchema(Task):
    name: str = "egoschema"
    max_new_tokens: int = 1024
    subset: bool = False

    def _annotations(self, root: str) -> str:
        if self.subset:
            path = os.path.join(root, "Subset", PARQUET)
            if not os.path.isfile(path):
                raise DataError(f"{path} not found; expected the 500 labelled EgoSchema questions "
                                "(Subset/ of lmms-lab/egoschema)")
            return path
        for config in ("GENERATION", "MC"):
            path = os.path.join(root, config, PARQUET)
            if os.path.isfile(path):
                return path
        raise DataError(f"{os.path.join(root, 'GENERATION', PARQUET)} not found (nor MC/{PARQUET}); expected "
                        "the 5031 EgoSchema questions (GENERATION/ of lmms-lab/egoschema)")

    def load(self, data_dir: str) -> list[Sample]:
        root = data_root(data_dir, self.name)
        path = self._annotations(root)
        samples = []
        for i, row in enumerate(read_parquet(path)):
            where = f"{path}: row {i}"
            options = str_list(row, "option", where, min_len=5)
            if len(options) != 5:
                raise DataError(f"{where}: field 'option' should hold 5 options, got {len(options)}")
            video_idx = field(row, "video_idx", str, where)
            gold = ""
            if self.subset:
                answer = str(field(row, "answer", (str, int), where)).strip()
                if answer not in ("0", "1", "2", "3", "4"):
                    raise DataError(f"{where}: answer {answer!r:.40} should be an option index 0-4")
                gold = LETTERS[int(answer)]
            video = os.path.join(root, "videos", video_idx + ".mp4")
            if not os.path.isfile(video) and os.path.isfile(video[:-4] + ".MP4"):
                video = video[:-4] + ".MP4"
            samples.append(Sample(
                id=field(row, "question_idx", str, where),
                video=video,
                context=build_context(field(row, "question", str, where), options),
                gold=gold, letters=LETTERS,
                meta={"video_idx": video_idx, "options": options},
            ))
        check_unique(samples, path)
        check_videos(samples, "extract videos_chunked_*.zip of lmms-lab/egoschema into <data>/videos/")
        return samples

    def parse(self, output: str, sample: Sample, rng: random.Random) -> tuple[str, bool]:
        letter = parse_answer(output, sample.meta["options"])
        if letter:
            return letter, False
        return rng.choice(sample.letters), True

    def metrics(self, records: list[dict]) -> dict:
        """Subset: {"score": fraction}; full set: {"submitted": n} (scored by the server)."""
        if not self.subset:
            return {"submitted": len(records)}
        correct = sum(bool(r["correct"]) for r in records)
        return {"score": correct / len(records) if records else 0.0}

    def submission(self, records: list[dict]) -> dict | None:
        """Full set: {video_idx: index 0-4 of the parsed letter (-1 if none)}; subset: None."""
        if self.subset:
            return None
        return {r["meta"]["video_idx"]: (LETTERS.index(r["parsed"]) if r["parsed"] in LETTERS else -1)
                for r in records}
