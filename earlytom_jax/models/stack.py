"""Scan over a range of stacked layer weights, and how those stacks are held on CPU.

Layer weights are stored stacked, [num_layers, ...] per leaf. Slicing a range out of the stack
(`a[start:stop]`) and scanning over the slice makes XLA materialise the slice: a copy of those
layers' weights on every call (every decode step when the LLM's cache is split in two, every
video when the encoder runs in segments). Scanning over layer indices and reading each layer
with a dynamic index into the whole stack reads the weights in place.

bf16 on CPU (`pack`), two problems and two held forms:

- XLA:CPU converts every bf16 array a loop reads to f32 *before* the loop (to compute its dots
  in f32), so a bf16 stack costs an f32 copy of all its layers on every prefill and decode
  step. The encoder's stack is held as its uint16 bits, which that conversion leaves alone;
  `layer` turns one layer's bits back into bf16 inside the loop (measured:
  docs/cpu-forms.md#bf16-stacks-as-uint16-bits).
- Reading a layer out of a stack (dynamic index, bits turned back) copies it on every pass,
  and YNNPACK, which runs bf16 products on CPU, re-packs each weight matrix per call; with
  few rows (a compressed prefill, a decode step) these copies, not the FLOPs, set the time.
  So on one device each of the LLM's stacked leaves is held as a tuple of per-layer arrays
  (`Layers`), its MLP matrices transposed to [out, in] (`OutIn`, which `dense` reads), and
  `scan` unrolls over them. The encoder (729+ rows per frame) gains nothing from it and keeps its loop, which
  compiles once (measured: docs/cpu-forms.md#llm-per-layer-mlp-transposed-outin).

An untied token embedding is held as its uint16 bits too (`Qwen2.embed_tokens` gathers from them:
XLA:CPU would convert a bf16 table to f32 to gather from it; measured:
docs/cpu-forms.md#embedding-table-as-bits). Weights are unchanged bit for bit in every form;
`unpack` gives the plain tree back.

A stack is a layer module built under `nnx.vmap` (models/params.py: every parameter leads with
the layer axis), whose parameter values may be held in these forms: `layer` and `scan` give
the model code one layer at a time as a module of that layer, with plain arrays (or `OutIn`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

_BF16 = jnp.dtype(jnp.bfloat16)
STACKS = ("blocks", "layers")  # the stacked subtrees: params["vision"]["blocks"], params["text"]["layers"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class OutIn:
    """A weight matrix held with its `n_in` leading (contracted) axes moved last:
    w [in..., out...] as t [out..., in...]. `models.dense.dense` takes it in place of w."""

    t: jax.Array
    n_in: int = dataclasses.field(metadata=dict(static=True))

    @property
    def shape(self):
        return self.t.shape[self.t.ndim - self.n_in:] + self.t.shape[: self.t.ndim - self.n_in]

    @property
    def dtype(self):
        return self.t.dtype


class Layers(tuple):
    """A stacked parameter held as one array per layer (a pytree: a tuple of the layers'
    arrays or `OutIn`s)."""


jax.tree_util.register_pytree_node(Layers, lambda s: (tuple(s), None), lambda _, c: Layers(c))


def _is_layers(x) -> bool:
    return isinstance(x, Layers)

# LLM matrices held transposed, with their contracted leading axes (product specs in
# models/qwen2.py). Only the MLP's: YNNPACK runs 2-D [out, in] weights faster with few rows,
# while attention's 3-D weights ([C, H, D], [H, D, C]) run slower transposed
# (measured: docs/cpu-forms.md#llm-per-layer-mlp-transposed-outin).
_LLM_IN_AXES = {"gate_w": 1, "up_w": 1, "down_w": 1}


def bits(a):
    """A bf16 array as its uint16 bits (other dtypes unchanged): the form in which XLA:CPU
    passes it into or out of a loop without converting it to f32 around the loop."""
    return jax.lax.bitcast_convert_type(a, jnp.uint16) if a.dtype == _BF16 else a


def unbits(a):
    """The inverse of `bits`."""
    return jax.lax.bitcast_convert_type(a, jnp.bfloat16) if a.dtype == jnp.uint16 else a


def frame_by_frame(x) -> bool:
    """Whether an encoder runs the frames [B, ...] of bf16 activations `x` one at a time: on CPU
    without a mesh, where XLA:CPU's products slow down as a block's [B·N, F] operands outgrow
    the caches (SigLIP: docs/cpu-forms.md#siglip-blocks-frame-by-frame; Qwen2.5-VL's encoder,
    4 blocks on 8 temporal patches of 1008 patches: 2.24 → 1.75 s). Each frame's result then
    does not depend on how many frames share the batch."""
    return x.shape[0] > 1 and frame_loop(x.dtype)


def frame_loop(dtype) -> bool:
    """Whether encoders run activations of `dtype` one frame at a time here (`frame_by_frame`):
    bf16 on CPU without a mesh."""
    return jnp.dtype(dtype) == _BF16 and jax.default_backend() == "cpu" and jax.sharding.get_abstract_mesh().empty


def map_frames(fn, x):
    """fn(x [1, ...]) → [1, ...] for each frame of x [B, ...], as a loop (`jax.lax.map`), bf16
    through the loop as bits."""
    return unbits(jax.lax.map(lambda xb: bits(fn(unbits(xb)[None])[0]), bits(x)))


def map_frames_upto(fn, x, n):
    """fn(x [1, ...]) → tuple of [1, ...] arrays, for each of the first `n` frames (traced int)
    of x [B, ...], as one loop over the B frames whose steps from `n` on only write zeros
    (`lax.cond`): the frames left after a merge cost what they are, with one compiled body.
    → tuple of [B, ...] arrays, zero from frame n on; bf16 through the loop as bits."""
    shapes = jax.eval_shape(fn, x[:1])

    def step(args):
        i, xb = args
        return jax.lax.cond(i < n, lambda xb: tuple(bits(o[0]) for o in fn(unbits(xb)[None])),
                            lambda xb: tuple(bits(jnp.zeros(s.shape[1:], s.dtype)) for s in shapes), xb)

    out = jax.lax.map(step, (jnp.arange(x.shape[0], dtype=jnp.int32), bits(x)))
    return tuple(unbits(o) for o in out)


def per_layer(tree) -> bool:
    """Whether a stack's parameters (a dict of stacked leaves, or a layer module's state) are
    held per layer."""
    return any(_is_layers(x) for x in jax.tree.leaves(tree, is_leaf=_is_layers))


def _take(a, index):
    """Layer `index` of one stacked leaf, bf16 bits unpacked."""
    if _is_layers(a):
        return a[index]
    return unbits(jax.lax.dynamic_index_in_dim(a, index, keepdims=False))


def _one(graphdef, state, index):
    return nnx.merge(graphdef, jax.tree.map(lambda a: _take(a, index), state, is_leaf=_is_layers))


def layer(stack: nnx.Module, index) -> nnx.Module:
    """Layer `index` of a stacked layer module as a module of that one layer, bf16 bits
    unpacked; index: int, or a traced int32 for a stack not held per layer."""
    return _one(*nnx.split(stack), index)


def scan(step, carry, stack: nnx.Module, start: int, stop: int, xs=None):
    """`jax.lax.scan` of `step(carry, layer, x) -> (carry, y)` over layers [start, stop)
    (static) of the stacked layer module `stack` (`layer` as `layer` gives it); xs (optional)
    has a leading axis of stop - start. A stack held per layer is run as an unrolled loop with
    the same result."""
    graphdef, state = nnx.split(stack)
    if per_layer(state):
        ys = []
        for n, i in enumerate(range(start, stop)):
            carry, y = step(carry, _one(graphdef, state, i), None if xs is None else jax.tree.map(lambda a: a[n], xs))
            ys.append(y)
        return carry, jax.tree.map(lambda *a: jnp.stack(a), *ys) if ys else None

    def body(c, args):
        i, x = args
        return step(c, _one(graphdef, state, i), x)

    return jax.lax.scan(body, carry, (jnp.arange(start, stop, dtype=jnp.int32), xs))


_to_bits = jax.jit(bits, donate_argnums=0)
_from_bits = jax.jit(unbits)


@jax.jit
def _layer_of(a, i):
    return jax.lax.dynamic_index_in_dim(a, i, keepdims=False)


def _out_in(a, n_in: int):
    """a [in... (n_in axes), out...] → [out..., in...]."""
    return jnp.transpose(a, tuple(range(n_in, a.ndim)) + tuple(range(n_in)))


def _in_out(t, n_in: int):
    """The inverse of `_out_in`."""
    k = t.ndim - n_in
    return jnp.transpose(t, tuple(range(k, t.ndim)) + tuple(range(k)))


_layer_out_in = jax.jit(lambda a, i, n_in: _out_in(jax.lax.dynamic_index_in_dim(a, i, keepdims=False), n_in),
                        static_argnums=2)


def split_layers(key: str, a) -> list:
    """One stacked LLM leaf `key` ([n, ...], a device array or a host numpy array) as its n
    per-layer held arrays (`OutIn` for the MLP matrices). From a host array no device copy of
    the whole stack is made: loaders use this to hold the 7B LLM without a stacked leaf's
    transient (`bench_torch.params_from_torch(held=True)`)."""
    n_in = _LLM_IN_AXES.get(key)
    out = []
    for i in range(a.shape[0]):
        if isinstance(a, jax.Array):
            w = _layer_out_in(a, i, n_in) if n_in else _layer_of(a, i)
        else:
            w = jax.device_put(a[i])
            w = _layer_out_in(w[None], 0, n_in) if n_in else w
        out.append(OutIn(w, n_in) if n_in else w)
    return out


def _held_per_layer(tree: dict) -> dict:
    """A bf16 LLM tree (stacked leaves, or lists from `split_layers`) with each leaf as
    `Layers`, one leaf at a time (the peak is one stacked leaf more than the weights, not a
    second model)."""
    tree = dict(tree)
    for k in list(tree):
        a = tree.pop(k)
        parts = a if isinstance(a, list) else split_layers(k, a)
        if isinstance(a, jax.Array):
            a.delete()
        del a
        tree[k] = Layers(parts)
    return tree


def _stacked(tree: dict) -> dict:
    """The inverse of `_held_per_layer`: plain bf16 stacks."""
    out = {}
    for k, parts in tree.items():
        if isinstance(parts[0], OutIn):
            parts = [_in_out(p.t, p.n_in) for p in parts]
        out[k] = jnp.stack(parts)
    return out


def _one_device(tree: dict) -> bool:
    return all(len(a.sharding.device_set) == 1 for a in jax.tree.leaves(tree))


def pack(params: dict, backend: str | None = None) -> dict:
    """On CPU, bf16 layer stacks in their held forms (module docstring): the encoder's as
    uint16 bits, and the token embedding too when the head is untied (`Qwen2.embed_tokens`); the
    LLM's leaves as `Layers` on one device (they may already be lists from `split_layers`), as
    uint16 bits when sharded over several. Elsewhere, or for other dtypes,
    `params` unchanged. Consumes the bf16 leaves: do not use them afterwards."""
    if (backend or jax.default_backend()) != "cpu":
        return params
    out = dict(params)
    text = out.get("text", {})
    if "lm_head" in text and text["embed"].dtype == _BF16:  # only gathered from: as bits (Qwen2.embed_tokens)
        out["text"] = dict(text, embed=_to_bits(text["embed"]))
    for part, name in (("vision", "blocks"), ("text", "layers")):
        tree = out.get(part, {}).get(name)
        if not isinstance(tree, dict):
            continue
        dtypes = {jnp.dtype((a[0] if isinstance(a, list) else a).dtype) for a in tree.values()}
        if _BF16 not in dtypes:
            continue
        out[part] = dict(out[part])
        if name == "layers" and dtypes == {_BF16} and _one_device(tree):
            out[part][name] = _held_per_layer(tree)
        else:
            out[part][name] = {k: _to_bits(a) if a.dtype == jnp.bfloat16 else a for k, a in tree.items()}
    return out


def unpack(params: dict) -> dict:
    """The inverse of `pack`: plain bf16 stacks again (for export, inspection or re-placing),
    as new arrays; `params` stays usable."""
    out = dict(params)
    if "text" in out and out["text"]["embed"].dtype == jnp.uint16:
        out["text"] = dict(out["text"], embed=_from_bits(out["text"]["embed"]))
    for part, name in (("vision", "blocks"), ("text", "layers")):
        tree = out.get(part, {}).get(name)
        if tree is None:
            continue
        out[part] = dict(out[part])
        if per_layer(tree):
            out[part][name] = _stacked(tree)
        else:
            out[part][name] = {k: _from_bits(a) if a.dtype == jnp.uint16 else a for k, a in tree.items()}
    return out
