"""XLA:CPU options this project runs with, applied when earlytom_jax is imported before JAX
has opened a backend.

`--xla_cpu_experimental_ynn_fusion_type=` (empty: no YNNPACK fusions) gives every CPU dot to
Eigen. Measured on a 2-core x86 CPU, SigLIP-so400m blocks at 8 frames: 3 blocks on one core
5.86 s with YNNPACK, 5.17 s with Eigen (transformers 5.05 s); 4 blocks on two cores 3.9 s
and 3.7 s. YNNPACK's dots were the slower ones at these shapes (1152 x 1152 projections on
one core: 127 against 147 GFLOP/s). Flags the user already set in XLA_FLAGS win; other
platforms ignore CPU flags.
"""

from __future__ import annotations

import os

CPU_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=",)


def apply_cpu_flags(flags=CPU_FLAGS) -> bool:
    """Append `flags` to XLA_FLAGS, each unless the user set that flag already. → whether
    they can still take effect (False once a JAX backend is initialised)."""
    import sys

    jax_started = False
    if "jax" in sys.modules:
        try:
            from jax._src import xla_bridge

            jax_started = xla_bridge.backends_are_initialized()
        except (ImportError, AttributeError):  # private API moved: setting the variable is harmless
            jax_started = False
    if jax_started:
        return False
    current = os.environ.get("XLA_FLAGS", "")
    names = {f.split("=")[0] for f in current.split()}
    extra = [f for f in flags if f.split("=")[0] not in names]
    if extra:
        os.environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()
    return True
