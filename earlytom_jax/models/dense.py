"""Weight products of the models' linear layers, accumulated in f32 and returned in the
activation dtype.

Asking for the f32 result explicitly (rather than a bf16 one) is what lets XLA:CPU give a bf16
product to YNNPACK's native bf16 x bf16 → f32 kernels instead of converting both operands to
f32 first (see earlytom_jax.xla_setup); on GPUs and TPUs the product accumulates in f32 either
way. The bias is added before the result is rounded back, as fused GEMM kernels do.

One more XLA:CPU detail: YNNPACK takes no single-row product, and XLA's own bf16
vector-matrix code is slow, so on CPU a bf16 product of one row (the first token's logits,
every decode step) is computed as two (measured: docs/cpu-forms.md#single-row-products-doubled).

On CPU the bf16 LLM's matrices are held transposed (`stack.OutIn`, see models/stack.py), which
YNNPACK packs faster; `dense` rewrites the product's spec for them (measured:
docs/cpu-forms.md#llm-per-layer-mlp-transposed-outin).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from earlytom_jax.models.stack import OutIn


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


def held_spec(spec: str, n_in: int) -> str:
    """`spec` for a weight held as `stack.OutIn` (its n_in leading axes, the contracted ones,
    moved last): "blc,chd->blhd" with n_in = 1 → "blc,hdc->blhd"."""
    lhs, rest = spec.split(",", 1)
    w, out = rest.split("->")
    if any(ch in out for ch in w[:n_in]) or any(ch not in out for ch in w[n_in:]):
        raise ValueError(f"{spec}: the weight's first {n_in} axes must be exactly its contracted ones")
    return f"{lhs},{w[n_in:]}{w[:n_in]}->{out}"


def _as_matmul(spec: str, x, w):
    """(x2 [R, K], w2, spec2, out_shape) when `spec` is a plain matmul after flattening: x's
    contracted axes trailing, the weight's contracted axes leading ([K, N]) or trailing
    ([N, K], as `stack.OutIn` holds them), and the output = x's row axes then the weight's
    other axes; else None."""
    lhs, rest = spec.split(",", 1)
    wl, out = rest.split("->")
    named = lhs.replace("...", "")
    rows_l = "".join(ch for ch in named if ch in out)
    contracted = named[len(rows_l):]
    if not contracted or named != rows_l + contracted or any(ch in out for ch in contracted):
        return None
    n_c = len(contracted)
    trailing = wl.endswith(contracted)
    w_out = wl[:-n_c] if trailing else wl[n_c:]
    if not (trailing or wl.startswith(contracted)) or out != ("..." if lhs.startswith("...") else "") + rows_l + w_out:
        return None
    k = math.prod(x.shape[x.ndim - n_c:])
    w_dims = w.shape[: w.ndim - n_c] if trailing else w.shape[n_c:]
    spec2 = "rk,nk->rn" if trailing else "rk,kn->rn"
    return x.reshape((-1, k)), w.reshape((-1, k) if trailing else (k, -1)), spec2, x.shape[: x.ndim - n_c] + w_dims


def dense(spec: str, x, w, b=None, out_dtype=None, act=None):
    """einsum(spec, x, w) (+ b), accumulated in f32, in `out_dtype` (default: x's dtype).
    spec: starts with "..." or with a row axis of x that leads the output, as every layer's does.
    w: an array laid out as `spec` says, or a `stack.OutIn` holding it transposed.
    act: an elementwise activation applied to the rounded result in f32 and rounded once, as
    PyTorch's bf16 kernels do. Handed a bf16 array, XLA:CPU instead rounds after every op of the
    activation's formula, which is less exact and slower (measured:
    docs/cpu-forms.md#f32-activations-on-rounded-products).

    bf16 on CPU: the product is computed as one 2-D matmul [R, K] x [K, N] (rows and
    contracted axes flattened, free reshapes): with more row axes XLA:CPU copies (transposes)
    the weight for the dot, and inside a loop hoists those copies out of it (measured:
    docs/cpu-forms.md#bf16-products-as-one-2-d-matmul). A single row is doubled (see the
    module docstring)."""
    if isinstance(w, OutIn):
        spec, w = held_spec(spec, w.n_in), w.t
    cpu_bf16 = x.dtype == jnp.bfloat16 and jax.default_backend() == "cpu"
    mm = _as_matmul(spec, x, w) if cpu_bf16 else None
    if mm is not None:
        x2, w2, spec2, out_shape = mm
        r = x2.shape[0]
        if r == 1:
            x2 = jnp.concatenate([x2, x2])
        y = jnp.einsum(spec2, x2, w2, preferred_element_type=jnp.float32)[:r].reshape(out_shape)
    else:
        two = cpu_bf16 and rows(spec, x) == 1
        if not two:
            y = jnp.einsum(spec, x, w, preferred_element_type=jnp.float32)
        elif spec.startswith("..."):  # a new leading axis of 2, dropped again
            y = jnp.einsum(spec, jnp.stack([x, x]), w, preferred_element_type=jnp.float32)[0]
        else:  # the leading row axis (of size 1) doubled, then cut back
            y = jnp.einsum(spec, jnp.concatenate([x, x]), w, preferred_element_type=jnp.float32)[:1]
    if b is not None:
        y = y + b
    y = y.astype(out_dtype or x.dtype)
    return y if act is None else act(y.astype(jnp.float32)).astype(y.dtype)
