"""KV caches and greedy decoding after the prefill (`pipeline.prefill`), on device.

Caches are one `CacheGroup` per range of LLM layers (hook 3 cuts the layers into ranges, each
with its own valid mask). `decode_loop` runs every step in one device loop; hook 4
(compression/base.py `decode_layer`, DyCoke) re-picks each step's visual slots
(`decode_step_pruned`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from earlytom_jax.compression.base import FullTokens
from earlytom_jax.config import ModelConfig
from earlytom_jax.models import family
from earlytom_jax.models.attention import last_row_probs
from earlytom_jax.models.qwen2 import rms_norm

FULL = FullTokens()


@dataclasses.dataclass
class CacheGroup:
    """KV cache of a contiguous range of layers: k/v [n_layers, B, Lc, Hk, D], valid [B, Lc];
    shift: int32, subtracted from a decoded token's position in these layers (the visual slots an
    earlier stage of a renumbering method dropped, `llm_renumber`; 0 otherwise)."""

    k: Any
    v: Any
    valid: Any
    length: int  # prefill slots used (static); decode writes at length + step
    shift: Any = 0


jax.tree_util.register_dataclass(CacheGroup, data_fields=["k", "v", "valid", "shift"], meta_fields=["length"])


def _alloc(ks, vs, valid, extra: int, shift=0) -> CacheGroup:
    pad = [(0, 0), (0, 0), (0, extra), (0, 0), (0, 0)]
    return CacheGroup(
        jnp.pad(ks, pad), jnp.pad(vs, pad), jnp.pad(valid, ((0, 0), (0, extra))), ks.shape[2],
        jnp.asarray(shift, jnp.int32),
    )


def _step(params, tokens, positions, caches, step, cfg: ModelConfig):
    """One step of B sequences: tokens/positions int32 [B]; caches' k/v [n, B, Lc, Hk, D], valid
    [B, Lc], shift scalar or [B]. → (logits [B, V], caches)."""
    text = family.bind(cfg, params).text
    h = text.embed_tokens(tokens)[:, None]
    out, start = [], 0
    for g in caches:
        nlay = g.k.shape[0]
        h, ck, cv, valid = text.decode_layers(h, positions - g.shift, g.k, g.v, g.valid, g.length + step, start)
        out.append(CacheGroup(ck, cv, valid, g.length, g.shift))
        start += nlay
    return text.logits(h[:, -1]), tuple(out)


def decode_step(params, token, position, caches, step, cfg: ModelConfig):
    """One greedy step. token/position int32 [1]; step int32 scalar (0 for the first new token).
    A generated token's three multimodal positions are equal: the 1-D position serves both families.

    → (logits [V], caches). Compiles once per set of cache lengths.
    """
    logits, caches = _step(params, token, position, caches, step, cfg)
    return logits[0], caches


def split_caches(caches, layer: int):
    """The cache groups cut so that layer `layer` - 1 is a group of its own and a group starts
    at `layer` (hook 4's layout; the pieces of a group have equal valid masks and length)."""
    out, start = [], 0
    for g in caches:
        n = g.k.shape[0]
        cuts = sorted({0, n} | {c - start for c in (layer - 1, layer) if start < c < start + n})
        for j, (a, b) in enumerate(zip(cuts, cuts[1:])):  # own copies of valid/shift: each donatable
            valid, shift = (g.valid, g.shift) if j == 0 else (jnp.copy(g.valid), jnp.copy(g.shift))
            out.append(CacheGroup(g.k[a:b], g.v[a:b], valid, g.length, shift))
        start += n
    return tuple(out)


def decode_span(method, caches, prefix_len: int, suffix_len: int) -> tuple[int, int] | None:
    """Static (start, stop) cache slots of the visual span (tokens and newline) that hook 4
    (`decode_layer`) prunes; None for a method without it. Needs one prefill cache group (no
    hook 3): the prompt's layout, prefix | span | suffix."""
    if getattr(method, "decode_layer", None) is None:
        return None
    if len(caches) != 1:
        raise ValueError("decode-time pruning needs the prompt's cache layout (a method without hook 3)")
    return prefix_len, caches[0].length - suffix_len


def decode_step_pruned(params, token, position, caches, step, cfg: ModelConfig, method, span, state):
    """`decode_step` with hook 4: caches split by `split_caches(caches, method.decode_layer)`;
    span: the visual span's static cache slots (`decode_span`); state: `method.decode_init`'s.
    Layer L - 1 (L = decode_layer) also gives the new token's attention (mean over heads) to the
    span, from which `method.decode_keep` picks the span slots layers L.. attend this step.

    → (logits [V], caches, state, keep bool [span])."""
    text = family.bind(cfg, params).text
    layer = method.decode_layer
    a, b = span
    h = text.embed_tokens(token)[:, None]
    out, start, keep = [], 0, None
    for g in caches:
        nlay, index, pos = g.k.shape[0], g.length + step, position - g.shift
        if start >= layer:  # the step's keep mask on the span, for this step only
            mask = jnp.ones(g.valid.shape, bool).at[:, a:b].set(keep[None])
            h, ck, cv, _ = text.decode_layers(h, pos, g.k, g.v, g.valid & mask, index, start)
            valid = jax.lax.dynamic_update_slice(g.valid, jnp.ones((g.valid.shape[0], 1), bool), (0, index))
        else:
            h_in = h
            h, ck, cv, valid = text.decode_layers(h, pos, g.k, g.v, g.valid, index, start)
            if start + nlay == layer:  # layer L - 1 (a group of its own): its query, re-projected
                lay = text.layer(layer - 1)
                cos, sin = text.rope(pos[:, None])
                q = lay.qkv(rms_norm(h_in, lay.ln1[...], lay.cfg.rms_norm_eps), cos, sin)[0]
                attn = last_row_probs(q, ck[-1], valid)[0]
                keep, state = method.decode_keep(attn[a:b], valid[0, a:b], state)
        out.append(CacheGroup(ck, cv, valid, g.length, g.shift))
        start += nlay
    return text.logits(h[0, -1]), tuple(out), state, keep


decode_step_jit = jax.jit(decode_step, static_argnames=("cfg",), donate_argnames=("caches",))
decode_step_pruned_jit = jax.jit(decode_step_pruned, static_argnames=("cfg", "method", "span"),
                                 donate_argnames=("caches",))


def _decode_loop(params, first_logits, position, caches, cfg, steps: int, eos_ids, method=FULL, span=None,
                 trace: bool = False):
    """Greedy decoding of up to `steps` tokens in one device loop (no host sync per token),
    stopping after the first token in `eos_ids`.

    → (tokens int32 [steps], count): the first `count` tokens are the answer, EOS included;
    the first token is argmax(first_logits).

    method, span: a method with hook 4 (`decode_layer`) and its visual span (`decode_span`); any
    other method decodes as without them. trace (hook 4 only): also return keep bool [steps,
    span]: row i the span slots layers L.. attended to produce token i (row 0: the prefill's).
    """
    toks = jnp.zeros((steps,), jnp.int32).at[0].set(jnp.argmax(first_logits).astype(jnp.int32))
    if getattr(method, "decode_layer", None) is not None:
        return _decode_loop_pruned(params, toks, position, caches, cfg, steps, eos_ids, method, span, trace)

    def cond(carry):
        i, toks, _ = carry
        return (i < steps) & ~jnp.isin(toks[i - 1], eos_ids)

    def body(carry):
        i, toks, caches = carry
        logits, caches = decode_step(params, toks[i - 1][None], position + i - 1, caches, i - 1, cfg)
        return i + 1, toks.at[i].set(jnp.argmax(logits).astype(jnp.int32)), caches

    count, toks, _ = jax.lax.while_loop(cond, body, (jnp.asarray(1, jnp.int32), toks, caches))
    return toks, count


def _decode_loop_pruned(params, toks, position, caches, cfg, steps, eos_ids, method, span, trace):
    """`decode_loop`'s loop with hook 4 (`decode_step_pruned`)."""
    if span is None:
        raise ValueError("a method with decode_layer needs the visual span (pipeline.decode_span)")
    width = span[1] - span[0]
    caches = split_caches(caches, method.decode_layer)
    hist = jnp.ones((steps, width), bool) if trace else None

    def cond(carry):
        i, toks = carry[:2]
        return (i < steps) & ~jnp.isin(toks[i - 1], eos_ids)

    def body(carry):
        i, toks, caches, state, hist = carry
        logits, caches, state, keep = decode_step_pruned(params, toks[i - 1][None], position + i - 1, caches, i - 1,
                                                         cfg, method, span, state)
        hist = None if hist is None else hist.at[i].set(keep)
        return i + 1, toks.at[i].set(jnp.argmax(logits).astype(jnp.int32)), caches, state, hist

    init = (jnp.asarray(1, jnp.int32), toks, caches, method.decode_init(width), hist)
    count, toks, _, _, hist = jax.lax.while_loop(cond, body, init)
    return (toks, count, hist) if trace else (toks, count)


decode_loop = jax.jit(_decode_loop, static_argnames=("cfg", "steps", "method", "span", "trace"))


@functools.partial(jax.jit, static_argnames=("cfg", "steps", "method", "span"))
def decode_loop_batch(params, first_logits, position, caches, cfg, steps: int, eos_ids, method=FULL, span=None):
    """`decode_loop` for a batch from `prefill_batch` (first_logits [B, V], position [B, 1], caches
    with a leading batch axis) in one device loop: every step decodes the whole batch (the
    per-sample step vmapped), a sample past its EOS keeps its tokens and count, and the loop
    ends when all are done or after `steps`. The loop's condition is the batch's, so the caches
    are carried as they are (a vmapped loop would select every cache entry each step).
    → (tokens int32 [B, steps], count int32 [B]); sample i's are `decode_loop`'s for it alone."""
    b = first_logits.shape[0]
    first = jnp.argmax(first_logits, -1).astype(jnp.int32)
    toks = jnp.zeros((b, steps), jnp.int32).at[:, 0].set(first)
    hooked = getattr(method, "decode_layer", None) is not None
    if hooked:  # hook 4 picks each sample's slots: the one-sample step, vmapped
        if span is None:
            raise ValueError("a method with decode_layer needs the visual span (pipeline.decode_span)")
        caches = jax.vmap(lambda c: split_caches(c, method.decode_layer))(caches)
        state = jax.vmap(lambda _: method.decode_init(span[1] - span[0]))(jnp.arange(b))

        def step(toks, caches, state, i):
            def one(tok, pos, caches, state):
                logits, caches, state, _ = decode_step_pruned(params, tok[None], pos + i - 1, caches, i - 1, cfg,
                                                              method, span, state)
                return jnp.argmax(logits).astype(jnp.int32), caches, state

            return jax.vmap(one)(toks, position, caches, state)
    else:  # the model's own batch axis: caches [n, B, Lc, Hk, D], moved there once
        caches = tuple(CacheGroup(jnp.moveaxis(g.k[:, :, 0], 0, 1), jnp.moveaxis(g.v[:, :, 0], 0, 1), g.valid[:, 0],
                                  g.length, g.shift) for g in caches)
        state = jnp.zeros((b,), jnp.int32)  # unused
        pos = position[:, 0]

        def step(toks, caches, state, i):
            logits, caches = _step(params, toks, pos + i - 1, caches, i - 1, cfg)
            return jnp.argmax(logits, -1).astype(jnp.int32), caches, state

    def cond(carry):
        i, _, alive = carry[:3]
        return (i < steps) & alive.any()

    def body(carry):
        i, toks, alive, count, caches, state = carry
        new, caches, state = step(toks[:, i - 1], caches, state, i)
        toks = toks.at[:, i].set(jnp.where(alive, new, 0))
        count = jnp.where(alive, i + 1, count)
        return i + 1, toks, alive & ~jnp.isin(new, eos_ids), count, caches, state

    alive = ~jnp.isin(first, eos_ids)
    init = (jnp.asarray(1, jnp.int32), toks, alive, jnp.ones((b,), jnp.int32), caches, state)
    _, toks, _, count, _, _ = jax.lax.while_loop(cond, body, init)
    return toks, count
