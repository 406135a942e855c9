"""What the pipeline asks of a compression method, and helpers shared by methods.

A method is a frozen (hashable) dataclass, passed to the jitted pipeline as a static
argument, with any of these three hooks (see pipeline.py for where each one acts):

hook 1, inside the vision encoder
    encoder_layers: tuple[int, ...]   blocks after which `encoder_merge` runs (sorted)
    frame_buckets(t0) -> tuple[int]   frame counts the later blocks may run on
    encoder_init(t0) -> state
    encoder_merge(x [Tc,N,C], n, colmean [Tc,N], state, last) -> (x, n, state)
    encoder_stats(state) -> dict
hook 2, after projector and pooling
    select(tokens [Tc,S,H], n, state, cfg) -> (buffer [Vc,H], valid [Vc], info with "count")
hook 3, inside the LLM (prefill only)
    llm_layer: int | None, llm_noncausal: bool
    llm_capacity(span) -> int         static length of the visual span after the hook
    llm_merge(h [span,H], attn [span], valid [span]) -> (h, keep [span])

A method that leaves a hook out inherits the no-op below.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp


def frame_buckets(capacity: int, count: int) -> tuple[int, ...]:
    """`count` evenly spaced frame counts up to `capacity` (e.g. 32, 4 → 8, 16, 24, 32)."""
    return tuple(sorted({max(1, -(-capacity * j // count)) for j in range(1, count + 1)}))


class NoHooks:
    """Defaults: no frame merging, keep every token, no in-LLM merging."""

    name = "full"

    encoder_layers: tuple[int, ...] = ()
    llm_layer = None
    llm_noncausal = False

    def frame_buckets(self, t0: int) -> tuple[int, ...]:
        return (t0,)

    def encoder_init(self, t0: int):
        return {}

    def encoder_merge(self, x, n, colmean, state, last):
        return x, n, state

    def encoder_stats(self, state) -> dict:
        return {}

    def capacity(self, t0: int, s: int) -> int:
        """Static length of the visual-token buffer (before the newline)."""
        return t0 * s

    def select(self, tokens, n, state, cfg):
        t, s, h = tokens.shape
        count = jnp.asarray(t * s, jnp.int32)
        return tokens.reshape(t * s, h), jnp.ones((t * s,), bool), {"count": count}

    def llm_capacity(self, span: int) -> int:
        return span

    def llm_merge(self, h, attn, valid):
        return h, valid


@dataclasses.dataclass(frozen=True)
class FullTokens(NoHooks):
    """The uncompressed model: every pooled token of every frame, as transformers runs it."""
