"""The toy video-QA generator, the toy model's checkpoint files and its training step."""

from __future__ import annotations

import os

import numpy as np
import pytest

from earlytom_jax.toy import data

N = 12


@pytest.mark.parametrize("kind", data.KINDS)
def test_samples_are_deterministic_and_well_formed(kind):
    for seed in range(N):
        a, b = data.make_sample(kind, seed), data.make_sample(kind, seed)
        np.testing.assert_array_equal(a.frames, b.frames)
        assert a.frames.shape == (16, 48, 48, 3) and a.frames.dtype == np.uint8
        assert len(set(a.options)) == 4 and a.answer in data.LETTERS
        assert a.prompt.splitlines()[1:5] == [f"{l}. {o}" for l, o in zip(data.LETTERS, a.options)]
    assert len({data.make_sample(kind, s).answer for s in range(40)}) == 4  # every letter used


def _answer(s):
    return s.options[data.LETTERS.index(s.answer)]


def test_count_answer_is_the_number_of_flash_frames():
    for seed in range(N):
        s = data.make_sample("count", seed)
        bright = np.flatnonzero(s.frames.mean(axis=(1, 2, 3)) > 200)
        assert bright.tolist() == s.meta["flash_frames"]
        assert _answer(s) == data.COUNTS[len(bright) - 1]


def test_motion_answer_follows_the_square():
    for seed in range(N):
        s = data.make_sample("motion", seed)
        bg = np.median(s.frames[0].reshape(-1, 3), axis=0)
        centres = []
        for f in (s.frames[0], s.frames[-1]):
            ys, xs = np.nonzero(np.abs(f.astype(int) - bg).sum(-1) > 60)
            centres.append((xs.mean(), ys.mean()))
        dx, dy = centres[1][0] - centres[0][0], centres[1][1] - centres[0][1]
        want = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
        assert _answer(s) == want


