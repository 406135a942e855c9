"""Qwen2 decoder: GQA with q/k/v bias, RoPE (rotate-half), RMSNorm, SwiGLU. Its parameters are
declared as Flax NNX modules (`Qwen2Layer`, `Qwen2`), its computation is pure functions of
(params, inputs) over their state (models/params.py).

Layers are stacked on a leading axis and run with `lax.scan` (`models.stack.scan`; on CPU in
bf16 the stack is held per layer and the loop unrolled, see models/stack.py). Prefill runs
any layer range [start, stop) over a sequence with a key-validity mask (padding slots are
never attended) and explicit position ids (gaps allowed, as EarlyTom's in-LLM merge leaves
them); it returns the keys (after RoPE) and values to cache. A decode step writes one slot of a static-length cache
at a traced index, so it compiles once per cache length.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from earlytom_jax.config import Qwen2Config
from earlytom_jax.models import stack
from earlytom_jax.models.params import param, stacked
from earlytom_jax.models.attention import attention, causal_attention
from earlytom_jax.models.dense import dense
from earlytom_jax.sharding import constrain


def rms_norm(x, w, eps):
    """HF Qwen2RMSNorm: normalise in fp32, cast back, then times weight."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + eps)
    return w * y.astype(x.dtype)


def embed(table, ids):
    """Rows `ids` (int, any shape) of the embedding table [V, C] → [*ids.shape, C]. The table
    may be held as its uint16 bits (`stack.pack`, bf16 on CPU with an untied head): XLA:CPU
    converts a whole bf16 table to f32 to gather from it (on every prefill and decode loop),
    never a uint16 one (measured: docs/cpu-forms.md#embedding-table-as-bits)."""
    return stack.unbits(table[ids])


def rope_tables(positions, head_dim: int, theta: float):
    """positions int [B, L] → cos, sin fp32 [B, L, D] (HF default rope, halves duplicated)."""
    inv = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    f = positions.astype(jnp.float32)[..., None] * inv
    emb = jnp.concatenate([f, f], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
    """x [B, L, H, D]; rotate-half (non-interleaved) RoPE; result in x's dtype."""
    d = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., d:], x[..., :d]], axis=-1)
    c, s = cos[:, :, None].astype(x.dtype), sin[:, :, None].astype(x.dtype)
    return x * c + rot * s


def qkv(p, h, cos, sin):
    """h [B, L, C] (already normed) → q [B,L,Hq,D], k [B,L,Hk,D] (both rotated), v."""
    q = constrain(dense("blc,chd->blhd", h, p["q_w"], p["q_b"]), None, None, "heads", None)
    k = constrain(dense("blc,chd->blhd", h, p["k_w"], p["k_b"]), None, None, "kv_heads", None)
    v = constrain(dense("blc,chd->blhd", h, p["v_w"], p["v_b"]), None, None, "kv_heads", None)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def out_proj(p, o):
    """o [B, L, H, D] → [B, L, C]. The heads are flattened into one contracted axis: the same
    sum, which XLA:CPU runs as a plain 2-D product, faster than contracting two axes (measured:
    docs/cpu-forms.md#bf16-products-as-one-2-d-matmul)."""
    w = p["o_w"]
    return dense("blk,kc->blc", o.reshape(o.shape[:2] + (-1,)), w.reshape((-1, w.shape[-1])))


def mlp(p, h):
    g = dense("...c,cm->...m", h, p["gate_w"], act=jax.nn.silu) * dense("...c,cm->...m", h, p["up_w"])
    g = constrain(g, None, None, "mlp")
    return dense("...m,mc->...c", g, p["down_w"])


def layer_prefill(p, h, cos, sin, key_valid, cfg: Qwen2Config, causal: bool = True, block: int = 128):
    """One decoder layer over a whole sequence. → (h, k, v, q)."""
    x = rms_norm(h, p["ln1"], cfg.rms_norm_eps)
    q, k, v = qkv(p, x, cos, sin)
    if causal:
        o = causal_attention(q, k, v, key_valid, block=block)
    else:
        o = attention(q, k, v, jnp.broadcast_to(key_valid[:, None, :], (h.shape[0], h.shape[1], h.shape[1])))
    h = h + out_proj(p, o)
    h = h + mlp(p, rms_norm(h, p["ln2"], cfg.rms_norm_eps))
    return h, k, v, q


