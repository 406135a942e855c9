"""Where loaded parameters go: their dtype and their shardings (shared by every loader)."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from earlytom_jax.checkpoint.hf import mismatch
from earlytom_jax.errors import CheckpointError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def resolve_dtype(dtype) -> np.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise CheckpointError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    return np.dtype(dtype)


def _key(k) -> str:
    return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))


def sharding_lookup(shardings, expected) -> Callable[[tuple[str, ...]], object] | None:
    """`shardings` (None, one Sharding for every parameter, a pytree of Sharding matching the
    parameter tree, or a callable path -> Sharding) → a function path -> Sharding, or None for
    "default device".
    A pytree must name exactly the parameters in `expected` (paths)."""
    if shardings is None:
        return None
    if isinstance(shardings, jax.sharding.Sharding):  # one sharding for every parameter
        return lambda path: shardings
    if callable(shardings) and not isinstance(shardings, (dict, jax.sharding.Sharding)):
        def call(path):
            sh = shardings(tuple(path))
            if not isinstance(sh, jax.sharding.Sharding):
                raise CheckpointError(f"shardings({'/'.join(path)}) returned {type(sh).__name__}, not a jax Sharding")
            return sh

        return call
    leaves = jax.tree_util.tree_leaves_with_path(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    table = {tuple(_key(k) for k in p): s for p, s in leaves}
    bad = [f"{'/'.join(p)} ({type(s).__name__})" for p, s in table.items() if not isinstance(s, jax.sharding.Sharding)]
    missing = ["/".join(p) for p in expected if p not in table]
    extra = ["/".join(p) for p in table if p not in expected]
    parts = mismatch(missing, extra, bad, wrong_label="not a Sharding")
    if parts:
        raise CheckpointError("shardings do not match the parameter tree: " + "; ".join(parts))
    return table.__getitem__
