"""`earlytom convert`: an HF checkpoint directory → an orbax checkpoint (streamed, validated,
atomic). The one conversion entry point (`convert/convert.py` forwards here)."""

from __future__ import annotations

import json


def add_parser(sub) -> None:
    c = sub.add_parser("convert", help="HF checkpoint directory -> orbax checkpoint (streamed, validated, atomic)")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    c.set_defaults(fn=cmd_convert)


def cmd_convert(args) -> int:
    from earlytom_jax.checkpoint.orbax_io import convert_checkpoint

    summary = convert_checkpoint(args.src, args.dst, args.dtype, progress=not args.quiet)
    if args.json:
        print(json.dumps(summary))
        return 0
    gb = summary["bytes"] / 1e9
    print(f"converted {summary['tensors']} tensors ({gb:.2f} GB, {args.dtype}) to {args.dst} "
          f"in {summary['seconds']:.1f} s; validated")
    return 0
