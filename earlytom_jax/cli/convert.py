"""`earlytom convert`: an HF checkpoint directory → an orbax checkpoint (streamed, validated,
atomic). The one conversion entry point (`convert/convert.py` forwards here)."""

from __future__ import annotations


def add_parser(sub) -> None:
    c = sub.add_parser("convert", help="HF checkpoint directory -> orbax checkpoint (streamed, validated, atomic)")
    c.add_argument("src", help="HF checkpoint directory: config.json, *.safetensors, tokenizer.json, "
                               "preprocessor_config.json; or a Hugging Face hub id ORG/NAME")
    c.add_argument("dst", help="the converted directory to create (must not exist; written atomically)")
    c.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"],
                   help="dtype the weights are stored in (a run can still compute in the other)")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    c.set_defaults(fn=cmd_convert)


def summary_lines(summary: dict, dtype: str) -> list[str]:
    """The summary as printed: what was converted, then one line per staging directory a
    killed earlier conversion left (removed, or kept with the reason)."""
    from earlytom_jax.progress import human_bytes

    gb = summary["bytes"] / 1e9
    lines = [f"converted {summary['tensors']} tensors ({gb:.2f} GB, {dtype}) to {summary['dst']} "
             f"in {summary['seconds']:.1f} s; validated"]
    for left in summary.get("removed_leftovers", []):
        lines.append(f"removed {left['path']} ({human_bytes(left['bytes'])}), left by a killed conversion")
    for other in summary.get("other_staging_dirs", []):
        lines.append(f"left {other['path']} in place ({other['why']}; remove it once no conversion is writing it)")
    return lines


def cmd_convert(args) -> int:
    from earlytom_jax.checkpoint.hub import resolve_model
    from earlytom_jax.checkpoint.orbax_io import convert_checkpoint
    from earlytom_jax.io_utils import strict_json

    summary = convert_checkpoint(resolve_model(args.src), args.dst, args.dtype, progress=not args.quiet)
    if args.json:
        print(strict_json(summary))
        return 0
    print("\n".join(summary_lines(summary, args.dtype)))
    return 0
