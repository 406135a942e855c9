"""The lmms-eval model (`--model earlytom_jax`, earlytom_jax/lmms_eval_model.py) end to end,
offline: lmms-eval's own CLI in a subprocess runs a local copy of its videomme task (its YAML
with the data read from a fixture parquet, its prompt, scoring and aggregation functions) on
the shipped toy model with EarlyTom at batch size 2; its prompts, answers, parsed letters and
score equal `earlytom eval`'s (`run_eval`) on the same fixture, frames and method."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("lmms_eval", reason="lmms-eval is the optional extra: pip install -e '.[lmms]'")

import yaml  # noqa: E402  (lmms-eval's dependency)

from earlytom_jax.errors import ConfigError  # noqa: E402
from earlytom_jax.evals.fixtures import write_fixture  # noqa: E402
from earlytom_jax.evals.toy import TOY_DIR  # noqa: E402

TASK = "earlytom_videomme_fixture"
FRAMES = 4
RATIO = 0.25
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Function(str):
    """A YAML `!function module.name` tag's value, kept to be written back as the tag."""


class _Loader(yaml.SafeLoader):
    pass


class _Dumper(yaml.SafeDumper):
    pass


_Loader.add_constructor("!function", lambda loader, node: _Function(loader.construct_scalar(node)))
_Dumper.add_representer(_Function, lambda dumper, value: dumper.represent_scalar("!function", str(value)))


def _reference_yaml() -> dict:
    """lmms-eval's own videomme.yaml (its `!function` tags kept)."""
    from lmms_eval.tasks.videomme import utils

    with open(os.path.join(os.path.dirname(utils.__file__), "videomme.yaml")) as f:
        return yaml.load(f, Loader=_Loader)


