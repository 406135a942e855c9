"""Qwen2 decoder as Flax NNX modules (`Qwen2Layer`, `Qwen2`): GQA with q/k/v bias, RoPE
(rotate-half), RMSNorm, SwiGLU.

Layers are stacked on a leading axis and run with `lax.scan` (`models.stack.scan`; on CPU in
bf16 the stack is held per layer and the loop unrolled, see models/stack.py). Prefill runs
any layer range [start, stop) over a sequence with a key-validity mask (padding slots are
never attended) and explicit position ids (gaps allowed, as EarlyTom's in-LLM merge leaves
them); it returns the keys (after RoPE) and values to cache. A decode step writes one slot of a static-length cache
at a traced index, so it compiles once per cache length.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from earlytom_jax.config import Qwen2Config
from earlytom_jax.models import stack
from earlytom_jax.models.attention import attention, causal_attention
from earlytom_jax.models.axes import constrain
from earlytom_jax.models.dense import dense

FEW_ROWS = 16  # `logits`: up to this many rows (a batched decode step) go one at a time on CPU in fp32
from earlytom_jax.models.params import param, stacked


def rms_norm(x, w, eps):
    """HF Qwen2RMSNorm: normalise in fp32, cast back, then times weight."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + eps)
    return w * y.astype(x.dtype)


def rope_tables(positions, head_dim: int, theta: float, mrope_section=None):
    """positions int [B, L] → cos, sin fp32 [B, L, D] (HF default rope, halves duplicated).

    Multimodal RoPE (Qwen2.5-VL): positions int [B, L, 3] (temporal, height, width) and
    mrope_section (s0, s1, s2) summing to D / 2: frequency j < s0 turns with the temporal
    position, the next s1 with the height, the last s2 with the width. A text token, whose
    three positions are equal, gets exactly the 1-D rope."""
    inv = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if positions.ndim == 3:
        if mrope_section is None or sum(mrope_section) != head_dim // 2:
            raise ValueError(f"3-D positions need an mrope_section summing to {head_dim // 2}, got {mrope_section}")
        component = np.repeat(np.arange(3), mrope_section)  # [D/2]: which position each frequency reads
        f = positions.astype(jnp.float32)[..., component] * inv
    else:
        f = positions.astype(jnp.float32)[..., None] * inv
    emb = jnp.concatenate([f, f], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
    """x [B, L, H, D]; rotate-half (non-interleaved) RoPE; result in x's dtype."""
    d = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., d:], x[..., :d]], axis=-1)
    c, s = cos[:, :, None].astype(x.dtype), sin[:, :, None].astype(x.dtype)
    return x * c + rot * s


class Qwen2Layer(nnx.Module):
    """One decoder layer (einsum layouts): ln1, ln2 [C]; q_w [C, Hq, D], q_b [Hq, D]; k_w, v_w
    [C, Hk, D], k_b, v_b [Hk, D]; o_w [Hq, D, C]; gate_w, up_w [C, F]; down_w [F, C] (on CPU in
    bf16 the MLP matrices may be held transposed: `stack.OutIn`)."""

    def __init__(self, cfg: Qwen2Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        c, f, hq, hk, d = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.ln1 = param(rngs, (c,), (None,), "ones")
        self.ln2 = param(rngs, (c,), (None,), "ones")
        self.q_w = param(rngs, (c, hq, d), (None, "heads", None))
        self.q_b = param(rngs, (hq, d), ("heads", None))
        self.k_w = param(rngs, (c, hk, d), (None, "kv_heads", None))
        self.k_b = param(rngs, (hk, d), ("kv_heads", None))
        self.v_w = param(rngs, (c, hk, d), (None, "kv_heads", None))
        self.v_b = param(rngs, (hk, d), ("kv_heads", None))
        self.o_w = param(rngs, (hq, d, c), ("heads", None, None))
        self.gate_w = param(rngs, (c, f), (None, "mlp"))
        self.up_w = param(rngs, (c, f), (None, "mlp"))
        self.down_w = param(rngs, (f, c), ("mlp", None))

    def __call__(self, h, cos, sin, key_valid, causal: bool = True, block: int | None = None):
        """The layer over a whole sequence. h [B, L, C]; cos, sin [B, L, D]; key_valid bool
        [B, L]. → (h, k, v, q): k, v [B, L, Hk, D] to cache (k after RoPE), q [B, L, Hq, D]."""
        x = rms_norm(h, self.ln1[...], self.cfg.rms_norm_eps)
        q, k, v = self.qkv(x, cos, sin)
        if causal:
            o = causal_attention(q, k, v, key_valid, block=block)
        else:
            o = attention(q, k, v, key_valid)
        h = h + self.out_proj(o)
        h = h + self.mlp(rms_norm(h, self.ln2[...], self.cfg.rms_norm_eps))
        return h, k, v, q

    def decode(self, h, cos, sin, cache_k, cache_v, key_valid, index):
        """One new token with a static-length cache. h [B, 1, C]; cache_k/v [B, Lc, Hk, D];
        key_valid bool [B, Lc] (the new slot included); index: int32 slot to write.
        → (h, cache_k, cache_v)."""
        x = rms_norm(h, self.ln1[...], self.cfg.rms_norm_eps)
        q, k, v = self.qkv(x, cos, sin)
        cache_k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), (0, index, 0, 0))
        cache_v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), (0, index, 0, 0))
        o = attention(q, cache_k, cache_v, key_valid)
        h = h + self.out_proj(o)
        h = h + self.mlp(rms_norm(h, self.ln2[...], self.cfg.rms_norm_eps))
        return h, cache_k, cache_v

    def qkv(self, h, cos, sin):
        """h [B, L, C] (already normed) → q [B,L,Hq,D], k [B,L,Hk,D] (both rotated), v."""
        q = constrain(dense("blc,chd->blhd", h, self.q_w[...], self.q_b[...]), None, None, "heads", None)
        k = constrain(dense("blc,chd->blhd", h, self.k_w[...], self.k_b[...]), None, None, "kv_heads", None)
        v = constrain(dense("blc,chd->blhd", h, self.v_w[...], self.v_b[...]), None, None, "kv_heads", None)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def out_proj(self, o):
        """o [B, L, H, D] → [B, L, C]. The heads are flattened into one contracted axis: the same
        sum, which XLA:CPU runs as a plain 2-D product, faster than contracting two axes
        (measured: docs/cpu-forms.md#bf16-products-as-one-2-d-matmul)."""
        w = self.o_w[...]
        return dense("blk,kc->blc", o.reshape(o.shape[:2] + (-1,)), w.reshape((-1, w.shape[-1])))

    def mlp(self, h):
        """SwiGLU. h [..., C] → [..., C]."""
        g = dense("...c,cm->...m", h, self.gate_w.get_value(), act=jax.nn.silu) * dense(
            "...c,cm->...m", h, self.up_w.get_value())
        g = constrain(g, None, None, "mlp")
        return dense("...m,mc->...c", g, self.down_w.get_value())


