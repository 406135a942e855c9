"""The prepared GPU check: TTFT of full tokens, EarlyTom r=0.1 and VisionZip r=0.1 in JAX, and of
transformers' full-token model in PyTorch, at the LLaVA-OV-7B shape in bfloat16 on 32 frames of
a generated clip, with random weights drawn on the device. One JSON file, one table.

The device command (run in the repository root; the JSON lands in $OUT, which comes back):

    pip install --no-deps --no-build-isolation -e . -q; PYTHONPATH=$PWD python benchmarks/gpu_check.py --out $OUT/gpu_check.json --compile-cache /tmp/earlytom_jax_cache

(PYTHONPATH: should the install fail, e.g. setuptools older than 70.1 without `wheel` cannot build
an editable install offline, the package still imports from the tree; the check reads no
installed metadata of its own.)

On CPU at a tiny shape (tests/test_gpu_check.py runs the same in-process):

    python benchmarks/gpu_check.py --arch tiny --frames 4 --warmup 1 --runs 2 --out /tmp/gc.json

Order and memory. transformers' model runs first, in a child process of its own (this script with
--torch-part), which exits before JAX opens the GPU: the two never hold the GPU's memory at once
(process exit frees all of torch's, its CUDA context and cached blocks included, which
torch.cuda.empty_cache alone does not), so JAX keeps its default preallocation (75% of the GPU)
and no XLA_PYTHON_CLIENT_* setting is needed; and they never share a process, where torch and
the JAX CUDA plugin would each load their own CUDA libraries (cuDNN, NCCL) whose versions may
differ. A failed or timed-out child is recorded as the transformers figures' "error" and the JAX
part still runs. Both sides draw their random weights on the device (speed does not depend on
the values; the two sides' weights differ): `random_params(on_device=True)` and
`bench_torch.build_random(device="cuda")`.

After the timings, the attention kernels the device picks are checked against the materialised
one on the same inputs (`kernel_check`: cuDNN's and splash's kernels run nowhere else).

JAX's figures come from the bench's own machinery (`bench.session.time_methods`: compile timed
apart, warm-ups, timed TTFT runs, one staged run for the vision / tokens / LLM split); decode
and XLA's FLOP count are left out to keep the whole check within 5 minutes on one H100.
transformers' TTFT is one prefill forward (KV cache built, the last position's logits) and its
argmax read on the host (`bench_torch.measure(forward=True)`), with sdpa attention.

Peak memory: JAX's `peak_bytes_in_use` of the first device cannot be reset, so it is read after
each method in order (`peak_bytes_in_use_after`: that method and every one before it);
transformers': torch.cuda.max_memory_allocated over its warm-ups and timed runs (weights
included). Both are null where the device does not report them (CPU).

The JSON (--out) is written atomically after every phase ("complete": false until the end), so a
run cut short by the device's time limit still leaves what it measured. --compile-cache keeps
XLA's compiled programs in a folder, so that a rerun on the same machine skips most compiling
(its compile_s then measure the cache).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

METHODS = ("full", "earlytom", "visionzip")
RATIO = 0.1
TORCH_TIMEOUT_S = 240  # the transformers child's limit: it may not eat the JAX part's time


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="llava-ov-7b", help="tiny | llava-ov-0.5b | llava-ov-7b (random weights)")
    ap.add_argument("--frames", type=int, default=32, help="frames of the generated clip")
    ap.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls after compiling")
    ap.add_argument("--runs", type=int, default=5, help="timed TTFT calls per method")
    ap.add_argument("--out", required=True, help="the JSON file to write")
    ap.add_argument("--skip-torch", action="store_true", help="leave transformers' model out")
    ap.add_argument("--compile-cache", default=None, help="a folder for XLA's persistent compilation cache")
    ap.add_argument("--torch-timeout", type=float, default=TORCH_TIMEOUT_S, help="seconds for the transformers part")
    ap.add_argument("--torch-part", action="store_true", help=argparse.SUPPRESS)  # the child process
    return ap.parse_args(argv)


class Clock:
    """Seconds since the start, and per phase (`lap`), for the log and the JSON."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.phases: dict[str, float] = {}

    def lap(self, name: str) -> float:
        now = time.perf_counter()
        self.phases[name] = now - self.last
        self.last = now
        return self.phases[name]

    def log(self, line: str) -> None:
        print(f"[{time.perf_counter() - self.start:7.1f} s] {line}", file=sys.stderr, flush=True)


def bench_spec(args):
    """The bench's description of what JAX times: METHODS at RATIO, the sequential protocol,
    the staged split; no decode, no XLA FLOP count."""
    from earlytom_jax.bench.session import BenchSpec

    return BenchSpec(arch=args.arch, frames=args.frames, methods=METHODS, ratios=(RATIO,), warmup=args.warmup,
                     runs=args.runs, timing="sequential", dtype=args.dtype, staged=True, decode_tokens=0, xla=False)


