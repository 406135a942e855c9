"""The `earlytom` command. Thin: parses flags, calls the library, prints.

Errors the user can fix print one line (`earlytom: error: ...`) and exit 2; `--debug` shows
the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from earlytom_jax.errors import ConfigError, EarlyTomError


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _compression_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("compression")
    from earlytom_jax.compression.registry import METHODS

    g.add_argument("--method", default="earlytom", choices=list(METHODS),
                   help="compression method; every one keeps --ratio of the T0·196 visual tokens "
                        "(fastv: from LLM layer --llm-merge-layer, default 2, on)")
    g.add_argument("--ratio", type=float, default=None, help="retention ratio r in (0, 1] (default 0.1)")
    g.add_argument("--tau", type=float, default=None, help="segmentation threshold τ in [0, 1] (default 0.6)")
    g.add_argument("--layers", type=_ints, default=None, help="SigLIP blocks after which frames merge, e.g. 6,21,23")
    g.add_argument("--llm-merge-layer", type=int, default=None, help="stage III layer k (default 18; -1 turns it off)")
    g.add_argument("--llm-merge-ratio", type=float, default=None, help="stage III drop ratio (default 0.5)")
    g.add_argument("--llm-noncausal", action="store_true", help="layer k-1 without causal mask in prefill, as the official code")
    g.add_argument("--paper-prose", action="store_true", help="follow the paper's prose where the official code differs")
    g.add_argument("--preset", default=None, help="published settings: TASK or TASK@RATIO, e.g. videomme@0.1")


def _ratio_from_args(args):
    """--ratio, else the ratio of --preset TASK@R, else the one default (`registry.default_ratio`)."""
    from earlytom_jax.compression import registry

    return args.ratio if args.ratio is not None else registry.default_ratio(args.preset)


# compression flag → the settings it sets, the first of them that a method takes
FLAG_SETTINGS = (("tau", ("tau",)), ("layers", ("layers",)), ("llm_merge_layer", ("llm_layer", "layer")),
                 ("llm_merge_ratio", ("llm_ratio",)), ("preset", ("preset",)))


def _method_from_args(args, cfg, name: str | None = None, ratio: float | None = None, scale: bool = False):
    """The method `name` (default --method) at `ratio` (default from the flags), built by the
    registry with the compression flags that apply to it (the settings it takes,
    `registry.SETTINGS`). scale: map EarlyTom's default layers onto a shallower model (tiny and
    toy architectures)."""
    from earlytom_jax.compression import registry

    name = registry.canonical(name or args.method)
    if name == "full":
        return registry.build("full", None, cfg)
    takes = registry.SETTINGS[name]
    kw: dict = {}
    if "scale_layers_for_depth" in takes:
        kw["scale_layers_for_depth"] = scale and args.layers is None and args.preset is None
    if "llm_noncausal" in takes:
        kw["llm_noncausal"] = args.llm_noncausal
    if "quirks" in takes:
        kw["quirks"] = not args.paper_prose
    for flag, keys in FLAG_SETTINGS:
        key = next((k for k in keys if k in takes), None)
        if key is not None and getattr(args, flag) is not None:
            kw[key] = getattr(args, flag)
    return registry.build(name, ratio if ratio is not None else _ratio_from_args(args), cfg, **kw)


def _stats_line(ans, n_frames: int) -> str:
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
    method = _method_from_args(args, llm.cfg)
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
        print(_stats_line(ans, args.frames), file=sys.stderr)
    return 0


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
    method = _method_from_args(args, cfg)
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
    method = _method_from_args(args, cfg, scale=args.layers is None and args.preset is None)
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


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _bench_ratios(args) -> tuple[float, ...]:
    """`bench`'s ratios: --ratios, or --ratio (one), else the default (--preset TASK@R's ratio,
    else 0.1); both flags: one-line error."""
    if args.ratio is not None and args.ratios is not None:
        raise ConfigError("--ratio and --ratios exclude each other; give one (--ratios takes a list)")
    return args.ratios or (_ratio_from_args(args),)


def cmd_bench(args) -> int:
    import dataclasses as dc
    import datetime

    import jax

    from earlytom_jax import bench
    from earlytom_jax.architectures import architecture, random_params
    from earlytom_jax.checkpoint.load import load_hf
    from earlytom_jax.models import stack
    from earlytom_jax.pipeline import FULL
    from earlytom_jax.video import Preprocessor

    from earlytom_jax import sharding as shd
    from earlytom_jax.architectures import param_shapes
    from earlytom_jax.compression import registry

    if args.frames < 1 or args.runs < 1 or args.warmup < 0 or args.decode_tokens < 0:
        raise ConfigError("need --frames >= 1, --runs >= 1, --warmup >= 0 and --decode-tokens >= 0")
    names = registry.resolve(args.methods)  # before any loading: a misspelt name fails at once
    ratios = _bench_ratios(args)
    mesh = shd.parse_mesh(args.mesh) if args.mesh else None
    if args.reference == "torch":
        from earlytom_jax import bench_torch

        bench_torch.require()  # fail before any work when torch is missing
    frames = bench.clip_frames(args.video, args.frames)
    prefix, suffix = bench.prompt_ids()
    # The PyTorch reference runs first, alone in memory, so that the 7B shape (15 GB in bf16)
    # never needs two models on a 24 GB host; its weights then move into our tree.
    reference = None
    if args.model:
        from earlytom_jax.checkpoint.load import load_config

        cfg = load_config(args.model)
        pre = Preprocessor.from_dir(args.model)
        pix_np = pre(frames)
        if args.reference == "torch":
            torch_model = bench_torch.load_pretrained(args.model, args.dtype)
            reference = bench_torch.measure(torch_model, pix_np, prefix, suffix, cfg, args.warmup, args.runs)
            del torch_model
        shardings = None if mesh is None else shd.plan_shardings(param_shapes(cfg), mesh)[0]
        cfg, params = load_hf(args.model, args.dtype, shardings, cfg=cfg)
        weights = args.model
    else:
        cfg = architecture(args.arch)
        pix_np = bench.random_preprocessor(cfg)(frames)
        shardings = None if mesh is None else shd.plan_shardings(param_shapes(cfg), mesh)[0]
        if args.reference == "torch":
            # the random transformers model first; our tree gets its very weights
            torch_model = bench_torch.build_random(cfg, args.dtype)
            reference = bench_torch.measure(torch_model, pix_np, prefix, suffix, cfg, args.warmup, args.runs)
            params = bench_torch.params_from_torch(torch_model, cfg, args.dtype, shardings, release=True, held=True)
            del torch_model
            weights = f"random ({args.arch}), the same in JAX and in the PyTorch reference"
        else:
            params = random_params(cfg, dtype=jax.numpy.dtype(args.dtype))
            if mesh is not None:
                params, _ = shd.shard_params(params, mesh)
            weights = f"random ({args.arch})"
    if reference is not None:
        print(f"PyTorch full: TTFT mean {reference['ttft_mean_s']:.3f} s", file=sys.stderr, flush=True)
    params = stack.pack(params)  # bf16 on CPU: no f32 copy of the layer stacks (see models/stack.py)
    pixels = jax.numpy.asarray(pix_np, params["vision"]["patch_w"].dtype)
    if mesh is not None:
        pixels = jax.device_put(pixels, shd.frames_sharding(mesh, pixels.shape[0]))
    scale = args.layers is None and args.preset is None and bench.shallow_encoder(cfg)
    timers = [bench.MethodTimer(params, cfg, pixels, prefix, suffix, _method_from_args(args, cfg, name, r, scale),
                                name, r, mesh)
              for name in names for r in ([None] if name == "full" else list(ratios))]

    def progress(res):
        print(f"{res.method} r={res.ratio}: TTFT mean {res.ttft_mean:.3f} s (compile {res.compile_s:.1f} s)",
              file=sys.stderr, flush=True)

    opts = dict(warmup=args.warmup, runs=args.runs, staged=not args.no_stages, decode_tokens=args.decode_tokens,
                xla=not args.no_xla_flops)
    if args.timing == "interleaved":
        results = bench.measure_interleaved(timers, progress=progress, **opts)
    else:
        results = []
        for timer in timers:
            results.append(bench.measure(timer, **opts))
            progress(results[-1])
    full = bench.find_full(results)
    if reference is not None:
        for r in results:
            r.ttft_over_reference = r.ttft_mean / reference["ttft_mean_s"]
        if full is not None:
            reference["jax_full_over_torch_full"] = full.ttft_mean / reference["ttft_mean_s"]
            reference["jax_full_over_torch_full_median"] = full.ttft_median / reference["ttft_median_s"]
            reference["same_first_token_as_jax_full"] = full.first_token == reference["first_token"]
    bench.relate_to_full(results, interleaved=args.timing == "interleaved")
    table = bench.markdown(results, reference)
    print(table)
    meta = {"date": datetime.date.today().isoformat(), **bench.host(), "weights": weights,
            "video": args.video or "generated clip",
            "frames": args.frames, "dtype": args.dtype, "warmup": args.warmup, "runs": args.runs, "timing": args.timing,
            "decode_tokens": args.decode_tokens, "mesh": None if mesh is None else shd.describe(mesh),
            "reference": args.reference, "command": " ".join(sys.argv),
            "xla_flags": os.environ.get("XLA_FLAGS", "")}
    if args.json:
        from earlytom_jax.io_utils import atomic_write_text

        out = {"meta": meta, "results": [r.to_json() for r in results], "reference": reference}
        atomic_write_text(args.json, json.dumps(out, indent=1))
    if args.chart:
        from earlytom_jax.chart import save_chart

        source = args.arch or os.path.basename(os.path.normpath(args.model))
        save_chart(args.chart, results, reference,
                   title=f"TTFT breakdown: {source}, {args.frames} frames, {args.dtype}, {jax.devices()[0].platform}")
    return 0


def _init_distributed(args) -> None:
    """Multi-host: join the other processes before any device is touched."""
    if not (args.distributed or args.coordinator):
        return
    import jax

    if args.coordinator:
        if args.num_processes is None or args.process_id is None:
            raise ConfigError("--coordinator needs --num-processes and --process-id")
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    else:
        jax.distributed.initialize()  # cluster environments (TPU pods, Slurm, ...) detect the rest


def _eval_runs(args, cfg) -> list:
    """The (name, ratio, method) runs of `earlytom eval`: every --compare method at every ratio
    of --ratios, or --method; a ratio not given is --ratio's, else --preset TASK@R's, else the
    default. EarlyTom at a published ratio without --preset, --tau or --layers takes the
    task's published settings."""
    from earlytom_jax.compression.presets import PUBLISHED, RATIOS

    preset_task = "egoschema" if args.task == "egoschema_subset" else args.task

    def build(name, ratio):
        a = argparse.Namespace(**vars(args))
        a.method, a.ratio = name, ratio
        published = ratio is not None and any(abs(ratio - x) < 1e-9 for x in RATIOS)
        if name == "earlytom" and not a.preset and a.tau is None and a.layers is None and preset_task in PUBLISHED and published:
            a.preset = f"{preset_task}@{ratio:g}"
            print(f"note: EarlyTom with the published {a.preset} settings (--tau/--layers override)", file=sys.stderr)
        return name, ratio, _method_from_args(a, cfg)

    ratio = _ratio_from_args(args)
    if args.compare:
        return [build(name, r) for name in args.compare for r in ([None] if name == "full" else list(args.ratios or (ratio,)))]
    return [build(args.method, None if args.method == "full" else ratio)]


