"""The `earlytom` parser (one module per subcommand adds its own) and `main`: errors the user
can fix print one line and exit 2, a device out of memory exits 3, Ctrl-C 130, SIGTERM during
a conversion 143 (128 + 15, after the partial conversion was removed)."""

from __future__ import annotations

import argparse
import sys

from earlytom_jax.cli import bench, convert, demo, run, visualize
from earlytom_jax.cli import eval as evaluate
from earlytom_jax.cli.flags import HelpWithDefaults
from earlytom_jax.errors import EarlyTomError

SUBCOMMANDS = (run, demo, convert, visualize, evaluate, bench)  # in `earlytom --help` order


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="earlytom", description="EarlyTom video-token compression in JAX")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = p.add_subparsers(dest="command", required=True)
    for command in SUBCOMMANDS:
        command.add_parser(sub)
    for parser in sub.choices.values():
        parser.formatter_class = HelpWithDefaults  # defaults shown in every subcommand's --help
    return p


def version() -> str:
    """The installed package's version (pyproject.toml's when installed with pip -e)."""
    from importlib import metadata

    try:
        return metadata.version("earlytom-jax")
    except metadata.PackageNotFoundError:
        return "unknown (not installed; pip install -e .)"


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
    except KeyboardInterrupt as e:
        from earlytom_jax.checkpoint.staging import Terminated

        if isinstance(e, Terminated):
            print(f"earlytom: terminated (SIGTERM) during {args.command}; nothing was kept "
                  "(the partial output was removed)", file=sys.stderr)
            return 143
        print("earlytom: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # device out of memory: one line, not XLA's traceback
        if args.debug or "RESOURCE_EXHAUSTED" not in str(e):
            raise
        first = str(e).strip().splitlines()[0]
        print(f"earlytom: error: the device ran out of memory ({first}); try fewer --frames, "
              "a smaller model, --dtype bfloat16 on an accelerator, or --mesh to shard", file=sys.stderr)
        return 3

