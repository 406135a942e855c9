"""Benchmark task data layers: prompts, answer parsing (every tricky answer of the reference
tables), metrics on hand-made records, fixture round trips and the loaders' errors."""

from __future__ import annotations

import json
import os
import random
import shutil

import numpy as np
import pytest
from PIL import Image

from earlytom_jax.errors import ConfigError
from earlytom_jax.evals.fixtures import write_fixture
from earlytom_jax.evals.tasks import TASKS, DataError, Sample, get_task
from earlytom_jax.evals.tasks import egoschema as ego
from earlytom_jax.evals.tasks import longvideobench as lvb
from earlytom_jax.evals.tasks import mvbench as mvb
from earlytom_jax.evals.tasks import videomme as vmme
from earlytom_jax.video import VideoError, load_frame_dir, load_video

POST = "Answer with the option's letter from the given choices directly."


def _sample(letters=("A", "B", "C", "D"), gold="A", **meta) -> Sample:
    return Sample(id="q", video="/v.mp4", context="", gold=gold, letters=tuple(letters), meta=meta)


def _rec(correct, answer="A", parsed="A", gold="A", drawn=False, **meta) -> dict:
    return {"id": "x", "answer": answer, "parsed": parsed, "gold": gold, "correct": correct, "random": drawn,
            "meta": meta}


# --------------------------------------------------------------------------------------------
# registry


def test_registry_names_and_token_limits():
    assert {k: (t.name, t.max_new_tokens) for k, t in TASKS.items()} == {
        "mvbench": ("mvbench", 16), "videomme": ("videomme", 16), "egoschema": ("egoschema", 1024),
        "egoschema_subset": ("egoschema_subset", 1024), "longvideobench": ("longvideobench", 32)}
    assert get_task("videomme") is TASKS["videomme"]
    with pytest.raises(ConfigError, match="'mmbench'.*mvbench, videomme, egoschema, egoschema_subset, longvideobench"):
        get_task("mmbench")


# --------------------------------------------------------------------------------------------
# MVBench


def test_mvbench_prompt():
    ctx = mvb.build_context("What happened after the person took the food?",
                            ["Ate the medicine.", "Tidied up the blanket.", "Put down the cup/glass/bottle.",
                             "Took the box."])
    assert ctx == ("Question:What happened after the person took the food?\nOption:\n(A) Ate the medicine.\n"
                   "(B) Tidied up the blanket.\n(C) Put down the cup/glass/bottle.\n(D) Took the box.\n"
                   "Only give the best option.\n")


@pytest.mark.parametrize("answer,parsed", [
    ("A", "A"), ("b", "B"), ("C.", "C"), ("D)", "D"), ("a. lowercase option text", "A"),
    ("<think>Maybe A</think>C", "C"), ("None of the above", ""), ("1,000 people; C", "C"),
    ("The answer is (B)", "B"), ("Best option:(A)", "A"), ("A dog is running.", "A"), ("e.g. the first one", "E"),
    ("C\nD", "C"), ("<think>B</think>", ""), ("Put down the cup/glass/bottle.", ""), ("F", ""),
    # from the spec's list of consequences
    ("The person took a cup", "A"), ("B or C", "B"), ("G. none", ""),
])
def test_mvbench_parsing_table(answer, parsed):
    task = get_task("mvbench")
    assert task.parse(answer, _sample(gold="C"), random.Random(0)) == (parsed, False)
    assert task.correct(parsed, _sample(gold="C")) == (parsed == "C")


def test_mvbench_punctuation_pass():
    # lmms-eval deletes at most 32 periods (re.UNICODE passed as the count)
    assert mvb.process("." * 33 + "x") == ".x"
    assert mvb.process("1.5 apples") == "1.5 apples"  # a period before a digit stays
    # a mark with a space beside it anywhere is deleted everywhere, otherwise it becomes a space
    assert mvb.process("x/y / z") == "xy  z"
    assert mvb.process("x/y") == "x y"
    # the test reads the text as it was before the pass: "/" -> " " does not make "(" deletable
    assert mvb.process("x/(y") == "x  y"


