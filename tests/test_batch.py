"""Batched answering (`VideoLLM.answer_batch`/`ask_batch`, `pipeline.prefill_batch`,
`decode_loop_batch`): every sample of a batch gets what it gets alone, for every method on every
model family (tokens identical, first-token logits within 1e-4 in fp32, the same compression
statistics); each sample stops at its own EOS; one compile per (B, shape), the last partial
batch included; a frame bucket stays one branch for the batch (no vmapped switch)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from earlytom_jax import pipeline
from earlytom_jax.api import VideoLLM
from earlytom_jax.errors import ConfigError
from earlytom_jax.generate import generate, generate_batch
from earlytom_jax.synthetic import make_clip
from earlytom_jax.toy.model import TOY_DIR
from tests import tiny_qwen
from tests.test_llava_video import _mark_video
from tests.tiny_models import build_tiny_model, random_video, save_tiny_checkpoint

QUESTIONS = ["What?", "Which moves?", "Count them."]  # prompts of three lengths, one padded length
METHODS = {
    "llava_onevision": ["full", "earlytom", "earlytom_topk", "earlytom_average", "fastv", "visionzip",
                        "uniform_tokens", "uniform_frames", "holitom", "fastvid", "pdrop", "dycoke", "prunevid"],
    "llava_video": ["full", "earlytom", "fastv", "visionzip", "holitom", "pdrop"],
    # EarlyTom's two ablations select and merge inside EarlyTom's Qwen path, batched above on LLaVA-OV
    "qwen2_5_vl": ["full", "earlytom", "fastv", "visionzip", "uniform_tokens", "uniform_frames", "pdrop"],
}
RATIO = 0.5
RATIOS = {"fastvid": 0.25}  # FastVID's anchors at 0.5 need more tokens than a tiny frame's


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    # 4 x 4 pooled tokens a frame: HoliTom's DPC-KNN needs 7 neighbours, PyramidDrop 4 LLM layers
    ov = save_tiny_checkpoint(build_tiny_model(seed=1, image_size=112), str(root / "ov"))
    lv = _mark_video(save_tiny_checkpoint(build_tiny_model(seed=3, image_size=112), str(root / "lv")))
    qw = tiny_qwen.write_assets(tiny_qwen.save(tiny_qwen.build(seed=5, fullatt=(2,), text_layers=4), str(root / "qwen")))
    return {"llava_onevision": VideoLLM.load(ov), "llava_video": VideoLLM.load(lv),
            "qwen2_5_vl": VideoLLM.load(qw)}


def _clips(llm, n=3, frames=4):
    """n clips of `frames` frames, preprocessed: [(pixels, video_time)]."""
    size = 56 if llm.cfg.family == "qwen2_5_vl" else llm.cfg.vision.image_size
    return [llm.prepare(random_video(frames, size, size, seed=10 + i)) for i in range(n)]


def _method(llm, name):
    return pipeline.FULL if name == "full" else llm.method(name, ratio=RATIOS.get(name, RATIO))


CASES = [(f, m) for f, ms in METHODS.items() for m in ms]


@pytest.mark.parametrize("family,name", CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_batch_equals_one_at_a_time(models, family, name):
    """3 samples in batches of 2 (the second batch partial): each answer equals its own."""
    llm = models[family]
    method = _method(llm, name)
    clips = _clips(llm)
    alone = [llm.answer(p, q, method, 6, pad_multiple=32, video_time=t) for (p, t), q in zip(clips, QUESTIONS)]
    before = pipeline.prefill_batch._cache_size()
    got = (llm.answer_batch([p for p, _ in clips[:2]], QUESTIONS[:2], method, 6, batch_size=2,
                            video_times=[t for _, t in clips[:2]])
           + llm.answer_batch([clips[2][0]], QUESTIONS[2:], method, 6, batch_size=2, video_times=[clips[2][1]]))
    assert pipeline.prefill_batch._cache_size() - before == 1  # the partial batch reuses the program
    for a, b in zip(alone, got):
        assert b.tokens == a.tokens
        np.testing.assert_allclose(b.generation.first_logits, a.generation.first_logits, atol=1e-4, rtol=0)
        for key in ("visual_tokens", "frames", "llm_kept"):
            assert b.stats.get(key) == a.stats.get(key), key


@pytest.mark.parametrize("name", ["full", "dycoke"])
def test_each_sample_stops_at_its_own_eos(name):
    """The shipped toy model with an EOS that the samples reach at different steps (or not at
    all): the batch runs on for those not done, and every sample's tokens equal its own decode
    with that EOS (DyCoke: hook 4's per-step pruning too)."""
    llm = VideoLLM.load(TOY_DIR)
    method = _method(llm, name)
    clips = [llm.prepare(make_clip(6, 64, seed=10 + i))[0] for i in range(3)]
    ids = [llm.prompt_ids(q) for q in QUESTIONS]
    params, cfg = llm.params, llm.cfg

    def alone(i, eos):
        suffix, valid = pipeline.pad_suffixes([ids[i].suffix], 64)
        return generate(params, cfg, clips[i], ids[i].prefix, suffix[0], method, 8, eos, suffix_valid=valid[0])

    free = [alone(i, ()).tokens for i in range(3)]

    def lengths(t):  # each sample's answer length with EOS t
        return [f.index(t) + 1 if t in f else len(f) for f in free]

    stop = max(sorted({t for f in free for t in f}), key=lambda t: len(set(lengths(t))))
    want = [alone(i, (stop,)).tokens for i in range(3)]
    assert [len(w) for w in want] == lengths(stop) and len(set(lengths(stop))) >= 2
    suffix, valid = pipeline.pad_suffixes([x.suffix for x in ids], 64)
    gens = generate_batch(params, cfg, np.stack(clips), ids[0].prefix, suffix, valid, method, 8, (stop,))
    assert [g.tokens for g in gens] == want


def test_frame_buckets_stay_one_branch_per_batch(models):
    """EarlyTom's frame merges run later blocks on the bucket of the batch's largest frame
    count: the batched program keeps every `cond` of the one-sample program, none turned into
    a select over all branches."""
    llm = models["llava_onevision"]
    method = _method(llm, "earlytom")
    (p, _), = _clips(llm, 1)
    ids = llm.prompt_ids(QUESTIONS[0])
    suffix, valid = pipeline.pad_suffixes([ids.suffix] * 2, 32)

    def conds(jaxpr):
        return str(jaxpr).count("cond[")

    one = jax.make_jaxpr(lambda x: pipeline.prefill(llm.params, x, jnp.asarray(ids.prefix), suffix[0], llm.cfg,
                                                    method, 4, valid[0]))(jnp.asarray(p))
    two = jax.make_jaxpr(lambda x: pipeline.prefill_batch(llm.params, x, jnp.asarray(ids.prefix), suffix, llm.cfg,
                                                          method, 4, valid))(jnp.asarray(np.stack([p, p])))
    assert conds(one) > 0 and conds(two) == conds(one)


def test_ask_batch_groups_shapes_and_keeps_order(models):
    """Qwen2.5-VL clips of two frame sizes: batched apart, answered in the input order, each
    equal to `ask` alone."""
    llm = models["qwen2_5_vl"]
    method = pipeline.FULL
    videos = [random_video(4, 56, 56, seed=1), random_video(4, 84, 56, seed=2), random_video(4, 56, 56, seed=3)]
    got = llm.ask_batch(videos, QUESTIONS, method, num_frames=4, max_new_tokens=5, batch_size=2)
    alone = [llm.ask(v, q, method, num_frames=4, max_new_tokens=5) for v, q in zip(videos, QUESTIONS)]
    assert [g.tokens for g in got] == [a.tokens for a in alone]


def test_bad_batches_are_one_line_errors(models):
    llm = models["llava_onevision"]
    (p, _), = _clips(llm, 1)
    with pytest.raises(ConfigError, match="3 videos and 3 questions for a batch of 2"):
        llm.answer_batch([p, p, p], QUESTIONS, batch_size=2)
    with pytest.raises(ConfigError, match="pixels of one shape"):
        llm.answer_batch([p, p[:2]], QUESTIONS[:2])
    with pytest.raises(ConfigError, match="one question per video"):
        llm.ask_batch([p], QUESTIONS)
