"""Load a model (config + parameter tree) from a checkpoint directory."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from earlytom_jax.checkpoint.hf import iter_params, set_path
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


def load_hf(directory: str, dtype="float32") -> tuple[LlavaOVConfig, dict]:
    """HF safetensors directory (any supported layout, single or sharded) → (config, params).

    Tensors are read one at a time from memory-mapped files and placed on the default device.
    """
    cfg = load_config(directory)
    files = open_checkpoint_files(directory)
    dt = resolve_dtype(dtype)
    params: dict = {}
    for path, arr in iter_params(files, cfg, dt):
        set_path(params, path, jax.device_put(arr))
    return cfg, params
