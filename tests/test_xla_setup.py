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


F32 = xla_setup.CPU_FLAGS["float32"]


def test_import_sets_cpu_flags_and_keeps_the_users():
    assert _flags_after_import(None) == " ".join(F32)
    assert _flags_after_import("--xla_force_host_platform_device_count=2").split() == [
        "--xla_force_host_platform_device_count=2", *F32]
    mine = "--xla_cpu_experimental_ynn_fusion_type=individual_dot"
    assert _flags_after_import(mine) == mine


def test_bf16_takes_back_the_f32_flags_but_never_the_users(monkeypatch):
    monkeypatch.setattr(xla_setup, "backend_started", lambda: False)
    monkeypatch.setattr(xla_setup, "_added", [])
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    assert xla_setup.apply_cpu_flags("float32")
    assert os.environ["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=2", *F32]
    assert xla_setup.apply_cpu_flags("bfloat16")
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"
    assert xla_setup.apply_cpu_flags("float32") and os.environ["XLA_FLAGS"].split()[1:] == list(F32)
    mine = "--xla_cpu_experimental_ynn_fusion_type=individual_dot"
    monkeypatch.setenv("XLA_FLAGS", mine)
    monkeypatch.setattr(xla_setup, "_added", [])
    assert xla_setup.apply_cpu_flags("bfloat16") and os.environ["XLA_FLAGS"] == mine
    assert xla_setup.apply_cpu_flags("float32") and os.environ["XLA_FLAGS"] == mine
    monkeypatch.delenv("XLA_FLAGS")
    assert xla_setup.apply_cpu_flags("bfloat16") and "XLA_FLAGS" not in os.environ


def test_the_command_line_applies_its_dtype_before_jax_starts():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    code = ("import os, sys, earlytom_jax.cli as c, earlytom_jax.cli.bench as b\n"
            "def shown(args):\n"
            "    import jax; jax.devices(); print(os.environ.get('XLA_FLAGS', '')); return 0\n"
            "b.cmd_bench = shown\n"
            "sys.exit(c.main(sys.argv[1:]))")

    def flags(dtype):
        argv = ["bench", "--arch", "tiny", "--video", "x.mp4", "--frames", "2", "--dtype", dtype]
        return subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True,
                              check=True).stdout.strip()

    assert flags("float32") == " ".join(F32) and flags("bfloat16") == ""


def test_too_late_once_a_backend_runs():
    import jax

    jax.devices()
    assert xla_setup.apply_cpu_flags() is False
