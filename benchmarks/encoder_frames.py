"""SigLIP-so400m's blocks in bf16 on CPU: the frames as one batch, or one frame at a time.

`models.siglip.SiglipBlock` runs bf16 blocks on CPU as a loop over the frames (the same result: bit
for bit at 3-4 frames, within bf16 rounding from 8). This times both forms on the encoder's
own code: a `lax.scan` over `--layers` blocks of random so400m weights, held as the pipeline
holds them (`stack.pack`: uint16 bits), for each frame count; median ms per block over
interleaved rounds (one call of each form per round, after two warm-ups), and the blocks'
FLOP rate (the analytic count: weight products and attention, 2 FLOPs per multiply-add).
Before timing, it prints how far the two forms' outputs differ.

    python benchmarks/encoder_frames.py [--frames 3,4,8,16] [--layers 4] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

from earlytom_jax import xla_setup

xla_setup.apply_cpu_flags("bfloat16")

import dataclasses  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from earlytom_jax import flops  # noqa: E402
from earlytom_jax.architectures import architecture, param_shapes  # noqa: E402
from earlytom_jax.models import params as params_lib, stack  # noqa: E402
from earlytom_jax.models.siglip import SiglipEncoder  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", default="3,4,8,16", help="frame counts, comma-separated")
    ap.add_argument("--layers", type=int, default=4, help="blocks per timed call (a scan, as the encoder runs them)")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    cfg = architecture("llava-ov-7b")
    v = cfg.vision
    rng = np.random.default_rng(0)
    blocks = {}
    for name, sd in param_shapes(cfg)["vision"]["blocks"].items():
        shape = (args.layers,) + sd.shape[1:]
        a = np.ones(shape, np.float32) if name.endswith("_s") else rng.standard_normal(shape, dtype=np.float32) * 0.02
        blocks[name] = jnp.asarray(a, jnp.bfloat16)
    blocks = stack.pack({"vision": {"blocks": blocks}})["vision"]["blocks"]
    vl = dataclasses.replace(v, num_layers=args.layers)
    unused = {k: jnp.zeros(sd.shape, jnp.bfloat16) for k, sd in param_shapes(cfg)["vision"].items() if k != "blocks"}

    def encoder(blocks):
        return params_lib.bind(SiglipEncoder, vl, dict(unused, blocks=blocks))

    def batched(blocks, x):  # the frames as one batch: the block body without the frame loop
        return stack.scan(lambda x, blk, _: (blk.batched(x)[0], None), x, encoder(blocks).blocks, 0, args.layers)[0]

    def by_frame(blocks, x):  # the encoder's own path
        return encoder(blocks).run_blocks(x, 0, args.layers)

    forms = {"one batch": jax.jit(batched), "frame by frame": jax.jit(by_frame)}
    print(f"backend {jax.default_backend()}; SigLIP-so400m blocks, bf16, {args.layers} per call; "
          f"median of {args.rounds} interleaved rounds")
    print("| frames | one batch: ms per block, GFLOP/s | frame by frame: ms per block, GFLOP/s | by frame / batch |")
    print("|---|---|---|---|")
    for frames in (int(f) for f in args.frames.split(",")):
        x = jnp.asarray(rng.standard_normal((frames, v.grid**2, v.hidden_size), dtype=np.float32), jnp.bfloat16)
        outs = {k: jax.block_until_ready(f(blocks, x)) for k, f in forms.items()}
        a, b = (np.asarray(o, np.float32) for o in outs.values())
        print(f"{frames} frames: max abs diff {np.abs(a - b).max():.3g}, of max abs {np.abs(a).max():.3g}; "
              f"elements differing {np.mean(a != b):.2%}")
        for f in forms.values():
            jax.block_until_ready(f(blocks, x))
        times = {k: [] for k in forms}
        for _ in range(args.rounds):
            for k, f in forms.items():
                t0 = time.perf_counter()
                jax.block_until_ready(f(blocks, x))
                times[k].append((time.perf_counter() - t0) / args.layers)
        med = {k: statistics.median(t) for k, t in times.items()}
        cells = [f"{med[k] * 1e3:.1f}, {flops.siglip_block(cfg, frames) / med[k] / 1e9:.0f}" for k in forms]
        print(f"| {frames} | {cells[0]} | {cells[1]} | {med['frame by frame'] / med['one batch']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
