"""The command line as a user drives it (subprocesses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from earlytom_jax.synthetic import make_clip
from earlytom_jax.video import write_test_video

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "earlytom_jax.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("clip") / "clip.mp4")
    write_test_video(path, make_clip(12, 64, seed=1), fps=10)
    return path


def test_run_json(tiny_dir, clip):
    _, d = tiny_dir
    p = _cli("run", "--model", d, "--video", clip, "--prompt", "What happens?", "--frames", "8",
             "--ratio", "0.5", "--layers", "1,2", "--llm-merge-layer", "2", "--max-new-tokens", "5", "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert 1 <= len(out["tokens"]) <= 5
    s = out["stats"]
    assert len(s["frames_after_layer"]) == 2 and s["frames"] <= 8
    assert s["visual_tokens"] == s["count"] + 1
    assert sum(s["kept_per_frame"]) == s["count"]
    assert "ratio=0.5" in out["settings"]["method"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--video", "/nonexistent.mp4"], "/nonexistent.mp4"),
        (["--ratio", "0"], "ratio 0.0 is outside (0, 1]"),
        (["--tau", "1.5"], "tau 1.5 is outside [0, 1]"),
        (["--layers", "1,9"], "beyond the encoder's depth"),
        (["--frames", "0"], "--frames 0"),
        (["--frames", "1100", "--method", "full"], "exceeds the model's context of 4096"),
    ],
)
def test_bad_input_one_line(tiny_dir, clip, args, message):
    _, d = tiny_dir
    base = {"--model": d, "--video": clip, "--prompt": "hi", "--frames": "4", "--layers": "1,2", "--llm-merge-layer": "2"}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v
    flat = [x for kv in base.items() for x in kv]
    p = _cli("run", *flat)
    assert p.returncode == 2, (p.returncode, p.stderr)
    lines = [line for line in p.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("earlytom: error:"), p.stderr
    assert message in lines[0]


def test_unsupported_codec_one_line(tiny_dir, clip, tmp_path):
    from tests.test_video import unsupported_codec_copy

    bad = unsupported_codec_copy(clip, str(tmp_path / "odd.mp4"))
    p = _cli("run", "--model", tiny_dir[1], "--video", bad, "--prompt", "hi", "--frames", "4", "--method", "full")
    assert p.returncode == 2
    lines = [line for line in p.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "odd.mp4: video codec is not supported" in lines[0], p.stderr


def test_missing_checkpoint_one_line(tmp_path, clip):
    p = _cli("run", "--model", str(tmp_path), "--video", clip, "--prompt", "hi")
    assert p.returncode == 2
    assert "no config.json" in p.stderr and "Traceback" not in p.stderr


def test_visualize_writes_png_with_every_kept_token(tiny_dir, clip, tmp_path):
    from PIL import Image

    _, d = tiny_dir
    out = str(tmp_path / "kept.png")
    flags = ["--model", d, "--video", clip, "--frames", "8", "--ratio", "0.5", "--layers", "1,2", "--llm-merge-layer", "2"]
    p = _cli("visualize", *flags, "--out", out)
    assert p.returncode == 0, p.stderr
    img = Image.open(out)
    img.verify()
    highlighted = int(p.stdout.split(",")[1].split()[0])
    q = _cli("run", *flags, "--prompt", "Describe what's happening in this video.", "--max-new-tokens", "1", "--json")
    assert highlighted == json.loads(q.stdout.strip().splitlines()[-1])["stats"]["count"]


def test_convert_then_run(tiny_dir, clip, tmp_path):
    _, d = tiny_dir
    dst = str(tmp_path / "converted")
    p = _cli("convert", d, dst, "--dtype", "float32", "--quiet")
    assert p.returncode == 0, p.stderr
    again = _cli("convert", d, dst, "--quiet")
    assert again.returncode == 2 and "exists" in again.stderr
    flags = ["--video", clip, "--prompt", "Describe.", "--frames", "6", "--layers", "1,2",
             "--llm-merge-layer", "2", "--max-new-tokens", "4", "--json"]
    a = json.loads(_cli("run", "--model", dst, *flags).stdout.strip().splitlines()[-1])
    b = json.loads(_cli("run", "--model", d, *flags).stdout.strip().splitlines()[-1])
    assert a["tokens"] == b["tokens"] and a["stats"]["kept_index"] == b["stats"]["kept_index"]


def test_run_streams_the_same_tokens_as_json(tiny_dir, clip):
    """Streaming (one jitted step per token) and the on-device loop give the same answer."""
    _, d = tiny_dir
    flags = ["--model", d, "--video", clip, "--prompt", "Describe.", "--frames", "6", "--layers", "1,2",
             "--llm-merge-layer", "2", "--max-new-tokens", "6"]
    streamed = _cli("run", *flags)
    assert streamed.returncode == 0, streamed.stderr
    assert "visual tokens" in streamed.stderr and "TTFT" in streamed.stderr
    j = json.loads(_cli("run", *flags, "--json").stdout.strip().splitlines()[-1])
    assert streamed.stdout.strip() == j["text"]


def test_out_of_memory_is_one_line(monkeypatch, capsys):
    """XLA's RESOURCE_EXHAUSTED (e.g. the 7B shape on a small host) ends in one line, exit 3."""
    from earlytom_jax import cli
    from earlytom_jax.cli import bench as cli_bench

    def oom(args):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 30086335792 bytes.\nmore XLA detail")

    monkeypatch.setattr(cli_bench, "cmd_bench", oom)
    assert cli.main(["bench", "--arch", "tiny"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ran out of memory" in err[0] and "30086335792 bytes" in err[0]


def _parse(*argv):
    from earlytom_jax import cli

    return cli.build_parser().parse_args(list(argv))


def test_eval_and_run_take_the_presets_ratio():
    """`--preset videomme@0.15` without --ratio runs r = 0.15 with the 0.15 settings, in `run`
    and in `eval` alike (eval ran r = 0.1 with the 0.15 tau and layers)."""
    from earlytom_jax.architectures import architecture
    from earlytom_jax.cli.eval import eval_runs
    from earlytom_jax.cli.flags import method_from_args

    cfg = architecture("tiny")
    flags = ("--preset", "videomme@0.15", "--layers", "1,2", "--llm-merge-layer", "2")
    run = method_from_args(_parse("run", "--model", "m", "--video", "v", "--prompt", "p", *flags), cfg)
    [(name, ratio, ev)] = eval_runs(_parse("eval", "--model", "m", "--task", "videomme", "--data", "d",
                                                "--out", "o", *flags), cfg)
    assert name == "earlytom" and ratio == run.ratio == ev.ratio == 0.15
    assert ev == run and ev.tau == 0.4
    [(_, r, m)] = eval_runs(_parse("eval", "--model", "m", "--task", "videomme", "--data", "d", "--out", "o",
                                        "--layers", "1,2", "--llm-merge-layer", "2"), cfg)
    assert r == m.ratio == 0.1


def test_set_reaches_any_registered_setting(capsys):
    """--set METHOD.KEY=VALUE builds the method with that setting (typed as its default), in run,
    eval --compare and bench; a wrong key, value, method or a method the command does not run is
    one line before anything loads."""
    from earlytom_jax import cli
    from earlytom_jax.architectures import architecture
    from earlytom_jax.cli.eval import eval_runs
    from earlytom_jax.cli.flags import method_from_args

    cfg = architecture("llava-ov-0.5b")
    run = ("run", "--model", "m", "--video", "v", "--prompt", "p")
    m = method_from_args(_parse(*run, "--method", "holitom", "--set", "holitom.d=0.5", "--set", "holitom.knn=5"), cfg)
    assert (m.d, m.knn) == (0.5, 5) and isinstance(m.knn, int)
    m = method_from_args(_parse(*run, "--method", "fastvid", "--set", "fastvid.keep_positions=false",
                                "--set", "fastvid.signals=tower"), cfg)
    assert m.keep_positions is False and m.signals == "tower"
    runs = eval_runs(_parse("eval", "--model", "m", "--task", "videomme", "--data", "d", "--out", "o", "--compare",
                            "full,holitom,prunevid", "--set", "prunevid.cluster_ratio=0.4"), cfg)
    assert [getattr(m, "cluster_ratio", None) for _, _, m in runs] == [None, None, 0.4]
    for argv, says in [((*run, "--method", "holitom", "--set", "holitom.zz=1"), "holitom has no setting 'zz'; its settings: tau"),
                       ((*run, "--method", "holitom", "--set", "holitom.d=abc"), "'abc' is not a float"),
                       ((*run, "--set", "holitom.d=0.5"), "holitom is not among the methods this command runs (earlytom)"),
                       ((*run, "--set", "holitomd=1"), "expected METHOD.KEY=VALUE"),
                       (("bench", "--arch", "tiny", "--methods", "full,earlytom", "--set", "nope.d=1"), "unknown method 'nope'")]:
        assert cli.main(list(argv)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0], err


def test_bench_ratio_is_one_ratio_or_refused(capsys):
    from earlytom_jax import cli
    from earlytom_jax.cli.bench import bench_ratios

    bench = ("bench", "--arch", "tiny")
    assert bench_ratios(_parse(*bench, "--ratio", "0.25")) == (0.25,)
    assert bench_ratios(_parse(*bench, "--ratios", "0.1,0.25")) == (0.1, 0.25)
    assert bench_ratios(_parse(*bench)) == (0.1,)
    assert bench_ratios(_parse(*bench, "--preset", "videomme@0.2")) == (0.2,)
    assert cli.main([*bench, "--ratio", "0.25", "--ratios", "0.1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--ratio and --ratios" in err[0]
