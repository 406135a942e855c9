"""Scan over a range of stacked layer weights, and how those stacks are held on CPU.

Layer weights are stored stacked, [num_layers, ...] per leaf. Slicing a range out of the stack
(`a[start:stop]`) and scanning over the slice makes XLA materialise the slice: a copy of those
layers' weights on every call (every decode step when the LLM's cache is split in two, every
video when the encoder runs in segments). Scanning over layer indices and reading each layer
with a dynamic index into the whole stack reads the weights in place.

bf16 on CPU: XLA:CPU computes bf16 dots in f32 and, to do so, converts every bf16 array a loop
reads to f32 *before* the loop, so a bf16 stack costs an f32 copy of all its layers (30 GB for
the 7B LLM, on every prefill and decode step). `pack` holds bf16 stacks as their uint16 bits,
which the conversion leaves alone; `layer` turns one layer's bits back into bf16 inside the
loop, so only that layer is ever converted. Values are unchanged bit for bit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

STACKS = ("blocks", "layers")  # the stacked subtrees: params["vision"]["blocks"], params["text"]["layers"]


def _unbits(a):
    return jax.lax.bitcast_convert_type(a, jnp.bfloat16) if a.dtype == jnp.uint16 else a


def layer(stack, index):
    """Weights of layer `index` (int or traced int32) of a stacked tree, bf16 bits unpacked."""
    return jax.tree.map(lambda a: _unbits(jax.lax.dynamic_index_in_dim(a, index, keepdims=False)), stack)


def scan(step, carry, stack, start: int, stop: int, xs=None):
    """`jax.lax.scan` of `step(carry, layer_params, x) -> (carry, y)` over layers [start, stop)
    (static) of `stack`; xs (optional) has a leading axis of stop - start."""

    def body(c, args):
        i, x = args
        return step(c, layer(stack, i), x)

    return jax.lax.scan(body, carry, (jnp.arange(start, stop, dtype=jnp.int32), xs))


_to_bits = jax.jit(lambda a: jax.lax.bitcast_convert_type(a, jnp.uint16), donate_argnums=0)
_from_bits = jax.jit(lambda a: jax.lax.bitcast_convert_type(a, jnp.bfloat16), donate_argnums=0)


def _map_stacks(params: dict, fn, dtype) -> dict:
    """params with `fn` applied to each stacked leaf of `dtype`, one leaf at a time, the old
    leaf dropped as soon as its replacement exists (the peak is one leaf, not a second model)."""
    out = dict(params)
    for part in ("vision", "text"):
        if part not in out:
            continue
        out[part] = dict(out[part])
        for name in STACKS:
            if name in out[part]:
                tree = out[part][name] = dict(out[part][name])
                for k in list(tree):
                    if tree[k].dtype == dtype:
                        tree[k] = fn(tree[k])
    return out


def pack(params: dict, backend: str | None = None) -> dict:
    """On CPU, bf16 layer stacks as uint16 bits (see the module docstring); elsewhere, or for
    other dtypes, `params` unchanged. Donates the bf16 leaves: do not use them afterwards."""
    if (backend or jax.default_backend()) != "cpu":
        return params
    return _map_stacks(params, _to_bits, jnp.bfloat16)


def unpack(params: dict) -> dict:
    """The inverse of `pack`: bf16 layer stacks again (for export or inspection)."""
    return _map_stacks(params, _from_bits, jnp.uint16)