def test_scene_answer_is_the_quarter_in_which_the_screen_goes_dark():
    for seed in range(N):
        s = data.make_sample("scene", seed)
        background = np.median(s.frames.reshape(16, -1, 3), axis=1)  # the square covers < 10%
        k = int(np.flatnonzero(np.abs(np.diff(background, axis=0)).sum(-1) > 15)[0]) + 1
        assert k == s.meta["change_frame"]
        assert _answer(s) == data.QUARTERS[min(3, k * 4 // 16)]


def test_order_answer_is_the_earlier_colour():
    for seed in range(N):
        s = data.make_sample("order", seed)
        a0, a1, b0, b1 = s.meta["windows"]
        assert a1 <= b0 and _answer(s) == s.meta["first"] and s.meta["second"] in s.options


def test_held_out_and_validation_seeds_never_meet_training_seeds():
    """Training seeds of stage i: seed · 10^7 + 5 · 10^6 · i + [0, steps · batch)."""
    from earlytom_jax.toy.train import TrainSettings

    from earlytom_jax.errors import ConfigError

    st = TrainSettings(seed=79, max_stages=4)
    last = st.seed * 10_000_000 + 5_000_000 * (st.max_stages - 1) + 5_000_000
    assert last < data.VALIDATION_START
    for bad in (dict(seed=80), dict(seed=-1), dict(max_stages=5), dict(steps=400_000)):
        with pytest.raises(ConfigError, match="toy training needs"):
            TrainSettings(**bad)
    assert data.VALIDATION_START + 10_000_000 < data.HELD_OUT_START
    assert data.validation("motion", 1)[0].seed == data.VALIDATION_START


def test_tokenizer_knows_every_prompt_word():
    from earlytom_jax.prompt import chat_prompt
    from earlytom_jax.toy.model import tokenizer

    tok = tokenizer()
    for kind in data.KINDS:
        for seed in range(5):
            ids = tok.encode(chat_prompt(data.make_sample(kind, seed).prompt)).ids
            assert tok.token_to_id("<unk>") not in ids


def test_checkpoint_round_trip_and_transformers_agree(tmp_path):
    """Random toy weights → HF directory → our loader (bit-equal) and transformers (same
    logits and greedy answer on toy questions)."""
    import jax

    from earlytom_jax.api import VideoLLM
    from earlytom_jax.architectures import random_params
    from earlytom_jax.pipeline import FULL
    from earlytom_jax.toy.model import TOY_CONFIG, save_checkpoint
    from tests.helpers import hf_logits

    params = random_params(TOY_CONFIG, seed=3)
    save_checkpoint(params, str(tmp_path))
    umask = os.umask(0)
    os.umask(umask)
    for name in os.listdir(tmp_path):  # shipped files must not come out private
        assert os.stat(tmp_path / name).st_mode & 0o777 == 0o666 & ~umask, name
    llm = VideoLLM.load(str(tmp_path))
    assert llm.cfg == TOY_CONFIG
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(llm.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    _assert_transformers_answers_like_us(str(tmp_path), llm, FULL, per_kind=1, hf_logits=hf_logits)


def _assert_transformers_answers_like_us(directory, llm, method, per_kind, hf_logits):
    from transformers import LlavaOnevisionForConditionalGeneration

    model = LlavaOnevisionForConditionalGeneration.from_pretrained(directory).eval()
    for kind in data.KINDS:
        for s in data.held_out(kind, per_kind):
            pixels = llm.preprocessor(s.frames)
            ids = llm.prompt_ids(s.prompt)
            theirs, _ = hf_logits(model, pixels, ids.prefix, ids.suffix)
            ours = llm.answer(pixels, s.prompt, method, max_new_tokens=1)
            assert ours.tokens[0] == int(np.argmax(theirs[-1]))


def test_train_step_learns_a_fixed_batch():
    """A few AdamW steps on one batch lower its loss (the step, the loss and the gradients
    are wired together); augmentation masks never leave a clip without visual tokens."""
    import jax
    import jax.numpy as jnp
    import optax

    from earlytom_jax.architectures import random_params
    from earlytom_jax.toy.batch import Encoder, make_batch
    from earlytom_jax.toy.loss import loss_fn
    from earlytom_jax.toy.model import TOY_CONFIG

    enc = Encoder()
    rng = np.random.default_rng(0)
    samples = [data.make_sample(k, i) for i, k in enumerate(data.KINDS)]
    batch = {k: jnp.asarray(v) for k, v in make_batch(samples, enc, rng, augment=True).items()}
    vis = (batch["seg_start"] & batch["frame_keep"])[:, :, None] & batch["token_keep"]
    assert bool(vis.any(axis=(1, 2)).all())
    prefix = jnp.asarray(enc.prefix)
    params = random_params(TOY_CONFIG, seed=1)
    opt = optax.adamw(3e-3)
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        (loss, _), g = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, prefix, enc.eos)
        u, state = opt.update(g, state, params)
        return optax.apply_updates(params, u), state, loss

    losses = []
    for _ in range(12):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], losses


def test_contextual_tokens_absorb_every_dropped_token_once():
    """Each dropped token goes to exactly one target; a target's row is its group's mean (or
    target + mean of the others, the official VisionZip form); kept tokens stay themselves."""
    from earlytom_jax.toy import batch

    rng = np.random.default_rng(0)
    for _ in range(200):
        keep = rng.random((16, 9)) < 0.3
        before = keep.copy()
        mix = np.broadcast_to(np.eye(9, dtype=np.float32), (16, 9, 9)).copy()
        batch._contextual_tokens(rng, keep, mix)
        for t in range(16):
            dropped = np.flatnonzero(~before[t])
            targets = np.flatnonzero(keep[t] & ~before[t])
            np.testing.assert_array_equal(mix[t, before[t]], np.eye(9, dtype=np.float32)[before[t]])
            if dropped.size < 2:
                assert targets.size == 0
                continue
            assert 1 <= targets.size <= 2
            cover = (mix[t, targets][:, dropped] > 0).sum(0)
            np.testing.assert_array_equal(cover, np.ones(dropped.size))  # every dropped token once
            for tgt in targets:
                row = mix[t, tgt]
                members = np.flatnonzero(row > 0)
                assert set(members) <= set(dropped) and tgt in members
                if row.sum() > 1.5:  # quirk: 1 + mean of the others
                    others = members[members != tgt]
                    np.testing.assert_allclose(row[others], 1 / others.size, rtol=1e-6)
                    assert row[tgt] == 1.0
                else:
                    np.testing.assert_allclose(row[members], 1 / members.size, rtol=1e-6)


def test_pruning_inside_the_llm_hides_tokens_from_its_layer_on():
    """A visual token dropped from LLM layer 0 on cannot change the answer logits; dropped
    only from the last layer on, it still does (the mask is wired per layer)."""
    import jax.numpy as jnp

    from earlytom_jax.architectures import random_params
    from earlytom_jax.toy.batch import Encoder, make_batch
    from earlytom_jax.toy.loss import forward
    from earlytom_jax.toy.model import TOY_CONFIG

    enc = Encoder()
    batch = make_batch([data.make_sample("colour", 1)], enc, np.random.default_rng(0), augment=False)
    params = random_params(TOY_CONFIG, seed=2)
    prefix = jnp.asarray(enc.prefix)
    other = dict(batch, token_mix=batch["token_mix"].copy())
    other["token_mix"][0, 5, 4] = np.eye(9)[0]  # frame 5: token 4 becomes a copy of token 0
    hide = np.ones_like(batch["llm_keep"])
    hide[0, 5, 4] = False

    def logits(b, at):
        b = dict(b, llm_keep=hide, llm_drop_at=np.array([at]))
        return np.asarray(forward(params, {k: jnp.asarray(v) for k, v in b.items()}, prefix))

    np.testing.assert_allclose(logits(batch, 0), logits(other, 0), rtol=0, atol=1e-6)
    assert np.abs(logits(batch, TOY_CONFIG.text.num_layers - 1) - logits(other, TOY_CONFIG.text.num_layers - 1)).max() > 1e-4


# ----------------------------------------------------------------------------- shipped model


@pytest.fixture(scope="module")
def shipped():
    from earlytom_jax.api import VideoLLM
    from earlytom_jax.evals.toy import TOY_DIR

    return VideoLLM.load(TOY_DIR)


def test_shipped_model_answers_held_out_questions(shipped):
    """The trained checkpoint in the repo answers held-out questions of every type (accuracies
    on 200 per type are in BENCHMARKS.md; 20 per type here)."""
    from earlytom_jax.evals.toy import parse_letter
    from earlytom_jax.pipeline import FULL

    for kind in data.KINDS:
        samples = data.held_out(kind, 20)
        right = sum(
            parse_letter(shipped.answer(shipped.preprocessor(s.frames), s.prompt, FULL, 2, pad_multiple=64).text) == s.answer
            for s in samples
        )
        assert right >= 18, (kind, right)


def test_transformers_answers_the_shipped_model_identically(shipped):
    from earlytom_jax.evals.toy import TOY_DIR
    from earlytom_jax.pipeline import FULL
    from tests.helpers import hf_logits

    _assert_transformers_answers_like_us(TOY_DIR, shipped, FULL, per_kind=2, hf_logits=hf_logits)


def test_toy_benchmark_command_writes_every_row(tmp_path):
    """`python -m earlytom_jax.evals.toy` end to end on 1 clip per type at one ratio: full,
    EarlyTom with and without stage III, every baseline at EarlyTom's budget and (a subset of
    the paper's other baselines, to keep this short) methods at their own budget, PyramidDrop
    also at its published schedule, in the JSON and the markdown table."""
    import json

    from earlytom_jax.evals import toy

    out = tmp_path / "toy.json"
    assert toy.main(["--per-type", "1", "--ratios", "0.25", "--own-budget", "holitom,pdrop", "--json", str(out),
                     "--md", str(tmp_path / "toy.md")]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["name"] for r in rows] == ["full", "earlytom", "earlytom", *toy.BASELINES, "holitom", "pdrop", "pdrop"]
    assert [r["ratio"] for r in rows[-3:]] == [0.25, 0.25, 0.5]
    assert rows[0]["visual_tokens"] == 144.0 and all(set(r["accuracy"]) == set(data.KINDS) for r in rows)
    table = (tmp_path / "toy.md").read_text()
    assert "| VisionZip at EarlyTom 25%'s budget |" in table and table.count("\n") == len(rows) + 2


def test_demo_runs_the_shipped_model(tmp_path):
    import subprocess
    import sys

    from PIL import Image

    out = tmp_path / "demo.png"
    r = subprocess.run([sys.executable, "-m", "earlytom_jax.cli", "demo", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "real weights, real answers" in r.stdout and "correct: full tokens" in r.stdout
    for kind in data.KINDS:
        assert f"[{kind}]" in r.stdout
    assert Image.open(out).size[0] > 100


def test_training_starts_from_a_2d_sincos_position_embedding():
    """The first half of each patch's vector depends on its column only, the second half on its
    row only, every patch differs, and nothing else of `random_params` changes."""
    import jax

    from earlytom_jax.architectures import random_params
    from earlytom_jax.toy.model import TOY_CONFIG
    from earlytom_jax.toy.loss import initial_params, posemb_sincos_2d

    g, c = TOY_CONFIG.vision.grid, TOY_CONFIG.vision.hidden_size
    pos = posemb_sincos_2d(g, c).reshape(g, g, c)
    assert np.abs(pos).max() <= 1.0
    np.testing.assert_array_equal(pos[:, :, : c // 2], np.broadcast_to(pos[:1, :, : c // 2], pos[:, :, : c // 2].shape))
    np.testing.assert_array_equal(pos[:, :, c // 2 :], np.broadcast_to(pos[:, :1, c // 2 :], pos[:, :, c // 2 :].shape))
    flat = pos.reshape(g * g, c)
    assert np.linalg.norm(flat[:, None] - flat[None], axis=-1)[~np.eye(g * g, dtype=bool)].min() > 0.1
    # sin and cos of the same angle: each frequency's pair has unit norm
    np.testing.assert_allclose(flat[:, : c // 4] ** 2 + flat[:, c // 4 : c // 2] ** 2, 1.0, rtol=1e-6)
    p, q = initial_params(5), random_params(TOY_CONFIG, seed=5)
    np.testing.assert_array_equal(np.asarray(p["vision"]["pos"]), flat)
    p["vision"]["pos"] = q["vision"]["pos"]
    jax.tree.map(np.testing.assert_array_equal, p, q)


def test_training_continues_until_every_type_is_learned(monkeypatch):
    """Stage 1 always follows stage 0; later stages run while a type's validation accuracy at
    a stage's end is below `until`, at most `max_stages` in all; --init continues as
    `start_stage`."""
    from earlytom_jax.toy import train

    def fake_stage(st, params, stage, steps, enc, log, on_eval, progress=True):
        acc = script[stage]
        return params, [{"step": steps, "validation": {k: acc for k in data.KINDS}}], 0.0

    monkeypatch.setattr(train, "_train_stage", fake_stage)
    monkeypatch.setattr(train, "initial_params", lambda seed: {})
    for script, want in (([0.3, 1.0, 1.0, 1.0], [1, 2]), ([0.3, 0.5, 0.96, 1.0], [1, 2, 3]),
                         ([0.3, 0.5, 0.5, 0.5], [1, 2, 3, 4])):
        _, rec = train.train(train.TrainSettings(), None, log=lambda *a, **k: None)
        assert [s["stage"] for s in rec["stages"]] == want and rec["complete"]
        assert [s["steps"] for s in rec["stages"]] == [3500] + [2000] * (len(want) - 1)
    monkeypatch.setattr(train, "read_record", lambda d: None)
    monkeypatch.setattr("earlytom_jax.checkpoint.load.load_any", lambda d: (None, {}))
    script = [None, None, 0.5, 1.0]
    _, rec = train.train(train.TrainSettings(init="x", start_stage=2, steps=2000), None, log=lambda *a, **k: None)
    assert [s["stage"] for s in rec["stages"]] == [3, 4]


def test_reproduce_compares_per_type_and_fails_beyond_the_tolerance(tmp_path, capsys):
    """The re-run script's comparison: the shipped model against itself is within 0 points; a
    random-weights checkpoint is not within 2; the recorded recipe is the shipped one."""
    from earlytom_jax.architectures import random_params
    from earlytom_jax.evals.toy import TOY_DIR
    from earlytom_jax.io_utils import read_json
    from earlytom_jax.toy import reproduce
    from earlytom_jax.toy.model import TOY_CONFIG, save_checkpoint

    st = reproduce.recorded_settings(TOY_DIR)
    assert st.seed == read_json(os.path.join(TOY_DIR, "training.json"))["settings"]["seed"]
    assert reproduce.recorded_settings(TOY_DIR, seed=1).seed == 1
    assert reproduce.main(["--trained", TOY_DIR, "--per-type", "4", "--tolerance", "0",
                           "--json", str(tmp_path / "same.json")]) == 0
    assert read_json(str(tmp_path / "same.json"))["max_abs_diff_points"] == 0
    save_checkpoint(random_params(TOY_CONFIG, seed=4), str(tmp_path / "random"))
    assert reproduce.main(["--trained", str(tmp_path / "random"), "--per-type", "4"]) == 1
    assert "NOT within 2 points" in capsys.readouterr().out
    assert reproduce.main(["--against", str(tmp_path / "random"), "--out", str(tmp_path / "x")]) == 2
    assert "no training record" in capsys.readouterr().err


def test_a_short_training_run_shows_its_steps_and_validation(tmp_path, capsys):
    """Two real optimizer steps: a bar over the stage's steps (stderr, with the loss), the
    validation line on stdout, and a checkpoint whose record names its one stage."""
    from earlytom_jax.io_utils import read_json
    from earlytom_jax.toy import train

    st = train.TrainSettings(steps=2, batch=2, eval_every=2, eval_per_kind=1, max_stages=1)
    _, rec = train.train(st, str(tmp_path / "ckpt"))
    out, err = capsys.readouterr()
    assert "stage 1: 100%" in err and "2/2" in err and "step" in err
    assert "stage 1 step 2/2" in out and all(k in out for k in data.KINDS)
    assert [s["stage"] for s in rec["stages"]] == [1] and rec["complete"]
    assert read_json(str(tmp_path / "ckpt" / "training.json"))["stages"][0]["history"][0]["step"] == 2


def test_toy_table_marks_a_method_that_cannot_run_at_a_ratio():
    """A baseline whose budget the toy's 9 tokens a frame cannot meet (HoliTom keeps a token per
    frame: r >= 1/9) is a row saying so, not a crash and not a number."""
    from earlytom_jax.compression import registry
    from earlytom_jax.errors import ConfigError
    from earlytom_jax.evals import toy
    from earlytom_jax.toy.model import TOY_CONFIG

    with pytest.raises(ConfigError, match="below 1/9"):
        toy.build("holitom", 0.1, TOY_CONFIG)
    row = {"label": "HoliTom at r = 0.1 (its own budget)", "name": "holitom", "ratio": 0.1, "skipped": "too few"}
    table = toy.markdown({"rows": [row]})
    assert "| HoliTom at r = 0.1 (its own budget) | not run: too few |" in table
    assert table.splitlines()[-1].count("|") == table.splitlines()[0].count("|")
    assert registry.LABELS["holitom"] == "HoliTom"
