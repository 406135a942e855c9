"""Shared fixtures: tiny transformers checkpoints written once per session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # quiet test logs; not configuration


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compiled programs after each test module. XLA:CPU maps ~3 memory regions per
    compiled program and the kernel allows 65530 per process (vm.max_map_count): the whole
    suite in one process reached it and crashed inside XLA's compiler (SIGSEGV)."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Untied head, GQA group 2, 4x4 vision grid (pooled 2x2): (transformers model, directory)."""
    from tests.tiny_models import build_tiny_model, save_tiny_checkpoint

    model = build_tiny_model(seed=0)
    d = save_tiny_checkpoint(model, str(tmp_path_factory.mktemp("tiny")))
    return model, d


@pytest.fixture(scope="session")
def qwen_win_full(tmp_path_factory):
    """get(name) -> (transformers model, cfg, params) of tiny_qwen.WIN_AND_FULL[name], built once."""
    from tests import tiny_qwen

    return tiny_qwen.loader(tmp_path_factory, tiny_qwen.WIN_AND_FULL, "qwen")
