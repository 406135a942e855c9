"""Tiny datasets in each benchmark's real layout and file formats, with generated videos.

`write_fixture(task, root)` writes the annotation files a task's loader reads (same paths,
column names and types as the releases) and one small synthetic video per question, so the
evaluation loop can run end to end without the real data. Sizes, with `per_group` = G:

    mvbench          G questions per subtask (20 subtasks)                -> 20 G samples
    videomme         G videos per duration (short/medium/long), 3 questions each -> 9 G
    egoschema        full set: the subset's questions + 5 G unlabelled    -> 10 G
    egoschema_subset G questions per gold option (A-E)                    -> 5 G
    longvideobench   G questions per duration group (15/60/600/3600 s)    -> 4 G

Both EgoSchema tasks get the same directory (GENERATION/, MC/ and Subset/); LongVideoBench
gets both lvb_val.json and the validation parquet. Gold answers and question lengths vary
with `seed`. Videos: `frames` frames of `size` x `size` (even) from `synthetic.make_clip`.
"""

from __future__ import annotations

import json
import os
import random
import string

from earlytom_jax.errors import ConfigError
from earlytom_jax.evals.tasks import egoschema as ego
from earlytom_jax.evals.tasks import longvideobench as lvb
from earlytom_jax.evals.tasks import mvbench as mvb
from earlytom_jax.evals.tasks import videomme as vmme
from earlytom_jax.synthetic import make_clip
from earlytom_jax.video import write_test_video

_WORDS = ("person", "table", "cup", "door", "red", "ball", "moves", "left", "box", "quickly", "kitchen", "opens")


class _Videos:
    """Writes one distinct clip per call (seeded from the fixture seed and a counter)."""

    def __init__(self, seed: int, frames: int, size: int):
        if size % 2 or size < 4:
            raise ConfigError(f"fixture video size must be even and >= 4, got {size}")
        if frames < 1:
            raise ConfigError(f"fixture videos need at least 1 frame, got {frames}")
        self.seed, self.frames, self.size, self.count = seed, frames, size, 0

    def write(self, path: str) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_test_video(path, make_clip(self.frames, self.size, self.seed * 1000 + self.count), fps=10)
        self.count += 1


def _text(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(lo, hi)))


def _write_parquet(path: str, rows: list[dict], schema) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def _write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)


# --------------------------------------------------------------------------------------------


def _mvbench(root: str, per_group: int, rng: random.Random, videos: _Videos) -> None:
    n_options = {"action_antonym": 3, "episodic_reasoning": 5, "object_existence": 3}
    with_times = {"action_sequence", "action_prediction", "object_interaction", "action_localization",
                  "episodic_reasoning"}
    configs = []
    for subtask, folder in mvb.SUBTASK_FOLDERS.items():
        rows = []
        for i in range(per_group):
            k = n_options.get(subtask, 4)
            candidates = [f"{_text(rng, 1, 4)} {j}." for j in range(k)]
            stem = f"{subtask}_{i:03d}"
            # episodic_reasoning names its videos without the extension (accepted by the loader)
            name = stem if subtask == "episodic_reasoning" else stem + ".mp4"
            videos.write(os.path.join(root, folder, stem + ".mp4"))
            row = {"video": name, "question": f"What happens with the {_text(rng, 1, 8)}?",
                   "candidates": candidates, "answer": candidates[rng.randrange(k)]}
            if subtask in with_times:
                row["start"], row["end"] = round(rng.uniform(0, 10), 1), round(rng.uniform(10, 30), 1)
            rows.append(row)
        _write_json(os.path.join(root, "json", f"{subtask}.json"), rows)
        configs.append(f"- config_name: {subtask}\n  data_files:\n  - split: train\n    path: json/{subtask}.json")
    with open(os.path.join(root, "README.md"), "w") as f:
        f.write("---\nconfigs:\n" + "\n".join(configs) + "\n---\n# MVBench fixture\n")


def _videomme(root: str, per_group: int, rng: random.Random, videos: _Videos) -> None:
    import pyarrow as pa

    rows, n = [], 0
    for duration in vmme.DURATIONS:
        for _ in range(per_group):
            n += 1
            video_id, stem = f"{n:03d}", f"vid{n:03d}{rng.choice(string.ascii_letters)}"
            videos.write(os.path.join(root, "data", stem + ".mp4"))
            domain = vmme.DOMAINS[n % len(vmme.DOMAINS)]
            sub = vmme.SUB_CATEGORIES[n % len(vmme.SUB_CATEGORIES)]
            for q in range(1, 4):
                rows.append({
                    "video_id": video_id, "duration": duration, "domain": domain, "sub_category": sub,
                    "url": f"https://www.youtube.com/watch?v={stem}", "videoID": stem,
                    "question_id": f"{video_id}-{q}", "task_type": vmme.TASK_TYPES[(n + q) % len(vmme.TASK_TYPES)],
                    "question": f"Which {_text(rng, 1, 10)}?",
                    "options": [f"{x}. {_text(rng, 1, 3).capitalize()}." for x in "ABCD"],
                    "answer": rng.choice("ABCD"),
                })
    schema = pa.schema([(k, pa.list_(pa.string()) if k == "options" else pa.string()) for k in rows[0]])
    _write_parquet(os.path.join(root, vmme.ANNOTATIONS), rows, schema)
    with open(os.path.join(root, "README.md"), "w") as f:
        f.write("---\nconfigs:\n- config_name: videomme\n  data_files:\n  - split: test\n"
                "    path: videomme/test-*\n---\n# Video-MME fixture\n")


