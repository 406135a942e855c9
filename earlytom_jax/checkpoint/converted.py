"""A converted checkpoint directory's layout and its config file (`earlytom_config.json`).

    earlytom_config.json       our model config (dataclasses.asdict: LlavaOVConfig, LlavaVideoConfig or Qwen25VLConfig), stored dtype, format version
    params/                    an orbax checkpoint of the parameter tree (checkpoint/orbax_io.py)
    hf_config.json             the source config.json, verbatim
    tokenizer.json, preprocessor_config.json, tokenizer_config.json (when the source has one)
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from earlytom_jax.checkpoint.placement import resolve_dtype
from earlytom_jax.config import LlavaOVConfig, LlavaVideoConfig, ModelConfig, Qwen2Config, Qwen25VLConfig, QwenVisionConfig, SiglipConfig
from earlytom_jax.errors import CheckpointError, one_line
from earlytom_jax.io_utils import read_json

FORMAT = "earlytom-jax-orbax"
FORMAT_VERSION = 1
CONFIG_FILE = "earlytom_config.json"
PARAMS_DIR = "params"



def config_dict(cfg: ModelConfig, dtype: np.dtype) -> dict:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "dtype": np.dtype(dtype).name,
        "config": dataclasses.asdict(cfg),
    }


def read_config_file(path: str) -> dict:
    if os.path.isdir(path):
        path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: not found; this is not a converted checkpoint directory")
    d = read_json(path)
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an {FORMAT} config (format={d.get('format') if isinstance(d, dict) else None!r})")
    if d.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {d.get('format_version')!r}, this code reads {FORMAT_VERSION}; "
            "convert the HF checkpoint again"
        )
    return d


def config_from_json(path: str) -> ModelConfig:
    """Our config from `earlytom_config.json` (the file, or the converted directory holding it)."""
    d = read_config_file(path)
    try:
        c = dict(d["config"])
        text = dict(c.pop("text"))
        if text.get("mrope_section") is not None:
            text["mrope_section"] = tuple(text["mrope_section"])
        vision = dict(c.pop("vision"))
        if "fullatt_block_indexes" in vision:  # only Qwen2.5-VL's encoder has full-attention blocks
            vision["fullatt_block_indexes"] = tuple(vision["fullatt_block_indexes"])
            return Qwen25VLConfig(vision=QwenVisionConfig(**vision), text=Qwen2Config(**text), **c)
        cls = LlavaVideoConfig if c.get("newline_position") == "grid" else LlavaOVConfig
        return cls(vision=SiglipConfig(**vision), text=Qwen2Config(**text), **c)
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: config does not match this version's fields ({one_line(e)})") from None


def stored_dtype(d: dict, path: str) -> np.dtype:
    try:
        return resolve_dtype(d["dtype"])
    except (KeyError, CheckpointError):
        raise CheckpointError(f"{path}: unknown stored dtype {d.get('dtype')!r}") from None


def is_converted(directory: str) -> bool:
    """True when `directory` looks like the output of `convert_checkpoint`."""
    return os.path.isfile(os.path.join(directory, CONFIG_FILE)) and os.path.isdir(
        os.path.join(directory, PARAMS_DIR)
    )
