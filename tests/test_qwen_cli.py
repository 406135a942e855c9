"""Qwen2.5-VL through the API and the command line: the family read from config.json, its
sampling, preprocessing and prompt, answers equal to transformers' on the same pixels."""

from __future__ import annotations

import json

import numpy as np
import pytest

from earlytom_jax.api import VideoLLM
from earlytom_jax.cli.main import main
from earlytom_jax.prompt import PromptError, Tokenizer, encode_qwen_vl_prompt
from earlytom_jax.synthetic import make_clip
from earlytom_jax.video import write_test_video
from tests import tiny_qwen

QUESTION = "What moves in the clip?"


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """(transformers model, checkpoint directory, a 6 s clip at 10 fps, 160 x 120)."""
    root = tmp_path_factory.mktemp("qwen_cli")
    model = tiny_qwen.build(seed=11, window=56, fullatt=(2,))
    d = tiny_qwen.write_assets(tiny_qwen.save(model, str(root / "ckpt")))
    clip = make_clip(60, 160, seed=4)[:, :120]
    path = str(root / "clip.mp4")
    write_test_video(path, clip, fps=10)
    return model, d, path


def test_prompt_ids_around_the_video(qwen):
    _, d, _ = qwen
    llm = VideoLLM.load(d)
    ids = llm.prompt_ids(QUESTION)
    assert ids.prefix[-1] == tiny_qwen.VSTART and ids.suffix[0] == tiny_qwen.VEND
    tok = llm.tokenizer
    assert tok.decode(ids.prefix, skip_special_tokens=False).endswith("<|im_start|>user\n<|vision_start|>")
    assert tok.decode(ids.suffix, skip_special_tokens=False) == (
        f"<|vision_end|>{QUESTION}<|im_end|>\n<|im_start|>assistant\n")
    import dataclasses

    with pytest.raises(PromptError, match="maps '<\\|video_pad\\|>' to 299, but the model's config says 5"):
        encode_qwen_vl_prompt(Tokenizer.from_dir(d), QUESTION, dataclasses.replace(llm.cfg, video_token_id=5))


def test_ask_equals_transformers_on_the_same_pixels(qwen):
    """VideoLLM.ask on the file: qwen-vl-utils' frames (2 a second: 12 of 60, at most --frames),
    the processor's pixels, the prompt; 8 greedy tokens equal transformers' on those pixels."""
    model, d, path = qwen
    llm = VideoLLM.load(d)
    ans = llm.ask(path, QUESTION, num_frames=10, max_new_tokens=8)
    assert ans.video.n == 12 and len(ans.video.frames) == 10
    assert ans.video.frames.shape[1:3] == (168, 224)  # 120 x 160 scaled up to >= 37632 pixels, sides of 28
    assert ans.stats["frames"] == 5 and ans.stats["visual_tokens"] == 5 * 6 * 8
    pixels, video_time = llm.prepare(ans.video.frames)
    assert video_time == 1.0  # lmms-eval passes no fps: transformers' 2.0 → 2 / 2.0 seconds a temporal patch
    ids = llm.prompt_ids(QUESTION)
    ref = tiny_qwen.greedy(model, pixels, ids.prefix, ids.suffix, 8, video_time)
    assert ans.tokens == ref


def test_cli_run_visualize_and_errors(qwen, tmp_path, capsys):
    _, d, path = qwen
    assert main(["run", "--model", d, "--video", path, "--prompt", QUESTION, "--frames", "8", "--method", "full",
                 "--max-new-tokens", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["settings"]["family"] == "qwen2_5_vl" and out["settings"]["method"] == "FullTokens()"
    assert out["settings"]["frames_sampled"] == 8 and out["stats"]["frames"] == 4
    assert main(["run", "--model", d, "--video", path, "--prompt", QUESTION, "--frames", "8",
                 "--min-pixels", "60000", "--max-new-tokens", "1", "--json"]) == 0
    large = json.loads(capsys.readouterr().out)
    assert np.prod(out["settings"]["frame_size"]) < 60000 <= np.prod(large["settings"]["frame_size"])

    png = str(tmp_path / "kept.png")
    assert main(["visualize", "--model", d, "--video", path, "--frames", "6", "--method", "full", "--out", png]) == 0
    assert "3 frames, 144 kept tokens highlighted (full tokens)" in capsys.readouterr().out

    assert main(["run", "--model", d, "--video", path, "--prompt", QUESTION, "--frames", "12", "--method", "earlytom",
                 "--ratio", "0.15", "--tau", "0.3", "--max-new-tokens", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    s = out["stats"]
    assert out["settings"]["method"].startswith("EarlyTom(ratio=0.15, tau=0.3, layers=(1, 3)")  # 7,26,28 of 32 scaled
    assert s["frames"] == len([f for f in s["frame_sources"][: s["frames"]]]) < 6 == len(s["frame_sources"])
    kept = [i for i in s["kept_index"] if i >= 0]
    assert len(kept) == s["visual_tokens"] == s["count"] and s["llm_kept"] == round(len(kept) * 0.5)
    pos = s["visual_positions"][: len(kept)]
    assert [p[1:] for p in pos] == [[(i % 48) // 8, i % 8] for i in kept]  # a 6 x 8 merged grid
    assert [p[0] for p in pos] == [2 * s["frame_sources"][i // 48] for i in kept]  # earliest source, 2 a second
    png = str(tmp_path / "earlytom.png")
    assert main(["visualize", "--model", d, "--video", path, "--frames", "12", "--method", "earlytom", "--ratio", "0.3",
                 "--tau", "0.3", "--out", png]) == 0
    assert f"{s['frames']} frames, " in capsys.readouterr().out
    assert main(["run", "--model", d, "--video", path, "--prompt", QUESTION, "--method", "tome"]) == 2  # not even built
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "method 'tome' is not adapted to Qwen2.5-VL" in err
    assert main(["run", "--model", d, "--video", path, "--prompt", QUESTION, "--min-pixels", "90000",
                 "--max-pixels", "50000"]) == 2
    assert "--max-pixels 50000 is below --min-pixels 90000" in capsys.readouterr().err


@pytest.mark.parametrize("task", ["videomme", "mvbench"])
def test_eval_on_fixture_datasets(qwen, tmp_path, capsys, task):
    """`earlytom eval` on Qwen2.5-VL: video files as qwen-vl-utils samples them, MVBench's frame
    folders as stills; records complete, with the encoder's FLOPs at the frame size."""
    from earlytom_jax.evals import records as rec
    from earlytom_jax.evals.fixtures import write_fixture

    _, d, _ = qwen
    data = write_fixture(task, str(tmp_path / "data"), per_group=1, frames=6, size=32)
    out = tmp_path / "out"
    assert main(["eval", "--model", d, "--task", task, "--data", data, "--out", str(out), "--frames", "4",
                 "--method", "full", "--limit", "3", "--quiet"]) == 0
    rows = rec.read_records(str(out / "samples.jsonl"))
    assert len(rows) == 3
    for r in rows:
        assert r["frames_after_merge"] == 2 and r["visual_tokens"] == 2 * 7 * 7  # 32 px scaled up to 196 x 196
        assert r["flops"] > 0
    results = json.load(open(out / "results.json"))
    assert results["complete"] and results["config"]["method"]["name"] == "full"
