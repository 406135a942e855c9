"""`earlytom eval`: accuracy on MVBench, VideoMME, EgoSchema, LongVideoBench (resumable,
data-parallel, multi-host), one method or several compared."""

from __future__ import annotations

import argparse
import os
import sys

from earlytom_jax.cli.flags import (DEFAULT_METHOD, check_counts, compression_flags, floats, method_from_args, names,
                                    ratio_from_args, siglip_head_flag, video_flags, video_settings)
from earlytom_jax.errors import ConfigError


def add_parser(sub) -> None:
    e = sub.add_parser("eval", help="accuracy on MVBench, VideoMME, EgoSchema, LongVideoBench (resumable)")
    e.add_argument("--model", required=True, help="HF checkpoint directory or a converted one, or a Hugging Face hub id ORG/NAME")
    e.add_argument("--task", required=True, help="mvbench | videomme | egoschema | egoschema_subset | longvideobench")
    e.add_argument("--data", required=True, help="the task's local copy (layout: see earlytom_jax/evals/tasks)")
    e.add_argument("--out", required=True, help="run directory: samples.jsonl, results.json; re-run to resume")
    e.add_argument("--frames", type=int, default=32, help="frames sampled from each video (lmms-eval's sampling)")
    e.add_argument("--limit", type=int, default=None, help="only the first N samples")
    e.add_argument("--max-new-tokens", type=int, default=None, help="default: the task's (lmms-eval) limit, at most 64")
    e.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="compute dtype of the weights and activations (bfloat16 halves memory)")
    e.add_argument("--mesh", default=None, help="data-parallel groups (and tensor parallel inside), e.g. data=4 or data=2,model=2")
    e.add_argument("--prefetch", type=int, default=4, help="videos decoded ahead in background threads")
    e.add_argument("--batch-size", type=int, default=1,
                   help="videos answered per jitted call (same answers as 1; --mesh data=N gives each group B/N, rounded up)")
    e.add_argument("--compare", type=names, default=None,
                   help="run several methods (e.g. full,earlytom,fastv) at --ratios and print one table")
    e.add_argument("--ratios", type=floats, default=None, help="ratios for --compare (default: --ratio, else 0.1)")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    siglip_head_flag(e)
    video_flags(e)
    m = e.add_argument_group("multi-host (every host runs the same command; --out on a shared file system)")
    m.add_argument("--distributed", action="store_true", help="jax.distributed.initialize() from the cluster environment")
    m.add_argument("--coordinator", default=None, help="HOST:PORT of process 0 (with --num-processes, --process-id)")
    m.add_argument("--num-processes", type=int, default=None, help="how many processes join (with --coordinator)")
    m.add_argument("--process-id", type=int, default=None, help="this process's index, 0..N-1 (with --coordinator)")
    compression_flags(e)
    e.set_defaults(fn=cmd_eval)


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


def eval_runs(args, cfg, info=None) -> list:
    """The (name, ratio, method) runs of `earlytom eval`: every --compare method at every ratio
    of --ratios, or --method; a ratio not given is --ratio's, else --preset TASK@R's, else the
    default. EarlyTom on LLaVA-OneVision or LLaVA-Video at a published ratio without --preset, --tau or
    --layers takes the task's published settings. info: the checkpoint's defaults (`compression.defaults`)."""
    from earlytom_jax.compression.presets import PUBLISHED, RATIOS

    preset_task = "egoschema" if args.task == "egoschema_subset" else args.task

    def build(name, ratio):
        a = argparse.Namespace(**vars(args))
        a.method, a.ratio = name, ratio
        published = ratio is not None and any(abs(ratio - x) < 1e-9 for x in RATIOS)
        # the published settings are SigLIP's blocks (LLaVA-Video: its script's, `presets.FAMILY_EXCEPTIONS`)
        llava = cfg.family in ("llava_onevision", "llava_video")
        if (name == "earlytom" and llava and not a.preset and a.tau is None and a.layers is None
                and preset_task in PUBLISHED and published):
            a.preset = f"{preset_task}@{ratio:g}"
            print(f"note: EarlyTom with the published {a.preset} settings (--tau/--layers override)", file=sys.stderr)
        return name, ratio, method_from_args(a, cfg, info=info)

    ratio = ratio_from_args(args)
    if args.compare:
        return [build(name, r) for name in args.compare for r in ([None] if name == "full" else list(args.ratios or (ratio,)))]
    name = args.method or DEFAULT_METHOD
    return [build(name, None if name == "full" else ratio)]


def cmd_eval(args) -> int:
    from earlytom_jax.checkpoint.hub import resolve_model
    from earlytom_jax.checkpoint.load import load_any_config
    from earlytom_jax.compression.defaults import read_model_info
    from earlytom_jax.evals import compare, runner
    from earlytom_jax.io_utils import check_writable_dir

    check_counts(args)
    check_writable_dir(args.out, "--out")
    _init_distributed(args)
    args.model = resolve_model(args.model)  # a hub id → its snapshot directory (OUT/config.json pins it)

    s = runner.EvalSettings(
        model=args.model, task=args.task, data=args.data, out=args.out, frames=args.frames,
        limit=args.limit, max_new_tokens=args.max_new_tokens, dtype=args.dtype, mesh=args.mesh,
        prefetch=args.prefetch, progress=not args.quiet, min_pixels=args.min_pixels, max_pixels=args.max_pixels,
        time_instruction=args.time_instruction, batch_size=args.batch_size, siglip_head=args.siglip_head,
    )
    video_settings(args)  # contradictory bounds: one line, before anything loads
    runs = eval_runs(args, load_any_config(args.model), read_model_info(args.model))
    if args.compare:
        rows = compare.compare(s, runs)
        print(compare.markdown(args.task, rows))
        return 0
    results = runner.run_eval(s, runs[0][2])
    if results:
        print("\n".join(runner.summary_lines(results)))
        print(f"wrote {os.path.join(args.out, 'results.json')} and samples.jsonl")
    return 0 if not results or results["complete"] else 1