def test_mvbench_metrics_drop_empty_answers_and_average_subtasks():
    recs = [
        _rec(True, subtask="action_count"), _rec(False, answer="B", subtask="action_count"),
        _rec(False, answer="", parsed="", subtask="action_count"),  # empty: not in the denominator
        _rec(False, answer="<think>A</think>  ", parsed="", subtask="action_count"),  # empty after </think>
        _rec(False, answer="None of the above", parsed="", subtask="action_count"),  # answered, wrong
        _rec(True, subtask="scene_transition"),
        _rec(False, answer="", parsed="", subtask="state_change"),  # nothing answered: 0
    ]
    m = get_task("mvbench").metrics(recs)
    assert m["subtask"] == {"action_count": pytest.approx(100 / 3), "scene_transition": 100.0, "state_change": 0.0}
    assert m["mean"] == pytest.approx((100 / 3 + 100 + 0) / 3)
    assert list(m["subtask"]) == ["action_count", "scene_transition", "state_change"]  # lmms-eval group order


# --------------------------------------------------------------------------------------------
# VideoMME


def test_videomme_prompt():
    ctx = vmme.build_context(
        "When demonstrating the Germany modern Christmas tree is initially decorated with apples, candles and "
        "berries, which kind of the decoration has the largest number?",
        ["A. Apples.", "B. Candles.", "C. Berries.", "D. The three kinds are of the same number."])
    assert ctx == (
        "Select the best answer to the following multiple-choice question based on the video and the subtitles. "
        "Respond with only the letter (A, B, C, or D) of the correct option.\n"
        "When demonstrating the Germany modern Christmas tree is initially decorated with apples, candles and "
        "berries, which kind of the decoration has the largest number?\n"
        "A. Apples.\nB. Candles.\nC. Berries.\nD. The three kinds are of the same number.\n"
        "\nAnswer with the option's letter from the given choices directly.")


@pytest.mark.parametrize("answer,parsed", [
    ("C", "C"), ("(C)", "C"), ("C.", "C"), ("The answer is C", "C"), ("Answer: C", "A"),
    ("Best answer: C", "B"), ("Definitely B", "D"), ("The correct option is B", "B"),
    ("d", ""), ("(d)", ""), ("the answer is c", ""), ("Based on the video, C", "B"), ("Correct option: D", "C"),
    ("E", ""), ("<think>B</think>", "B"),
    # the glued prefixes are removed only as glued strings
    ("Best answer:Best option:A", "A"), ("Best option: C", "B"),
])
def test_videomme_parsing_table(answer, parsed):
    task = get_task("videomme")
    assert task.parse(answer, _sample(gold="C"), random.Random(0)) == (parsed, False)
    assert task.correct(parsed, _sample(gold="C")) == (parsed == "C")


def test_videomme_metrics():
    def r(ok, duration, domain="Knowledge", sub="Law", tt="OCR Problems"):
        return _rec(ok, duration=duration, domain=domain, sub_category=sub, task_type=tt)

    recs = [r(True, "short"), r(False, "short", tt="Counting Problem"), r(True, "long"),
            r(False, "long", domain="Multilingual", sub="Multilingual"),
            # lmms-eval groups by substring of "{duration}_{domain}_{sub_category}_{task_type}": a
            # Multilingual-domain row counts for the "Multilingual" sub-category whatever its own
            r(True, "medium", domain="Multilingual", sub="Travel")]
    m = get_task("videomme").metrics(recs)
    assert m["overall"] == pytest.approx(60.0)
    assert m["duration"] == {"short": 50.0, "medium": 100.0, "long": 50.0}
    assert m["domain"] == {"Knowledge": 66.7, "Multilingual": 50.0}
    assert m["sub_category"] == {"Law": 66.7, "Travel": 100.0, "Multilingual": 50.0}
    assert m["task_type"] == {"OCR Problems": 75.0, "Counting Problem": 0.0}


