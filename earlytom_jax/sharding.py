"""Device meshes and parameter shardings, with JAX's own SPMD machinery.

A mesh has two axes: `data` (frames of a video inside the encoder, and videos in evaluation
loops) and `model` (tensor parallelism over attention heads and MLP width, in SigLIP and
Qwen2 alike). Each parameter has logical axis names, declared with it in its module; `LOGICAL_RULES` maps
them to mesh axes.
A dimension that the mesh axis does not divide is replicated instead (reported by
`plan_shardings`), so every mesh runs, and results equal the single-device ones.
Activations carry logical names too (`models.axes.constrain`, called inside the models):
frames of the encoder over `data`, attention heads and MLP width over `model`; they take
effect under `jax.set_mesh(mesh)` (VideoLLM does this when it has a mesh).

Multi-host: call `jax.distributed.initialize()` on every host first (see README), then build
the mesh over `jax.devices()` as here; params placed with these shardings span hosts.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from earlytom_jax.config import LlavaOVConfig, Qwen2Config, Qwen25VLConfig, QwenVisionConfig, SiglipConfig
from earlytom_jax.errors import ConfigError
from earlytom_jax.models import family, params
from earlytom_jax.models.axes import LOGICAL_RULES

__all__ = ["LOGICAL_RULES", "describe", "frames_sharding", "logical_axes", "parse_mesh", "plan_shardings", "shard_params"]


@functools.lru_cache(maxsize=1)
def logical_axes() -> dict[tuple[str, int], tuple[str | None, ...]]:
    """(parameter path joined by "/", its rank) → the logical names of its dimensions, as the
    models' modules declare them (models/params.py; stacked layers lead with None), both
    families. Names and axes do not depend on the sizes, so a one-layer model with an untied
    head (every parameter there is) stands for each family; a path both families have with one
    rank is named alike (`vision/patch_w` is 2-D in SigLIP, a 5-D Conv3d kernel in Qwen2.5-VL)."""
    text = Qwen2Config(num_layers=1, tie_word_embeddings=False)
    cfgs = (LlavaOVConfig(vision=SiglipConfig(num_layers=1), text=text),
            Qwen25VLConfig(vision=QwenVisionConfig(num_layers=1, fullatt_block_indexes=(0,), out_hidden_size=896),
                           text=dataclasses.replace(text, mrope_section=(8, 12, 12))))
    out: dict[tuple[str, int], tuple[str | None, ...]] = {}
    for cfg in cfgs:
        for p, names in params.logical_axes(family.module(cfg), cfg).items():
            key = ("/".join(p), len(names))
            if out.setdefault(key, names) != names:
                raise ValueError(f"{key}: the families name its axes differently ({out[key]} and {names})")
    return out


def parse_mesh(spec: str | None, devices=None) -> Mesh:
    """"data=2,model=4" → a Mesh over the first 8 devices. Missing axes have size 1; None or
    "" means one device. The product must not exceed the devices available."""
    sizes = {"data": 1, "model": 1}
    for part in (spec or "").split(","):
        if not part.strip():
            continue
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in sizes or not value.strip().isdigit() or int(value) < 1:
            raise ConfigError(f"mesh {spec!r}: expected e.g. data=2,model=4 (axes data, model; sizes >= 1)")
        sizes[name] = int(value)
    devices = jax.devices() if devices is None else devices
    need = sizes["data"] * sizes["model"]
    if need > len(devices):
        raise ConfigError(f"mesh {spec!r} needs {need} devices; {len(devices)} available")
    grid = np.asarray(devices[:need]).reshape(sizes["data"], sizes["model"])
    return Mesh(grid, ("data", "model"))


def _spec_for(path: str, shape: tuple[int, ...], mesh: Mesh, fallbacks: list[str]) -> PartitionSpec:
    names = logical_axes().get((path, len(shape)))
    if names is None or all(n is None for n in names):
        return PartitionSpec()
    axes = []
    for dim, name in zip(shape, names):
        axis = LOGICAL_RULES.get(name) if name else None
        if axis is not None and dim % mesh.shape[axis] != 0:
            fallbacks.append(f"{path} dim {dim} over {axis}={mesh.shape[axis]}")
            axis = None
        axes.append(axis)
    return PartitionSpec(*axes)


def plan_shardings(shapes, mesh: Mesh):
    """Pytree of NamedSharding matching `shapes` (arrays or ShapeDtypeStructs), plus the list
    of tensors replicated because the mesh does not divide them."""
    fallbacks: list[str] = []

    def one(path, leaf):
        key = "/".join(params.key_path(path))
        return NamedSharding(mesh, _spec_for(key, tuple(leaf.shape), mesh, fallbacks))

    tree = jax.tree_util.tree_map_with_path(one, shapes)
    return tree, fallbacks


def shard_params(params, mesh: Mesh):
    """Place an in-memory parameter tree on the mesh. → (params, fallbacks)."""
    shardings, fallbacks = plan_shardings(params, mesh)
    return jax.tree.map(jax.device_put, params, shardings), fallbacks


def frames_sharding(mesh: Mesh, n_frames: int) -> NamedSharding:
    """Pixels [T, 3, S, S]: frames over `data` when it divides T, else replicated."""
    d = mesh.shape["data"]
    axis = "data" if d > 1 and n_frames % d == 0 else None
    return NamedSharding(mesh, PartitionSpec(axis))


def batch_sharding(mesh: Mesh, shape) -> NamedSharding:
    """A batch of pixels [B, T, ...]: samples over `data` when it divides B, else frames when
    it divides T, else replicated."""
    d = mesh.shape["data"]
    if d > 1 and shape[0] % d == 0:
        return NamedSharding(mesh, PartitionSpec("data"))
    return NamedSharding(mesh, PartitionSpec(None, "data" if d > 1 and shape[1] % d == 0 else None))


def describe(mesh: Mesh) -> str:
    return f"mesh data={mesh.shape['data']},model={mesh.shape['model']} over {math.prod(mesh.devices.shape)} {mesh.devices.flat[0].platform} devices"
