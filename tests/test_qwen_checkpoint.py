"""Qwen2.5-VL checkpoints: both key layouts, Qwen's flat config, sharded files, orbax
conversion, and one-line errors for what does not match."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from earlytom_jax.checkpoint.load import load_hf
from earlytom_jax.checkpoint.orbax_io import convert_checkpoint, load_converted
from earlytom_jax.config import config_from_dict
from earlytom_jax.errors import CheckpointError
from tests import tiny_qwen


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    model = tiny_qwen.build(seed=3)
    d = tiny_qwen.save(model, str(tmp_path_factory.mktemp("qwen") / "ckpt"))
    tiny_qwen.write_assets(d)
    return model, d


def _same(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def _copy_with(src: str, dst: str, tensors: dict, config: dict) -> str:
    os.makedirs(dst)
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    return dst


def _tensors(d: str) -> dict:
    from safetensors import safe_open

    with safe_open(os.path.join(d, "model.safetensors"), "np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_layouts_and_flat_config_load_identically(qwen_dir, tmp_path):
    """transformers' in-memory names (model.visual., model.language_model.) with Qwen's flat
    config.json (text settings at the top, rope_scaling.mrope_section), and sharded files, give
    the tree save_pretrained's layout gives."""
    model, d = qwen_dir
    cfg, ref = load_hf(d)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    assert any(k.startswith("model.visual.") for k in state) and any(k.startswith("model.language_model.") for k in state)
    nested = json.load(open(os.path.join(d, "config.json")))
    flat = {k: v for k, v in nested.items() if k != "text_config"}
    text = dict(nested["text_config"])
    rope = text.pop("rope_parameters")
    flat.update(text, rope_theta=rope["rope_theta"], rope_scaling={"type": "mrope", "mrope_section": rope["mrope_section"]})
    flat["model_type"] = "qwen2_5_vl"
    other = _copy_with(d, str(tmp_path / "state_dict"), state, flat)
    cfg2, tree = load_hf(other)
    assert cfg2 == cfg
    _same(ref, tree)
    sharded = tiny_qwen.save(model, str(tmp_path / "sharded"), max_shard_size="20KB")
    assert os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))
    _same(ref, load_hf(sharded)[1])


def test_orbax_conversion_round_trip(qwen_dir, tmp_path):
    _, d = qwen_dir
    cfg, ref = load_hf(d)
    convert_checkpoint(d, str(tmp_path / "conv"), dtype="float32", progress=False)
    cfg2, tree = load_converted(str(tmp_path / "conv"))
    assert cfg2 == cfg
    _same(ref, tree)


def test_wrong_checkpoints_fail_with_one_line(qwen_dir, tmp_path):
    _, d = qwen_dir
    tensors = _tensors(d)
    config = json.load(open(os.path.join(d, "config.json")))

    missing = dict(tensors)
    del missing["visual.blocks.1.attn.qkv.weight"]
    with pytest.raises(CheckpointError, match=r"missing 1: vision\.blocks\.1\.attn\.qkv\.weight") as e:
        load_hf(_copy_with(d, str(tmp_path / "missing"), missing, config))
    assert "\n" not in str(e.value)

    wrong = dict(tensors)
    wrong["visual.merger.mlp.2.weight"] = wrong["visual.merger.mlp.2.weight"][:, :-1]
    with pytest.raises(CheckpointError, match=r"mis-shaped 1: visual\.merger\.mlp\.2\.weight"):
        load_hf(_copy_with(d, str(tmp_path / "wrong"), wrong, config))

    bad = json.loads(json.dumps(config))
    bad["text_config"]["rope_parameters"]["mrope_section"] = [2, 3, 4]
    with pytest.raises(CheckpointError, match=r"mrope_section=\[2, 3, 4\] sums to 9, not half the head size \(16 / 2 = 8\)"):
        load_hf(_copy_with(d, str(tmp_path / "mrope"), tensors, bad))

    with pytest.raises(CheckpointError, match=r"model_type 'qwen2_vl' \(Qwen2-VL\) is not a supported family"):
        config_from_dict({**config, "model_type": "qwen2_vl"})
    with pytest.raises(CheckpointError, match=r"fullatt_block_indexes \[9\] name no block of 4"):
        config_from_dict({**config, "vision_config": {**config["vision_config"], "fullatt_block_indexes": [9]}})
