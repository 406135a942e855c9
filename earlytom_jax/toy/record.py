"""The training record a toy checkpoint carries (training.json): settings, stages with their
validation history, the machine; written with every save, read back to continue or re-run."""

from __future__ import annotations

import dataclasses
import os
import platform

import jax

from earlytom_jax.io_utils import read_json
from earlytom_jax.toy.model import NUM_FRAMES


def stage_record(stage: int, steps: int, history, seconds: float) -> dict:
    """One stage's entry of the record (stages counted from 1)."""
    return {"stage": stage + 1, "steps": steps, "train_seconds": round(seconds, 1), "history": history}


def training_record(st, stages: list, seconds: float, done: bool, init_record=None) -> dict:
    """training.json: the settings (a `TrainSettings`), the stages so far, the machine."""
    return {
        "settings": dataclasses.asdict(st),
        "config": "earlytom_jax.toy.model.TOY_CONFIG",
        "frames": NUM_FRAMES,
        "complete": done,
        "train_seconds": round(seconds, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, jax {jax.__version__} ({jax.default_backend()})",
        "stages": stages,
        **({"init_record": init_record} if st.init else {}),
    }


def read_record(directory: str):
    """The training record of the checkpoint a second stage started from (None if it has none)."""
    path = os.path.join(directory, "training.json")
    return read_json(path) if os.path.exists(path) else None
