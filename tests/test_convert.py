"""HF checkpoint → converted (orbax) directory: equality with the HF loader, and no partial DST
on any failure."""

from __future__ import annotations

import errno
import glob
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from earlytom_jax import pipeline
from earlytom_jax.checkpoint import orbax_io
from earlytom_jax.checkpoint.load import load_any, load_hf
from earlytom_jax.checkpoint.orbax_io import config_from_json, convert_checkpoint, is_converted, load_converted
from earlytom_jax.config import load_config
from earlytom_jax.errors import CheckpointError
from tests.helpers import random_pixels
from tests.helpers import lmms_lab_name
from tests.test_checkpoint import _llava_hf_v4, _rename, _transformers_v5
from tests.tiny_models import save_tiny_checkpoint


def _lmms(d, out):
    """The lmms-lab layout: one extra stored SigLIP block, flat llava_qwen config."""
    hf_cfg = json.load(open(os.path.join(d, "config.json")))
    t, v = hf_cfg["text_config"], hf_cfg["vision_config"]
    n = v["num_hidden_layers"]
    extra = {}
    for k, val in load_file(os.path.join(d, "model.safetensors")).items():
        if k.startswith(f"vision_tower.encoder.layers.{n - 1}."):
            extra[lmms_lab_name(k).replace(f"layers.{n - 1}.", f"layers.{n}.")] = val + 1.0
    cfg = dict(t, model_type="llava_qwen", mm_vision_tower="google/siglip-so400m-patch14-384",
               mm_vision_select_layer=-2, vision_config=dict(v, num_hidden_layers=n + 1),
               tie_word_embeddings=False)
    return _rename(d, out, lmms_lab_name, extra=extra, config=cfg)


@pytest.fixture(scope="module")
def layouts(tiny_dir, tmp_path_factory):
    model, d = tiny_dir
    root = tmp_path_factory.mktemp("layouts")
    return {
        "llava_hf_v4": _rename(d, str(root / "v4"), _llava_hf_v4),
        "transformers_v5": _rename(d, str(root / "v5"), _transformers_v5),
        "lmms_lab": _lmms(d, str(root / "lmms")),
        "sharded": save_tiny_checkpoint(model, str(root / "sharded"), max_shard_size="20KB"),
    }


def _equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _leftovers(dst):
    return glob.glob(glob.escape(dst) + ".tmp-*") + glob.glob(glob.escape(dst) + "*partial_save*")


@pytest.mark.parametrize("layout", ["llava_hf_v4", "transformers_v5", "lmms_lab", "sharded"])
def test_convert_equals_hf_loader(layouts, layout, tmp_path):
    src = layouts[layout]
    if layout == "sharded":
        assert os.path.exists(os.path.join(src, "model.safetensors.index.json"))
    dst32, dst16 = str(tmp_path / "fp32"), str(tmp_path / "bf16")
    s = convert_checkpoint(src, dst32, dtype="float32", progress=False)
    assert s["tensors"] == len(jax.tree.leaves(load_hf(src)[1])) and s["bytes"] > 0 and s["seconds"] > 0
    assert is_converted(dst32) and not is_converted(src)
    for f in ("earlytom_config.json", "hf_config.json", "tokenizer.json", "preprocessor_config.json"):
        assert os.path.isfile(os.path.join(dst32, f)), f
    assert json.load(open(os.path.join(dst32, "hf_config.json"))) == json.load(open(os.path.join(src, "config.json")))
    assert config_from_json(dst32) == load_config(src)

    cfg_hf, hf32 = load_hf(src)
    cfg, conv32 = load_converted(dst32)
    assert cfg == cfg_hf
    _equal(conv32, hf32)
    _equal(load_any(dst32)[1], hf32)

    convert_checkpoint(src, dst16, dtype="bfloat16", progress=False)
    _, hf16 = load_hf(src, dtype="bfloat16")
    _, conv16 = load_converted(dst16)  # stored dtype
    _equal(conv16, hf16)
    _, conv16_32 = load_any(dst16, dtype="float32")  # cast on read: exact for bf16 → fp32
    _equal(conv16_32, jax.tree.map(lambda x: x.astype(jnp.float32), hf16))
    assert not _leftovers(dst32) and not _leftovers(dst16)


