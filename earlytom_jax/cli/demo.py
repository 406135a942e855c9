"""`earlytom demo`: full tokens against a compression method on the toy model trained here
(real answers about generated clips), or on a named architecture with random weights."""

from __future__ import annotations

import time

from earlytom_jax.cli.flags import compression_flags, method_from_args
from earlytom_jax.errors import ConfigError


def add_parser(sub) -> None:
    d = sub.add_parser("demo", help="full tokens vs EarlyTom: the toy model trained here answering "
                                    "questions about generated clips (no download)")
    d.add_argument("--model", default=None, help="a checkpoint directory (default: the shipped toy model)")
    d.add_argument("--arch", default=None,
                   help="instead: a named architecture with RANDOM weights (tiny | llava-ov-0.5b | llava-ov-7b)")
    d.add_argument("--video", default=None, help="a video file (default: generated clips)")
    d.add_argument("--frames", type=int, default=16)
    d.add_argument("--seed", type=int, default=0, help="which generated clips (toy model)")
    d.add_argument("--prompt", default="Describe what's happening in this video.",
                   help="the question about --video (or about the random-weight model's clip)")
    d.add_argument("--max-new-tokens", type=int, default=8)
    d.add_argument("--out", default="earlytom_demo.png", help="where to write the picture ('' for none)")
    compression_flags(d)
    d.set_defaults(fn=cmd_demo)


def _timed_answer(llm, pixels, question, method, max_new, pad_multiple=None):
    """(answer, seconds of the first call, which compiles); the answer is a second, warm call."""
    t = time.perf_counter()
    llm.answer(pixels, question, method, max_new, pad_multiple=pad_multiple)
    first = time.perf_counter() - t
    return llm.answer(pixels, question, method, max_new, pad_multiple=pad_multiple), first


def _print_compression(stats) -> None:
    if "frames_after_layer" not in stats:  # a method without EarlyTom's stage I
        return
    print(f"  frames left after each compression layer: {stats['frames_after_layer']}")
    starts = [i for i, b in enumerate(stats["segment_starts"]) if b]
    print(f"  final segments start at merged frames {starts}; dynamic frames "
          f"{[i for i, d in enumerate(stats['dynamic']) if d]}")


def _write_picture(args, frames, stats, cfg) -> None:
    if args.out and "frames_after_layer" not in stats:
        print("  (no picture: it shows EarlyTom's merges, and this method has none)")
    elif args.out:
        from earlytom_jax.visualize import render, save_png

        img, highlighted = render(frames, stats, cfg.pooled_grid)
        save_png(img, args.out)
        print(f"  picture of what EarlyTom kept ({highlighted} tokens highlighted): {args.out}")


def cmd_demo(args) -> int:
    if args.arch and args.model:
        raise ConfigError("--arch (random weights) and --model (a checkpoint) exclude each other")
    return _demo_random(args) if args.arch else _demo_trained(args)


