"""Checkpoint layouts and clear errors for broken checkpoints."""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from earlytom_jax.checkpoint.load import load_hf
from earlytom_jax.errors import CheckpointError
from tests.helpers import lmms_lab_name


def _rename(src_dir, dst_dir, fn, extra=None, config=None):
    os.makedirs(dst_dir, exist_ok=True)
    tensors = load_file(os.path.join(src_dir, "model.safetensors"))
    out = {fn(k): v for k, v in tensors.items() if fn(k) is not None}
    out.update(extra or {})
    save_file(out, os.path.join(dst_dir, "model.safetensors"))
    for f in ("tokenizer.json", "preprocessor_config.json"):
        shutil.copy(os.path.join(src_dir, f), dst_dir)
    cfg = config or json.load(open(os.path.join(src_dir, "config.json")))
    json.dump(cfg, open(os.path.join(dst_dir, "config.json"), "w"))
    return dst_dir


def _llava_hf_v4(k):
    return k.replace("vision_tower.", "vision_tower.vision_model.", 1) if k.startswith("vision_tower.") else k


def _transformers_v5(k):
    for a, b in [
        ("vision_tower.", "model.vision_tower."),
        ("multi_modal_projector.", "model.multi_modal_projector."),
        ("language_model.model.", "model.language_model."),
        ("language_model.lm_head.", "lm_head."),
        ("image_newline", "model.image_newline"),
    ]:
        if k.startswith(a):
            return b + k[len(a) :]
    return k


def _assert_same(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_llava_hf_and_transformers5_layouts(tiny_dir, tmp_path):
    _, d = tiny_dir
    _, base = load_hf(d)
    for name, fn in [("v4", _llava_hf_v4), ("v5", _transformers_v5)]:
        _, p = load_hf(_rename(d, str(tmp_path / name), fn))
        _assert_same(base, p)


def test_lmms_lab_layout_drops_the_extra_vision_block(tiny_dir, tmp_path):
    model, d = tiny_dir
    hf_cfg = json.load(open(os.path.join(d, "config.json")))
    t, v = hf_cfg["text_config"], hf_cfg["vision_config"]
    n = v["num_hidden_layers"]
    # the original stores one more SigLIP block than it uses, and selects hidden_states[-2]
    extra = {}
    src = load_file(os.path.join(d, "model.safetensors"))
    for k, val in src.items():
        if k.startswith(f"vision_tower.encoder.layers.{n - 1}."):
            extra[lmms_lab_name(k).replace(f"layers.{n - 1}.", f"layers.{n}.")] = val + 1.0
    lmms_cfg = dict(t, model_type="llava_qwen", mm_vision_tower="google/siglip-so400m-patch14-384",
                    mm_vision_select_layer=-2, vision_config=dict(v, num_hidden_layers=n + 1),
                    tie_word_embeddings=False, architectures=["LlavaQwenForCausalLM"])
    lmms = _rename(d, str(tmp_path / "lmms"), lmms_lab_name, extra=extra, config=lmms_cfg)
    cfg, p = load_hf(lmms)
    assert cfg.vision.num_layers == n
    _, base = load_hf(d)
    _assert_same(base, p)


def _broken(d, tmp_path, mutate):
    out = str(tmp_path / "broken")
    shutil.copytree(d, out)
    tensors = load_file(os.path.join(out, "model.safetensors"))
    mutate(tensors)
    save_file(tensors, os.path.join(out, "model.safetensors"))
    return out


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda t: t.pop("language_model.model.norm.weight"), "missing 1: text.norm.weight"),
        (lambda t: t.update({"foo.bar": np.zeros(2, np.float32)}), "unexpected 1: foo.bar"),
        (lambda t: t.update({"image_newline": np.zeros(3, np.float32)}), "mis-shaped 1: image_newline (3,)"),
    ],
)
def test_wrong_checkpoint_one_clear_message(tiny_dir, tmp_path, mutate, message):
    _, d = tiny_dir
    with pytest.raises(CheckpointError, match="checkpoint does not match") as e:
        load_hf(_broken(d, tmp_path, mutate))
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_truncated_shard_and_missing_files(tiny_dir, tmp_path):
    _, d = tiny_dir
    out = str(tmp_path / "trunc")
    shutil.copytree(d, out)
    path = os.path.join(out, "model.safetensors")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(CheckpointError, match="truncated"):
        load_hf(out)
    os.remove(path)
    open(os.path.join(out, "pytorch_model.bin"), "wb").close()
    with pytest.raises(CheckpointError, match="never loaded"):
        load_hf(out)
    with pytest.raises(CheckpointError, match="no config.json"):
        load_hf(str(tmp_path))
