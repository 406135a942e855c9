"""Host probes for the benchmark JSON: peak memory (/proc or the devices' counters), the CPU
and its matmul features, how many cores were busy, and the commit the code ran at."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys

import jax


def cores_busy(cpu_s, wall_s) -> float:
    """CPU time over wall time, summed over runs: how many host cores were working, on average.
    On CPU, well below the core count means the program waits (host round trips, a serial
    stretch); XLA:CPU's workers spin briefly before they sleep, so a short wait can still count
    as busy. On accelerators: the host's share only."""
    return sum(cpu_s) / sum(wall_s)


def peak_memory_start(scope: str = "the timed prefills and decodes") -> dict:
    """Start a peak-memory window over `scope` (what runs in it, for the JSON). On
    accelerators: the devices' `peak_bytes_in_use` (not resettable: peak since the process
    started). On CPU: the process's peak resident set (`host_peak_start`)."""
    dev = jax.local_devices()
    if dev[0].platform != "cpu":
        stats = [d.memory_stats() or {} for d in dev]
        if all("peak_bytes_in_use" in st for st in stats):
            return {"kind": "device_peak_bytes_in_use", "scope": "max over local devices, since process start"}
    return host_peak_start(scope)


def host_peak_start(scope: str) -> dict:
    """A window over the process's peak resident set (VmHWM), reset through
    /proc/self/clear_refs where the kernel allows it, else getrusage's ru_maxrss (peak since
    the process started). Touches no JAX backend (the PyTorch reference's process uses it)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _vmhwm()
        return {"kind": "host_vmhwm", "scope": f"peak resident set of the process during {scope} (reset before them)"}
    except (OSError, ValueError):
        return {"kind": "host_ru_maxrss", "scope": "peak resident set of the process since it started"}


def _vmhwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise ValueError("no VmHWM")


def peak_memory_read(window: dict) -> dict:
    kind = window["kind"]
    if kind == "device_peak_bytes_in_use":
        b = max(int((d.memory_stats() or {}).get("peak_bytes_in_use", 0)) for d in jax.local_devices())
    elif kind == "host_vmhwm":
        b = _vmhwm()
    else:
        ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        b = ru if sys.platform == "darwin" else ru * 1024
    return dict(window, bytes=int(b))


CPU_FEATURES = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2")  # what decides bf16/f32 dot speed


def package_versions(names) -> dict:
    """{name: its installed version, or None} from the packages' metadata (nothing imported)."""
    from importlib import metadata

    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def host_cpu(cpuinfo: str | None = None) -> dict:
    """The host CPU as benchmark tables should name it: model, logical cores, and the few
    instruction-set features that decide matmul speed (PyTorch's bf16 runs on AMX or AVX512-BF16
    where they exist; XLA:CPU computes bf16 dots in f32). `cpuinfo`: /proc/cpuinfo's text
    (read when None; on other systems only the core count is known)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            cpuinfo = ""
    model, flags = None, set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return {"model": model, "logical_cores": os.cpu_count(),
            "features": [f for f in CPU_FEATURES if f in flags]}


def code_commit(package_dir: str | None = None) -> dict:
    """The commit the code ran at: {"commit": `git rev-parse HEAD` of the git checkout that holds
    the package, "commit_dirty": whether its tracked files differ from that commit}; both None
    when the package is not in a git checkout of its own (an installed copy) or git is missing.
    package_dir: the `earlytom_jax` directory (default: this one)."""
    pkg = package_dir or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args) -> str:
        return subprocess.run(["git", "-C", pkg, *args], capture_output=True, text=True, check=True,
                              timeout=30).stdout.strip()

    try:
        top = git("rev-parse", "--show-toplevel")
        if not os.path.samefile(os.path.join(top, os.path.basename(pkg)), pkg):
            raise ValueError("the package lies in another repository")
        return {"commit": git("rev-parse", "HEAD"),
                "commit_dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, ValueError, subprocess.SubprocessError):
        return {"commit": None, "commit_dirty": None}


def host() -> dict:
    """Where and at what code a measurement ran, for the JSON of benchmarks and evaluations:
    JAX's devices, the OS platform, the CPU (`host_cpu`) and the commit (`code_commit`)."""
    return {"devices": [str(d) for d in jax.devices()], "platform": platform.platform(), "cpu": host_cpu(),
            **code_commit()}