def make_method(cfg, name: str, ratio):
    from earlytom_jax import bench

    return bench.named_method(name, ratio, cfg)


def check_args(args):
    """Every input checked before any work (ConfigError, one line) → the bench spec."""
    from earlytom_jax.architectures import architecture
    from earlytom_jax.bench import prompt_ids
    from earlytom_jax.bench.session import check_spec_frames
    from earlytom_jax.errors import ConfigError
    from earlytom_jax.io_utils import check_writable

    if args.frames < 1 or args.runs < 1 or args.warmup < 0:
        raise ConfigError("need --frames >= 1, --runs >= 1 and --warmup >= 0")
    if args.torch_timeout <= 0:
        raise ConfigError("need --torch-timeout > 0")
    architecture(args.arch)
    check_writable(args.out, "--out")
    spec = bench_spec(args)
    prefix, suffix = prompt_ids()
    check_spec_frames(spec, make_method, len(prefix) + len(suffix))
    return spec


def clip_pixels(cfg, frames: int):
    """The generated clip's `frames` frames, preprocessed: float32 [T, 3, S, S] (numpy)."""
    from earlytom_jax.bench import clip_frames, random_preprocessor

    return random_preprocessor(cfg)(clip_frames(None, frames))


def digest(pixels) -> str:
    """sha256 of the pixels' float32 bytes: both sides ran on the same input when they agree."""
    import numpy as np

    return hashlib.sha256(np.ascontiguousarray(pixels, np.float32).tobytes()).hexdigest()


def torch_part(args) -> int:
    """The child: transformers' model built on the GPU (else the CPU), timed, its dict written
    to --out."""
    from earlytom_jax import bench, bench_torch
    from earlytom_jax.architectures import architecture
    from earlytom_jax.io_utils import atomic_write_text, strict_json

    torch, _ = bench_torch.require()
    cfg = architecture(args.arch)
    pixels = clip_pixels(cfg, args.frames)
    prefix, suffix = bench.prompt_ids()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t = time.perf_counter()
    model = bench_torch.build_random(cfg, args.dtype, device=device, attn_implementation="sdpa")
    if device == "cuda":
        torch.cuda.synchronize()
    build_s = time.perf_counter() - t
    res = bench_torch.measure(model, pixels, prefix, suffix, cfg, args.warmup, args.runs, forward=True)
    res.update(build_s=build_s, pixels_sha256=digest(pixels), torch_cuda=torch.version.cuda,
               weights_bytes=sum(p.numel() * p.element_size() for p in model.parameters()))
    atomic_write_text(args.out, strict_json(res, indent=1))
    return 0


def run_torch_part(args, clock: Clock) -> dict:
    """transformers' figures from the child process, or {"error": why}."""
    from earlytom_jax.io_utils import read_json

    cmd = [sys.executable, os.path.abspath(__file__), "--torch-part", "--arch", args.arch, "--frames",
           str(args.frames), "--dtype", args.dtype, "--warmup", str(args.warmup), "--runs", str(args.runs)]
    with tempfile.TemporaryDirectory(prefix="gpu_check_torch_") as tmp:
        path = os.path.join(tmp, "torch.json")
        try:
            p = subprocess.run(cmd + ["--out", path], timeout=args.torch_timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"the transformers part ran past --torch-timeout {args.torch_timeout:g} s and was stopped"}
        if p.returncode != 0 or not os.path.exists(path):
            return {"error": f"the transformers part exited with status {p.returncode} (its stderr is in the log)"}
        res = read_json(path)
    clock.log(f"transformers full: TTFT mean {res['ttft_mean_s']:.3f} s on {res['device_name'] or res['device']}")
    return res


def versions() -> dict:
    """Python's and the packages' versions (installed metadata: nothing imported), JAX's CUDA
    plugins included."""
    from importlib import metadata

    names = ["jax", "jaxlib", "flax", "torch", "transformers"]
    names += sorted({d.metadata["Name"] for d in metadata.distributions()
                     if (d.metadata["Name"] or "").lower().replace("_", "-").startswith("jax-cuda")})
    from earlytom_jax.bench import package_versions

    return {"python": platform.python_version(), **package_versions(names)}


