"""Device meshes and parameter shardings, with JAX's own SPMD machinery.

A mesh has two axes: `data` (frames of a video inside the encoder, and videos in evaluation
loops) and `model` (tensor parallelism over attention heads and MLP width, in SigLIP and
Qwen2 alike). Each parameter gets logical axis names; `LOGICAL_RULES` maps them to mesh axes.
A dimension that the mesh axis does not divide is replicated instead (reported by
`plan_shardings`), so every mesh runs, and results equal the single-device ones.
Activations carry logical names too (`constrain`, called inside the models): frames of the
encoder over `data`, attention heads and MLP width over `model`; they take effect under
`jax.set_mesh(mesh)` (VideoLLM does this when it has a mesh).

Multi-host: call `jax.distributed.initialize()` on every host first (see README), then build
the mesh over `jax.devices()` as here; params placed with these shardings span hosts.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from earlytom_jax.errors import ConfigError

# logical axis → mesh axis
LOGICAL_RULES = {"heads": "model", "kv_heads": "model", "mlp": "model", "vocab": "model", "frames": "data"}

# parameter path (joined by "/") → logical names of its dimensions (layer stacks lead with None)
_LOGICAL = {
    "vision/blocks/q_w": (None, None, "heads", None),
    "vision/blocks/k_w": (None, None, "heads", None),
    "vision/blocks/v_w": (None, None, "heads", None),
    "vision/blocks/q_b": (None, "heads", None),
    "vision/blocks/k_b": (None, "heads", None),
    "vision/blocks/v_b": (None, "heads", None),
    "vision/blocks/o_w": (None, "heads", None, None),
    "vision/blocks/fc1_w": (None, None, "mlp"),
    "vision/blocks/fc1_b": (None, "mlp"),
    "vision/blocks/fc2_w": (None, "mlp", None),
    "projector/w1": (None, "mlp"),
    "projector/b1": ("mlp",),
    "projector/w2": ("mlp", None),
    "text/layers/q_w": (None, None, "heads", None),
    "text/layers/q_b": (None, "heads", None),
    "text/layers/k_w": (None, None, "kv_heads", None),
    "text/layers/k_b": (None, "kv_heads", None),
    "text/layers/v_w": (None, None, "kv_heads", None),
    "text/layers/v_b": (None, "kv_heads", None),
    "text/layers/o_w": (None, "heads", None, None),
    "text/layers/gate_w": (None, None, "mlp"),
    "text/layers/up_w": (None, None, "mlp"),
    "text/layers/down_w": (None, "mlp", None),
    "text/lm_head": ("vocab", None),
}


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
    names = _LOGICAL.get(path)
    if names is None:
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
        key = "/".join(str(getattr(k, "key", k)) for k in path)
        return NamedSharding(mesh, _spec_for(key, tuple(leaf.shape), mesh, fallbacks))

    tree = jax.tree_util.tree_map_with_path(one, shapes)
    return tree, fallbacks


def shard_params(params, mesh: Mesh):
    """Place an in-memory parameter tree on the mesh. → (params, fallbacks)."""
    shardings, fallbacks = plan_shardings(params, mesh)
    return jax.tree.map(jax.device_put, params, shardings), fallbacks


def constrain(x, *names):
    """Pin activation x to the mesh by logical axis names (one per dimension; None = no
    axis), inside a `jax.set_mesh(mesh)` context; a no-op without a mesh. A dimension that
    its mesh axis does not divide (e.g. a frame bucket of 3 over data=2) stays replicated."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    axes = []
    for dim, name in zip(x.shape, names):
        axis = LOGICAL_RULES.get(name) if name else None
        if axis not in sizes or sizes[axis] == 1 or dim % sizes[axis]:
            axis = None
        axes.append(axis)
    if all(a is None for a in axes):
        return x
    return jax.lax.with_sharding_constraint(x, PartitionSpec(*axes))


def frames_sharding(mesh: Mesh, n_frames: int) -> NamedSharding:
    """Pixels [T, 3, S, S]: frames over `data` when it divides T, else replicated."""
    d = mesh.shape["data"]
    axis = "data" if d > 1 and n_frames % d == 0 else None
    return NamedSharding(mesh, PartitionSpec(axis))


def describe(mesh: Mesh) -> str:
    return f"mesh data={mesh.shape['data']},model={mesh.shape['model']} over {math.prod(mesh.devices.shape)} {mesh.devices.flat[0].platform} devices"
