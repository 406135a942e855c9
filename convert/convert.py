"""`python convert/convert.py SRC DST [--dtype D] [--quiet] [--json]` is `earlytom convert`."""
import os, sys  # noqa: E401
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from earlytom_jax.cli import main  # noqa: E402
sys.exit(main(["convert", *sys.argv[1:]]))
