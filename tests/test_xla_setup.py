"""The CPU flags are set on import, never over a flag the user chose, never too late silently."""

from __future__ import annotations

import os
import subprocess
import sys

from earlytom_jax import xla_setup


def _flags_after_import(user: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    if user is not None:
        env["XLA_FLAGS"] = user
    code = "import earlytom_jax, os, jax; jax.devices(); print(os.environ['XLA_FLAGS'])"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.strip()


def test_import_sets_cpu_flags_and_keeps_the_users():
    assert _flags_after_import(None) == " ".join(xla_setup.CPU_FLAGS)
    assert _flags_after_import("--xla_force_host_platform_device_count=2").split() == [
        "--xla_force_host_platform_device_count=2", *xla_setup.CPU_FLAGS]
    mine = "--xla_cpu_experimental_ynn_fusion_type=individual_dot"
    assert _flags_after_import(mine) == mine


def test_too_late_once_a_backend_runs():
    import jax

    jax.devices()
    assert xla_setup.apply_cpu_flags() is False
