"""XLA:CPU options this project runs with, chosen by the compute dtype and applied before JAX
has opened a backend (`import earlytom_jax` applies the float32 set; the command line and
`VideoLLM.load` re-apply for their --dtype while that is still possible).

- float32: `--xla_cpu_experimental_ynn_fusion_type=` (empty: no YNNPACK fusions) gives every
  CPU dot to Eigen, which runs this project's f32 products faster than YNNPACK does.
- bfloat16: XLA's defaults, which give dots to YNNPACK. YNNPACK multiplies bf16 operands into
  an f32 result natively (the models ask for that with `preferred_element_type`), where Eigen
  first converts both operands to f32; so YNNPACK runs them faster and makes no per-pass f32
  copy of each layer's weights.

(measured: docs/cpu-forms.md#xla-flags-per-dtype)

Flags the user already set in XLA_FLAGS win; other platforms ignore CPU flags.
"""

from __future__ import annotations

import os

CPU_FLAGS = {
    "float32": ("--xla_cpu_experimental_ynn_fusion_type=",),
    "bfloat16": (),
}
_added: list[str] = []  # the flags this module put into XLA_FLAGS, so another dtype can take them back


def backend_started() -> bool:
    import sys

    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge

        return xla_bridge.backends_are_initialized()
    except (ImportError, AttributeError):  # private API moved: setting the variable is harmless
        return False


def apply_cpu_flags(dtype: str = "float32") -> bool:
    """Make XLA_FLAGS hold CPU_FLAGS[dtype] (each unless the user set that flag), in place of
    what an earlier call added. → whether they can still take effect (False once a JAX
    backend is initialised: then nothing changes)."""
    if backend_started():
        return False
    words = [w for w in os.environ.get("XLA_FLAGS", "").split() if w not in _added]
    _added.clear()
    names = {w.split("=")[0] for w in words}
    for flag in CPU_FLAGS.get(str(dtype), CPU_FLAGS["float32"]):
        if flag.split("=")[0] not in names:
            words.append(flag)
            _added.append(flag)
    if words:
        os.environ["XLA_FLAGS"] = " ".join(words)
    else:
        os.environ.pop("XLA_FLAGS", None)
    return True
