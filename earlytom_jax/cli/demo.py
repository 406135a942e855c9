"""`earlytom demo`: full tokens against a compression method on the toy model trained here
(real answers about generated clips), or on a named architecture with random weights."""

from __future__ import annotations

from earlytom_jax.architectures import ARCHITECTURES
from earlytom_jax.cli.flags import check_counts, compression_flags, method_from_args, video_flags, video_settings
from earlytom_jax.errors import ConfigError
from earlytom_jax.progress import say


def add_parser(sub) -> None:
    d = sub.add_parser("demo", help="full tokens vs EarlyTom: the toy model trained here answering "
                                    "questions about generated clips (no download)")
    d.add_argument("--model", default=None, help="an HF checkpoint or converted directory, or a Hugging Face hub id ORG/NAME "
                   "(default: the shipped toy model)")
    d.add_argument("--arch", default=None,
                   help=f"instead: a named architecture with RANDOM weights ({' | '.join(ARCHITECTURES)})")
    d.add_argument("--video", default=None, help="a video file (default: generated clips)")
    d.add_argument("--frames", type=int, default=16, help="frames sampled from each clip")
    d.add_argument("--seed", type=int, default=0, help="which generated clips (toy model)")
    d.add_argument("--prompt", default="Describe what's happening in this video.",
                   help="the question about --video (or about the random-weight model's clip)")
    d.add_argument("--max-new-tokens", type=int, default=8, help="longest answer, in tokens (at least 1)")
    d.add_argument("--out", default="earlytom_demo.png", help="where to write the picture ('' for none)")
    video_flags(d)
    compression_flags(d)
    d.set_defaults(fn=cmd_demo)


def _print_compression(stats) -> None:
    if "frames_after_layer" not in stats:  # a method without EarlyTom's stage I
        return
    print(f"  frames left after each compression layer: {stats['frames_after_layer']}")
    starts = [i for i, b in enumerate(stats["segment_starts"]) if b]
    print(f"  final segments start at merged frames {starts}; dynamic frames "
          f"{[i for i, d in enumerate(stats['dynamic']) if d]}")


def _frames_note(n_sampled: int, stats) -> str:
    """How many of the sampled frames reached the LLM, and how many were merged or dropped."""
    n = int(stats.get("frames", n_sampled))
    if n >= n_sampled:
        return f"all {n_sampled} sampled frames"
    how = "merged into others" if "frame_mixing" in stats else "dropped"
    return f"{n_sampled} sampled frames -> {n} ({n_sampled - n} {how})"


def _write_picture(args, frames, stats, llm, label, clip: str) -> None:
    if args.out and "frames_after_layer" not in stats:
        print(f"  (no picture: it shows EarlyTom's merges, and {label} has none; `earlytom visualize --method` draws any)")
    elif args.out:
        from earlytom_jax.visualize import render, save_png

        grid, group = llm.token_grid(frames)
        img, highlighted = render(frames, stats, grid, label, group=group)
        save_png(img, args.out)
        say(f"  picture of what {label} kept on {clip}: {_frames_note(len(frames), stats)}, "
            f"{highlighted} tokens highlighted -> {args.out}")


def _check_outputs(args) -> None:
    """Before any work: counts at least 1, the picture's path writable."""
    check_counts(args)
    if args.out:
        from earlytom_jax.io_utils import check_writable

        check_writable(args.out, "--out")


def _load_frames(llm, path: str, n: int):
    from earlytom_jax.cli.run import frames_note

    vf = llm.load_video(path, n)
    note = frames_note(vf, path, n)
    if note:
        print(f"  note: {note}")
    return vf.frames


def cmd_demo(args) -> int:
    if args.arch and args.model:
        raise ConfigError("--arch (random weights) and --model (a checkpoint) exclude each other")
    _check_outputs(args)
    return _demo_random(args) if args.arch else _demo_trained(args)