def _write_task(task_dir: str, data: str, cache: str) -> None:
    """lmms-eval's videomme task, reading the fixture: its YAML with only the task name and the
    data source changed (a local parquet file instead of the hub dataset), and a utils.py
    that is lmms-eval's videomme utils with the video path pointing into the fixture."""
    spec = _reference_yaml()
    spec["task"] = TASK
    spec["dataset_path"] = "parquet"
    spec["dataset_kwargs"] = {"data_files": {"test": os.path.join(data, "videomme", "test-00000-of-00001.parquet")},
                              "cache_dir": cache}
    os.makedirs(task_dir, exist_ok=True)
    with open(os.path.join(task_dir, f"{TASK}.yaml"), "w") as f:
        yaml.dump(spec, f, Dumper=_Dumper, sort_keys=False)
    with open(os.path.join(task_dir, "utils.py"), "w") as f:
        f.write(
            "import os\n"
            "from lmms_eval.tasks.videomme.utils import *  # noqa: F401,F403 - lmms-eval's prompt and scoring\n\n"
            f"VIDEOS = {os.path.join(data, 'data')!r}\n\n\n"
            "def videomme_doc_to_visual(doc):\n"
            "    return [os.path.join(VIDEOS, doc['videoID'] + '.mp4')]\n"
        )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(lmms-eval's results, its samples by question id, our records by id, our results)."""
    from earlytom_jax.api import VideoLLM
    from earlytom_jax.evals import records as rec
    from earlytom_jax.evals.runner import EvalSettings, run_eval

    tmp = tmp_path_factory.mktemp("lmms")
    data = write_fixture("videomme", str(tmp / "data"), per_group=1, frames=6, size=32)
    _write_task(str(tmp / "tasks"), data, str(tmp / "datasets"))
    env = dict(os.environ, HF_HOME=str(tmp / "hf"), HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "earlytom_jax",
           "--model_args", f"pretrained={TOY_DIR},method=earlytom,ratio={RATIO},frames={FRAMES},batch_size=2",
           "--tasks", TASK, "--include_path", str(tmp / "tasks"), "--output_path", str(tmp / "out"),
           "--log_samples", "--use_cache", str(tmp / "cache")]
    p = subprocess.run(cmd, env=env, cwd=str(tmp), capture_output=True, text=True, timeout=600)
    # lmms-eval logs an error and still exits 0: its results file says whether it ran
    results = glob.glob(str(tmp / "out" / "**" / "*_results.json"), recursive=True)
    assert p.returncode == 0 and len(results) == 1, p.stdout[-3000:] + p.stderr[-3000:]
    results_file = results[0]
    [samples_file] = glob.glob(str(tmp / "out" / "**" / f"*_samples_{TASK}.jsonl"), recursive=True)
    with open(results_file) as f:
        theirs = json.load(f)
    with open(samples_file) as f:
        their_samples = {s["videomme_perception_score"]["question_id"]: s for s in map(json.loads, f)}

    llm = VideoLLM.load(TOY_DIR)
    ours = run_eval(EvalSettings(model=TOY_DIR, task="videomme", data=data, out=str(tmp / "ours"), frames=FRAMES,
                                 progress=False), llm.method("earlytom", ratio=RATIO), llm)
    our_records = {r["id"]: r for r in rec.read_records(str(tmp / "ours" / "samples.jsonl"))}
    return theirs, their_samples, our_records, ours, (cmd, env, tmp, data)


def test_lmms_eval_answers_and_scores_like_earlytom_eval(runs):
    theirs, samples, records, ours, _ = runs
    assert sorted(samples) == sorted(records) and len(records) == 9
    for qid, s in samples.items():
        r = records[qid]
        assert s["input"] == r["prompt"], qid  # lmms-eval's videomme prompt is the one we rebuild
        answer = s["filtered_resps"][0] if isinstance(s["filtered_resps"], list) else s["filtered_resps"]
        assert answer == r["answer"], qid
        assert s["videomme_perception_score"]["pred_answer"] == r["parsed"], (qid, r["answer"])
        assert s["videomme_perception_score"]["score"] == float(r["correct"]), qid
    score = theirs["results"][TASK]["videomme_perception_score,none"]
    assert score == pytest.approx(ours["metrics"]["overall"], abs=1e-9)
    assert theirs["config"]["model"] == "earlytom_jax"


def test_cached_rerun_answers_from_the_cache(runs):
    """--use_cache: a second run with the same arguments reads every answer back from
    lmms-eval's response cache and gives the same score."""
    theirs, *_, (cmd, env, tmp, _) = runs
    out2 = tmp / "out2"
    cmd2 = [str(out2) if c == str(tmp / "out") else c for c in cmd]
    p = subprocess.run(cmd2, env=env, cwd=str(tmp), capture_output=True, text=True, timeout=600)
    results = glob.glob(str(out2 / "**" / "*_results.json"), recursive=True)
    assert p.returncode == 0 and len(results) == 1, p.stdout[-3000:] + p.stderr[-3000:]
    results_file = results[0]
    with open(results_file) as f:
        again = json.load(f)
    assert again["results"][TASK] == theirs["results"][TASK]
    assert "all 9 requests served from cache" in p.stdout + p.stderr


def test_generate_until_keeps_order_cuts_at_until_and_survives_a_bad_video(runs, tmp_path):
    """In process: answers in the requests' order whatever the batching (a request with another
    token limit batches apart), equal to `earlytom eval`'s; an `until` string cuts the
    answer; an unreadable video answers "" and its batch-mate is still answered."""
    from lmms_eval.api.instance import Instance

    from earlytom_jax.evals.tasks import get_task
    from earlytom_jax.lmms_eval_model import EarlyTomJax

    *_, records, _, (_, _, _, data) = runs
    samples = get_task("videomme").load(data)[:5]
    bad = tmp_path / "bad.mp4"
    bad.write_text("not a video")
    docs = [{"video": s.video} for s in samples] + [{"video": str(bad)}]
    contexts = [s.context for s in samples] + [samples[0].context]
    cut = records[samples[1].id]["answer"][-1:]  # the answer's last character (the toy answers a letter)
    kwargs = [{"max_new_tokens": 16, "until": ["\n\n"]}] * len(docs)
    kwargs[1] = {"max_new_tokens": 16, "until": [cut]}
    kwargs[2] = {"max_new_tokens": 8, "until": ["\n\n"]}  # the toy's answers are shorter
    model = EarlyTomJax.create_from_arg_string(
        f"pretrained={TOY_DIR},method=earlytom,ratio={RATIO},max_frames_num={FRAMES},batch_size=2")
    model.task_dict = {"t": {"test": docs}}
    requests = [Instance("generate_until", (c, k, lambda d: [d["video"]], i, "t", "test"), 0,
                         {"task": "t", "doc_id": i, "repeats": 1}) for i, (c, k) in enumerate(zip(contexts, kwargs))]
    got = model.generate_until(requests)
    want = [records[s.id]["answer"] for s in samples]
    want[1] = want[1].split(cut)[0]
    assert cut and want[1] != records[samples[1].id]["answer"]
    assert got == want + [""]


def test_bad_model_args_fail_with_one_line():
    from earlytom_jax.lmms_eval_model import EarlyTomJax, cut_at

    with pytest.raises(ConfigError, match="pretrained"):
        EarlyTomJax.create_from_arg_string("method=earlytom")
    with pytest.raises(ConfigError, match="batch_size"):
        EarlyTomJax.create_from_arg_string(f"pretrained={TOY_DIR},batch_size=auto")
    assert cut_at("B. red\nQ: next", ["\nQ:"]) == "B. red"
    assert cut_at("B\n\nmore", ["\n\n"]) == "B\n\nmore"  # lmms-eval's default stop is not applied