class Qwen2(nnx.Module):
    """Token embedding embed [V, C], final norm [C], the head lm_head [V, C] (absent when tied
    to the embedding), and `num_layers` layers stacked on a leading axis (`layers`)."""

    def __init__(self, cfg: Qwen2Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        c, v = cfg.hidden_size, cfg.vocab_size
        self.embed = param(rngs, (v, c), (None, None))
        self.norm = param(rngs, (c,), (None,), "ones")
        if not cfg.tie_word_embeddings:
            self.lm_head = param(rngs, (v, c), ("vocab", None))
        self.layers = stacked(lambda r: Qwen2Layer(cfg, rngs=r), cfg.num_layers, rngs)

    def embed_tokens(self, ids):
        """Rows `ids` (int, any shape) of the embedding table [V, C] → [*ids.shape, C]. The
        table may be held as its uint16 bits (`stack.pack`, bf16 on CPU with an untied head):
        XLA:CPU converts a whole bf16 table to f32 to gather from it (on every prefill and
        decode loop), never a uint16 one (measured: docs/cpu-forms.md#embedding-table-as-bits)."""
        return stack.unbits(self.embed[...][ids])

    def layer(self, index) -> Qwen2Layer:
        """Layer `index` (int; or a traced int32 unless held per layer) as a module of its own."""
        return stack.layer(self.layers, index)

    def rope(self, positions):
        """cos, sin fp32 [B, L, D] for positions int [B, L], or [B, L, 3] with multimodal RoPE."""
        cfg = self.cfg
        return rope_tables(positions, cfg.head_dim, cfg.rope_theta, cfg.mrope_section)

    def run_layers(self, h, positions, key_valid, start: int, stop: int, block: int | None = None):
        """Causal prefill of layers [start, stop). h [B,L,C]; positions int [B, L] (RoPE ids; [B, L, 3]
        with multimodal RoPE); key_valid bool [B, L]. → (h, ks, vs) with ks [n, B, L, Hk, D]."""
        cfg = self.cfg
        cos, sin = self.rope(positions)

        def step(h, lay, _):
            h, k, v, _ = lay(h, cos, sin, key_valid, block=block)
            return h, (k, v)

        b, L = h.shape[:2]
        if stop <= start:
            empty = jnp.zeros((0, b, L, cfg.num_kv_heads, cfg.head_dim), h.dtype)
            return h, empty, empty
        h, (ks, vs) = stack.scan(step, h, self.layers, start, stop)
        return h, ks, vs

    def decode_layers(self, h, position, cache_k, cache_v, key_valid, index, start: int = 0):
        """One token through layers [start, start + n), with a static-length cache.

        h [B, 1, C]; position int [B] (RoPE id of the new token); cache_k/v [n, B, Lc, Hk, D];
        key_valid bool [B, Lc] (before writing); index: int32 scalar slot to write.
        → (h, cache_k, cache_v, key_valid).
        """
        cos, sin = self.rope(position[:, None])
        key_valid = jax.lax.dynamic_update_slice(key_valid, jnp.ones((h.shape[0], 1), bool), (0, index))

        def step(h, lay, xs):
            h, ck, cv = lay.decode(h, cos, sin, *xs, key_valid, index)
            return h, (ck, cv)

        h, (cache_k, cache_v) = stack.scan(step, h, self.layers, start, start + cache_k.shape[0], (cache_k, cache_v))
        return h, cache_k, cache_v, key_valid

    def logits(self, h):
        """Final norm and head. h [..., C] → fp32 logits [..., V] (tied head reuses the embedding)."""
        x = rms_norm(h, self.norm[...], self.cfg.rms_norm_eps)
        head = self.embed[...] if self.cfg.tie_word_embeddings else self.lm_head[...]
        rows = math.prod(x.shape[:-1])
        if x.dtype == jnp.float32 and 1 < rows <= FEW_ROWS and jax.default_backend() == "cpu":
            # a batched decode step's few rows: XLA:CPU's fp32 product with the head [V, C] runs
            # 20x slower for 2-16 rows than one row (0.5B's head, 4 rows: 318 ms, 4 one-row
            # products 4 x 13.5 ms), so one row at a time
            flat = x.reshape(rows, 1, x.shape[-1])
            y = jax.lax.map(lambda r: dense("...c,vc->...v", r, head, out_dtype=jnp.float32), flat)
            return y.reshape(x.shape[:-1] + (head.shape[0],))
        return dense("...c,vc->...v", x, head, out_dtype=jnp.float32)
