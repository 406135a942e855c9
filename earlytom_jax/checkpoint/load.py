"""Load a model (config + parameter tree) from a checkpoint directory."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from earlytom_jax.checkpoint.hf import _specs, iter_params, mismatch, set_path
from earlytom_jax.checkpoint.safetensors_io import open_checkpoint_files
from earlytom_jax.config import LlavaOVConfig, load_config
from earlytom_jax.errors import CheckpointError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def resolve_dtype(dtype) -> np.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise CheckpointError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    return np.dtype(dtype)


def param_paths_and_shapes(cfg: LlavaOVConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{path: shape} of every leaf of our parameter tree for `cfg`, in loader order."""
    out = {}
    for s in _specs(cfg):
        one = jax.eval_shape(s.fn, jax.ShapeDtypeStruct(s.shape, jnp.float32)).shape
        out[s.path] = ((s.layers,) if s.layers else ()) + tuple(one)
    return out


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


def load_hf(directory: str, dtype="float32", shardings=None, cfg: LlavaOVConfig | None = None
            ) -> tuple[LlavaOVConfig, dict]:
    """HF safetensors directory (any supported layout, single or sharded) → (config, params).
    `cfg`: the directory's config when the caller has already read it.

    Tensors are read one at a time from memory-mapped files and placed on the default device,
    or, with `shardings` (a pytree of jax Shardings matching the parameter tree, or a callable
    path -> Sharding), each directly into its sharding.
    """
    cfg = load_config(directory) if cfg is None else cfg
    files = open_checkpoint_files(directory)
    dt = resolve_dtype(dtype)
    lookup = sharding_lookup(shardings, param_paths_and_shapes(cfg)) if shardings is not None else None
    params: dict = {}
    for path, arr in iter_params(files, cfg, dt):
        set_path(params, path, jax.device_put(arr) if lookup is None else jax.device_put(arr, lookup(path)))
    return cfg, params


def load_any(directory: str, dtype="float32", shardings=None) -> tuple[LlavaOVConfig, dict]:
    """A converted (orbax) directory or an HF safetensors directory → (config, params).

    `dtype` None keeps a converted checkpoint's stored dtype (HF checkpoints then load fp32)."""
    from earlytom_jax.checkpoint.orbax_io import is_converted, load_converted

    if is_converted(directory):
        return load_converted(directory, dtype=dtype, shardings=shardings)
    return load_hf(directory, "float32" if dtype is None else dtype, shardings=shardings)


def load_any_config(directory: str) -> LlavaOVConfig:
    """The model config of an HF or a converted checkpoint directory (no weights read)."""
    from earlytom_jax.checkpoint.orbax_io import config_from_json, is_converted

    return config_from_json(directory) if is_converted(directory) else load_config(directory)