# --------------------------------------------------------------------------------------------
# EgoSchema

EGO_OPTIONS = ["A. C is cooking.", "B. C is doing laundry.", "C. C is cleaning the kitchen.",
               "D. C is cleaning dishes.", "E. C is cleaning the bathroom."]


def test_egoschema_prompt():
    q = ("Taking into account all the actions performed by c, what can you deduce about the primary objective and "
         "focus within the video content?")
    assert ego.build_context(q, EGO_OPTIONS) == (
        q + "\nA. C is cooking.\nB. C is doing laundry.\nC. C is cleaning the kitchen.\nD. C is cleaning dishes."
        "\nE. C is cleaning the bathroom.\nAnswer with the option's letter from the given choices directly.")


@pytest.mark.parametrize("answer,parsed", [
    ("A", "A"), ("(A)", "A"), ("A.", "A"), ("Answer: D", "D"), ("C is cooking, so the answer is A", "C"),
    ("The correct answer is option D. C is cleaning dishes.", "D"),
    ("so i think it is c. c is cleaning the kitchen. right", "C"),
    ("C is cooking.", "C"), ("A, B", "B"), ("ABCDE", "E"),
    ("d", None), ("b.", None), ("I think it is b", None),
    ("The person is cleaning dishes in the kitchen sink area", None),
])
def test_egoschema_parsing_table(answer, parsed):
    """None = no letter found: a letter drawn with the sample's own generator."""
    task = get_task("egoschema_subset")
    s = _sample(letters=ego.LETTERS, gold="C", options=EGO_OPTIONS)
    if parsed is None:
        letter, drawn = task.parse(answer, s, random.Random("egoschema_subset:q"))
        assert drawn and letter == random.Random("egoschema_subset:q").choice(ego.LETTERS)
    else:
        assert task.parse(answer, s, random.Random(0)) == (parsed, False)
        assert task.correct(parsed, s) == (parsed == "C")


def test_egoschema_metrics_and_submission():
    recs = [_rec(True, parsed="A", video_idx="v1"), _rec(False, parsed="E", video_idx="v2"),
            _rec(True, parsed="B", drawn=True, video_idx="v3"), _rec(False, parsed="", video_idx="v4")]
    assert get_task("egoschema_subset").metrics(recs) == {"score": 0.5}  # random draws count
    assert get_task("egoschema_subset").submission(recs) is None
    full = [dict(r, correct=None, gold="") for r in recs]
    assert get_task("egoschema").submission(full) == {"v1": 0, "v2": 4, "v3": 1, "v4": -1}
    assert get_task("egoschema").metrics(full) == {"submitted": 4}
    assert get_task("egoschema").correct("A", _sample(gold="")) is None


# --------------------------------------------------------------------------------------------
# LongVideoBench


def test_longvideobench_prompt():
    ctx = lvb.build_context("In the video, which subtitles appear at the same time as the man in a suit?",
                            ["hello", "good night", "see you", "thanks"])
    assert ctx == ("In the video, which subtitles appear at the same time as the man in a suit?\n"
                   "A. hello\nB. good night\nC. see you\nD. thanks\n"
                   "Answer with the option's letter from the given choices directly.\n")


@pytest.mark.parametrize("answer,parsed", [
    ("C", "C"), ("(C)", "C"), ("C.", "C"), ("The correct option is D", "D"), ("Based on the subtitles, C", "B"),
    ("Explanation: the answer is B", "E"), ("D. A book", "D"), ("Answer: D", "A"), ("Definitely E", "D"),
    ("It is not A, it is B", "A"), ("E", "E"),
    ("d", None), ("(e)", None), ("the answer is b", None),
])
def test_longvideobench_parsing_table(answer, parsed):
    """4-option question, gold C; None = random draw among the question's own letters."""
    task = get_task("longvideobench")
    s = _sample(gold="C")
    if parsed is None:
        letter, drawn = task.parse(answer, s, random.Random("longvideobench:q"))
        assert drawn and letter == random.Random("longvideobench:q").choice("ABCD")
    else:
        assert task.parse(answer, s, random.Random(0)) == (parsed, False)
        assert task.correct(parsed, s) == (parsed == "C")  # "E" on 4 options: always wrong


