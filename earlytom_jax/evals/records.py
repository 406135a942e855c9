"""Per-sample results as JSON lines: appended as samples finish, durable, resumable.

Each record is one line written with a single `write`, then flushed and fsynced, so a run
killed at any moment (even SIGKILL) leaves complete lines plus at most one torn last line;
`RecordLog` cuts a torn tail before appending again, and readers skip it. Resuming = reading
the ids already recorded and running the rest; merging = one record per id, in task order.
"""

from __future__ import annotations

import glob
import json
import os

from earlytom_jax.io_utils import atomic_write_text, strict_json


def repair_tail(path: str) -> int:
    """Cut a torn last line (no trailing newline) left by a killed writer. → bytes removed."""
    if not os.path.exists(path):
        return 0
    with open(path, "rb+") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if size == 0:
            return 0
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        # scan back for the last newline
        pos, chunk = size, 1 << 16
        keep = 0
        while pos > 0:
            start = max(0, pos - chunk)
            f.seek(start)
            block = f.read(pos - start)
            i = block.rfind(b"\n")
            if i >= 0:
                keep = start + i + 1
                break
            pos = start
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
        return size - keep


class RecordLog:
    """Append-only JSONL file: `append(record)` returns once the line is on disk."""

    def __init__(self, path: str):
        self.path = path
        repair_tail(path)
        self._f = open(path, "a", encoding="utf-8")

    def append(self, record: dict) -> None:
        self._f.write(strict_json(record, ensure_ascii=False) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_records(path: str) -> list[dict]:
    """Complete records of one file (a torn last line is skipped)."""
    if not os.path.exists(path):
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # a line torn in the middle of a crash-time rewrite; rerun that sample
    return out


def shard_files(out_dir: str, stem: str = "samples") -> list[str]:
    """`samples.jsonl` and any per-host `samples.host*.jsonl` in `out_dir`, sorted."""
    return sorted(glob.glob(os.path.join(out_dir, f"{stem}.jsonl")) + glob.glob(os.path.join(out_dir, f"{stem}.host*.jsonl")))


def collect(paths: list[str]) -> dict[str, dict]:
    """id → record over several files; the first record of an id wins."""
    seen: dict[str, dict] = {}
    for p in paths:
        for r in read_records(p):
            seen.setdefault(r["id"], r)
    return seen


def write_merged(path: str, records: dict[str, dict], order: list[str]) -> list[dict]:
    """Write one record per id, in `order` (ids without a record are skipped), atomically."""
    rows = [records[i] for i in order if i in records]
    atomic_write_text(path, "".join(strict_json(r, ensure_ascii=False) + "\n" for r in rows))
    return rows
