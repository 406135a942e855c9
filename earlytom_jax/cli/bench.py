"""`earlytom bench`: TTFT, its breakdown and FLOPs per method (the paper's protocol). Thin: the
flags become a `bench.session.BenchSpec`, the library runs it."""

from __future__ import annotations

from earlytom_jax.architectures import ARCHITECTURES
from earlytom_jax.cli.flags import (check_set, compression_flags, floats, ints, method_from_args, names, ratio_from_args,
                                    siglip_head_flag, video_flags)
from earlytom_jax.errors import ConfigError


def add_parser(sub) -> None:
    b = sub.add_parser("bench", help="TTFT, its breakdown and FLOPs per method (the paper's protocol)")
    src = b.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="HF checkpoint or converted directory, or a Hugging Face hub id ORG/NAME")
    src.add_argument("--arch", help=f"{' | '.join(ARCHITECTURES)}, random weights")
    b.add_argument("--video", default=None, help="video file (default: a generated clip)")
    b.add_argument("--frames", type=int, default=32, help="frames sampled from the video (Qwen2.5-VL: at most this "
                                                          "many, as qwen-vl-utils and lmms-eval sample them)")
    b.add_argument("--methods", type=names, default=None,
                   help="comma-separated methods (or groups: uniform), each at every --ratios; NAME@R: "
                        "that method at R only (e.g. pdrop@0.5); default full,earlytom")
    b.add_argument("--ratios", type=floats, default=None, help="comma-separated ratios (default: --ratio, else 0.1)")
    b.add_argument("--warmup", type=int, default=2, help="untimed calls after compiling")
    b.add_argument("--runs", type=int, default=5, help="timed calls per method")
    b.add_argument("--timing", default="sequential", choices=["sequential", "interleaved"],
                   help="sequential (default, the paper's protocol): one method's warm-ups and runs after another's; "
                        "interleaved: every method compiled and warmed up, then rounds of one timed run per method, "
                        "so a host's drift between rounds hits all alike (per-round speed-ups: see `paired`)")
    b.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="compute dtype of the weights and activations (bfloat16 halves memory)")
    b.add_argument("--json", default=None, help="write results as JSON here")
    b.add_argument("--no-stages", action="store_true", help="skip the per-stage breakdown run")
    b.add_argument("--decode-tokens", type=int, default=32,
                   help="new tokens of the timed greedy generation for decode tok/s (EOS ignored; 0 skips it)")
    b.add_argument("--no-xla-flops", action="store_true", help="skip XLA's cost analysis of the stages")
    b.add_argument("--reference", default=None, choices=["torch"],
                   help="also time transformers' full-token model (PyTorch, CPU) on the same weights and inputs")
    b.add_argument("--chart", default=None, help="write a PNG stacked-bar chart of the TTFT breakdown here")
    b.add_argument("--mesh", default=None, help="shard over devices, e.g. data=2,model=4")
    b.add_argument("--batch", type=ints, default=(),
                   help="also time each method at these batch sizes, e.g. 1,2,4: samples/s and prefill / B")
    siglip_head_flag(b)
    compression_flags(b)
    video_flags(b)
    b.set_defaults(fn=cmd_bench)


def bench_ratios(args) -> tuple[float, ...]:
    """`bench`'s ratios: --ratios, or --ratio (one), else the default (--preset TASK@R's ratio,
    else 0.1); both flags: one-line error."""
    if args.ratio is not None and args.ratios is not None:
        raise ConfigError("--ratio and --ratios exclude each other; give one (--ratios takes a list)")
    return args.ratios or (ratio_from_args(args),)


def cmd_bench(args) -> int:
    from earlytom_jax.bench import session
    from earlytom_jax.checkpoint.hub import resolve_model

    check_set(args)
    if args.model:
        args.model = resolve_model(args.model)  # a hub id → its snapshot directory, once
    methods = args.methods or session.default_methods(session.source_config(args.arch, args.model))
    spec = session.BenchSpec(
        model=args.model, arch=args.arch, video=args.video, frames=args.frames, methods=methods,
        ratios=bench_ratios(args), warmup=args.warmup, runs=args.runs, timing=args.timing, dtype=args.dtype,
        staged=not args.no_stages, decode_tokens=args.decode_tokens, xla=not args.no_xla_flops,
        reference=args.reference, mesh=args.mesh, min_pixels=args.min_pixels, max_pixels=args.max_pixels,
        batches=tuple(args.batch), siglip_head=args.siglip_head)
    from earlytom_jax.io_utils import check_writable

    for flag, path in (("--json", args.json), ("--chart", args.chart)):
        if path:
            check_writable(path, flag)  # before the (long) timing, not after it
    info = None
    if args.model:
        from earlytom_jax.compression.defaults import read_model_info

        info = read_model_info(args.model)

    def make_method(cfg, name, ratio):
        return method_from_args(args, cfg, name, ratio, info=info)

    run = session.run(spec, make_method)
    print(run.markdown())
    if args.json:
        run.save_json(args.json)
    if args.chart:
        run.save_chart(args.chart)
    return 0
