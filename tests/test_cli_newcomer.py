"""Issue 37: what a new user tries, through the command line (`cli.main` in this process, so
the compiled programs are shared between tests; one subprocess where the exit path matters),
on the shipped toy model: defaults that fit the model, one-line errors before any expensive
work, honest timings, strict JSON, complete help."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from earlytom_jax import cli
from earlytom_jax.toy.model import TOY_DIR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DESCRIBE = "Describe what's happening in this video."


def _strict(text: str):
    """json.loads that rejects NaN and Infinity, as strict parsers do."""
    def bad(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=bad)


def _one_error_line(capsys, code: int, expected: int = 2) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and not line.startswith("note:")]
    assert code == expected, err
    assert len(err) == 1 and err[0].startswith("earlytom: "), err
    return err[0]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A toy clip (16 frames) and its multiple-choice question."""
    from earlytom_jax.toy.data import make_sample
    from earlytom_jax.video import write_test_video

    sample = make_sample("count", 7)
    path = str(tmp_path_factory.mktemp("toyclip") / "clip.mp4")
    write_test_video(path, sample.frames, fps=8)
    return path, sample


def test_toy_checkpoint_carries_its_defaults():
    """The shipped config.json holds what toy/model.py writes into it (a retrained model keeps them)."""
    from earlytom_jax.compression.defaults import read_model_info
    from earlytom_jax.toy.model import CHECKPOINT_INFO

    with open(os.path.join(TOY_DIR, "config.json")) as f:
        assert json.load(f)["earlytom"] == CHECKPOINT_INFO
    info = read_model_info(TOY_DIR)
    assert info.defaults == {"earlytom": {"layers": (1, 2, 3), "llm_layer": 3}, "fastv": {"layer": 1}}
    assert info.multiple_choice_only