def cmd_eval(args) -> int:
    from earlytom_jax.checkpoint.load import load_any_config
    from earlytom_jax.evals import compare, runner

    _init_distributed(args)

    s = runner.EvalSettings(
        model=args.model, task=args.task, data=args.data, out=args.out, frames=args.frames,
        limit=args.limit, max_new_tokens=args.max_new_tokens, dtype=args.dtype, mesh=args.mesh,
        prefetch=args.prefetch, progress=not args.quiet,
    )
    runs = _eval_runs(args, load_any_config(args.model))
    if args.compare:
        rows = compare.compare(s, runs)
        print(compare.markdown(args.task, rows))
        return 0
    results = runner.run_eval(s, runs[0][2])
    if results:
        print("\n".join(runner.summary_lines(results)))
        print(f"wrote {os.path.join(args.out, 'results.json')} and samples.jsonl")
    return 0 if not results or results["complete"] else 1


def cmd_visualize(args) -> int:
    from earlytom_jax.api import VideoLLM
    from earlytom_jax.visualize import render, save_png

    llm = VideoLLM.load(args.model, args.dtype)
    method = _method_from_args(args, llm.cfg, "earlytom")
    ans = llm.ask(args.video, args.prompt, method, args.frames, max_new_tokens=1)
    img, highlighted = render(ans.video.frames, ans.stats, llm.cfg.pooled_grid)
    save_png(img, args.out)
    print(f"wrote {args.out}: {ans.stats['frames']} frames, {highlighted} kept tokens highlighted")
    return 0


