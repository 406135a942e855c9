"""Which Qwen2.5-VL encoder blocks EarlyTom merges temporal patches after (docs/qwen-earlytom.md):
frames left, kept tokens and vision time of each candidate set of blocks.

Runs the encoder and EarlyTom's stages I-II (`pipeline.encode_video` + `visual_buffer`) of
Qwen2.5-VL-7B's vision shape with random weights (N(0, 0.02), as `architectures.random_params`;
the LLM is cut to one small layer, which this does not run) on `--frames` frames of a clip
preprocessed as lmms-eval does (`bench.bench_video`). For each candidate it prints the temporal
patches left after each merge block, the tokens kept, the overlap of its kept tokens with the
first candidate's (a token = (source temporal patch, merged token), Jaccard), and the median
vision-stage time over `--runs` calls after one warm-up. Random weights say how the blocks
behave on this clip's hidden states, not what real weights would merge: the figures are for
the design page, not for accuracy.

    python benchmarks/qwen_merge_blocks.py --video ../shared/videos/jobs.mp4 --frames 16 \
        [--candidates "7,26,28;7,23,31;15,23,31;6,21,23"] [--ratio 0.15] [--tau 0.6] [--runs 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

from earlytom_jax import xla_setup

xla_setup.apply_cpu_flags("bfloat16")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from earlytom_jax import pipeline  # noqa: E402
from earlytom_jax.architectures import architecture, random_params  # noqa: E402
from earlytom_jax.bench.inputs import bench_video  # noqa: E402
from earlytom_jax.bench.probes import host  # noqa: E402
from earlytom_jax.compression.earlytom import EarlyTom  # noqa: E402
from earlytom_jax.models import stack  # noqa: E402
from earlytom_jax.video_qwen import QwenVideoSettings  # noqa: E402


def vision_only(name: str):
    """The architecture with its LLM cut to one layer of a small vocabulary (the encoder is the
    full shape; the LLM keeps its width, which the merger's output must match)."""
    cfg = architecture(name)
    text = dataclasses.replace(cfg.text, num_layers=1, vocab_size=1024, intermediate_size=256)
    return dataclasses.replace(cfg, text=text)


def kept_tokens(stats, per_frame: int) -> set[tuple[int, int]]:
    """(source temporal patch, merged token) of every kept slot."""
    sources = np.asarray(stats["frame_sources"])
    return {(int(sources[i // per_frame]), int(i % per_frame)) for i in np.asarray(stats["kept_index"]) if i >= 0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="qwen2.5-vl-7b")
    ap.add_argument("--video", default=None, help="a video file (default: a generated clip)")
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--candidates", default="7,26,28;7,23,31;15,23,31;6,21,23",
                    help="block sets separated by ';', the first is the one the others are compared with")
    ap.add_argument("--ratio", type=float, default=0.15)
    ap.add_argument("--tau", type=float, default=0.6)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args(argv)

    cfg = vision_only(args.arch)
    video = bench_video(cfg, args.video, args.frames, None, QwenVideoSettings(args.frames))
    params = stack.pack(random_params(cfg, jnp.bfloat16))
    pixels = jnp.asarray(video.pixels, jnp.bfloat16)
    t, gh, gw = video.meta["grid_thw"]
    per_frame = gh * gw // cfg.vision.merge_unit

    def stages(params, pixels, method):
        feats, n, state = pipeline.encode_video(params, pixels, cfg, method, jnp.float32(video.video_time))
        _, _, info = pipeline.visual_buffer(params, feats, n, state, cfg, method)
        return {**method.encoder_stats(state), "frames": n, "kept_index": info["kept_index"]}

    rows, first = [], None
    for text in args.candidates.split(";"):
        layers = tuple(int(x) for x in text.split(","))
        method = EarlyTom(ratio=args.ratio, tau=args.tau, layers=layers, llm_layer=None)
        f = jax.jit(lambda p, x, m=method: stages(p, x, m))
        stats = jax.block_until_ready(f(params, pixels))  # warm-up (compiles)
        times = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            stats = jax.block_until_ready(f(params, pixels))
            times.append(time.perf_counter() - t0)
        kept = kept_tokens(stats, per_frame)
        first = kept if first is None else first
        row = {"layers": list(layers), "frames_after_layer": np.asarray(stats["frames_after_layer"]).tolist(),
               "kept_tokens": len(kept), "overlap_with_first": len(kept & first) / max(1, len(kept | first)),
               "vision_s": statistics.median(times)}
        rows.append(row)
        print(f"blocks {text:>10}: temporal patches {t} -> {row['frames_after_layer']}, "
              f"{row['kept_tokens']} tokens kept, overlap with {args.candidates.split(';')[0]} "
              f"{row['overlap_with_first']:.2f}, vision {row['vision_s']:.2f} s", flush=True)
    if args.json:
        from earlytom_jax.io_utils import atomic_write_text

        meta = {**host(), "arch": args.arch, "video": args.video or "generated clip", "frames": args.frames,
                "grid_thw": [t, gh, gw], "ratio": args.ratio, "tau": args.tau, "runs": args.runs}
        atomic_write_text(args.json, json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
