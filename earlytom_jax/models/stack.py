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
  So on one device the LLM's stack is held as a tuple of per-layer trees (`PerLayer`), its
  MLP matrices transposed to [out, in] (`OutIn`, which `dense` reads), and `scan` unrolls
  over it. The encoder (729+ rows per frame) gains nothing from it and keeps its loop, which
  compiles once (measured: docs/cpu-forms.md#llm-per-layer-mlp-transposed-outin).

An untied token embedding is held as its uint16 bits too (`qwen2.embed` gathers from them:
XLA:CPU would convert a bf16 table to f32 to gather from it; measured:
docs/cpu-forms.md#embedding-table-as-bits). Weights are unchanged bit for bit in every form;
`unpack` gives the plain tree back.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

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


class PerLayer(tuple):
    """A layer stack held as one tree per layer (a pytree: a tuple of the layers' dicts)."""


jax.tree_util.register_pytree_node(PerLayer, lambda s: (tuple(s), None), lambda _, c: PerLayer(c))

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


def layer(stack, index):
    """Weights of layer `index` of a stacked tree, bf16 bits unpacked; index: int, or a traced
    int32 for a stacked (not `PerLayer`) tree."""
    if isinstance(stack, PerLayer):
        return stack[index]
    return jax.tree.map(lambda a: unbits(jax.lax.dynamic_index_in_dim(a, index, keepdims=False)), stack)


def scan(step, carry, stack, start: int, stop: int, xs=None):
    """`jax.lax.scan` of `step(carry, layer_params, x) -> (carry, y)` over layers [start, stop)
    (static) of `stack`; xs (optional) has a leading axis of stop - start. A `PerLayer` stack
    is run as an unrolled loop with the same result."""
    if isinstance(stack, PerLayer):
        ys = []
        for n, i in enumerate(range(start, stop)):
            carry, y = step(carry, stack[i], None if xs is None else jax.tree.map(lambda a: a[n], xs))
            ys.append(y)
        return carry, jax.tree.map(lambda *a: jnp.stack(a), *ys) if ys else None

    def body(c, args):
        i, x = args
        return step(c, layer(stack, i), x)

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


def _per_layer(tree: dict) -> PerLayer:
    """A bf16 LLM tree (stacked leaves, or lists from `split_layers`) as `PerLayer`, one leaf at
    a time (the peak is one stacked leaf more than the weights, not a second model)."""
    tree = dict(tree)
    layers = None
    for k in list(tree):
        a = tree.pop(k)
        parts = a if isinstance(a, list) else split_layers(k, a)
        if isinstance(a, jax.Array):
            a.delete()
        del a
        layers = layers or [{} for _ in parts]
        for layer_tree, w in zip(layers, parts):
            layer_tree[k] = w
    return PerLayer(layers)


def _stacked(layers: PerLayer) -> dict:
    """The inverse of `_per_layer`: plain bf16 stacks."""
    out = {}
    for k in layers[0]:
        parts = [l[k] for l in layers]
        if isinstance(parts[0], OutIn):
            parts = [_in_out(p.t, p.n_in) for p in parts]
        out[k] = jnp.stack(parts)
    return out


def _one_device(tree: dict) -> bool:
    return all(len(a.sharding.device_set) == 1 for a in jax.tree.leaves(tree))


def pack(params: dict, backend: str | None = None) -> dict:
    """On CPU, bf16 layer stacks in their held forms (module docstring): the encoder's as
    uint16 bits, and the token embedding too when the head is untied (`qwen2.embed`); the LLM's as `PerLayer` on one device (its leaves may already be lists from
    `split_layers`), as uint16 bits when sharded over several. Elsewhere, or for other dtypes,
    `params` unchanged. Consumes the bf16 leaves: do not use them afterwards."""
    if (backend or jax.default_backend()) != "cpu":
        return params
    out = dict(params)
    text = out.get("text", {})
    if "lm_head" in text and text["embed"].dtype == _BF16:  # only gathered from: as bits (qwen2.embed)
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
            out[part][name] = _per_layer(tree)
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
        if isinstance(tree, PerLayer):
            out[part][name] = _stacked(tree)
        else:
            out[part][name] = {k: _from_bits(a) if a.dtype == jnp.uint16 else a for k, a in tree.items()}
    return out