def _demo_trained(args) -> int:
    """The toy model trained here (or --model DIR): real answers about generated clips."""
    import jax

    from earlytom_jax.api import VideoLLM
    from earlytom_jax.compression import registry
    from earlytom_jax.evals.toy import TOY_DIR, parse_letter
    from earlytom_jax.pipeline import FULL
    from earlytom_jax.toy import data
    from earlytom_jax.toy.model import TOY_LAYERS, TOY_LLM_LAYER
    from earlytom_jax.video import load_video

    model_dir = args.model or TOY_DIR
    llm = VideoLLM.load(model_dir)
    cfg = llm.cfg
    if args.model is None:
        print("earlytom demo: the toy LLaVA-OneVision trained on this project's procedural video-QA "
              "(earlytom_jax/assets/toy, 48 px frames; real weights, real answers)")
        if args.layers is None and args.preset is None:
            args.layers = TOY_LAYERS
        if args.llm_merge_layer is None and args.preset is None:
            args.llm_merge_layer = TOY_LLM_LAYER
    else:
        print(f"earlytom demo: {model_dir}")
    method = method_from_args(args, cfg)
    label = registry.label(method)
    print(f"  {label} settings: {method!r}")
    if args.video:
        frames = load_video(args.video, args.frames).frames
        clips = [("your video", frames, args.prompt, None)]
    else:
        clips = []
        for kind in data.KINDS:
            smp = data.make_sample(kind, data.HELD_OUT_START + 10_000 + args.seed, args.frames, cfg.vision.image_size)
            clips.append((kind, smp.frames, smp.prompt, smp.answer))
    rows = []
    for kind, frames, question, gold in clips:
        pixels = llm.preprocessor(frames)
        full, _ = _timed_answer(llm, pixels, question, FULL, args.max_new_tokens, 64)
        et, _ = _timed_answer(llm, pixels, question, method, args.max_new_tokens, 64)
        rows.append((kind, frames, question, gold, full, et))
        q = question.splitlines()
        print(f"\n  [{kind}] {q[0]}  " + "  ".join(q[1:5]))
        if gold is not None:
            print(f"    correct answer: {gold}")
        for name, ans in (("full tokens", full), (label, et)):
            s = ans.stats
            toks = f"{s['visual_tokens']}" + (f" -> {s['llm_kept']}" if "llm_kept" in s else "")
            print(f"    {name:11s}: {ans.text!r:8s} frames {s['frames']:>2} visual tokens {toks:>10} "
                  f"TTFT {ans.ttft_s * 1000:6.1f} ms")
    full_t = sum(r[4].ttft_s for r in rows)
    et_t = sum(r[5].ttft_s for r in rows)
    if any(r[3] is not None for r in rows):
        right = lambda i: sum(parse_letter(r[i].text) == r[3] for r in rows)  # noqa: E731
        print(f"\n  correct: full tokens {right(4)}/{len(rows)}, {label} {right(5)}/{len(rows)}")
    print(f"  TTFT full / {label}: {full_t / et_t:.2f}x on {jax.devices()[0].platform} "
          "(a model this small is dominated by fixed costs; see BENCHMARKS.md for real shapes)")
    pick = next((r for r in rows if r[0] == "count"), rows[0])
    _print_compression(pick[5].stats)
    _write_picture(args, pick[1], pick[5].stats, cfg)
    return 0


def _demo_random(args) -> int:
    """A named architecture with random weights: real token counts and timings, noise answers."""
    import jax

    from earlytom_jax.api import VideoLLM
    from earlytom_jax.architectures import architecture, random_params
    from earlytom_jax.compression import registry
    from earlytom_jax.pipeline import FULL
    from earlytom_jax.prompt import Tokenizer
    from earlytom_jax.synthetic import char_tokenizer, make_clip
    from earlytom_jax.video import Preprocessor, load_video

    cfg = architecture(args.arch)
    print(f"earlytom demo: {args.arch} architecture with RANDOM weights (no checkpoint, no download);")
    print("  answers are noise, token counts and timings are real.")
    params = random_params(cfg, seed=0)
    tok = Tokenizer(char_tokenizer(cfg.image_token_id))
    pre = Preprocessor(size=cfg.vision.image_size, mean=(0.5,) * 3, std=(0.5,) * 3)
    llm = VideoLLM(cfg, params, tok, pre)
    if args.video:
        frames = load_video(args.video, args.frames).frames
        source = args.video
    else:
        frames = make_clip(args.frames, 112, seed=0)
        source = f"generated clip ({args.frames} frames, 112x112: drifting square, scene cut, two flashes)"
    print(f"  video: {source}")
    method = method_from_args(args, cfg, scale=args.layers is None and args.preset is None)
    pixels = pre(frames)
    rows = [(name, *_timed_answer(llm, pixels, args.prompt, m, args.max_new_tokens))
            for name, m in (("full tokens", FULL), (registry.label(method), method))]
    print(f"  settings: {method!r}")
    for name, ans, compile_s in rows:
        s = ans.stats
        print(f"  {name:12s} frames {s.get('frames')} visual tokens {s.get('visual_tokens')}"
              f"{' -> ' + str(s['llm_kept']) + ' after the LLM merge' if 'llm_kept' in s else ''}"
              f" | TTFT {ans.ttft_s * 1000:.1f} ms (first call with compile {compile_s:.1f} s)")
    full, et = rows[0][1], rows[1][1]
    _print_compression(et.stats)
    print(f"  TTFT ratio full / {registry.label(method)}: {full.ttft_s / et.ttft_s:.2f}x on {jax.devices()[0].platform}")
    print(f"  {registry.label(method)} answer (random weights): {et.text!r}")
    _write_picture(args, frames, et.stats, cfg)
    return 0
