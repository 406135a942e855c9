"""ToMe (Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023) inside the SigLIP
encoder, as a baseline for EarlyTom's own in-encoder merging (spec section 9).

In every block, after the attention residual and before the MLP, each frame's tokens are
merged by bipartite soft matching:
- the metric is the block's keys averaged over heads, L2-normalised;
- the tokens in even slots form set A, those in odd slots set B; every A token finds its most
  cosine-similar B token (first on ties);
- the r A tokens with the highest such similarity merge into their B match (descending
  similarity, first slot on ties): x = Σ size·x / Σ size, sizes add;
- the next block sees the unmerged A tokens (in that descending order) followed by B.
Attention is proportional: log(size) of each key is added to every query's score for it.

For LLaVA-OneVision, ToMe replaces the 2x2 bilinear pooling (merged tokens no longer form a
grid): the encoder merges each frame down to c = round(r · 196) tokens (the pooled tokens a
frame would hand the LLM at retention r, at least 1), the projector maps them, and they enter
the LLM in the raster order of the patch whose slot each one kept (our choice; ToMe itself has
no order). So ToMe hands the LLM T0 · c tokens, within T0 / 2 of the shared budget
round(r · T0 · 196). Schedule: ToMe's constant r per block (`schedule`), the last blocks
merging fewer so that exactly c remain (26 blocks: 729 → 20 tokens merges 28 per block).

Static shapes: every block's token count is known from the config alone, so the blocks run
unrolled, one shape each; there is no padding and no frame merging.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from earlytom_jax.compression.base import NoHooks
from earlytom_jax.compression.registration import DEFAULT_RATIO, check_ratio, register
from earlytom_jax.config import LlavaOVConfig
from earlytom_jax.errors import ConfigError


def schedule(n: int, c: int, depth: int) -> tuple[int, ...]:
    """Tokens merged in each of `depth` blocks to go from n to c per frame: ToMe's constant r,
    the smallest that gets there, each block capped by what is left and by |A| = floor(N / 2)."""
    if not 1 <= c <= n:
        raise ConfigError(f"ToMe cannot keep {c} of {n} tokens per frame")
    for r in range(-(-(n - c) // depth), n // 2 + 1):
        out, left = [], n
        for _ in range(depth):
            m = min(r, left - c, left // 2)
            out.append(m)
            left -= m
        if left == c:
            return tuple(out)
    raise ConfigError(f"ToMe merges at most half the tokens per block: {depth} blocks cannot take {n} tokens "
                      f"per frame down to {c}; choose a larger ratio")


def bipartite_merge(x, size, idx, metric, r: int):
    """One ToMe step. x [B, N, C], size [B, N] fp32, idx [B, N] int32 (the patch each slot
    stands for), metric [B, N, D] → (x, size, idx) with N - r tokens."""
    m = metric / jnp.linalg.norm(metric, axis=-1, keepdims=True)
    scores = jnp.einsum("bid,bjd->bij", m[:, ::2], m[:, 1::2])  # [B, Na, Nb]
    best = scores.max(-1)
    match = scores.argmax(-1)  # first on ties
    order = jnp.argsort(-best, axis=-1, stable=True)  # descending, first slot on ties
    src, unm = order[:, :r], order[:, r:]
    dst = jnp.take_along_axis(match, src, axis=1)

    def split(a):
        return a[:, ::2], a[:, 1::2]

    def take(a, i):
        return jnp.take_along_axis(a, i.reshape(i.shape + (1,) * (a.ndim - 2)), axis=1)

    xs = x.astype(jnp.float32) * size[..., None]
    (xa, xb), (sa, sb), (ia, ib) = split(xs), split(size), split(idx)
    add = jax.vmap(lambda t, d, v: t.at[d].add(v))
    xb = add(xb, dst, take(xa, src))
    sb = add(sb, dst, take(sa, src))
    size = jnp.concatenate([take(sa, unm), sb], 1)
    x = (jnp.concatenate([take(xa, unm), xb], 1) / size[..., None]).astype(x.dtype)
    return x, size, jnp.concatenate([take(ia, unm), ib], 1)


@register(name="tome", label="ToMe")
@dataclasses.dataclass(frozen=True)
class ToMe(NoHooks):
    """ratio: retention r; each frame keeps round(r · tokens per frame) merged tokens."""

    ratio: float = DEFAULT_RATIO
    name = "tome"
    token_merging = True
    pooled = False

    def __post_init__(self):
        check_ratio(self.ratio)

    def per_frame(self, s: int) -> int:
        """Tokens per frame entering the LLM, from the pooled tokens per frame `s`."""
        return max(1, round(self.ratio * s))

    def schedule(self, cfg: LlavaOVConfig) -> tuple[int, ...]:
        v = cfg.vision
        return schedule(v.num_patches, self.per_frame(cfg.tokens_per_frame), v.num_layers)

    def check(self, cfg: LlavaOVConfig) -> "ToMe":
        self.schedule(cfg)
        return self

    def capacity(self, t0: int, s: int) -> int:
        return t0 * self.per_frame(s)

    def encode_tokens(self, vision, x, cfg: LlavaOVConfig):
        """Every block of `vision` (a `SiglipEncoder`) with ToMe. x [T, N, C] (patch
        embeddings) → [T, c, C]."""
        t, n, _ = x.shape
        size = jnp.ones((t, n), jnp.float32)
        idx = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (t, n))
        for layer, r in enumerate(self.schedule(cfg)):
            blk = vision.block(layer)
            x, _, k = blk.attention_half(x, key_bias=jnp.log(size))
            if r:
                x, size, idx = bipartite_merge(x, size, idx, k.astype(jnp.float32).mean(axis=2), r)
            x = blk.mlp_half(x)
        order = jnp.argsort(idx, axis=1)
        return jnp.take_along_axis(x, order[..., None], axis=1)

    def token_counts(self, cfg: LlavaOVConfig) -> list[tuple[int, int]]:
        """(tokens entering, tokens merged) per block, per frame: for the FLOP counts."""
        n, out = cfg.vision.num_patches, []
        for r in self.schedule(cfg):
            out.append((n, r))
            n -= r
        return out