def cmd_convert(args) -> int:
    from earlytom_jax.checkpoint.orbax_io import convert_checkpoint

    summary = convert_checkpoint(args.src, args.dst, args.dtype, progress=not args.quiet)
    gb = summary["bytes"] / 1e9
    print(f"converted {summary['tensors']} tensors ({gb:.2f} GB, {args.dtype}) to {args.dst} "
          f"in {summary['seconds']:.1f} s; validated")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="earlytom", description="EarlyTom video-token compression in JAX")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="answer a question about a video")
    r.add_argument("--model", required=True, help="HF checkpoint directory")
    r.add_argument("--video", required=True)
    r.add_argument("--prompt", required=True)
    r.add_argument("--frames", type=int, default=32)
    r.add_argument("--max-new-tokens", type=int, default=64)
    r.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    r.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    r.add_argument("--mesh", default=None, help="shard over devices, e.g. data=2,model=4")
    _compression_flags(r)
    r.set_defaults(fn=cmd_run)

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
    _compression_flags(d)
    d.set_defaults(fn=cmd_demo)

    c = sub.add_parser("convert", help="HF checkpoint directory -> orbax checkpoint (streamed, validated, atomic)")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(fn=cmd_convert)

    v = sub.add_parser("visualize", help="PNG of the frames and tokens EarlyTom kept")
    v.add_argument("--model", required=True, help="HF checkpoint directory")
    v.add_argument("--video", required=True)
    v.add_argument("--prompt", default="Describe what's happening in this video.")
    v.add_argument("--frames", type=int, default=32)
    v.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    v.add_argument("--out", required=True, help="PNG file to write")
    _compression_flags(v)
    v.set_defaults(fn=cmd_visualize)

    e = sub.add_parser("eval", help="accuracy on MVBench, VideoMME, EgoSchema, LongVideoBench (resumable)")
    e.add_argument("--model", required=True, help="HF checkpoint directory or a converted one")
    e.add_argument("--task", required=True, help="mvbench | videomme | egoschema | egoschema_subset | longvideobench")
    e.add_argument("--data", required=True, help="the task's local copy (layout: see earlytom_jax/evals/tasks)")
    e.add_argument("--out", required=True, help="run directory: samples.jsonl, results.json; re-run to resume")
    e.add_argument("--frames", type=int, default=32)
    e.add_argument("--limit", type=int, default=None, help="only the first N samples")
    e.add_argument("--max-new-tokens", type=int, default=None, help="default: the task's (lmms-eval) limit, at most 64")
    e.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    e.add_argument("--mesh", default=None, help="data-parallel groups (and tensor parallel inside), e.g. data=4 or data=2,model=2")
    e.add_argument("--prefetch", type=int, default=4, help="videos decoded ahead in background threads")
    e.add_argument("--compare", type=lambda t: tuple(x.strip() for x in t.split(",") if x.strip()), default=None,
                   help="run several methods (e.g. full,earlytom,fastv) at --ratios and print one table")
    e.add_argument("--ratios", type=_floats, default=None, help="ratios for --compare (default 0.1)")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    m = e.add_argument_group("multi-host (every host runs the same command; --out on a shared file system)")
    m.add_argument("--distributed", action="store_true", help="jax.distributed.initialize() from the cluster environment")
    m.add_argument("--coordinator", default=None, help="HOST:PORT of process 0 (with --num-processes, --process-id)")
    m.add_argument("--num-processes", type=int, default=None)
    m.add_argument("--process-id", type=int, default=None)
    _compression_flags(e)
    e.set_defaults(fn=cmd_eval)

    b = sub.add_parser("bench", help="TTFT, its breakdown and FLOPs per method (the paper's protocol)")
    src = b.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="HF checkpoint directory")
    src.add_argument("--arch", help="tiny | llava-ov-0.5b | llava-ov-7b, random weights")
    b.add_argument("--video", default=None, help="video file (default: a generated clip)")
    b.add_argument("--frames", type=int, default=32)
    b.add_argument("--methods", type=lambda t: tuple(x.strip() for x in t.split(",") if x.strip()), default=("full", "earlytom"))
    b.add_argument("--ratios", type=_floats, default=None, help="comma-separated ratios (default: --ratio, else 0.1)")
    b.add_argument("--warmup", type=int, default=2)
    b.add_argument("--runs", type=int, default=5)
    b.add_argument("--timing", default="sequential", choices=["sequential", "interleaved"],
                   help="sequential (default, the paper's protocol): one method's warm-ups and runs after another's; "
                        "interleaved: every method compiled and warmed up, then rounds of one timed run per method, "
                        "so a host's drift between rounds hits all alike (per-round speed-ups: see `paired`)")
    b.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    b.add_argument("--json", default=None, help="write results as JSON here")
    b.add_argument("--no-stages", action="store_true", help="skip the per-stage breakdown run")
    b.add_argument("--decode-tokens", type=int, default=32,
                   help="new tokens of the timed greedy generation for decode tok/s (EOS ignored; 0 skips it)")
    b.add_argument("--no-xla-flops", action="store_true", help="skip XLA's cost analysis of the stages")
    b.add_argument("--reference", default=None, choices=["torch"],
                   help="also time transformers' full-token model (PyTorch, CPU) on the same weights and inputs")
    b.add_argument("--chart", default=None, help="write a PNG stacked-bar chart of the TTFT breakdown here")
    b.add_argument("--mesh", default=None, help="shard over devices, e.g. data=2,model=4")
    _compression_flags(b)
    b.set_defaults(fn=cmd_bench)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "dtype", None):
        from earlytom_jax import xla_setup

        xla_setup.apply_cpu_flags(args.dtype)  # before the command opens a JAX backend
    try:
        return args.fn(args)
    except EarlyTomError as e:
        if args.debug:
            raise
        print(f"earlytom: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("earlytom: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # device out of memory: one line, not XLA's traceback
        if args.debug or "RESOURCE_EXHAUSTED" not in str(e):
            raise
        first = str(e).strip().splitlines()[0]
        print(f"earlytom: error: the device ran out of memory ({first}); try fewer --frames, "
              "a smaller model, --dtype bfloat16 on an accelerator, or --mesh to shard", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
