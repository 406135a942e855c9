"""Logical axis names and where they go on a device mesh.

Parameters name their dimensions when they are declared (models/params.py) and activations
when the models compute them (`constrain`); `LOGICAL_RULES` maps the names to the mesh axes of
earlytom_jax/sharding.py: frames of the encoder over `data`, attention heads, MLP width and
the vocabulary over `model`.
"""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec

# logical axis → mesh axis
LOGICAL_RULES = {"heads": "model", "kv_heads": "model", "mlp": "model", "vocab": "model", "frames": "data"}


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
