"""Sharded model on 8 host devices equals the single-device model (fp32, 1e-5)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from earlytom_jax import sharding
from earlytom_jax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_meshes_match_single_device(tiny_dir):
    _, d = tiny_dir
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    meshes = ["data=2,model=4", "data=8", "model=2", "model=8"]
    proc = subprocess.run(
        [sys.executable, "-m", "tests.sharding_check", d, *meshes],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["devices"] == 8
    for spec in meshes:
        for method, diff in out[spec]["max_abs"].items():
            assert diff <= 1e-5, (spec, method, diff)
            assert out[spec]["same_tokens"][method], (spec, method)
    # the tiny model has 4 query heads and 2 kv heads: model=4 shards most weights and
    # replicates the kv projections; model=8 divides no head count and falls back
    assert out["data=2,model=4"]["sharded_leaves"] > 0
    assert out["data=2,model=4"]["fallbacks"] > 0
    assert out["model=8"]["fallbacks"] > out["model=2"]["fallbacks"]


def test_mesh_spec_errors():
    with pytest.raises(ConfigError, match="expected e.g. data=2,model=4"):
        sharding.parse_mesh("rows=2")
    with pytest.raises(ConfigError, match="needs 64 devices"):
        sharding.parse_mesh("data=8,model=8")
