"""A conversion's staging directory: removed on SIGTERM, swept after SIGKILL, named when it is
not ours to remove; honest messages for an unwritable or too small destination."""

from __future__ import annotations

import glob
import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from earlytom_jax.checkpoint import staging
from earlytom_jax.checkpoint.load import load_hf
from earlytom_jax.checkpoint.orbax_io import convert_checkpoint, load_converted
from earlytom_jax.errors import CheckpointError
from tests.test_convert import _equal

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A conversion whose writes stall after the first group, so that a signal finds it mid-way.
_SLOW = """
import sys, time
from earlytom_jax.checkpoint import orbax_io
real = orbax_io._write_group
orbax_io._GROUP_BYTES = 64 << 10
calls = []
def slow(params_dir, group):
    real(params_dir, group)
    calls.append(1)
    if len(calls) == 1:
        print("writing", flush=True)
        time.sleep(120)
orbax_io._write_group = slow
orbax_io.convert_checkpoint(sys.argv[1], sys.argv[2], progress=False)
"""


def _start(src, dst):
    p = subprocess.Popen([sys.executable, "-c", _SLOW, src, dst], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "writing", p.stderr.read()
    assert len(glob.glob(glob.escape(dst) + ".tmp-*")) == 1
    return p


def test_sigterm_removes_the_staging_directory(tiny_dir, tmp_path):
    _, src = tiny_dir
    dst = str(tmp_path / "out")
    p = _start(src, dst)
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=60)
    assert p.returncode != 0
    assert "Terminated" in p.stderr.read()
    assert os.listdir(tmp_path) == []


def test_a_killed_conversions_leftover_is_removed_by_the_next(tiny_dir, tmp_path):
    _, src = tiny_dir
    dst = str(tmp_path / "out")
    p = _start(src, dst)
    p.kill()
    p.wait(timeout=60)
    (left,) = glob.glob(glob.escape(dst) + ".tmp-*")
    summary = convert_checkpoint(src, dst, dtype="float32", progress=False)
    assert [d["path"] for d in summary["removed_leftovers"]] == [left]
    assert summary["removed_leftovers"][0]["bytes"] > 0
    assert sorted(os.listdir(tmp_path)) == ["out"]
    _equal(load_converted(dst)[1], load_hf(src)[1])


def test_other_staging_directories_are_named_not_removed(tmp_path):
    dst = str(tmp_path / "out")
    live = staging.create(dst)  # ours: this process is alive
    os.makedirs(dst + ".tmp-noowner")
    other = dst + ".tmp-otherhost"
    os.makedirs(other)
    with open(os.path.join(other, staging.OWNER_FILE), "w") as f:
        json.dump({"pid": 1, "host": socket.gethostname() + "-elsewhere"}, f)
    removed, kept = staging.sweep(dst)
    assert removed == []
    why = dict(kept)
    assert why[live] == f"process {os.getpid()} is still running"
    assert why[dst + ".tmp-noowner"] == "no owner recorded"
    assert why[other].startswith("written from host ")
    assert all(os.path.isdir(p) for p in why)


def test_parent_is_a_file(tiny_dir, tmp_path):
    _, src = tiny_dir
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="cannot create the destination's parent") as e:
        convert_checkpoint(src, str(tmp_path / "file" / "out"), progress=False)
    assert "\n" not in str(e.value)
    assert os.listdir(tmp_path) == ["file"]


def test_too_little_space_states_the_need_and_what_it_includes(tiny_dir, tmp_path, monkeypatch):
    _, src = tiny_dir
    import shutil as sh
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(sh, "disk_usage", lambda p: usage(10 << 20, 0, 10 << 20))
    with pytest.raises(CheckpointError) as e:
        convert_checkpoint(src, str(tmp_path / "out"), dtype="float32", progress=False)
    msg = str(e.value)
    assert "10.49 MB free but the conversion needs" in msg
    assert "of float32 parameters and 67.11 MB for orbax's metadata and temporary files" in msg
    assert os.listdir(tmp_path) == []
