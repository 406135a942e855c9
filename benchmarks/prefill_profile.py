"""Where one fused prefill spends its time, op by op: a JAX profiler trace of one TTFT call
(compiled and warmed up first), summarised as self time per kind of XLA op.

    python benchmarks/prefill_profile.py --arch llava-ov-7b --dtype bfloat16 --frames 4 \\
        --video clip.mp4 --method earlytom --ratio 0.1 --out /tmp/trace [--top 15]

Prints the wall time, the host cores busy (process CPU time over wall time), each worker
thread's share of the wall time inside an op (outside one it may still be working: YNNPACK
splits a product over the pool without annotating the helpers' share), the share of all ops' self time by kind (fusion
names without their numeric suffix: on XLA:CPU `ynn_fusion` is a YNNPACK matrix product, the
`*_fusion` kinds are XLA's own loops; `while` is the loop bookkeeping around the layer and
attention loops), and for CPU how long two matrix products ran at once (XLA runs independent
ones, such as q/k/v, side by side). Random weights of the named shapes (speed does not depend
on them). The trace itself stays in --out for TensorBoard/XProf or Perfetto.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys


def load_trace(out_dir: str) -> dict:
    paths = sorted(glob.glob(os.path.join(out_dir, "plugins", "profile", "*", "*.trace.json.gz")))
    if not paths:
        raise SystemExit(f"{out_dir}: the profiler wrote no *.trace.json.gz; is the xprof/tensorboard-plugin-profile "
                         "package needed by this JAX version installed?")
    with gzip.open(paths[-1]) as f:
        return json.load(f)


def summarise(trace: dict, top: int = 15) -> dict:
    """Self time (an event's duration minus its children's on the same thread) per op kind, over
    the XLA worker threads (every thread except the Python one)."""
    names = {(e["pid"], e["tid"]): e["args"]["name"] for e in trace["traceEvents"]
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    workers = collections.defaultdict(list)
    for e in events:
        name = names.get((e["pid"], e["tid"]), "")
        if name != "python" and not name.startswith("tf_XLAPjRt"):  # the caller, and the client's wait
            workers[(e["pid"], e["tid"])].append(e)
    self_time: collections.Counter = collections.Counter()
    busy = {}
    for key, evs in workers.items():
        evs.sort(key=lambda e: (e["ts"], -e["dur"]))
        own = [e["dur"] for e in evs]
        open_: list[int] = []  # indices of the enclosing events
        covered, end = 0.0, -1.0
        for i, e in enumerate(evs):
            while open_ and evs[open_[-1]]["ts"] + evs[open_[-1]]["dur"] <= e["ts"]:
                open_.pop()
            if open_:
                own[open_[-1]] -= e["dur"]
            else:  # a top-level event: the thread's busy time
                covered += max(0.0, e["ts"] + e["dur"] - max(e["ts"], end))
                end = max(end, e["ts"] + e["dur"])
            open_.append(i)
        for e, t in zip(evs, own):
            self_time[re.sub(r"(\.\d+)+(\.clone)?$", "", e["name"])] += t
        busy[names.get(key, str(key))] = covered
    total = sum(self_time.values())
    return {"self_s": {k: v / 1e6 for k, v in self_time.most_common(top)}, "total_self_s": total / 1e6,
            "thread_busy_s": {k: v / 1e6 for k, v in busy.items()}, "dot_overlap": _dot_overlap(workers)}


def _dot_overlap(workers) -> float | None:
    """Seconds during which YNNPACK products ran on two or more threads at once (XLA:CPU)."""
    edges = []
    for evs in workers.values():
        for e in evs:
            if e["name"].startswith("ynn_fusion"):
                edges += [(e["ts"], 1), (e["ts"] + e["dur"], -1)]
    if not edges:
        return None
    edges.sort()
    depth, last, both = 0, 0.0, 0.0
    for t, d in edges:
        if depth >= 2:
            both += t - last
        depth, last = depth + d, t
    return both / 1e6


def main(argv=None) -> int:
    from earlytom_jax import bench  # starts no JAX backend: the CPU flags below still apply

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench.add_input_args(ap)
    ap.add_argument("--out", required=True, help="directory for the trace")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args(argv)

    from earlytom_jax import xla_setup

    xla_setup.apply_cpu_flags(args.dtype)
    import jax
    import jax.numpy as jnp

    from earlytom_jax import pipeline

    cfg, params, pixels, prefix, suffix = bench.random_inputs(args.arch, args.dtype, args.frames, args.video)
    method = bench.named_method(args.method, args.ratio, cfg)
    run = pipeline.prefill_jit.lower(params, pixels, prefix, suffix, cfg, method, 16).compile()

    def first_token():
        return int(jnp.argmax(run(params, pixels, prefix, suffix)[0]))

    first_token()  # warm: nothing compiles inside the trace
    jax.profiler.start_trace(args.out)
    _, wall, cpu = bench.timed(first_token)
    jax.profiler.stop_trace()
    s = summarise(load_trace(args.out), args.top)
    print(f"{args.arch} {args.dtype}, {args.frames} frames, {args.method}"
          f"{'' if args.method == 'full' else f' r={args.ratio}'}: TTFT {wall:.3f} s, "
          f"host cores busy {bench.cores_busy([cpu], [wall]):.2f} of {os.cpu_count()}")
    for name, b in sorted(s["thread_busy_s"].items()):
        print(f"  thread {name}: inside an op {b / wall:.0%} of the wall time")
    if s["dot_overlap"] is not None:
        print(f"  two matrix products at once: {s['dot_overlap']:.2f} s ({s['dot_overlap'] / wall:.0%} of the wall time)")
    print(f"self time by op kind (of {s['total_self_s']:.2f} thread-seconds inside ops):")
    for k, v in s["self_s"].items():
        print(f"  {k:44s} {v:8.3f} s  {v / s['total_self_s']:6.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
