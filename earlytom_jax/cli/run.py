"""`earlytom run`: answer a question about a video."""

from __future__ import annotations

import sys

from earlytom_jax.cli.flags import (check_counts, compression_flags, method_from_args, siglip_head_flag, video_flags,
                                    video_settings)
from earlytom_jax.progress import status

MODEL_HELP = ("HF checkpoint or converted directory (`earlytom convert`), or a Hugging Face hub id ORG/NAME "
              "(from the HF cache, downloaded when online): LLaVA-OneVision or Qwen2.5-VL")
DTYPE_HELP = "compute dtype of the weights and activations (bfloat16 halves memory)"


def add_parser(sub) -> None:
    r = sub.add_parser("run", help="answer a question about a video")
    r.add_argument("--model", required=True, help=MODEL_HELP)
    r.add_argument("--video", required=True, help="video file (any format PyAV decodes: mp4, avi, mkv, webm, ...)")
    r.add_argument("--prompt", required=True, help="the question about the video")
    r.add_argument("--frames", type=int, default=32, help="frames sampled evenly from the video (lmms-eval's sampling; "
                   "Qwen2.5-VL: at most this many of qwen-vl-utils' 2 frames a second)")
    r.add_argument("--max-new-tokens", type=int, default=64, help="longest answer, in tokens (at least 1)")
    r.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help=DTYPE_HELP)
    r.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    r.add_argument("--mesh", default=None, help="shard over devices, e.g. data=2,model=4")
    siglip_head_flag(r)
    video_flags(r)
    compression_flags(r)
    r.set_defaults(fn=cmd_run)


def stats_line(ans, n_frames: int) -> str:
    """One line of what reached the LLM and how fast. Qwen2.5-VL's encoder sees pairs of
    frames: its line counts the frames sampled and the pairs they make."""
    s = ans.stats
    frames = s.get("frames", n_frames)
    if ans.video is not None and hasattr(ans.video, "sample_fps"):
        n_frames, frames = len(ans.video.frames), f"{frames} pairs"
    vis = s.get("visual_tokens")
    llm = s.get("llm_kept")
    extra = f" -> {llm} after the LLM merge" if llm is not None else ""
    rate = ans.generation.tokens_per_s
    speed = f"{rate:.1f} tok/s" if rate is not None else "decode rate n/a (too few tokens to time)"
    compiled = f" (+ {ans.generation.compile_s:.1f} s compiling, once)" if ans.generation.compile_s else ""
    return (
        f"[frames {n_frames} -> {frames} | visual tokens {vis}{extra} | "
        f"TTFT {ans.ttft_s * 1000:.0f} ms{compiled} | {speed}]"
    )


def frames_note(video, path: str, asked: int) -> str | None:
    """A line when the clip gave other frames than --frames asked for: repeated frames
    (LLaVA-OneVision, lmms-eval's sampling), or fewer (Qwen2.5-VL: qwen-vl-utils samples 2 a
    second, at most --frames of them)."""
    if video is None:
        return None
    if getattr(video, "repeated", False):
        return f"{path} has {video.total_frames} frames, fewer than {asked}; frames repeat (lmms-eval's sampling)"
    got = len(video.frames)
    if hasattr(video, "sample_fps") and got < asked:
        return (f"{path}: {video.total_frames} frames at {video.video_fps:g} fps give {got} frames at qwen-vl-utils' "
                f"2 a second, fewer than --frames {asked}")
    return None


def cmd_run(args) -> int:
    from earlytom_jax.api import VideoLLM
    from earlytom_jax.io_utils import strict_json

    check_counts(args)
    status(f"earlytom: loading {args.model}...")
    llm = VideoLLM.load(args.model, args.dtype, args.mesh, video=video_settings(args),
                        time_instruction=args.time_instruction, siglip_head=args.siglip_head)
    method = method_from_args(args, llm.cfg, info=llm.info)
    llm.check_request(args.frames, args.prompt, method, args.max_new_tokens)
    note = llm.info.open_question_note(args.prompt)
    if note:
        print(f"note: {note}", file=sys.stderr)
    status(f"earlytom: decoding {args.frames} frames, then compiling (first call for this shape) and prefilling...")

    def stream(piece):
        status(None)
        print(piece, end="", flush=True)

    try:
        ans = llm.ask(args.video, args.prompt, method, args.frames, args.max_new_tokens,
                      on_token=None if args.json else stream)
    finally:
        status(None)
    note = frames_note(ans.video, args.video, args.frames)
    if note:
        print(f"note: {note}", file=sys.stderr)
    if args.json:
        settings = {"model": args.model, "video": args.video, "frames": args.frames, "method": repr(method),
                    "dtype": args.dtype, "family": llm.cfg.family}
        if llm.cfg.family == "qwen2_5_vl":
            settings.update(min_pixels=args.min_pixels, max_pixels=args.max_pixels,
                            frame_size=list(ans.video.frames.shape[1:3]), frames_sampled=len(ans.video.frames))
        out = {
            "text": ans.text,
            "tokens": ans.tokens,
            "settings": settings,
            "ttft_s": ans.ttft_s,
            "compile_s": ans.generation.compile_s,
            "tokens_per_s": ans.generation.tokens_per_s,
            "stats": ans.stats,
        }
        print(strict_json(out))
    else:
        print()
        print(stats_line(ans, args.frames), file=sys.stderr)
    return 0