def test_longvideobench_random_draws_stay_within_the_options():
    task = get_task("longvideobench")
    draws = {task.parse("no idea", _sample(), random.Random(i))[0] for i in range(200)}
    assert draws == {"A", "B", "C", "D"}


def test_longvideobench_metrics():
    recs = [_rec(True, duration_group=15, question_category="TOS"),
            _rec(False, duration_group=15, question_category="S2E"),
            _rec(True, duration_group=600, question_category="TOS", drawn=True)]
    assert get_task("longvideobench").metrics(recs) == {
        "overall": 0.66667, "duration_group": {"15": 0.5, "600": 1.0}, "question_category": {"S2E": 0.0, "TOS": 1.0}}


# --------------------------------------------------------------------------------------------
# fixtures and loaders

COUNTS = {"mvbench": 40, "videomme": 18, "egoschema": 20, "egoschema_subset": 10, "longvideobench": 8}
PROMPT_ENDS = {"mvbench": "\nOnly give the best option.\n", "videomme": "\n\n" + POST,
               "egoschema": "\n" + POST, "egoschema_subset": "\n" + POST, "longvideobench": "\n" + POST + "\n"}


@pytest.mark.parametrize("name", list(TASKS))
def test_fixture_round_trip(tmp_path, name):
    task = get_task(name)
    root = write_fixture(name, str(tmp_path / name), per_group=2, frames=6, size=32)
    samples = task.load(root)
    assert len(samples) == COUNTS[name]
    assert len({s.id for s in samples}) == len(samples)
    assert [s.id for s in task.load(root)] == [s.id for s in samples]  # deterministic order
    for s in samples:
        assert os.path.isabs(s.video) and os.path.isfile(s.video) and s.video.startswith(root)
        assert s.context.endswith(PROMPT_ENDS[name])
        assert all(f"{x}. " in s.context or f"({x}) " in s.context for x in s.letters)
        assert s.gold in s.letters if name != "egoschema" else s.gold == ""
        assert json.loads(json.dumps(s.meta)) == s.meta
    vf = load_video(samples[-1].video, 4)
    assert vf.frames.shape == (4, 32, 32, 3) and vf.total_frames == 6


def test_fixture_groups(tmp_path):
    mv = get_task("mvbench").load(write_fixture("mvbench", str(tmp_path / "m"), per_group=1))
    assert [s.meta["subtask"] for s in mv] == list(mvb.SUBTASK_FOLDERS)
    assert {len(s.letters) for s in mv} == {3, 4, 5}
    vm = get_task("videomme").load(write_fixture("videomme", str(tmp_path / "v"), per_group=1))
    assert [s.meta["duration"] for s in vm] == ["short"] * 3 + ["medium"] * 3 + ["long"] * 3
    ego_dir = write_fixture("egoschema", str(tmp_path / "e"), per_group=1)
    subset, full = get_task("egoschema_subset").load(ego_dir), get_task("egoschema").load(ego_dir)
    assert [s.gold for s in subset] == list("ABCDE") and {s.id for s in subset} < {s.id for s in full}
    lv = get_task("longvideobench").load(write_fixture("longvideobench", str(tmp_path / "l"), per_group=1))
    assert [s.meta["duration_group"] for s in lv] == [15, 60, 600, 3600]
    assert [len(s.letters) for s in lv] == [4, 5, 4, 5]


def test_fixture_unknown_task(tmp_path):
    with pytest.raises(ConfigError, match="no fixture for task 'nope'"):
        write_fixture("nope", str(tmp_path))


ANNOTATION = {
    "mvbench": os.path.join("json", "action_count.json"),
    "videomme": vmme.ANNOTATIONS,
    "egoschema_subset": os.path.join("Subset", ego.PARQUET),
}


