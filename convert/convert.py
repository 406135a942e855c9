"""Convert a HuggingFace LLaVA-OneVision checkpoint (safetensors, any supported layout) into a
converted directory (orbax parameter tree + our config) that loads faster and straight into
sharded arrays:

    python convert/convert.py SRC DST [--dtype bfloat16|float32] [--no-progress] [--json]

Prints a summary (one JSON line with --json). Exit status 1 with a one-line message on error;
DST is then never left behind half-written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from earlytom_jax.errors import EarlyTomError  # noqa: E402


def _gb(n):
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="HF checkpoint directory (config.json + *.safetensors)")
    ap.add_argument("dst", help="output directory (must not exist)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="stored dtype")
    ap.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    ap.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    args = ap.parse_args(argv)

    from earlytom_jax.checkpoint.orbax_io import convert_checkpoint

    try:
        summary = convert_checkpoint(args.src, args.dst, dtype=args.dtype, progress=not args.no_progress)
    except EarlyTomError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"converted {summary['src']} -> {summary['dst']}")
        print(f"  tensors        {summary['tensors']} ({summary['dtype']}, {_gb(summary['bytes'])}; "
              f"largest {_gb(summary['largest_tensor_bytes'])})")
        print(f"  on disk        {_gb(summary['disk_bytes'])}")
        print(f"  time           {summary['seconds']:.1f} s")
        print(f"  peak RSS       {_gb(summary['peak_rss_bytes'])} (process; {_gb(summary['rss_start_bytes'])} at start)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
