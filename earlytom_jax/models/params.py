"""How the models declare their parameters (Flax NNX), and the plain trees the pipeline runs on.

Every parameter is declared once, in its module's `__init__` (models/siglip.py, qwen2.py,
llava_onevision.py), with `param`: its shape, dtype, logical axis names (one per dimension,
mapped to mesh axes by `models.axes.LOGICAL_RULES`) and how random weights are drawn. A stack of
layers is `stacked`: the layer module built under `nnx.vmap`, so each of its parameters gains a
leading layer axis (logical name None) and a range of layers runs as one `lax.scan`.

The jitted pipeline is a pure function of (parameters, inputs): it takes the model's state as
nested dicts of arrays (`nnx.to_pure_dict(nnx.state(model))`: {"vision": {"patch_w": ..., "blocks":
{"q_w": [L, C, H, D], ...}}, ...}) and runs the modules over it (`bind`: `nnx.merge` of the
model's graph with that tree, at trace time). Loaders (checkpoint/), conversion, sharding and
random weights take every path, shape and logical axis from the modules (`abstract`, `shapes`,
`logical_axes`, `metadata`), never from a list of their own.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

INITS = ("normal", "ones")  # how random weights are drawn: N(0, 0.02), or ones (norm scales)


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], init: str = "normal",
          dtype=jnp.float32) -> nnx.Param:
    """One parameter of `shape`, its dimensions named `axes` (logical names or None)."""
    if len(axes) != len(shape):
        raise ValueError(f"{len(axes)} axis names for a shape of {len(shape)} dimensions")
    if init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "normal":
        value = (0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    else:
        raise ValueError(f"init {init!r}: one of {', '.join(INITS)}")
    # eager_sharding off: the names are metadata here; placement is sharding.plan_shardings'
    return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False, init=init)


def stacked(make: Callable[[nnx.Rngs], nnx.Module], n: int, rngs: nnx.Rngs) -> nnx.Module:
    """`n` layers from `make(rngs)` as one module whose parameters lead with a layer axis [n]."""

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: None})
    def build(r):
        return make(r)

    return build(rngs)


def key_path(keys) -> tuple[str, ...]:
    """A jax tree path (dict keys or plain names) as the tuple of names the tables use."""
    return tuple(str(getattr(k, "key", k)) for k in keys)


@functools.lru_cache(maxsize=16)
def _abstract_split(cls, cfg):
    return nnx.split(nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0))), nnx.Param)


def abstract(cls, cfg) -> nnx.State:
    """The parameter state of `cls(cfg)` as ShapeDtypeStructs with their metadata (nothing
    allocated: built under `nnx.eval_shape`)."""
    return _abstract_split(cls, cfg)[1]


def bind(cls, cfg, params: dict):
    """The module `cls(cfg)` over the parameter tree `params` (nested dicts of arrays, held
    forms included: models/stack.py), e.g. inside a jitted function of (params, inputs).
    Top-level trees of other modules beside the model's (`params["siglip_head"]`,
    models/siglip_head.py) are left out."""
    graph, state = _abstract_split(cls, cfg)
    if any(k not in state for k in params):
        params = {k: v for k, v in params.items() if k in state}
    return nnx.merge(graph, params)


def shapes(cls, cfg) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{path: shape} of every parameter of `cls(cfg)`, in the order of its flattened tree."""
    leaves = jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(abstract(cls, cfg)))
    return {key_path(p): tuple(x.shape) for p, x in leaves}


def metadata(cls, cfg, key: str) -> dict[tuple[str, ...], object]:
    """{path: the parameter's metadata `key`} ("out_sharding": logical axes, "init") for `cls(cfg)`."""
    out = {}
    for p, v in nnx.to_flat_state(abstract(cls, cfg)):
        out[key_path(p)] = v.get_metadata().get(key)
    return out


def logical_axes(cls, cfg) -> dict[tuple[str, ...], tuple[str | None, ...]]:
    """{path: logical axis names, one per dimension} for every parameter of `cls(cfg)`."""
    return {p: tuple(names) for p, names in metadata(cls, cfg, "out_sharding").items()}


def set_path(tree: dict, path: tuple[str, ...], value) -> None:
    """tree[path[0]][path[1]]... = value, creating the dicts on the way."""
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def tree(flat: dict[tuple[str, ...], object]) -> dict:
    """{path: leaf} → nested dicts."""
    out: dict = {}
    for path, leaf in flat.items():
        set_path(out, path, leaf)
    return out