def _demo_trained(args) -> int:
    """The toy model trained here (or --model DIR): real answers about generated clips."""
    import jax

    from earlytom_jax.api import VideoLLM
    from earlytom_jax.compression import registry
    from earlytom_jax.evals.toy import TOY_DIR, parse_letter
    from earlytom_jax.pipeline import FULL
    from earlytom_jax.toy import data

    model_dir = args.model or TOY_DIR
    llm = VideoLLM.load(model_dir, video=video_settings(args))
    cfg = llm.cfg
    if args.model is None:
        say("earlytom demo: the toy LLaVA-OneVision trained on this project's procedural video-QA "
            "(earlytom_jax/assets/toy, 48 px frames; real weights, real answers)")
    else:
        say(f"earlytom demo: {model_dir}")
    method = method_from_args(args, cfg, info=llm.info)
    label = registry.label(method)
    say(f"  {label} settings: {method!r}")
    seed = data.HELD_OUT_START + 10_000 + args.seed
    size = getattr(cfg.vision, "image_size", 112)  # Qwen2.5-VL resizes any clip to its pixel bounds
    prompts = [args.prompt] if args.video else [data.make_sample(k, seed, 16, size).prompt for k in data.KINDS]
    for prompt in prompts:  # the context and memory, before any clip is made
        for m in (FULL, method):
            llm.check_request(args.frames, prompt, m, args.max_new_tokens, pad_multiple=64)
    if args.video:
        note = llm.info.open_question_note(args.prompt)
        if note:
            say(f"  note: {note}")
        clips = [("your video", _load_frames(llm, args.video, args.frames), args.prompt, None)]
    else:
        say(f"  making {len(data.KINDS)} clips of {args.frames} frames...")
        clips = []
        for kind in data.KINDS:
            smp = data.make_sample(kind, seed, args.frames, size)
            clips.append((kind, smp.frames, smp.prompt, smp.answer))
    rows = []
    same = registry.name(method) == "full"
    for i, (kind, frames, question, gold) in enumerate(clips):
        pixels, video_time = llm.prepare(frames)
        if i == 0:
            say(f"  compiling full tokens{'' if same else ' and ' + label} (first clip; once)...")
        full = llm.answer(pixels, question, FULL, args.max_new_tokens, pad_multiple=64, video_time=video_time)
        et = full if same else llm.answer(pixels, question, method, args.max_new_tokens, pad_multiple=64,
                                          video_time=video_time)
        rows.append((kind, frames, question, gold, full, et))
        q = question.splitlines()
        say(f"\n  [{kind}] {q[0]}  " + "  ".join(q[1:5]))
        if gold is not None:
            say(f"    correct answer: {gold}")
        for name, ans in (("full tokens", full),) + (() if same else ((label, et),)):
            s = ans.stats
            toks = f"{s['visual_tokens']}" + (f" -> {s['llm_kept']}" if "llm_kept" in s else "")
            say(f"    {name:11s}: {ans.text!r:8s} frames {s['frames']:>2} visual tokens {toks:>10} "
                f"TTFT {ans.ttft_s * 1000:6.1f} ms")
    full_t = sum(r[4].ttft_s for r in rows)
    et_t = sum(r[5].ttft_s for r in rows)
    if any(r[3] is not None for r in rows):
        right = lambda i: sum(parse_letter(r[i].text) == r[3] for r in rows)  # noqa: E731
        say(f"\n  correct: full tokens {right(4)}/{len(rows)}" + ("" if same else f", {label} {right(5)}/{len(rows)}"))
    if not same:
        say(f"  TTFT full / {label}: {full_t / et_t:.2f}x on {jax.devices()[0].platform}, compile time apart "
            "(a model this small is dominated by fixed costs; see BENCHMARKS.md for real shapes)")
    pick = next((r for r in rows if r[0] == "count"), rows[0])
    _print_compression(pick[5].stats)
    clip = "your video" if args.video else f"the [{pick[0]}] clip ({pick[2].splitlines()[0]})"
    _write_picture(args, pick[1], pick[5].stats, llm, label, clip)
    return 0


def _demo_random(args) -> int:
    """A named architecture with random weights: real token counts and timings, noise answers."""
    import jax

    from earlytom_jax.api import VideoLLM
    from earlytom_jax.architectures import architecture, random_params
    from earlytom_jax.compression import registry
    from earlytom_jax.pipeline import FULL
    from earlytom_jax.models import family
    from earlytom_jax.prompt import Tokenizer
    from earlytom_jax.synthetic import char_tokenizer, make_clip, qwen_vl_tokenizer
    from earlytom_jax.video import Preprocessor
    from earlytom_jax.video_qwen import QwenPreprocessor

    cfg = architecture(args.arch)
    say(f"earlytom demo: {args.arch} architecture with RANDOM weights (no checkpoint, no download);")
    say("  answers are noise, token counts and timings are real.")
    video = video_settings(args)
    if family.is_qwen(cfg):
        tok = Tokenizer(qwen_vl_tokenizer(cfg.video_token_id))
        pre = QwenPreprocessor(min_pixels=video.min_pixels, max_pixels=video.max_pixels)
    else:
        tok = Tokenizer(char_tokenizer(cfg.image_token_id))
        pre = Preprocessor(size=cfg.vision.image_size, mean=(0.5,) * 3, std=(0.5,) * 3)
    method = method_from_args(args, cfg)
    probe = VideoLLM(cfg, {}, tok, pre, video=video)  # no weights yet: the cheap checks only
    for m in (FULL, method):
        probe.check_request(args.frames, args.prompt, m, args.max_new_tokens)
    say("  drawing random weights...")
    params = random_params(cfg, seed=0)
    llm = VideoLLM(cfg, params, tok, pre, video=video)
    if args.video:
        say(f"  decoding {args.video} ({args.frames} frames)...")
        frames = _load_frames(llm, args.video, args.frames)
        source = args.video
    else:
        frames = make_clip(args.frames, 112, seed=0)
        source = f"generated clip ({args.frames} frames, 112x112: drifting square, scene cut, two flashes)"
    say(f"  video: {source}")
    pixels, video_time = llm.prepare(frames)
    say(f"  settings: {method!r}")
    rows = []
    same = registry.name(method) == "full"
    for name, m in (("full tokens", FULL),) + (() if same else ((registry.label(method), method),)):
        say(f"  {name}: compiling, then one timed call...")
        ans = llm.answer(pixels, args.prompt, m, args.max_new_tokens, video_time=video_time)
        rows.append((name, ans))
        s = ans.stats
        say(f"  {name:12s} frames {s.get('frames')} visual tokens {s.get('visual_tokens')}"
            f"{' -> ' + str(s['llm_kept']) + ' after the LLM merge' if 'llm_kept' in s else ''}"
            f" | TTFT {ans.ttft_s * 1000:.1f} ms (compiling apart: {ans.generation.compile_s:.1f} s)")
    full, et = rows[0][1], rows[-1][1]
    _print_compression(et.stats)
    if not same:
        say(f"  TTFT ratio full / {registry.label(method)}: {full.ttft_s / et.ttft_s:.2f}x on {jax.devices()[0].platform}")
    say(f"  {registry.label(method)} answer (random weights): {et.text!r}")
    _write_picture(args, frames, et.stats, llm, registry.label(method), f"the {source}")
    return 0