def _egoschema(root: str, per_group: int, rng: random.Random, videos: _Videos) -> None:
    import pyarrow as pa

    def row(answer: str) -> dict:
        uid = "%08x-%04x-%04x-%04x-%012x" % tuple(rng.getrandbits(b) for b in (32, 16, 16, 16, 48))
        videos.write(os.path.join(root, "videos", uid + ".mp4"))
        return {"question_idx": uid, "question": f"What is c doing with the {_text(rng, 1, 10)}?", "video_idx": uid,
                "option": [f"{x}. C is {_text(rng, 1, 4)}." for x in ego.LETTERS], "answer": answer}

    labelled = [row(str(g)) for _ in range(per_group) for g in range(5)]
    full = labelled + [row("") for _ in range(5 * per_group)]
    schema = pa.schema([("question_idx", pa.string()), ("question", pa.string()), ("video_idx", pa.string()),
                        ("option", pa.list_(pa.string())), ("answer", pa.string())])
    _write_parquet(os.path.join(root, "Subset", ego.PARQUET), labelled, schema)
    for config in ("GENERATION", "MC"):
        _write_parquet(os.path.join(root, config, ego.PARQUET), full, schema)


def _longvideobench(root: str, per_group: int, rng: random.Random, videos: _Videos) -> None:
    import pyarrow as pa

    categories = ("TOS", "S2E", "E2O", "TAA", "SSS")
    records, n = [], 0
    for group in (15, 60, 600, 3600):
        for _ in range(per_group):
            k = 4 + n % 2
            video_id = f"lvb{n:04d}{rng.choice(string.ascii_letters)}"
            videos.write(os.path.join(root, "videos", video_id + ".mp4"))
            question = f"In the video, which {_text(rng, 2, 10)}?"
            records.append({
                "video_id": video_id, "question": question, "question_wo_referring_query": question,
                "candidates": [_text(rng, 1, 4) for _ in range(k)], "correct_choice": rng.randrange(k),
                "position": [rng.randrange(100), 100 + rng.randrange(100)], "topic_category": "NP-News-Programs",
                "question_category": categories[n % len(categories)], "level": "L2-Relation",
                "id": f"{video_id}_0", "video_path": video_id + ".mp4", "subtitle_path": video_id + "_en.json",
                "duration_group": group, "starting_timestamp_for_subtitles": 0.0,
                "duration": round(group * rng.uniform(0.5, 1.0), 2), "view_count": rng.randrange(10**6),
            })
            n += 1
    _write_json(os.path.join(root, lvb.JSON), records)
    rows = []
    for r in records:
        row = {k: v for k, v in r.items() if k != "candidates"}
        for i in range(5):
            row[f"option{i}"] = r["candidates"][i] if i < len(r["candidates"]) else "N/A"
        rows.append(row)
    types = {"correct_choice": pa.int64(), "position": pa.list_(pa.int64()), "duration_group": pa.int64(),
             "starting_timestamp_for_subtitles": pa.float64(), "duration": pa.float64(), "view_count": pa.int64()}
    schema = pa.schema([(k, types.get(k, pa.string())) for k in rows[0]])
    _write_parquet(os.path.join(root, lvb.PARQUET), rows, schema)


_WRITERS = {"mvbench": _mvbench, "videomme": _videomme, "egoschema": _egoschema, "egoschema_subset": _egoschema,
            "longvideobench": _longvideobench}


def write_fixture(task_name: str, root: str, per_group: int = 2, seed: int = 0, frames: int = 8,
                  size: int = 32) -> str:
    """Write a tiny dataset for `task_name` under `root` (created if needed) and return `root`."""
    if task_name not in _WRITERS:
        raise ConfigError(f"no fixture for task {task_name!r}; choose one of {', '.join(_WRITERS)}")
    if per_group < 1:
        raise ConfigError(f"per_group must be >= 1, got {per_group}")
    os.makedirs(root, exist_ok=True)
    _WRITERS[task_name](root, per_group, random.Random(f"{task_name}:{seed}"), _Videos(seed, frames, size))
    return root
