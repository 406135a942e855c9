"""`--model ORG/NAME`: a Hugging Face hub id resolved from huggingface_hub's cache (laid out
here as huggingface_hub lays it out), offline; local directories win; one-line errors."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from earlytom_jax.checkpoint.hub import is_hub_id, resolve_model
from earlytom_jax.errors import CheckpointError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO, COMMIT = "org/name", "0123456789abcdef0123456789abcdef01234567"


def lay_out_cache(cache: str, repo: str, commit: str, src: str | None, files=None) -> str:
    """huggingface_hub's cache layout: models--ORG--NAME/{blobs/<sha256>, snapshots/<commit>/<file>
    (relative symlinks to the blobs), refs/main}. Returns the snapshot directory."""
    root = os.path.join(cache, "models--" + repo.replace("/", "--"))
    snap = os.path.join(root, "snapshots", commit)
    os.makedirs(os.path.join(root, "blobs"), exist_ok=True)
    os.makedirs(snap, exist_ok=True)
    os.makedirs(os.path.join(root, "refs"), exist_ok=True)
    with open(os.path.join(root, "refs", "main"), "w") as f:
        f.write(commit)
    for name in files or sorted(os.listdir(src)):
        data = open(os.path.join(src, name), "rb").read()
        blob = hashlib.sha256(data).hexdigest()
        with open(os.path.join(root, "blobs", blob), "wb") as f:
            f.write(data)
        os.symlink(os.path.join("..", "..", "blobs", blob), os.path.join(snap, name))
    return snap


@pytest.fixture(scope="module")
def cache(tiny_dir, tmp_path_factory):
    """(cache directory, snapshot directory of REPO): the tiny checkpoint, plus `org/partial`
    holding its config.json only (a snapshot another tool left incomplete)."""
    _, d = tiny_dir
    c = str(tmp_path_factory.mktemp("hf") / "hub")
    snap = lay_out_cache(c, REPO, COMMIT, d)
    lay_out_cache(c, "org/partial", COMMIT, d, files=["config.json"])
    return c, snap


@pytest.fixture
def offline(cache, monkeypatch):
    """huggingface_hub pointed at `cache` with the network off: the environment (for child
    processes) and its constants, which it read from the environment when first imported."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_CACHE", cache[0])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", cache[0])
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    from earlytom_jax.synthetic import make_clip
    from earlytom_jax.video import write_test_video

    path = str(tmp_path_factory.mktemp("clip") / "clip.mp4")
    write_test_video(path, make_clip(8, 64, seed=2), fps=10)
    return path


def test_hub_id_spelling():
    assert is_hub_id("lmms-lab/llava-onevision-qwen2-7b-ov") and is_hub_id("Qwen/Qwen2.5-VL-7B-Instruct")
    assert is_hub_id("llava-hf/llava-onevision-qwen2-0.5b-ov-hf")
    for s in ("/abs/path", "./rel/dir", "a/b/c", "name", "org/", "../x", "a--b/c", "org/na..me", "~/ckpt"):
        assert not is_hub_id(s), s


def test_load_by_hub_id_answers_as_the_snapshot_directory(offline):
    from earlytom_jax.api import VideoLLM

    _, snap = offline
    assert resolve_model(REPO) == snap
    a, b = VideoLLM.load(REPO), VideoLLM.load(snap)
    assert a.cfg == b.cfg
    same = [np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params))]
    assert same and all(same)
    frames = np.random.default_rng(0).integers(0, 256, (4, 48, 48, 3), dtype=np.uint8)
    ta = a.ask(frames, "What happens?", num_frames=4, max_new_tokens=4).tokens
    tb = b.ask(frames, "What happens?", num_frames=4, max_new_tokens=4).tokens
    assert ta == tb and len(ta) >= 1


def test_cli_run_takes_a_hub_id(offline, clip, capsys):
    from earlytom_jax import cli
    from earlytom_jax.api import VideoLLM

    flags = ["--video", clip, "--prompt", "Describe.", "--frames", "4", "--method", "full",
             "--max-new-tokens", "3", "--json"]
    assert cli.main(["run", "--model", REPO, *flags]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    want = VideoLLM.load(offline[1]).ask(clip, "Describe.", num_frames=4, max_new_tokens=3).tokens
    assert out["tokens"] == want


def test_uncached_hub_id_is_one_line(cache, clip):
    """The environment alone (HF_HUB_CACHE, HF_HUB_OFFLINE) steers huggingface_hub in a fresh
    process: the message names the id, that cache, and how to fetch it."""
    env = dict(os.environ, HF_HUB_CACHE=cache[0], HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, "-m", "earlytom_jax.cli", "run", "--model", "org/missing", "--video", clip,
                        "--prompt", "hi"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr
    lines = [line for line in p.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("earlytom: error: org/missing:"), p.stderr
    assert cache[0] in lines[0] and "hf download org/missing" in lines[0] and "HF_HUB_OFFLINE" in lines[0]


def test_uncached_hub_id_in_python(offline):
    from earlytom_jax.checkpoint.load import load_any_config

    with pytest.raises(CheckpointError, match="org/missing: no such directory.*not in the Hugging Face cache"):
        load_any_config("org/missing")


def test_partial_snapshot_offline_names_what_is_missing(offline):
    """Offline, a cached snapshot without weights is handed to the loader, which says what is missing."""
    from earlytom_jax.checkpoint.load import load_any

    with pytest.raises(CheckpointError) as e:
        load_any("org/partial")
    assert os.path.join("models--org--partial", "snapshots", COMMIT) in str(e.value)
    assert "safetensors" in str(e.value)


def test_local_directory_shadows_the_hub_id(offline, tmp_path, monkeypatch):
    from earlytom_jax.api import VideoLLM

    monkeypatch.chdir(tmp_path)
    os.makedirs(REPO)  # an (empty) directory spelt like the cached hub model
    assert resolve_model(REPO) == REPO
    with pytest.raises(CheckpointError, match=r"org/name/config.json: no config.json"):
        VideoLLM.load(REPO)


@pytest.mark.parametrize("spec", ["/nonexistent/model", "a/b/c", "nodir"])
def test_neither_directory_nor_hub_id(offline, spec):
    from earlytom_jax.checkpoint.load import load_any

    assert resolve_model(spec) == spec
    with pytest.raises(CheckpointError, match="no config.json; point --model at a checkpoint directory"):
        load_any(spec)
