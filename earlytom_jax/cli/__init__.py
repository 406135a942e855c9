"""The `earlytom` command. Thin: parses flags, calls the library, prints.

Errors the user can fix print one line (`earlytom: error: ...`) and exit 2; `--debug` shows
the traceback.

One module per subcommand (`run`, `demo`, `bench`, `eval`, `visualize`, `convert`: its flags
and its `cmd_*`), the flags they share in `flags` (compression flags, the method they build),
the parser and `main` in `main`.
"""

from earlytom_jax.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
