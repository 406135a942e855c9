"""Time of one LLM weight product against its row count: what a compressed prefill pays.

A prefill multiplies every weight matrix once, whatever the number of rows (tokens), so each
product has a part that does not shrink with the rows (streaming the weight from memory, and
whatever per-call work the kernel adds) and a part that does. This prints,
for Qwen2-7B's MLP matrices held as the bf16 LLM holds them on CPU (`stack.OutIn`, through
`models.dense.dense`, the code the model runs), the median time per product over interleaved
rounds, its FLOP rate, and a least-squares line time = fixed + rows · per_row, so the fixed
part per pass of the whole LLM can be read off; and, timed in the same rounds, one plain read
of each matrix (a sum), the part of the fixed time that no kernel can avoid.

    python benchmarks/matmul_rows.py [--rows 2,16,60,80,121,256,825] [--rounds 7]

Random weights (speed does not depend on them); distinct matrices per call, so nothing is
served from the caches.
"""

from __future__ import annotations

import argparse
import statistics
import time

from earlytom_jax import xla_setup

xla_setup.apply_cpu_flags("bfloat16")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from earlytom_jax.architectures import architecture  # noqa: E402
from earlytom_jax.models.dense import dense  # noqa: E402
from earlytom_jax.models.stack import OutIn  # noqa: E402


@jax.jit
def read(ws):
    """One pass over each matrix's bytes: a sum, accumulated in f32."""
    return [jnp.sum(w.t, dtype=jnp.float32) for w in ws]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="2,16,60,80,121,256,825", help="row counts, comma-separated")
    ap.add_argument("--rounds", type=int, default=7, help="timed rounds (each times every row count once)")
    ap.add_argument("--copies", type=int, default=4, help="distinct weight matrices per timed call")
    args = ap.parse_args(argv)
    rows = [int(r) for r in args.rows.split(",")]
    t = architecture("llava-ov-7b").text
    c, m = t.hidden_size, t.intermediate_size
    rng = np.random.default_rng(0)
    print(f"backend {jax.default_backend()}, {jax.device_count()} device(s); Qwen2-7B MLP products, bf16; "
          f"median of {args.rounds} interleaved rounds, {args.copies} distinct matrices per call")
    for name, (k, n) in {"gate/up [3584 → 18944]": (c, m), "down [18944 → 3584]": (m, c)}.items():
        ws = [OutIn(jnp.asarray(rng.standard_normal((n, k), dtype=np.float32) * 0.02, jnp.bfloat16), 1)
              for _ in range(args.copies)]
        xs = {r: jnp.asarray(rng.standard_normal((r, k), dtype=np.float32), jnp.bfloat16) for r in rows}
        f = jax.jit(lambda x, ws: [dense("rk,kn->rn", x, w) for w in ws])
        calls = {r: (lambda r=r: f(xs[r], ws)) for r in rows}
        calls["read"] = lambda: read(ws)
        for call in calls.values():
            jax.block_until_ready(call())
        times = {r: [] for r in calls}
        for _ in range(args.rounds):
            for r, call in calls.items():
                t0 = time.perf_counter()
                jax.block_until_ready(call())
                times[r].append((time.perf_counter() - t0) / args.copies)
        med = {r: statistics.median(times[r]) for r in calls}
        per_row, fixed = np.polyfit(np.array(rows, float), np.array([med[r] for r in rows]), 1)
        print(f"\n{name}: {k * n * 2 / 1e6:.0f} MB of weights")
        print("| rows | ms per product | GFLOP/s | fixed part of the time |")
        print("|---|---|---|---|")
        for r in rows:
            print(f"| {r} | {med[r] * 1e3:.1f} | {2 * r * k * n / med[r] / 1e9:.0f} | {fixed / med[r]:.0%} |")
        print(f"fit: {fixed * 1e3:.1f} ms + {per_row * 1e6:.1f} µs per row "
              f"(the rows alone at {2 * k * n / per_row / 1e9:.0f} GFLOP/s)")
        print(f"one read of the matrix: {med['read'] * 1e3:.1f} ms ({k * n * 2 / med['read'] / 1e9:.0f} GB/s); "
              f"fixed part minus the read: {(fixed - med['read']) * 1e3:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
