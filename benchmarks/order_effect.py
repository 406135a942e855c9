"""Does a method's TTFT depend on what ran just before it? Each round times one run of full
tokens, then the method twice: its first run follows full's (as in `earlytom bench --timing
interleaved`), its second follows its own (as in the default timing, one method after
another). Both runs of a round lie within seconds of each other, so a host whose speed drifts
over minutes slows them alike: a ratio away from 1 is the order, not the drift.

    python benchmarks/order_effect.py --arch llava-ov-7b --dtype bfloat16 --frames 4 \\
        --video clip.mp4 --method earlytom --ratio 0.1 [--rounds 7] [--warmup 2]

Prints every round's times, the medians, and the per-round ratio (after full / after itself),
median and range. Random weights of the named shapes (speed does not depend on them).
"""

from __future__ import annotations

import argparse
import statistics
import sys


def main(argv=None) -> int:
    from earlytom_jax import bench  # starts no JAX backend: the CPU flags below still apply

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench.add_input_args(ap)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args(argv)

    from earlytom_jax import xla_setup

    xla_setup.apply_cpu_flags(args.dtype)

    cfg, params, pixels, prefix, suffix = bench.random_inputs(args.arch, args.dtype, args.frames, args.video)
    timers = [bench.MethodTimer(params, cfg, pixels, prefix, suffix, bench.named_method(name, args.ratio, cfg), name)
              for name in ("full", args.method)]
    full, method = timers
    for t in timers:
        t.prepare(args.warmup, decode_tokens=0)
    print(f"{args.arch} {args.dtype}, {args.frames} frames, {args.method} r={args.ratio}: "
          f"{args.rounds} rounds of (full, {args.method}, {args.method}), after {args.warmup} warm-ups each")
    after_full, after_self = [], []
    print(f"| round | full s | {args.method} after full s | {args.method} after itself s | ratio |")
    print("|---|---|---|---|---|")
    for i in range(args.rounds):
        f = full.time_once()
        after_full.append(method.time_once())
        after_self.append(method.time_once())
        print(f"| {i + 1} | {f:.4g} | {after_full[-1]:.4g} | {after_self[-1]:.4g} | "
              f"{after_full[-1] / after_self[-1]:.3f} |", flush=True)
    ratios = [a / b for a, b in zip(after_full, after_self)]
    print(f"median: after full {statistics.median(after_full):.4g} s, after itself "
          f"{statistics.median(after_self):.4g} s; per-round ratio median {statistics.median(ratios):.3f} "
          f"(range {min(ratios):.3f}-{max(ratios):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
