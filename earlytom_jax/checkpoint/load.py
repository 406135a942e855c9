"""Load a model (config + parameter tree) from a checkpoint directory."""

from __future__ import annotations

import jax

from earlytom_jax.checkpoint import table
from earlytom_jax.checkpoint.hf import iter_params
from earlytom_jax.checkpoint.hub import resolve_model
from earlytom_jax.checkpoint.orbax_io import is_converted, load_converted
from earlytom_jax.checkpoint.converted import config_from_json
from earlytom_jax.checkpoint.placement import resolve_dtype, sharding_lookup
from earlytom_jax.checkpoint.safetensors_io import open_checkpoint_files
from earlytom_jax.config import ModelConfig, load_config
from earlytom_jax.models.params import set_path


def load_hf(directory: str, dtype="float32", shardings=None, cfg: ModelConfig | None = None
            ) -> tuple[ModelConfig, dict]:
    """HF safetensors directory (any supported layout, single or sharded) → (config, params).
    `cfg`: the directory's config when the caller has already read it.

    Tensors are read one at a time from memory-mapped files and placed on the default device,
    or, with `shardings` (a pytree of jax Shardings matching the parameter tree, or a callable
    path -> Sharding), each directly into its sharding. `directory` may be a hub id
    (`checkpoint.hub.resolve_model`).
    """
    directory = resolve_model(directory)
    cfg = load_config(directory) if cfg is None else cfg
    files = open_checkpoint_files(directory)
    dt = resolve_dtype(dtype)
    lookup = sharding_lookup(shardings, table.shapes(cfg)) if shardings is not None else None
    params: dict = {}
    for path, arr in iter_params(files, cfg, dt):
        set_path(params, path, jax.device_put(arr) if lookup is None else jax.device_put(arr, lookup(path)))
    return cfg, params


def load_any(directory: str, dtype="float32", shardings=None) -> tuple[ModelConfig, dict]:
    """A converted (orbax) directory or an HF safetensors directory → (config, params).

    `dtype` None keeps a converted checkpoint's stored dtype (HF checkpoints then load fp32).
    `directory` may be a hub id (`checkpoint.hub.resolve_model`)."""
    directory = resolve_model(directory)
    if is_converted(directory):
        return load_converted(directory, dtype=dtype, shardings=shardings)
    return load_hf(directory, "float32" if dtype is None else dtype, shardings=shardings)


def load_any_config(directory: str) -> ModelConfig:
    """The model config of an HF or a converted checkpoint directory, or a hub id (no weights read)."""
    directory = resolve_model(directory)
    return config_from_json(directory) if is_converted(directory) else load_config(directory)
