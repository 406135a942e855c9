"""The evaluation loop end to end on fixture datasets in each task's real layout, with a tiny
random model: complete records, metrics, one compile per padded prompt length, resume after
a crash (SIGKILL), a changed configuration refused, unreadable videos set aside, data
parallel over 4 devices equal to one device, and the compare table."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from earlytom_jax import pipeline
from earlytom_jax.api import VideoLLM
from earlytom_jax.compression.earlytom import EarlyTom
from earlytom_jax.errors import ConfigError
from earlytom_jax.evals import records as rec
from earlytom_jax.evals.fixtures import write_fixture
from earlytom_jax.evals.runner import EvalSettings, run_eval
from earlytom_jax.evals.tasks import get_task

TASKS = ["mvbench", "videomme", "egoschema_subset", "egoschema", "longvideobench"]
FIELDS = {"id", "prompt", "answer", "parsed", "random", "gold", "correct", "visual_tokens",
          "frames_after_merge", "ttft_s", "new_tokens", "flops", "flops_paper_llm", "meta"}
TINY_ET = EarlyTom(ratio=0.5, tau=0.5, layers=(1, 2), llm_layer=2)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def llm(tiny_dir):
    return VideoLLM.load(tiny_dir[1])


@pytest.fixture(scope="module")
def mvbench_root(tmp_path_factory):
    return write_fixture("mvbench", str(tmp_path_factory.mktemp("mvbench")), per_group=1, frames=6, size=32)


def _settings(tiny_dir, task, data, out, **kw):
    return EvalSettings(model=tiny_dir[1], task=task, data=data, out=str(out), frames=4, progress=False, **kw)


@pytest.mark.parametrize("task", TASKS)
def test_end_to_end_records_and_metrics(tiny_dir, llm, tmp_path, task):
    data = write_fixture(task, str(tmp_path / "data"), per_group=1, frames=6, size=32)
    t = get_task(task)
    samples = t.load(data)
    suffixes = {math.ceil(len(llm.prompt_ids(x.context).suffix) / 32) for x in samples}
    before = pipeline.prefill_jit._cache_size()
    res = run_eval(_settings(tiny_dir, task, data, tmp_path / "out"), pipeline.FULL, llm)
    # one program per padded prompt length, not one per question
    assert pipeline.prefill_jit._cache_size() - before <= len(suffixes) < len(samples)
    rows = rec.read_records(str(tmp_path / "out" / "samples.jsonl"))
    assert [r["id"] for r in rows] == [x.id for x in samples]
    for r, x in zip(rows, samples):
        assert FIELDS <= r.keys()
        assert r["prompt"] == x.context and r["gold"] == x.gold
        assert r["visual_tokens"] == 4 * llm.cfg.tokens_per_frame + 1
        assert r["correct"] == (t.correct(r["parsed"], x))
    assert res["complete"] and res["counts"]["recorded"] == len(samples)
    assert res["metrics"] == json.loads(json.dumps(t.metrics(rows)))
    on_disk = json.load(open(tmp_path / "out" / "results.json"))
    assert on_disk["metrics"] == res["metrics"]
    cfg = on_disk["config"]
    assert cfg["method"]["name"] == "full" and cfg["frames"] == 4 and cfg["versions"]["jax"]
    assert cfg["max_new_tokens"] == min(t.max_new_tokens, 64)
    sub = tmp_path / "out" / "submission.json"
    assert sub.exists() == (task == "egoschema")
    if task == "egoschema":
        assert len(json.load(open(sub))) == len(samples)


def test_resume_runs_only_the_rest_and_refuses_other_settings(tiny_dir, llm, mvbench_root, tmp_path):
    s = _settings(tiny_dir, "mvbench", mvbench_root, tmp_path / "out", limit=5)
    first = run_eval(s, TINY_ET, llm)
    assert first["complete"] and first["counts"]["samples"] == 5
    path = str(tmp_path / "out" / "samples.jsonl")
    head = rec.read_records(path)
    assert len(head) == 5
    s_all = _settings(tiny_dir, "mvbench", mvbench_root, tmp_path / "out")
    res = run_eval(s_all, TINY_ET, llm)
    rows = rec.read_records(path)
    assert res["complete"] and len(rows) == len({r["id"] for r in rows}) == res["counts"]["samples"]
    assert rows[:5] == head  # the resumed run did not redo them
    with pytest.raises(ConfigError, match="holds results for method"):
        run_eval(s_all, pipeline.FULL, llm)


def test_results_dir_without_later_identity_keys_resumes(tiny_dir, llm, mvbench_root, tmp_path):
    """A results directory written before an identity key existed (here `time_instruction`)
    resumes under that key's old value and refuses another; the time instruction is refused on
    LLaVA-OneVision in one line."""
    s = _settings(tiny_dir, "mvbench", mvbench_root, tmp_path / "out", limit=1)
    run_eval(s, pipeline.FULL, llm)
    path = tmp_path / "out" / "config.json"
    ident = json.loads(path.read_text())
    del ident["time_instruction"]
    path.write_text(json.dumps(ident))
    assert run_eval(dataclasses.replace(s, limit=2), pipeline.FULL, llm)["counts"]["samples"] == 2
    with pytest.raises(ConfigError, match="--time-instruction is LLaVA-Video's"):
        run_eval(dataclasses.replace(s, time_instruction=True), pipeline.FULL, llm)


def test_progress_bar_on_stderr_counts_resumed_samples(tiny_dir, llm, mvbench_root, tmp_path, capsys):
    """The bar (tqdm, on stderr) names the task and starts from the samples a resumed run
    found done; progress=False draws none."""
    run_eval(_settings(tiny_dir, "mvbench", mvbench_root, tmp_path / "out", limit=3), pipeline.FULL, llm)
    assert "mvbench" not in capsys.readouterr().err
    s = _settings(tiny_dir, "mvbench", mvbench_root, tmp_path / "out", limit=5)
    run_eval(dataclasses.replace(s, progress=True), pipeline.FULL, llm)
    err = capsys.readouterr().err
    assert "mvbench:" in err and "3/5" in err and "5/5" in err and "sample" in err


def test_unreadable_video_is_set_aside_and_retried(tiny_dir, llm, tmp_path):
    data = write_fixture("videomme", str(tmp_path / "data"), per_group=1, frames=6, size=32)
    samples = get_task("videomme").load(data)
    bad = samples[1].video
    good_bytes = open(bad, "rb").read()
    with open(bad, "wb") as f:
        f.write(b"not a video")
    s = _settings(tiny_dir, "videomme", data, tmp_path / "out")
    res = run_eval(s, pipeline.FULL, llm)
    assert not res["complete"] and res["counts"]["unreadable"] >= 1
    errs = rec.read_records(str(tmp_path / "out" / "errors.jsonl"))
    assert any(e["video"] == bad for e in errs)
    with open(bad, "wb") as f:
        f.write(good_bytes)
    res = run_eval(s, pipeline.FULL, llm)
    assert res["complete"] and res["counts"]["unreadable"] == 0


def _cli(args, env=None):
    return subprocess.Popen([sys.executable, "-m", "earlytom_jax.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _eval_args(tiny_dir, data, out, *extra):
    return ["eval", "--model", tiny_dir[1], "--task", "mvbench", "--data", data, "--out", str(out),
            "--frames", "4", "--method", "full", "--quiet", *extra]


@pytest.mark.parametrize("batch", [[], ["--batch-size", "3"]], ids=["one", "batched"])
def test_sigkill_then_resume_gives_one_record_per_sample(tiny_dir, mvbench_root, tmp_path, batch):
    out = tmp_path / "out"
    path = out / "samples.jsonl"
    proc = _cli(_eval_args(tiny_dir, mvbench_root, out, *batch))
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if path.exists() and len(path.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    n_killed = len(rec.read_records(str(path)))
    assert 3 <= n_killed < 20
    proc = _cli(_eval_args(tiny_dir, mvbench_root, out, *batch))
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    assert f"{n_killed} of 20 samples done" in stdout
    rows = rec.read_records(str(path))
    ids = [x.id for x in get_task("mvbench").load(mvbench_root)]
    assert [r["id"] for r in rows] == ids


@pytest.mark.parametrize("mesh", [["--mesh", "data=4"], ["--mesh", "data=2", "--batch-size", "4"]],
                         ids=["data4", "data2-batch4"])
def test_four_devices_equal_one_device(tiny_dir, mvbench_root, tmp_path, mesh):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    one = _cli(_eval_args(tiny_dir, mvbench_root, tmp_path / "one"))
    four = _cli(_eval_args(tiny_dir, mvbench_root, tmp_path / "four", *mesh), env)
    for p in (one, four):
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    keep = ("id", "answer", "parsed", "correct", "visual_tokens", "new_tokens")
    a = [{k: r[k] for k in keep} for r in rec.read_records(str(tmp_path / "one" / "samples.jsonl"))]
    b = [{k: r[k] for k in keep} for r in rec.read_records(str(tmp_path / "four" / "samples.jsonl"))]
    assert a == b and len(a) == 20
    res = json.load(open(tmp_path / "four" / "results.json"))
    assert res["config"]["mesh"] == mesh[1] and len(res["config"]["devices"]) == 4
    assert res["metrics"] == json.load(open(tmp_path / "one" / "results.json"))["metrics"]


@pytest.mark.parametrize("method", [pipeline.FULL, TINY_ET], ids=["full", "earlytom"])
def test_batched_eval_equals_one_at_a_time(tiny_dir, llm, mvbench_root, tmp_path, method):
    """--batch-size 3 over 20 samples (the last batch partial): the same records as batch 1, one
    batched program per padded prompt length, and the batch size in results.json."""
    keep = ("id", "answer", "parsed", "correct", "visual_tokens", "frames_after_merge", "new_tokens", "flops")
    one = run_eval(_settings(tiny_dir, "mvbench", mvbench_root, tmp_path / "one"), method, llm)
    before = pipeline.prefill_batch._cache_size()
    three = run_eval(_settings(tiny_dir, "mvbench", mvbench_root, tmp_path / "three", batch_size=3), method, llm)
    suffixes = {math.ceil(len(llm.prompt_ids(x.context).suffix) / 32)
                for x in get_task("mvbench").load(mvbench_root)}
    assert pipeline.prefill_batch._cache_size() - before <= len(suffixes)
    rows = [rec.read_records(str(tmp_path / d / "samples.jsonl")) for d in ("one", "three")]
    assert [{k: r[k] for k in keep} for r in rows[0]] == [{k: r[k] for k in keep} for r in rows[1]]
    assert {r["batch"] for r in rows[1]} == {3, 2} and {r["batch"] for r in rows[0]} == {1}
    assert three["metrics"] == one["metrics"] and three["config"]["batch_size"] == 3
    with pytest.raises(ConfigError, match="--batch-size 0: need at least 1"):
        run_eval(_settings(tiny_dir, "mvbench", mvbench_root, tmp_path / "x", batch_size=0), method, llm)


def test_compare_prints_one_row_per_method(tiny_dir, mvbench_root, tmp_path):
    p = _cli(_eval_args(tiny_dir, mvbench_root, tmp_path / "cmp", "--compare", "full,earlytom", "--ratios", "0.5",
                        "--layers", "1,2", "--llm-merge-layer", "2", "--limit", "4"))
    stdout, stderr = p.communicate(timeout=600)
    assert p.returncode == 0, stderr
    rows = json.load(open(tmp_path / "cmp" / "compare.json"))
    assert [(r["method"], r["ratio"]) for r in rows] == [("full", None), ("earlytom", 0.5)]
    assert rows[1]["visual_tokens"] < rows[0]["visual_tokens"] and rows[1]["tflops"] < rows[0]["tflops"]
    assert "| earlytom | 0.5 |" in stdout
    assert (tmp_path / "cmp" / "earlytom-r0.5" / "results.json").exists()


def test_two_processes_equal_one_device(tiny_dir, mvbench_root, tmp_path):
    """Multi-host on one machine: 2 processes x 2 CPU devices (gloo), each answering its
    groups' samples into its own file; process 0 merges."""
    import socket

    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    args = _eval_args(tiny_dir, mvbench_root, tmp_path / "mh", "--mesh", "data=4", "--limit", "8",
                      "--coordinator", f"localhost:{port}", "--num-processes", "2")
    procs = [_cli([*args, "--process-id", str(i)], env) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    one = _cli(_eval_args(tiny_dir, mvbench_root, tmp_path / "one", "--limit", "8"))
    _, err = one.communicate(timeout=600)
    assert one.returncode == 0, err
    keep = ("id", "answer", "parsed", "visual_tokens")
    a = [{k: r[k] for k in keep} for r in rec.read_records(str(tmp_path / "one" / "samples.jsonl"))]
    b = [{k: r[k] for k in keep} for r in rec.read_records(str(tmp_path / "mh" / "samples.jsonl"))]
    assert a == b and len(a) == 8
    hosts = [rec.read_records(str(tmp_path / "mh" / f"samples.host{i}.jsonl")) for i in range(2)]
    assert sorted(len(h) for h in hosts) == [4, 4]