def test_logits_converted_equal_hf(tiny_dir, tmp_path):
    _, d = tiny_dir
    dst = str(tmp_path / "conv")
    convert_checkpoint(d, dst, dtype="float32", progress=False)
    cfg, hf = load_hf(d)
    _, conv = load_any(dst)
    pix = random_pixels(2, cfg.vision.image_size, seed=1)
    pre, suf = jnp.asarray([1, 2, 3], jnp.int32), jnp.asarray([4, 5], jnp.int32)
    f = jax.jit(pipeline.sequence_logits, static_argnames="cfg")
    np.testing.assert_array_equal(np.asarray(f(conv, pix, pre, suf, cfg)), np.asarray(f(hf, pix, pre, suf, cfg)))


def test_shardings_tree_and_callable(tiny_dir, tmp_path):
    _, d = tiny_dir
    dst = str(tmp_path / "conv")
    convert_checkpoint(d, dst, dtype="float32", progress=False)
    mesh = jax.make_mesh((1,), ("model",))
    named = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    _, hf = load_hf(d)
    tree = jax.tree.map(lambda _: named, hf)
    for sh in (tree, lambda path: named):
        _, p = load_converted(dst, shardings=sh)
        assert all(x.sharding == named for x in jax.tree.leaves(p))
        _equal(p, hf)
        _, q = load_hf(d, shardings=sh)
        assert all(x.sharding == named for x in jax.tree.leaves(q))
    bad = dict(tree)
    bad.pop("newline")
    with pytest.raises(CheckpointError, match="missing 1: newline"):
        load_converted(dst, shardings=bad)


def test_dst_exists_changes_nothing(tiny_dir, tmp_path):
    _, d = tiny_dir
    dst = tmp_path / "taken"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="exists; choose another path or remove it"):
        convert_checkpoint(d, str(dst), progress=False)
    assert os.listdir(dst) == ["keep.txt"] and (dst / "keep.txt").read_text() == "mine"
    assert not _leftovers(str(dst))


def test_src_not_a_checkpoint(tiny_dir, tmp_path):
    _, d = tiny_dir
    empty = tmp_path / "empty"
    empty.mkdir()
    dst = str(tmp_path / "out")
    with pytest.raises(CheckpointError, match="no config.json"):
        convert_checkpoint(str(empty), dst, progress=False)
    (empty / "config.json").write_text(json.dumps({"vision_config": {}, "text_config": {}}))
    with pytest.raises(CheckpointError, match="incomplete config") as e:
        convert_checkpoint(str(empty), dst, progress=False)
    assert "\n" not in str(e.value)
    shutil.copy(os.path.join(d, "config.json"), empty / "config.json")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        convert_checkpoint(str(empty), dst, progress=False)
    with pytest.raises(CheckpointError, match="not a directory"):
        convert_checkpoint(str(tmp_path / "nowhere"), dst, progress=False)
    assert not os.path.exists(dst) and not _leftovers(dst)