def device_peak() -> int | None:
    """JAX's first device's peak_bytes_in_use since the process started; None where unreported."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return int(stats["peak_bytes_in_use"]) if "peak_bytes_in_use" in stats else None


def method_json(r, peak_after: int | None) -> dict:
    """A BenchResult's JSON with the check's own keys: label, TTFT standard deviation (None
    for one run), the device peak read after it."""
    d = r.to_json()
    d.update(label=r.method if r.ratio is None else f"{r.method} r={r.ratio}",
             ttft_std_s=statistics.stdev(r.ttft_s) if len(r.ttft_s) > 1 else None,
             peak_bytes_in_use_after=peak_after)
    return d


def speedups(results, reference: dict | None) -> dict:
    """Full tokens' TTFT over each method's, and transformers' over JAX full's (None without it)."""
    from earlytom_jax.bench import find_full

    full = find_full(results)
    out = {f"full_over_{r.method}": full.ttft_mean / r.ttft_mean for r in results if r is not full}
    ok = reference is not None and "ttft_mean_s" in reference
    out["transformers_over_full"] = reference["ttft_mean_s"] / full.ttft_mean if ok else None
    return out


def jax_part(args, spec, cfg, pixels, record: dict, save, clock: Clock) -> list:
    """Weights drawn on the device, then every method timed (`session.time_methods`); fills
    record["jax"] and saves after each method. → the BenchResults."""
    import jax
    import jax.numpy as jnp

    from earlytom_jax import bench
    from earlytom_jax.architectures import random_params
    from earlytom_jax.bench.session import time_methods

    part = record["jax"]
    params = jax.block_until_ready(random_params(cfg, jnp.dtype(args.dtype), on_device=True))
    part["init_s"] = clock.lap("jax_init")
    part["weights_bytes"] = sum(a.nbytes for a in jax.tree.leaves(params))
    clock.log(f"JAX weights drawn on {jax.devices()[0].device_kind} in {part['init_s']:.1f} s")
    peaks: list[int | None] = []

    def after(r):
        peaks.append(device_peak())
        part["methods"].append(method_json(r, peaks[-1]))
        clock.lap(part["methods"][-1]["label"])
        save()

    prefix, suffix = bench.prompt_ids()
    results = time_methods(spec, make_method, cfg, params, pixels, prefix, suffix, log=clock.log, after=after)
    part["methods"] = [method_json(r, p) for r, p in zip(results, peaks)]  # now related to full tokens
    return results


def kernel_check(dtype: str, length: int = 1000) -> dict:
    """The attention kernels this device picks (cuDNN's fused attention on an NVIDIA GPU,
    splash on a TPU) against the materialised one on the same inputs at the 7B's heads
    (28 query, 4 key/value heads of 128): causal with invalid slots in the middle,
    bidirectional with invalid keys, and segments of unequal lengths after a permutation. The CPU
    tests check these paths through XLA's implementation and Pallas' interpreter; only here do
    the device kernels themselves run. → {"impl", case: {max_abs_err, mean_abs_err}, "ok"}."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from earlytom_jax.models import attention as attn

    rng = np.random.default_rng(0)
    b, hq, hk, d = 2, 28, 4, 128
    q = jnp.asarray(rng.normal(size=(b, length, hq, d)), dtype)
    k, v = (jnp.asarray(rng.normal(size=(b, length, hk, d)), dtype) for _ in range(2))
    valid = rng.uniform(size=(b, length)) > 0.2
    valid[:, length // 3: length // 3 + 50] = False
    valid[:, 0] = True
    key_valid = jnp.asarray(valid)
    # segments long enough for the fused kernel (64-token windows would stay materialised)
    lengths = [length * 2 // 5, length * 7 // 20]
    windows = attn.Segments.from_lengths(lengths + [length - sum(lengths)], rng.permutation(length))
    # inputs are arguments, not closed-over constants: XLA would fold the constants' attention on
    # the host while compiling (minutes at this size, on any device)
    cases = {"causal": (lambda impl, q, k, v, kv: attn.causal_attention(q, k, v, kv, impl=impl), valid),
             "bidirectional": (lambda impl, q, k, v, kv: attn.attention(q, k, v, kv, impl=impl), None),
             "segments": (lambda impl, q, k, v, kv: attn.segment_attention(q, k, v, windows, impl=impl), None)}
    out: dict = {"impl": attn.choose(q, k), "dtype": dtype, "length": length}
    tol = (3e-2, 3e-3) if dtype == "bfloat16" else (1e-4, 1e-5)
    ok = True
    for name, (fn, rows) in cases.items():
        got, ref = (np.asarray(jax.jit(fn, static_argnums=0)(impl, q, k, v, key_valid), np.float32)
                    for impl in (None, "dense"))
        err = np.abs(got - ref) if rows is None else np.abs(got - ref)[rows]
        out[name] = {"max_abs_err": float(err.max()), "mean_abs_err": float(err.mean()),
                     "finite": bool(np.isfinite(got).all())}
        ok &= out[name]["finite"] and err.max() <= tol[0] and err.mean() <= tol[1]
    out["ok"] = bool(ok)
    return out


def summary(results, reference: dict | None, record: dict) -> str:
    """The bench's markdown table (transformers as its reference row), then devices, peak
    memory and speed-ups."""
    from earlytom_jax.bench import markdown

    ok = reference if reference and "ttft_mean_s" in reference else None
    dev = record["device"]
    lines = [markdown(results, ok), "", f"devices: JAX {dev['jax']}, transformers {dev['torch'] or 'not run'}"]
    gb = [f"{m['label']} {m['peak_bytes_in_use_after'] / 1e9:.2f} GB" for m in record["jax"]["methods"]
          if m["peak_bytes_in_use_after"] is not None]
    if ok and ok.get("peak_memory_bytes") is not None:
        gb.append(f"transformers {ok['peak_memory_bytes'] / 1e9:.2f} GB")
    lines.append("peak device memory (JAX: since start, after each method): " + (", ".join(gb) or "not reported"))
    sp = record["speedups"]
    lines.append("TTFT speed-ups: " + ", ".join(f"{k.replace('_over_', ' / ')} {v:.2f}x" for k, v in sp.items()
                                               if v is not None))
    kc = record["kernels"]
    lines.append(f"attention kernel {kc['impl']!r} against the materialised one ({kc['dtype']}, "
                 f"{kc['length']} tokens): " + ", ".join(f"{c} max {kc[c]['max_abs_err']:.2g}" for c in
                                                        ("causal", "bidirectional", "segments"))
                 + (", agree" if kc["ok"] else ", DISAGREE"))
    if reference and "error" in reference:
        lines.append(f"transformers: {reference['error']}")
    return "\n".join(lines)


def new_record(args, pixels) -> dict:
    """The JSON before anything is measured: settings, versions, host name, the code's commit,
    the JAX side's pixels' digest."""
    from earlytom_jax.bench import code_commit

    return {"complete": False,
            "settings": {"arch": args.arch, "dtype": args.dtype, "frames": args.frames, "warmup": args.warmup,
                         "runs": args.runs, "methods": list(METHODS), "ratio": RATIO, "timing": "sequential",
                         "video": "generated clip", "decode_tokens": 0, "xla_flops": False,
                         "compile_cache": args.compile_cache, "command": " ".join(sys.argv)},
            "versions": versions(), "hostname": platform.node(), **code_commit(),
            "transformers": None, "jax": {"pixels_sha256": digest(pixels), "methods": []}, "kernels": None}


def check(args) -> int:
    """The whole check (see the module docstring)."""
    from earlytom_jax import xla_setup

    spec = check_args(args)
    xla_setup.apply_cpu_flags(args.dtype)  # before JAX opens a backend (CPU only; elsewhere ignored)
    from earlytom_jax.architectures import architecture
    from earlytom_jax.bench import host
    from earlytom_jax.errors import one_line
    from earlytom_jax.io_utils import atomic_write_text, strict_json

    clock = Clock()
    cfg = architecture(args.arch)
    pixels = clip_pixels(cfg, args.frames)
    record = new_record(args, pixels)

    def save():
        record["elapsed_s"] = dict(clock.phases, total=time.perf_counter() - clock.start)
        atomic_write_text(args.out, strict_json(record, indent=1))

    save()  # the settings at least, should anything below fail
    # transformers first: JAX must not have opened the GPU yet (nothing above touches a device)
    if args.skip_torch:
        record["transformers"] = {"skipped": True}
    else:
        record["transformers"] = run_torch_part(args, clock)
        clock.lap("transformers")
    reference = record["transformers"]
    import jax

    if args.compile_cache:
        jax.config.update("jax_compilation_cache_dir", args.compile_cache)
    record["host"] = host()
    record["device"] = {"jax": jax.devices()[0].device_kind, "jax_platform": jax.devices()[0].platform,
                        "torch": reference.get("device_name") or reference.get("device")}
    save()
    clock.lap("jax_setup")  # the backend's start and the host probes, apart from the weights' draw
    try:
        results = jax_part(args, spec, cfg, pixels, record, save, clock)
    except Exception as e:
        record["jax"]["error"] = one_line(e)
        save()
        raise
    record["kernels"] = kernel_check(args.dtype)
    clock.lap("kernels")
    if "pixels_sha256" in reference:
        reference["same_pixels_as_jax"] = reference["pixels_sha256"] == record["jax"]["pixels_sha256"]
    record["speedups"] = speedups(results, reference)
    record["complete"] = True
    save()
    print(summary(results, reference, record))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    from earlytom_jax.errors import EarlyTomError

    try:
        return torch_part(args) if args.torch_part else check(args)
    except EarlyTomError as e:
        print(f"gpu_check: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
