"""`earlytom visualize`: a PNG of the frames and tokens a method kept (EarlyTom by default)."""

from __future__ import annotations

from earlytom_jax.cli.flags import (check_counts, compression_flags, method_from_args, siglip_head_flag, video_flags,
                                    video_settings)
from earlytom_jax.cli.run import DTYPE_HELP, MODEL_HELP
from earlytom_jax.errors import ConfigError
from earlytom_jax.progress import status


def add_parser(sub) -> None:
    v = sub.add_parser("visualize", help="PNG of the frames and tokens a method kept (EarlyTom by default)")
    v.add_argument("--model", required=True, help=MODEL_HELP)
    v.add_argument("--video", required=True, help="video file (any format PyAV decodes)")
    v.add_argument("--prompt", default="Describe what's happening in this video.",
                   help="the question (methods that select by attention to it depend on it)")
    v.add_argument("--frames", type=int, default=32, help="frames sampled evenly from the video")
    v.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help=DTYPE_HELP)
    v.add_argument("--out", required=True, help="PNG file to write")
    siglip_head_flag(v)
    video_flags(v)
    compression_flags(v)
    v.set_defaults(fn=cmd_visualize)


def cmd_visualize(args) -> int:
    from earlytom_jax.api import VideoLLM
    from earlytom_jax.compression import registry
    from earlytom_jax.io_utils import check_writable
    from earlytom_jax.visualize import render, save_png

    check_counts(args)
    check_writable(args.out, "--out")
    if args.method and registry.canonical(args.method) == "tome":
        raise ConfigError("--method tome merges tokens inside the encoder (no pooled-token grid): there is no "
                          "kept-token map to draw; choose another method")
    status(f"earlytom: loading {args.model}...")
    llm = VideoLLM.load(args.model, args.dtype, video=video_settings(args), siglip_head=args.siglip_head)
    method = method_from_args(args, llm.cfg, info=llm.info)
    llm.check_request(args.frames, args.prompt, method, 1)
    status(f"earlytom: decoding {args.frames} frames, then compiling and running {registry.label(method)}...")
    try:
        ans = llm.ask(args.video, args.prompt, method, args.frames, max_new_tokens=1)
    finally:
        status(None)
    picked = method.input_frames(len(ans.video.frames)) if hasattr(method, "input_frames") else None
    grid, group = llm.token_grid(ans.video.frames)
    img, highlighted = render(ans.video.frames, ans.stats, grid, registry.label(method), picked, group)
    save_png(img, args.out)
    print(f"wrote {args.out}: {ans.stats['frames']} frames, {highlighted} kept tokens highlighted "
          f"({registry.label(method)})")
    return 0