def test_truncated_shard(tiny_dir, tmp_path):
    _, d = tiny_dir
    src = str(tmp_path / "trunc")
    shutil.copytree(d, src)
    path = os.path.join(src, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    dst = str(tmp_path / "out")
    with pytest.raises(CheckpointError, match="truncated"):
        convert_checkpoint(src, dst, progress=False)
    assert not os.path.exists(dst) and not _leftovers(dst)


def test_shape_mismatch_with_config(tiny_dir, tmp_path):
    _, d = tiny_dir
    src = str(tmp_path / "mismatch")
    shutil.copytree(d, src)
    cfg = json.load(open(os.path.join(src, "config.json")))
    cfg["text_config"]["intermediate_size"] += 8
    json.dump(cfg, open(os.path.join(src, "config.json"), "w"))
    dst = str(tmp_path / "out")
    with pytest.raises(CheckpointError, match="does not match its config.json.*mis-shaped") as e:
        convert_checkpoint(src, dst, progress=False)
    assert "\n" not in str(e.value)
    assert not os.path.exists(dst) and not _leftovers(dst)


def test_disk_full(tiny_dir, tmp_path, monkeypatch):
    _, d = tiny_dir

    def full(params_dir, group):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(orbax_io, "_write_group", full)
    dst = str(tmp_path / "out")
    with pytest.raises(CheckpointError, match="no space left on device") as e:
        convert_checkpoint(d, dst, progress=False)
    assert "\n" not in str(e.value)
    assert not os.path.exists(dst) and not _leftovers(dst)
    assert os.listdir(tmp_path) == []


def test_interrupted_conversion_leaves_nothing_and_rerun_works(tiny_dir, tmp_path, monkeypatch):
    _, d = tiny_dir
    real = orbax_io._write_group
    calls = []

    def flaky(params_dir, group):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # e.g. Ctrl-C midway through the writes
        real(params_dir, group)

    monkeypatch.setattr(orbax_io, "_GROUP_BYTES", 64 << 10)  # several groups for the tiny model
    monkeypatch.setattr(orbax_io, "_write_group", flaky)
    dst = str(tmp_path / "out")
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(d, dst, progress=False)
    assert len(calls) == 3
    assert not os.path.exists(dst) and os.listdir(tmp_path) == []

    monkeypatch.setattr(orbax_io, "_write_group", real)
    s = convert_checkpoint(d, dst, dtype="float32", progress=False)
    assert s["tensors"] > 0
    _equal(load_converted(dst)[1], load_hf(d)[1])
    assert os.listdir(tmp_path) == ["out"]


def test_broken_converted_directory(tiny_dir, tmp_path):
    _, d = tiny_dir
    dst = str(tmp_path / "conv")
    convert_checkpoint(d, dst, dtype="bfloat16", progress=False)
    cfg_path = os.path.join(dst, "earlytom_config.json")
    meta = json.load(open(cfg_path))
    meta["format_version"] = 999
    json.dump(meta, open(cfg_path, "w"))
    with pytest.raises(CheckpointError, match="format version 999"):
        load_any(dst)
    meta["format_version"] = 1
    meta["config"]["text"]["num_layers"] += 1
    json.dump(meta, open(cfg_path, "w"))
    with pytest.raises(CheckpointError, match="stored tensors do not match the config"):
        load_converted(dst)


_SHARDED_RESTORE = """
import json, sys
import jax, numpy as np
from earlytom_jax import sharding
from earlytom_jax.architectures import param_shapes
from earlytom_jax.checkpoint.load import load_hf
from earlytom_jax.checkpoint.orbax_io import config_from_json, load_converted

src, dst = sys.argv[1], sys.argv[2]
cfg = config_from_json(dst)
mesh = sharding.parse_mesh("data=2,model=2")
plan, _ = sharding.plan_shardings(param_shapes(cfg), mesh)
_, ref = load_hf(src)
out = {"devices": len(jax.devices())}
flat = {tuple(k.key for k in p): s for p, s in jax.tree_util.tree_leaves_with_path(plan)}
for name, sh in (("tree", plan), ("callable", lambda path: flat[path])):
    _, p = load_converted(dst, shardings=sh)
    same_sharding = all(x.sharding == s for x, s in zip(jax.tree.leaves(p), jax.tree.leaves(plan)))
    split = sum(1 for x in jax.tree.leaves(p) if not x.sharding.is_fully_replicated)
    shard_ok = all(
        all(a.data.shape == x.sharding.shard_shape(x.shape) for a in x.addressable_shards) for x in jax.tree.leaves(p)
    )
    equal = all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(p), jax.tree.leaves(ref)))
    out[name] = dict(same_sharding=same_sharding, split=split, shard_ok=shard_ok, equal=equal)
print(json.dumps(out))
"""


def test_restore_into_shardings_on_four_devices(tiny_dir, tmp_path):
    import subprocess
    import sys

    _, d = tiny_dir
    dst = str(tmp_path / "conv")
    convert_checkpoint(d, dst, dtype="float32", progress=False)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _SHARDED_RESTORE, d, dst], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["devices"] == 4
    for name in ("tree", "callable"):
        r = out[name]
        assert r["same_sharding"] and r["shard_ok"] and r["equal"], (name, r)
        assert r["split"] > 0, (name, r)