@pytest.mark.parametrize("name", list(ANNOTATION))
def test_missing_annotation_file_names_the_path(tmp_path, name):
    root = write_fixture(name, str(tmp_path / name), per_group=1)
    os.remove(os.path.join(root, ANNOTATION[name]))
    with pytest.raises(DataError, match="not found; expected") as e:
        get_task(name).load(root)
    assert os.path.join(root, ANNOTATION[name]) in str(e.value)


def test_missing_annotation_egoschema_full_and_longvideobench(tmp_path):
    root = write_fixture("egoschema", str(tmp_path / "e"), per_group=1)
    shutil.rmtree(os.path.join(root, "GENERATION"))
    assert len(get_task("egoschema").load(root)) == 10  # MC/ holds the same questions
    shutil.rmtree(os.path.join(root, "MC"))
    with pytest.raises(DataError, match="GENERATION") as e:
        get_task("egoschema").load(root)
    assert os.path.join(root, "GENERATION", ego.PARQUET) in str(e.value)
    root = write_fixture("longvideobench", str(tmp_path / "l"), per_group=1)
    os.remove(os.path.join(root, lvb.PARQUET))
    os.remove(os.path.join(root, lvb.JSON))
    with pytest.raises(DataError, match="lvb_val.json") as e:
        get_task("longvideobench").load(root)
    assert os.path.join(root, lvb.PARQUET) in str(e.value)
    with pytest.raises(DataError, match="data directory for longvideobench not found"):
        get_task("longvideobench").load(str(tmp_path / "absent"))


@pytest.mark.parametrize("name", list(TASKS))
def test_missing_videos_are_counted_and_the_first_named(tmp_path, name):
    root = write_fixture(name, str(tmp_path / name), per_group=1)
    samples = get_task(name).load(root)
    for s in (samples[-1], samples[1]):
        os.remove(s.video)
    with pytest.raises(DataError, match=r"\(2 of \d+ videos missing\)") as e:
        get_task(name).load(root)
    assert str(e.value).startswith(samples[1].video + " not found")


def test_videomme_accepts_upper_case_mp4_and_mkv(tmp_path):
    root = write_fixture("videomme", str(tmp_path), per_group=1)
    samples = get_task("videomme").load(root)
    for s, ext in ((samples[0], ".MP4"), (samples[3], ".mkv")):
        os.rename(s.video, s.video[:-4] + ext)
    got = get_task("videomme").load(root)
    assert got[0].video == samples[0].video[:-4] + ".MP4" and got[3].video == samples[3].video[:-4] + ".mkv"
    assert got[1].video == got[0].video and got[6].video == samples[6].video  # 3 questions per video


def test_egoschema_accepts_upper_case_mp4(tmp_path):
    root = write_fixture("egoschema_subset", str(tmp_path), per_group=1)
    s = get_task("egoschema_subset").load(root)[2]
    os.rename(s.video, s.video[:-4] + ".MP4")
    assert get_task("egoschema_subset").load(root)[2].video == s.video[:-4] + ".MP4"


def test_mvbench_video_names_with_and_without_extension_and_frame_directories(tmp_path):
    root = write_fixture("mvbench", str(tmp_path), per_group=2)
    ep = [s for s in get_task("mvbench").load(root) if s.meta["subtask"] == "episodic_reasoning"]
    assert ep[0].meta["video"] == "episodic_reasoning_000" and ep[0].video.endswith("episodic_reasoning_000.mp4")
    # replace the second video by a folder of frames named as in the json
    folder = os.path.join(root, mvb.SUBTASK_FOLDERS["episodic_reasoning"])
    os.remove(os.path.join(folder, "episodic_reasoning_001.mp4"))
    frame_dir = os.path.join(folder, "episodic_reasoning_001")
    os.makedirs(frame_dir)
    for i in (3, 0, 2, 1):
        Image.fromarray(np.full((8, 10, 3), 40 * i, np.uint8)).save(os.path.join(frame_dir, f"{i:05d}.jpg"))
    ep = [s for s in get_task("mvbench").load(root) if s.meta["subtask"] == "episodic_reasoning"]
    assert ep[1].video == frame_dir
    vf = load_frame_dir(frame_dir, 7)
    assert vf.frames.shape == (7, 8, 10, 3) and vf.total_frames == 4 and vf.repeated
    assert vf.indices.tolist() == [0, 0, 1, 1, 2, 2, 3]
    # frames come back in name order (JPEG is lossy: compare levels roughly)
    assert np.allclose(vf.frames[:, 0, 0, 0], [0, 0, 40, 40, 80, 80, 120], atol=3)
    os.makedirs(os.path.join(folder, "empty"))
    with pytest.raises(VideoError, match="holds no .jpg/.png frames"):
        load_frame_dir(os.path.join(folder, "empty"), 4)


