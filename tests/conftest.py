"""Shared fixtures: tiny transformers checkpoints written once per session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # quiet test logs; not configuration


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Untied head, GQA group 2, 4x4 vision grid (pooled 2x2): (transformers model, directory)."""
    from tests.tiny_models import build_tiny_model, save_tiny_checkpoint

    model = build_tiny_model(seed=0)
    d = save_tiny_checkpoint(model, str(tmp_path_factory.mktemp("tiny")))
    return model, d
