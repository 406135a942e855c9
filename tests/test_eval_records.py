"""Per-sample JSONL records: torn tails from a killed writer, resume, merge in task order."""

from __future__ import annotations

import json

from earlytom_jax.evals import records as rec


def test_torn_tail_is_cut_and_appending_continues(tmp_path):
    p = str(tmp_path / "samples.jsonl")
    with rec.RecordLog(p) as log:
        log.append({"id": "a", "x": 1})
        log.append({"id": "b", "x": 2})
    with open(p, "a") as f:
        f.write('{"id": "c", "x"')  # killed mid-line
    assert [r["id"] for r in rec.read_records(p)] == ["a", "b"]
    with rec.RecordLog(p) as log:
        log.append({"id": "c", "x": 3})
    lines = open(p).read().splitlines()
    assert [json.loads(x)["id"] for x in lines] == ["a", "b", "c"]


def test_repair_without_any_newline_empties_the_file(tmp_path):
    p = tmp_path / "s.jsonl"
    p.write_text('{"id": "a"')
    assert rec.repair_tail(str(p)) == len('{"id": "a"')
    assert p.read_text() == ""
    assert rec.repair_tail(str(tmp_path / "missing.jsonl")) == 0


def test_collect_first_wins_and_merge_follows_task_order(tmp_path):
    a, b = str(tmp_path / "samples.host0.jsonl"), str(tmp_path / "samples.host1.jsonl")
    with rec.RecordLog(a) as log:
        log.append({"id": "q2", "v": "first"})
        log.append({"id": "q0", "v": 0})
    with rec.RecordLog(b) as log:
        log.append({"id": "q1", "v": 1})
        log.append({"id": "q2", "v": "second"})
    files = rec.shard_files(str(tmp_path))
    assert files == [a, b]
    merged = rec.collect(files)
    rows = rec.write_merged(str(tmp_path / "samples.jsonl"), merged, ["q0", "q1", "q2", "q3"])
    assert [r["id"] for r in rows] == ["q0", "q1", "q2"] and rows[2]["v"] == "first"
    assert [r["id"] for r in rec.read_records(str(tmp_path / "samples.jsonl"))] == ["q0", "q1", "q2"]