def test_longvideobench_json_and_parquet_give_the_same_samples(tmp_path):
    root = write_fixture("longvideobench", str(tmp_path), per_group=2)
    from_parquet = get_task("longvideobench").load(root)
    os.remove(os.path.join(root, lvb.PARQUET))
    assert get_task("longvideobench").load(root) == from_parquet
    five = [s for s in from_parquet if len(s.letters) == 5][0]
    assert "\nE. " in five.context and "N/A" not in "".join(s.context for s in from_parquet)


def _edit_json(path, fn):
    rows = json.load(open(path))
    fn(rows)
    json.dump(rows, open(path, "w"))


def _edit_parquet(path, fn):
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    rows = table.to_pylist()
    fn(rows)
    pq.write_table(type(table).from_pylist(rows, schema=table.schema), path)


def test_malformed_rows(tmp_path):
    root = write_fixture("mvbench", str(tmp_path / "m"), per_group=1)
    path = os.path.join(root, "json", "scene_transition.json")
    _edit_json(path, lambda rows: rows[0].update(answer="something else"))
    with pytest.raises(DataError, match="row 0: answer 'something else' is not one of the candidates"):
        get_task("mvbench").load(root)
    _edit_json(path, lambda rows: rows[0].pop("candidates"))
    with pytest.raises(DataError, match="field 'candidates' is missing"):
        get_task("mvbench").load(root)

    root = write_fixture("videomme", str(tmp_path / "v"), per_group=1)
    path = os.path.join(root, vmme.ANNOTATIONS)
    _edit_parquet(path, lambda rows: rows[4].update(domain="Cooking"))
    with pytest.raises(DataError, match="row 4: domain 'Cooking' is not one of lmms-eval's 6 values"):
        get_task("videomme").load(root)
    _edit_parquet(path, lambda rows: rows[4].update(domain="Knowledge", question_id=rows[0]["question_id"]))
    with pytest.raises(DataError, match="appears twice"):
        get_task("videomme").load(root)

    root = write_fixture("egoschema_subset", str(tmp_path / "e"), per_group=1)
    _edit_parquet(os.path.join(root, "Subset", ego.PARQUET), lambda rows: rows[2].update(answer="7"))
    with pytest.raises(DataError, match="row 2: answer '7' should be an option index 0-4"):
        get_task("egoschema_subset").load(root)

    root = write_fixture("longvideobench", str(tmp_path / "l"), per_group=1)
    _edit_parquet(os.path.join(root, lvb.PARQUET), lambda rows: rows[0].update(correct_choice=4))
    with pytest.raises(DataError, match="correct_choice 4 is outside the 4 options"):
        get_task("longvideobench").load(root)


def test_random_fallback_is_reproducible_per_sample_whatever_the_order(tmp_path):
    root = write_fixture("egoschema_subset", str(tmp_path), per_group=2)
    task = get_task("egoschema_subset")
    samples = task.load(root)

    def run(order):
        return {s.id: task.parse("no idea", s, random.Random(f"{task.name}:{s.id}")) for s in order}

    forward, backward = run(samples), run(samples[::-1])
    assert forward == backward and all(drawn for _, drawn in forward.values())
    assert len({letter for letter, _ in forward.values()}) > 1  # not one constant letter
