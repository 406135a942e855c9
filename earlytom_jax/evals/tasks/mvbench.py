"""MVBench (lmms-eval group `mvbench`): 20 subtasks of 200 questions, scored per subtask.

Layout (`OpenGVLab/MVBench`, revision `video`, videos extracted in place)::

    DIR/json/<subtask>.json      JSON list of rows, one file per subtask (all 20 required)
    DIR/<folder>/<video>         the video of a row; folder per subtask (SUBTASK_FOLDERS):
        star/Charades_segment          action_sequence, action_prediction, object_interaction
        sta/sta_video_segment          action_localization
        tvqa/video_fps3_hq_segment     episodic_reasoning
        ssv2_video_mp4                 action_antonym
        Moments_in_Time_Raw/videos     fine_grained_action
        FunQA_test/test                unexpected_action
        clevrer/video_validation       object_existence, moving_direction, moving_count,
                                       moving_attribute, counterfactual_inference
        perception/videos              object_shuffle, action_count, state_change, character_order
        scene_qa/video                 scene_transition
        nturgbd_convert                fine_grained_pose
        vlnqa                          egocentric_navigation
    DIR/README.md, DIR/test.json  (not read)

Row fields: `video` (str, relative to the subtask folder; accepted with or without `.mp4`,
or naming a directory of .jpg/.png frames), `question` (str), `candidates` (list of 2-5 str),
`answer` (str equal to one candidate's text). `start`/`end` (some subtasks) refer to the
original long videos, not to the shipped segments, and are ignored as lmms-eval ignores them:
32 frames are sampled over the whole segment file. Gold = letter of the first candidate equal
to `answer`. Sample ids: "<subtask>/<row index>".

Prompt (all subtasks)::

    "Question:" + question + "\\nOption:\\n" + "".join(f"({L}) {c}\\n" for each candidate)
    + "Only give the best option.\\n"

Parsing (`parse_answer`): the output is cut after the last `</think>` and stripped. Then
(1) if it matches `^([A-E])\\.\\s*(.+)$` (case-insensitive) that letter wins; (2) else newlines
and tabs become spaces, then a punctuation pass over ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !``
deletes each mark if it has a space on either side somewhere in the text (or the text holds
`digit,digit`), otherwise turns it into a space; every `.` not followed by a digit is deleted
(at most 32); quotes, parentheses and spaces are stripped from the ends, the text lower-cased;
the first standalone letter a-e wins (so "A dog..." -> A, "e.g. ..." -> E, "B or C" -> B).
No letter -> "" (wrong). There is no random fallback.

Metric: per subtask 100 * correct / answered, where a sample counts as answered only if its
output (after the `</think>` cut) is not empty: an empty output leaves the denominator instead
of counting as wrong (a subtask with nothing answered scores 0). `mean` = the unweighted mean
of the subtask accuracies (the paper's MVBench number; over the subtasks present in the
records, i.e. all 20 on a full run). Accuracies are in percent, unrounded.
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
import string

from earlytom_jax.evals.tasks.base import (
    DataError, Sample, Task, check_unique, check_videos, data_root, field, read_json, require_file, str_list,
)

# in the order of lmms-eval's `mvbench` group
SUBTASK_FOLDERS: dict[str, str] = {
    "action_sequence": "star/Charades_segment",
    "moving_count": "clevrer/video_validation",
    "action_prediction": "star/Charades_segment",
    "episodic_reasoning": "tvqa/video_fps3_hq_segment",
    "action_antonym": "ssv2_video_mp4",
    "action_count": "perception/videos",
    "scene_transition": "scene_qa/video",
    "object_shuffle": "perception/videos",
    "object_existence": "clevrer/video_validation",
    "fine_grained_pose": "nturgbd_convert",
    "unexpected_action": "FunQA_test/test",
    "moving_direction": "clevrer/video_validation",
    "state_change": "perception/videos",
    "object_interaction": "star/Charades_segment",
    "character_order": "perception/videos",
    "action_localization": "sta/sta_video_segment",
    "counterfactual_inference": "clevrer/video_validation",
    "fine_grained_action": "Moments_in_Time_Raw/videos",
    "moving_attribute": "clevrer/video_validation",
    "egocentric_navigation": "vlnqa",
}

POST_PROMPT = "Only give the best option.\n"

_OPTION = re.compile(r"^([A-E])\.\s*(.+)$", re.IGNORECASE)
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"\.(?!\d)")
_LETTER = re.compile(r"\b([A-E])\b", re.IGNORECASE)


def build_context(question: str, candidates: list[str]) -> str:
    options = "".join(f"({string.ascii_uppercase[i]}) {c}\n" for i, c in enumerate(candidates))
    return "Question:" + question + "\nOption:\n" + options + POST_PROMPT


def prediction(output: str) -> str:
    """The text that is scored: after the last `</think>`, stripped ("" = not answered)."""
    return output.split("</think>")[-1].strip()


def _punctuation(text: str) -> str:
    out = text
    glued_numbers = _DIGIT_COMMA.search(text) is not None
    for p in _PUNCT:
        # the test looks at the text as it was before the pass, not at `out`
        if p + " " in text or " " + p in text or glued_numbers:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # lmms-eval passes re.UNICODE (= 32) as `count`, so only the first 32 periods go
    return _PERIOD.sub("", out, count=32)


def process(text: str) -> str:
    """MVBench's normalisation: an upper-case letter "A".."E", else the processed lower-case text."""
    m = _OPTION.match(text.strip())
    if m:
        return m.group(1).upper()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    text = _punctuation(text)
    text = text.strip("'").strip('"').strip(")").strip("(").strip().lower()
    m = _LETTER.search(text)
    return m.group(1).upper() if m else text


