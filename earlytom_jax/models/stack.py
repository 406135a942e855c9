"""Scan over a range of stacked layer weights.

Layer weights are stored stacked, [num_layers, ...] per leaf. Slicing a range out of the stack
(`a[start:stop]`) and scanning over the slice makes XLA materialise the slice: a copy of those
layers' weights on every call (every decode step when the LLM's cache is split in two, every
video when the encoder runs in segments). Scanning over layer indices and reading each layer
with a dynamic index into the whole stack reads the weights in place.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def layer(stack, index):
    """Weights of layer `index` (int or traced int32) of a stacked tree."""
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, index, keepdims=False), stack)


def scan(step, carry, stack, start: int, stop: int, xs=None):
    """`jax.lax.scan` of `step(carry, layer_params, x) -> (carry, y)` over layers [start, stop)
    (static) of `stack`; xs (optional) has a leading axis of stop - start."""

    def body(c, args):
        i, x = args
        return step(c, layer(stack, i), x)

    return jax.lax.scan(body, carry, (jnp.arange(start, stop, dtype=jnp.int32), xs))
