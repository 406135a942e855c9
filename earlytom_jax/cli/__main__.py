"""`python -m earlytom_jax.cli ...` = `earlytom ...`."""

import sys

from earlytom_jax.cli.main import main

sys.exit(main())
