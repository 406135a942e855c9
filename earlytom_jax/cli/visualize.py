"""`earlytom visualize`: a PNG of the frames and tokens EarlyTom kept."""

from __future__ import annotations

from earlytom_jax.cli.flags import compression_flags, method_from_args


def add_parser(sub) -> None:
    v = sub.add_parser("visualize", help="PNG of the frames and tokens EarlyTom kept")
    v.add_argument("--model", required=True, help="HF checkpoint directory")
    v.add_argument("--video", required=True)
    v.add_argument("--prompt", default="Describe what's happening in this video.")
    v.add_argument("--frames", type=int, default=32)
    v.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    v.add_argument("--out", required=True, help="PNG file to write")
    compression_flags(v)
    v.set_defaults(fn=cmd_visualize)


def cmd_visualize(args) -> int:
    from earlytom_jax.api import VideoLLM
    from earlytom_jax.visualize import render, save_png

    llm = VideoLLM.load(args.model, args.dtype)
    method = method_from_args(args, llm.cfg, "earlytom")
    ans = llm.ask(args.video, args.prompt, method, args.frames, max_new_tokens=1)
    img, highlighted = render(ans.video.frames, ans.stats, llm.cfg.pooled_grid)
    save_png(img, args.out)
    print(f"wrote {args.out}: {ans.stats['frames']} frames, {highlighted} kept tokens highlighted")
    return 0
