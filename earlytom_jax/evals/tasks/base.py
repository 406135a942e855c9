"""What every benchmark task provides, and the checks shared by their loaders.

A task turns a local copy of a benchmark (`--data DIR`: the Hugging Face dataset snapshot with
the video archives extracted in place) into `Sample`s, parses the model's raw answer into an
option letter, scores it, and aggregates records into the metrics lmms-eval reports. Each
task module's docstring lists the files it expects under DIR and its exact rules.

Random fallbacks (EgoSchema, LongVideoBench): lmms-eval seeds Python's `random` with 0 once
and draws in sample order, so its picks depend on the order and cannot be matched sample by
sample. Here the caller passes one `random.Random` per sample (the runner uses
`random.Random(f"{task}:{sample.id}")`), so a draw is reproducible whatever the order or the
number of devices; `parse` reports whether the letter was drawn.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random

from earlytom_jax.errors import EarlyTomError


class DataError(EarlyTomError):
    """A benchmark's local copy is unusable: one line naming the file, what was wrong, what to do."""


@dataclasses.dataclass(frozen=True)
class Sample:
    """One question.

    id: unique and stable within the task (resumed runs match records by it);
    video: absolute path of the video file (or, for MVBench, of a directory of frames);
    context: the task text exactly as lmms-eval builds it (the model wrapper adds the video
        placeholder line and the chat template);
    gold: gold letter "A".."E", "" when unlabelled (EgoSchema full set);
    letters: this question's option letters, e.g. ("A", "B", "C", "D");
    meta: JSON-serialisable fields the metrics (and the submission) need.
    """

    id: str
    video: str
    context: str
    gold: str
    letters: tuple[str, ...]
    meta: dict


@dataclasses.dataclass(frozen=True)
class Task:
    """Base of the task classes (each task is a frozen instance of a subclass).

    Records given to `metrics`/`submission` are dicts with at least: id, answer (raw model
    text), parsed, gold, correct, random, meta.
    """

    name: str
    max_new_tokens: int

    def load(self, data_dir: str) -> list[Sample]:
        """All samples in a deterministic order. DataError if an annotation file or a video is
        missing, or a row is malformed."""
        raise NotImplementedError

    def parse(self, output: str, sample: Sample, rng: random.Random) -> tuple[str, bool]:
        """(parsed letter or "", True if the letter was drawn at random by the fallback)."""
        raise NotImplementedError

    def correct(self, parsed: str, sample: Sample) -> bool | None:
        """parsed == gold; None when the sample is unlabelled."""
        if not sample.gold:
            return None
        return parsed == sample.gold

    def metrics(self, records: list[dict]) -> dict:
        raise NotImplementedError

    def submission(self, records: list[dict]) -> dict | None:
        """A file for a scoring server ({key: answer}); None for locally scored tasks."""
        return None


# --------------------------------------------------------------------------------------------
# loader helpers


def data_root(data_dir: str, task: str) -> str:
    """Absolute data directory; DataError if it does not exist."""
    root = os.path.abspath(os.path.expanduser(str(data_dir)))
    if not os.path.isdir(root):
        raise DataError(f"{root}: data directory for {task} not found; pass the dataset root with --data")
    return root


def require_file(path: str, what: str) -> str:
    """`path` if it is a file, else DataError naming it and what belongs there."""
    if not os.path.isfile(path):
        raise DataError(f"{path} not found; expected {what}")
    return path


def read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read as JSON ({e}); re-download the file") from None


def read_parquet(path: str) -> list[dict]:
    """Rows of a parquet file as plain Python dicts (pyarrow)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow; pip install 'earlytom-jax[eval]'") from None
    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # noqa: BLE001 - pyarrow raises several unrelated types for a bad file
        raise DataError(f"{path}: cannot read as parquet ({e.__class__.__name__}: {e}); re-download the file") from None


def field(row: dict, name: str, kind, where: str):
    """row[name] checked against `kind` (a type or tuple of types); DataError if absent or wrong."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with field '{name}', got {type(row).__name__}")
    if name not in row or row[name] is None:
        raise DataError(f"{where}: field '{name}' is missing; the annotation file does not match the expected format")
    value = row[name]
    # bool is an int subclass; a boolean is never a valid int field here
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise DataError(f"{where}: field '{name}' should be {names}, got {type(value).__name__} {value!r:.60}")
    return value


def str_list(row: dict, name: str, where: str, min_len: int = 1) -> list[str]:
    """A list field whose items are all strings, with at least `min_len` items."""
    value = field(row, name, (list, tuple), where)
    if len(value) < min_len or not all(isinstance(v, str) for v in value):
        raise DataError(f"{where}: field '{name}' should be a list of at least {min_len} strings, got {value!r:.80}")
    return list(value)


def check_unique(samples: list[Sample], source: str) -> None:
    seen: set[str] = set()
    for s in samples:
        if s.id in seen:
            raise DataError(f"{source}: question id {s.id!r} appears twice; ids must be unique to resume runs")
        seen.add(s.id)


def check_videos(samples: list[Sample], hint: str) -> None:
    """Every sample's video exists (file or frame directory); else DataError naming the first
    missing one, how many are missing, and `hint` (where the videos come from)."""
    missing = [s.video for s in samples if not os.path.exists(s.video)]
    if missing:
        n = len(set(missing))
        total = len({s.video for s in samples})
        raise DataError(f"{missing[0]} not found ({n} of {total} videos missing); {hint}")