def test_run_on_the_toy_with_default_flags_honest_ttft_and_strict_json(clip, capsys):
    """Default flags on the toy model: its own layers; the TTFT printed leaves compilation out
    (reported apart); --json is strict (null where there is no decode rate); an open question
    gets the multiple-choice note."""
    video, _ = clip
    flags = ["run", "--model", TOY_DIR, "--video", video, "--prompt", DESCRIBE, "--max-new-tokens", "1"]
    assert cli.main(flags) == 0
    err = capsys.readouterr().err
    assert "note: the toy model only knows its five multiple-choice question types" in err
    m = re.search(r"TTFT (\d+) ms \(\+ ([\d.]+) s compiling, once\)", err)
    assert m, err
    ttft_s, compile_s = int(m.group(1)) / 1000, float(m.group(2))
    assert compile_s > 0.5 and ttft_s < compile_s / 5, (ttft_s, compile_s)  # compilation is not in the TTFT

    assert cli.main([*flags, "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()[-1]
    j = _strict(out)
    assert "layers=(1, 2, 3)" in j["settings"]["method"] and "llm_layer=3" in j["settings"]["method"]
    assert j["compile_s"] == 0.0  # the program compiled by the first run
    assert j["tokens_per_s"] is None and '"tokens_per_s": null' in out and "NaN" not in out
    assert j["ttft_s"] < compile_s / 5


def test_visualize_on_the_toy_draws_the_method_it_is_given(clip, tmp_path, capsys):
    from PIL import Image

    video, _ = clip
    base = ["visualize", "--model", TOY_DIR, "--video", video]
    assert cli.main([*base, "--out", str(tmp_path / "et.png")]) == 0  # EarlyTom, the toy's defaults
    out = capsys.readouterr().out
    assert "(EarlyTom)" in out
    assert cli.main([*base, "--method", "full", "--out", str(tmp_path / "full.png")]) == 0
    out = capsys.readouterr().out
    assert "32 frames, 288 kept tokens highlighted (full tokens)" in out  # every token of every frame
    Image.open(tmp_path / "full.png").verify()
    code = cli.main([*base, "--method", "tome", "--out", str(tmp_path / "t.png")])
    assert "no kept-token map" in _one_error_line(capsys, code)


def test_readme_python_api_runs_on_the_shipped_model(tmp_path, monkeypatch, capsys):
    """The README's first Python API block, executed as is."""
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    section = readme[readme.index("## Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "TOY_DIR" in code
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    ans, full, sample = namespace["ans"], namespace["full"], namespace["sample"]
    assert ans.text in "ABCD" and len(ans.text) == 1
    assert ans.stats["visual_tokens"] < full.stats["visual_tokens"]
    assert namespace["method"].layers == (1, 2, 3) and namespace["method"].llm_layer == 3
    assert "correct:" in capsys.readouterr().out


def test_precedence_flags_preset_checkpoint_scaled():
    """One order: explicit, preset, checkpoint, built-in scaled (with a note); explicit out of
    range stays an error."""
    from earlytom_jax.compression import defaults, registry
    from earlytom_jax.errors import ConfigError
    from earlytom_jax.toy.model import TOY_CONFIG

    info = defaults.read_model_info(TOY_DIR)
    kw, notes = defaults.settings("earlytom", TOY_CONFIG, {"llm_layer": 2}, None, info)
    assert kw == {"llm_layer": 2, "layers": (1, 2, 3)} and not notes
    kw, notes = defaults.settings("earlytom", TOY_CONFIG, {"tau": None}, None, None)
    assert kw == {"layers": (1, 3), "llm_layer": 3} and "6,21,23 -> 1,3" in notes[0]
    kw, _ = defaults.settings("earlytom", TOY_CONFIG, {"tau": 0.3}, "videomme@0.1", info)
    assert kw == {"tau": 0.3, "preset": "videomme@0.1"}  # the preset's, not the checkpoint's
    assert defaults.settings("fastv", TOY_CONFIG, {}, None, info)[0] == {"layer": 1}
    with pytest.raises(ConfigError, match="beyond the encoder's depth"):
        registry.build("earlytom", 0.1, TOY_CONFIG, **defaults.settings("earlytom", TOY_CONFIG, {"layers": (1, 9)},
                                                                         None, info)[0])
    assert defaults.is_multiple_choice("Q?\nA. one\nB. two") and not defaults.is_multiple_choice(DESCRIBE)
    assert info.open_question_note("Q?\nA. one\nB. two\nC. x\nD. y") is None


def test_checkpoint_without_defaults_scales_with_a_note(clip, tmp_path, capsys, monkeypatch):
    """The toy without its "earlytom" key: the built-in defaults scaled, one note (once per
    process); an explicit layer out of range is still an error. (Both stop before decoding.)"""
    from earlytom_jax.cli import flags

    monkeypatch.setattr(flags, "_PRINTED", set())
    video, _ = clip
    bare = tmp_path / "bare"
    shutil.copytree(TOY_DIR, bare)
    cfg = json.loads((bare / "config.json").read_text())
    del cfg["earlytom"]
    (bare / "config.json").write_text(json.dumps(cfg))
    code = cli.main(["run", "--model", str(bare), "--video", video, "--prompt", "hi", "--frames", "100000"])
    err = capsys.readouterr().err
    assert code == 2 and "note: EarlyTom's default layers 6,21,23 -> 1,3; llm_layer 18 -> 3 (scaled" in err
    assert "multiple-choice" not in err  # the note comes from the checkpoint's key
    code = cli.main(["run", "--model", str(bare), "--video", video, "--prompt", "hi", "--frames", "100000"])
    assert "note:" not in capsys.readouterr().err  # said once
    code = cli.main(["run", "--model", TOY_DIR, "--video", video, "--prompt", "hi", "--layers", "1,9"])
    assert "compression layer 9 is beyond the encoder's depth" in _one_error_line(capsys, code)


@pytest.mark.parametrize("argv,message", [
    (["run", "--model", TOY_DIR, "--video", "CLIP", "--prompt", "hi", "--frames", "100000"],
     "(100000 frames) plus 64 new tokens exceeds the model's context of 2048"),
    (["demo", "--frames", "100000", "--out", ""], "(100000 frames) plus 8 new tokens exceeds the model's context of 2048"),
    (["demo", "--arch", "llava-ov-0.5b", "--frames", "100000", "--out", ""], "exceeds the model's context of 32768"),
    (["demo", "--arch", "qwen2.5-vl-7b", "--frames", "100000", "--out", ""], "exceeds the model's context of 128000"),
    (["demo", "--frames", "4", "--out", ""], "the toy clips need at least 8 frames (--frames 4)"),
    (["run", "--model", TOY_DIR, "--video", "CLIP", "--prompt", "hi", "--max-new-tokens", "0"],
     "--max-new-tokens 0: need at least 1"),
    (["demo", "--max-new-tokens", "0"], "--max-new-tokens 0: need at least 1"),
    (["visualize", "--model", TOY_DIR, "--video", "CLIP", "--out", "FILE/kept.png"], "is a file, not a folder"),
    (["visualize", "--model", TOY_DIR, "--video", "CLIP", "--out", "MISSING/kept.png"], "does not exist"),
    (["demo", "--out", "FILE/demo.png"], "--out FILE/demo.png: its folder"),
    (["bench", "--arch", "llava-ov-7b", "--frames", "100000"], "(100000 frames) plus 32 new tokens exceeds the model's context"),
    (["bench", "--arch", "tiny", "--json", "FILE/b.json"], "--json FILE/b.json: its folder"),
    (["bench", "--arch", "tiny", "--chart", "FILE/b.png"], "--chart FILE/b.png: its folder"),
    (["eval", "--model", TOY_DIR, "--task", "mvbench", "--data", "MISSING", "--out", "FILE/run"], "FILE is a file"),
])
def test_cheap_checks_fail_in_one_line_within_seconds(argv, message, clip, tmp_path, capsys, monkeypatch):
    """Before decoding, compiling or timing anything: frames against the context, counts,
    output paths (a parent that is a file stands for an unwritable folder: tests run as root)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "FILE").write_text("a file, not a folder")
    argv = [clip[0] if a == "CLIP" else a for a in argv]
    t = time.perf_counter()
    code = cli.main(argv)
    line = _one_error_line(capsys, code)
    assert message in line, line
    assert time.perf_counter() - t < 30
    assert not os.path.exists(tmp_path / "earlytom_demo.png")


def test_frames_beyond_the_memory_available_fail_before_decoding(clip, capsys, monkeypatch):
    from earlytom_jax import api

    monkeypatch.setattr(api, "available_memory", lambda: 10_000_000)  # 10 MB free
    code = cli.main(["run", "--model", TOY_DIR, "--video", clip[0], "--prompt", "hi", "--frames", "200",
                     "--method", "full", "--max-new-tokens", "2"])
    line = _one_error_line(capsys, code)
    assert "--frames 200: the frames and the encoder's activations need at least" in line
    assert "more than the 10.00 MB of memory available" in line


def test_config_json_not_an_object_is_one_line(clip, tmp_path, capsys):
    bad = tmp_path / "model"
    shutil.copytree(TOY_DIR, bad)
    (bad / "config.json").write_text("[1, 2, 3]")
    code = cli.main(["run", "--model", str(bad), "--video", clip[0], "--prompt", "hi"])
    assert "config.json: valid JSON but not an object (a list)" in _one_error_line(capsys, code)


def test_version_and_help_with_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    from earlytom_jax.cli.main import version

    assert capsys.readouterr().out.strip() == f"earlytom {version()}" and version()[0].isdigit()
    helps = {}
    for command in ("run", "demo", "visualize", "convert", "bench", "eval"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        helps[command] = " ".join(capsys.readouterr().out.split())  # unwrapped
    run = helps["run"]
    for flag, text in (("--video", "video file"), ("--prompt", "the question"), ("--frames", "(default: 32)"),
                       ("--max-new-tokens", "(default: 64)"), ("--dtype", "(default: float32)"),
                       ("--model", "HF checkpoint or converted directory"), ("--method", "(default: earlytom)")):
        assert re.search(re.escape(flag) + r"\b.*?" + re.escape(text), run), (flag, text)
    assert "--max-new-tokens MAX_NEW_TOKENS longest answer, in tokens (at least 1) (default: 8)" in helps["demo"]
    assert "HF checkpoint or converted directory" in helps["visualize"] and "(default: 32)" in helps["visualize"]
    convert = helps["convert"]
    assert "src HF checkpoint directory" in convert and "dst the converted directory" in convert
    assert "(default: bfloat16)" in convert
    assert "--runs RUNS timed calls per method (default: 5)" in helps["bench"]


def test_convert_terminated_and_leftovers_are_one_line_each(monkeypatch, capsys):
    from earlytom_jax.checkpoint import orbax_io
    from earlytom_jax.checkpoint.staging import Terminated

    def terminated(*a, **k):
        raise Terminated("terminated (SIGTERM); the partial conversion was removed")

    monkeypatch.setattr(orbax_io, "convert_checkpoint", terminated)
    code = cli.main(["convert", "src", "dst", "--quiet"])
    line = _one_error_line(capsys, code, expected=143)
    assert line == ("earlytom: terminated (SIGTERM) during convert; nothing was kept "
                    "(the partial output was removed)")

    summary = {"dst": "/x/dst", "tensors": 3, "bytes": 2_000_000, "seconds": 1.25, "dtype": "bfloat16",
               "peak_rss_bytes": float("nan"),
               "removed_leftovers": [{"path": "/x/dst.tmp-ab12", "bytes": 1_500_000}],
               "other_staging_dirs": [{"path": "/x/dst.tmp-cd34", "why": "process 77 is still running"}]}
    monkeypatch.setattr(orbax_io, "convert_checkpoint", lambda *a, **k: summary)
    assert cli.main(["convert", "src", "dst", "--quiet"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "converted 3 tensors (0.00 GB, bfloat16) to /x/dst in 1.2 s; validated",
        "removed /x/dst.tmp-ab12 (1.50 MB), left by a killed conversion",
        "left /x/dst.tmp-cd34 in place (process 77 is still running; remove it once no conversion is writing it)",
    ]
    assert cli.main(["convert", "src", "dst", "--quiet", "--json"]) == 0
    assert _strict(capsys.readouterr().out)["peak_rss_bytes"] is None


def test_demo_says_what_it_is_doing_and_which_clip_it_draws(tmp_path):
    """A subprocess, as a user sees it: progress before each compile, the clip the picture
    shows and the frames merged away, the scaled defaults' note."""
    out = str(tmp_path / "demo.png")
    p = subprocess.run([sys.executable, "-m", "earlytom_jax.cli", "demo", "--arch", "tiny", "--frames", "4",
                        "--max-new-tokens", "1", "--out", out], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    at = {key: next(i for i, line in enumerate(lines) if key in line)
          for key in ("drawing random weights", "full tokens: compiling", "full tokens  frames",
                      "EarlyTom: compiling", "EarlyTom     frames", "picture of what EarlyTom kept on the generated clip")}
    assert at["drawing random weights"] < at["full tokens: compiling"] < at["full tokens  frames"] \
        < at["EarlyTom: compiling"] < at["EarlyTom     frames"]
    assert re.search(r"4 sampled frames -> \d|all 4 sampled frames", lines[at["picture of what EarlyTom kept on the generated clip"]])
    assert "compiling apart:" in lines[at["full tokens  frames"]]
    assert "note: EarlyTom's default layers 6,21,23 ->" in p.stderr and "Traceback" not in p.stderr
    assert os.path.exists(out)


def test_strict_json_writes_null_for_every_non_finite_float():
    import numpy as np

    from earlytom_jax.io_utils import strict_json

    text = strict_json({"a": float("nan"), "b": [float("inf"), 1.5, (float("-inf"),)], "c": np.float32("nan"),
                        "d": np.int64(3), "e": "NaN"})
    assert text == '{"a": null, "b": [null, 1.5, [null]], "c": null, "d": 3, "e": "NaN"}'
    assert _strict(text)["d"] == 3


def test_status_line_only_on_a_terminal(monkeypatch, capsys):
    """`run` and `visualize` say what they wait on (loading, compiling) in a status line that a
    terminal shows in place and erases; off a terminal (logs, these tests) it writes nothing."""
    from earlytom_jax import progress

    progress.status("earlytom: loading...")
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    progress.status("earlytom: loading...")
    progress.status(None)
    assert capsys.readouterr().err == "\r\x1b[Kearlytom: loading...\r\x1b[K"