def run_layers(layers, h, positions, key_valid, start: int, stop: int, cfg: Qwen2Config, block: int = 128):
    """Causal prefill of layers [start, stop). h [B,L,C]. → (h, ks, vs) with ks [n, B, L, Hk, D]."""
    cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta)

    def step(h, p, _):
        h, k, v, _ = layer_prefill(p, h, cos, sin, key_valid, cfg, block=block)
        return h, (k, v)

    b, L = h.shape[:2]
    if stop <= start:
        empty = jnp.zeros((0, b, L, cfg.num_kv_heads, cfg.head_dim), h.dtype)
        return h, empty, empty
    h, (ks, vs) = stack.scan(step, h, layers, start, stop)
    return h, ks, vs


def decode_layers(layers, h, position, cache_k, cache_v, key_valid, index, cfg: Qwen2Config, start: int = 0):
    """One token through layers [start, start + n) of the stack `layers`, with a static-length
    cache.

    h [B, 1, C]; position int [B] (RoPE id of the new token); cache_k/v [n, B, Lc, Hk, D];
    key_valid bool [B, Lc] (before writing); index: int32 scalar slot to write.
    → (h, cache_k, cache_v, key_valid).
    """
    cos, sin = rope_tables(position[:, None], cfg.head_dim, cfg.rope_theta)
    key_valid = jax.lax.dynamic_update_slice(key_valid, jnp.ones((h.shape[0], 1), bool), (0, index))

    def step(h, p, xs):
        ck, cv = xs
        x = rms_norm(h, p["ln1"], cfg.rms_norm_eps)
        q, k, v = qkv(p, x, cos, sin)
        ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, index, 0, 0))
        cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, index, 0, 0))
        o = attention(q, ck, cv, key_valid[:, None, :])
        h = h + out_proj(p, o)
        h = h + mlp(p, rms_norm(h, p["ln2"], cfg.rms_norm_eps))
        return h, (ck, cv)

    h, (cache_k, cache_v) = stack.scan(step, h, layers, start, start + cache_k.shape[0], (cache_k, cache_v))
    return h, cache_k, cache_v, key_valid


def logits(params, h, cfg: Qwen2Config):
    """Final norm and head. h [..., C] → fp32 logits [..., V] (tied head reuses the embedding)."""
    x = rms_norm(h, params["norm"], cfg.rms_norm_eps)
    head = params["embed"] if cfg.tie_word_embeddings else params["lm_head"]
    return dense("...c,vc->...v", x, head, out_dtype=jnp.float32)


# ----------------------------------------------------------------------------- parameters


class Qwen2Layer(nnx.Module):
    """One decoder layer's parameters (einsum layouts): ln1, ln2 [C]; q_w [C, Hq, D], q_b
    [Hq, D]; k_w, v_w [C, Hk, D], k_b, v_b [Hk, D]; o_w [Hq, D, C]; gate_w, up_w [C, F];
    down_w [F, C]."""

    def __init__(self, cfg: Qwen2Config, *, rngs: nnx.Rngs):
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


class Qwen2(nnx.Module):
    """Token embedding embed [V, C], final norm [C], the head lm_head [V, C] (absent when tied
    to the embedding), and `num_layers` layers stacked on a leading axis (`layers`)."""

    def __init__(self, cfg: Qwen2Config, *, rngs: nnx.Rngs):
        c, v = cfg.hidden_size, cfg.vocab_size
        self.embed = param(rngs, (v, c), (None, None))
        self.norm = param(rngs, (c,), (None,), "ones")
        if not cfg.tie_word_embeddings:
            self.lm_head = param(rngs, (v, c), ("vocab", None))
        self.layers = stacked(lambda r: Qwen2Layer(cfg, rngs=r), cfg.num_layers, rngs)
