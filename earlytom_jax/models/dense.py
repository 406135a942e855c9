"""Weight products of the models' linear layers, accumulated in f32 and returned in the
activation dtype.

Asking for the f32 result explicitly (rather than a bf16 one) is what lets XLA:CPU give a bf16
product to YNNPACK's native bf16 x bf16 → f32 kernels instead of converting both operands to
f32 first (see earlytom_jax.xla_setup); on GPUs and TPUs the product accumulates in f32 either
way. The bias is added before the result is rounded back, as fused GEMM kernels do.

One more XLA:CPU detail: YNNPACK takes no single-row product, and XLA's own bf16
vector-matrix code is slow (Qwen2-7B's LM head, 1 x 3584 x 152064: 805 ms, against 71 ms for
two rows; one 3584 x 18944 MLP matrix: 86 against 15 ms; AMD EPYC, 2 threads). So on CPU a
bf16 product of one row (the first token's logits, every decode step) is computed as two.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rows(spec: str, x) -> int:
    """How many rows `x` brings to the product `spec` (its dims that reach the output)."""
    lhs, rest = spec.split(",", 1)
    out = rest.split("->")[1]
    named = lhs.replace("...", "")
    lead = x.ndim - len(named)  # the dims "..." stands for, which always reach the output
    n = 1
    for d in x.shape[:lead]:
        n *= d
    for ch, d in zip(named, x.shape[lead:]):
        n *= d if ch in out else 1
    return n


def dense(spec: str, x, w, b=None, out_dtype=None):
    """einsum(spec, x, w) (+ b), accumulated in f32, in `out_dtype` (default: x's dtype).
    spec: starts with "..." or with a row axis of x that leads the output, as every layer's does."""
    two = x.dtype == jnp.bfloat16 and rows(spec, x) == 1 and jax.default_backend() == "cpu"
    if not two:
        y = jnp.einsum(spec, x, w, preferred_element_type=jnp.float32)
    elif spec.startswith("..."):  # a new leading axis of 2, dropped again
        y = jnp.einsum(spec, jnp.stack([x, x]), w, preferred_element_type=jnp.float32)[0]
    else:  # the leading row axis (of size 1) doubled, then cut back
        y = jnp.einsum(spec, jnp.concatenate([x, x]), w, preferred_element_type=jnp.float32)[:1]
    if b is not None:
        y = y + b
    return y.astype(out_dtype or x.dtype)