def parse_answer(output: str) -> str:
    """Option letter "A".."E" found in a raw model output, or "" (see the module docstring)."""
    parsed = process(prediction(output))
    return parsed if len(parsed) == 1 and parsed in "ABCDE" else ""


def _row_sample(root: str, subtask: str, index: int, row, where: str) -> Sample:
    video = field(row, "video", str, where)
    question = field(row, "question", str, where)
    candidates = str_list(row, "candidates", where, min_len=2)
    answer = field(row, "answer", str, where)
    if len(candidates) > 26:
        raise DataError(f"{where}: {len(candidates)} candidates; at most 26 can be lettered")
    if answer not in candidates:
        raise DataError(f"{where}: answer {answer!r:.60} is not one of the candidates; the row is malformed")
    folder = os.path.join(root, SUBTASK_FOLDERS[subtask])
    path = os.path.join(folder, video)
    if not os.path.exists(path) and not video.lower().endswith(".mp4") and os.path.exists(path + ".mp4"):
        path += ".mp4"
    letters = tuple(string.ascii_uppercase[: len(candidates)])
    return Sample(
        id=f"{subtask}/{index}",
        video=path,
        context=build_context(question, candidates),
        gold=letters[candidates.index(answer)],
        letters=letters,
        meta={"subtask": subtask, "video": video, "candidates": candidates, "answer": answer},
    )


@dataclasses.dataclass(frozen=True)
class MVBench(Task):
    name: str = "mvbench"
    max_new_tokens: int = 16

    def load(self, data_dir: str) -> list[Sample]:
        root = data_root(data_dir, self.name)
        files = {s: os.path.join(root, "json", f"{s}.json") for s in SUBTASK_FOLDERS}
        absent = [p for p in files.values() if not os.path.isfile(p)]
        if absent:
            require_file(absent[0], f"MVBench annotations json/<subtask>.json for all 20 subtasks "
                                    f"({len(absent)} of 20 missing); download OpenGVLab/MVBench (revision 'video')")
        samples: list[Sample] = []
        for subtask, path in files.items():
            rows = read_json(path)
            if not isinstance(rows, list):
                raise DataError(f"{path}: expected a JSON list of question rows, got {type(rows).__name__}")
            for i, row in enumerate(rows):
                samples.append(_row_sample(root, subtask, i, row, f"{path}: row {i}"))
        check_unique(samples, os.path.join(root, "json"))
        check_videos(samples, "extract the MVBench video archives into the subtask folders under the data directory")
        return samples

    def parse(self, output: str, sample: Sample, rng: random.Random) -> tuple[str, bool]:
        return parse_answer(output), False

    def metrics(self, records: list[dict]) -> dict:
        """{"mean": %, "subtask": {name: %}} (see the module docstring for the denominator)."""
        counts: dict[str, list[int]] = {}
        for r in records:
            c = counts.setdefault(r["meta"]["subtask"], [0, 0])
            if prediction(r["answer"]) != "":
                c[1] += 1
                c[0] += bool(r["correct"])
        order = [s for s in SUBTASK_FOLDERS if s in counts] + sorted(set(counts) - set(SUBTASK_FOLDERS))
        acc = {s: (100.0 * counts[s][0] / counts[s][1] if counts[s][1] else 0.0) for s in order}
        mean = sum(acc.values()) / len(acc) if acc else 0.0
        return {"mean": mean, "subtask": acc}
