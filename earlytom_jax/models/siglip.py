"""SigLIP vision encoder (pre-LN ViT, no CLS) as Flax NNX modules: `SiglipBlock` (one block)
and `SiglipEncoder` (patch embedding and the blocks).

Blocks are stacked on a leading layer axis (models/params.py) and run with `lax.scan`, so any
range of blocks [start, stop) is one compiled loop; a compression hook sits between two ranges
and asks the block before it for its attention (mean over heads and queries).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from earlytom_jax.config import SiglipConfig
from earlytom_jax.models import stack
from earlytom_jax.models.attention import attention, attention_colmean
from earlytom_jax.models.axes import constrain
from earlytom_jax.models.dense import dense
from earlytom_jax.models.params import param, stacked


def layer_norm(x, scale, bias, eps):
    xf = x.astype(jnp.float32)
    mu = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mu).mean(-1, keepdims=True)
    y = (xf - mu) * jax.lax.rsqrt(var + eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


class SiglipBlock(nnx.Module):
    """One encoder block (einsum layouts): ln1_s, ln1_b [C]; q_w, k_w, v_w [C, H, D]; q_b, k_b,
    v_b [H, D]; o_w [H, D, C]; o_b [C]; ln2_s, ln2_b [C]; fc1_w [C, F]; fc1_b [F]; fc2_w [F, C];
    fc2_b [C]."""

    def __init__(self, cfg: SiglipConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        c, f, h, d = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.head_dim
        self.ln1_s = param(rngs, (c,), (None,), "ones")
        self.ln1_b = param(rngs, (c,), (None,))
        for n in "qkv":
            setattr(self, f"{n}_w", param(rngs, (c, h, d), (None, "heads", None)))
            setattr(self, f"{n}_b", param(rngs, (h, d), ("heads", None)))
        self.o_w = param(rngs, (h, d, c), ("heads", None, None))
        self.o_b = param(rngs, (c,), (None,))
        self.ln2_s = param(rngs, (c,), (None,), "ones")
        self.ln2_b = param(rngs, (c,), (None,))
        self.fc1_w = param(rngs, (c, f), (None, "mlp"))
        self.fc1_b = param(rngs, (f,), ("mlp",))
        self.fc2_w = param(rngs, (f, c), ("mlp", None))
        self.fc2_b = param(rngs, (c,), (None,))

    def __call__(self, x, with_attention: bool = False, with_keys: bool = False):
        """x [B, N, C] → (x, colmean [B, N] fp32 or None), and with_keys also the keys averaged
        over heads [B, N, D] fp32 (VisionZip's similarity metric).

        bf16 on CPU without a mesh: run as a loop over the B frames, because XLA:CPU's products
        slow down as a block's [B·N, 4304] operands outgrow the caches; the loop also makes each
        frame's result independent of how many frames share the batch, where batched products
        split their sums differently (measured: docs/cpu-forms.md#siglip-blocks-frame-by-frame).
        """
        if not stack.frame_by_frame(x):
            return self.batched(x, with_attention, with_keys)

        def one(xb):  # bf16 through the loop as bits (stack.bits: no f32 copies around it)
            out = self.batched(stack.unbits(xb)[None], with_attention, with_keys)
            return (stack.bits(out[0][0]),) + tuple(None if a is None else a[0] for a in out[1:])

        out = jax.lax.map(one, stack.bits(x))
        return (stack.unbits(out[0]),) + tuple(out[1:])

    def batched(self, x, with_attention: bool = False, with_keys: bool = False):
        """The block on all B frames at once (what `__call__` runs but for bf16 on CPU)."""
        x, colmean, k = self.attention_half(x, with_attention)
        x = self.mlp_half(x)
        if with_keys:
            return x, colmean, k.astype(jnp.float32).mean(axis=2)
        return x, colmean

    def attention_half(self, x, with_attention: bool = False, key_bias=None):
        """The block up to its attention residual. x [B, N, C] → (x, colmean [B, N] fp32 or None,
        keys [B, N, Hk, D]); key_bias [B, N] is added to every query's score for that key."""
        x = constrain(x, "frames", None, None)
        h = layer_norm(x, self.ln1_s[...], self.ln1_b[...], self.cfg.layer_norm_eps)
        q, k, v = (
            constrain(dense("bnc,chd->bnhd", h, getattr(self, f"{n}_w")[...], getattr(self, f"{n}_b")[...]),
                      "frames", None, "heads", None)
            for n in "qkv"
        )
        if with_attention:
            o, colmean = attention_colmean(q, k, v)
        else:
            o, colmean = attention(q, k, v, bias=key_bias), None
        return x + dense("bnhd,hdc->bnc", o, self.o_w[...], self.o_b[...]), colmean, k

    def mlp_half(self, x):
        """The block's MLP residual. x [B, N, C] → [B, N, C]."""
        h = layer_norm(x, self.ln2_s[...], self.ln2_b[...], self.cfg.layer_norm_eps)
        h = dense("...c,cm->...m", h, self.fc1_w[...], self.fc1_b[...], act=partial(jax.nn.gelu, approximate=True))
        h = constrain(h, "frames", None, "mlp")
        return x + dense("...m,mc->...c", h, self.fc2_w[...], self.fc2_b[...])


class SiglipEncoder(nnx.Module):
    """Patch embedding patch_w [3·p·p, C], patch_b [C], position embedding pos [N, C], and
    `num_layers` blocks stacked on a leading axis (`blocks`: each `SiglipBlock` parameter with
    a leading [L])."""

    def __init__(self, cfg: SiglipConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        c, p = cfg.hidden_size, cfg.patch_size
        self.patch_w = param(rngs, (3 * p * p, c), (None, None))
        self.patch_b = param(rngs, (c,), (None,))
        self.pos = param(rngs, (cfg.num_patches, c), (None, None))
        self.blocks = stacked(lambda r: SiglipBlock(cfg, rngs=r), cfg.num_layers, rngs)

    def __call__(self, pixels):
        """All `num_layers` blocks, no post-LayerNorm (LLaVA's feature). [B,3,S,S] → [B, N, C]."""
        return self.run_blocks(self.embed(pixels), 0, self.cfg.num_layers)

    def embed(self, pixels):
        """pixels [B, 3, S, S] (normalised) → patch tokens plus position embedding [B, N, C]."""
        b = pixels.shape[0]
        g, p = self.cfg.grid, self.cfg.patch_size
        w = self.patch_w[...]
        x = pixels[:, :, : g * p, : g * p].astype(w.dtype)
        x = x.reshape(b, 3, g, p, g, p).transpose(0, 2, 4, 1, 3, 5).reshape(b, g * g, 3 * p * p)
        x = dense("bnk,kc->bnc", x, w, self.patch_b[...])
        return x + self.pos[...][None]

    def block(self, index) -> SiglipBlock:
        """Block `index` (int, or a traced int32) as a module of its own."""
        return stack.layer(self.blocks, index)

    def run_blocks(self, x, start: int, stop: int):
        """Run blocks [start, stop) (static) on x [B, N, C]."""
        if stop <= start:
            return x

        def step(x, blk, _):
            return blk(x)[0], None

        x, _ = stack.scan(step, x, self.blocks, start, stop)
        return x

    def block_with_attention(self, x, index: int, with_keys: bool = False):
        """Block `index` returning (x, colmean [B, N]): attention each token receives; with_keys
        also (…, keys [B, N, D]) averaged over heads."""
        return self.block(index)(x, with_attention=True, with_keys=with_keys)
