"""`earlytom run`: answer a question about a video."""

from __future__ import annotations

import json
import sys

from earlytom_jax.cli.flags import compression_flags, method_from_args
from earlytom_jax.errors import ConfigError


def add_parser(sub) -> None:
    r = sub.add_parser("run", help="answer a question about a video")
    r.add_argument("--model", required=True, help="HF checkpoint directory")
    r.add_argument("--video", required=True)
    r.add_argument("--prompt", required=True)
    r.add_argument("--frames", type=int, default=32)
    r.add_argument("--max-new-tokens", type=int, default=64)
    r.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    r.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    r.add_argument("--mesh", default=None, help="shard over devices, e.g. data=2,model=4")
    compression_flags(r)
    r.set_defaults(fn=cmd_run)


def stats_line(ans, n_frames: int) -> str:
    s = ans.stats
    frames = s.get("frames", n_frames)
    vis = s.get("visual_tokens")
    llm = s.get("llm_kept")
    extra = f" -> {llm} after the LLM merge" if llm is not None else ""
    return (
        f"[frames {n_frames} -> {frames} | visual tokens {vis}{extra} | "
        f"TTFT {ans.ttft_s * 1000:.0f} ms | {ans.generation.tokens_per_s:.1f} tok/s]"
    )


def cmd_run(args) -> int:
    from earlytom_jax.api import VideoLLM

    if args.frames < 1:
        raise ConfigError(f"--frames {args.frames}: need at least 1")
    llm = VideoLLM.load(args.model, args.dtype, args.mesh)
    method = method_from_args(args, llm.cfg)
    stream = None if args.json else (lambda piece: print(piece, end="", flush=True))
    ans = llm.ask(args.video, args.prompt, method, args.frames, args.max_new_tokens, on_token=stream)
    if ans.video is not None and ans.video.repeated:
        print(f"note: {args.video} has {ans.video.total_frames} frames, fewer than {args.frames}; "
              "frames repeat (lmms-eval's sampling)", file=sys.stderr)
    if args.json:
        out = {
            "text": ans.text,
            "tokens": ans.tokens,
            "settings": {"model": args.model, "video": args.video, "frames": args.frames,
                         "method": repr(method), "dtype": args.dtype},
            "ttft_s": ans.ttft_s,
            "tokens_per_s": ans.generation.tokens_per_s,
            "stats": ans.stats,
        }
        print(json.dumps(out))
    else:
        print()
        print(stats_line(ans, args.frames), file=sys.stderr)
    return 0
