"""The original SigLIP's `post_layernorm` and multihead attention-pooling head as a Flax NNX
module (`SiglipHead`), for FastVID's signals (compression/fastvid.py).

LLaVA-OneVision's tower drops both (LLaVA-NeXT's `SigLipVisionTower`: the last block deleted,
the head replaced by `nn.Identity`); FastVID's official LLaVA-OV code loads them again from
google/siglip-so400m-patch14-384 and runs them on the tower's output (EarlyTom b909322,
`LLaVA-NeXT/llava/model/multimodal_encoder/siglip_encoder.py` l. 888-921, the head l. 693-722).
transformers' `SiglipMultiheadAttentionPoolingHead` is the same head: a learned probe query
attends over the N patch tokens (`torch.nn.MultiheadAttention`), then a LayerNorm + MLP
residual. Its parameters live beside the model's, in `params["siglip_head"]` (the loader:
checkpoint/siglip_head.py; the table rows: checkpoint/table.py `HEAD_TABLE`).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from earlytom_jax.config import SiglipConfig
from earlytom_jax.models import params as params_lib
from earlytom_jax.models.attention import attention_colmean
from earlytom_jax.models.dense import dense
from earlytom_jax.models.params import param
from earlytom_jax.models.siglip import layer_norm

KEY = "siglip_head"  # where the head's tree sits in the parameter tree, beside "vision", "text"


class SiglipHead(nnx.Module):
    """post_s, post_b [C] (post_layernorm); probe [C]; qkv_w [C, 3, H, D], qkv_b [3, H, D]
    (the attention's in_proj: query, key, value); o_w [H, D, C], o_b [C] (out_proj); ln_s,
    ln_b [C] (the head's LayerNorm); fc1_w [C, F], fc1_b [F], fc2_w [F, C], fc2_b [C] (its MLP).
    C, H, D, F: the tower's hidden size, heads, head dim and MLP width (`SiglipConfig`)."""

    def __init__(self, cfg: SiglipConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        c, f, h, d = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.head_dim
        self.post_s = param(rngs, (c,), (None,), "ones")
        self.post_b = param(rngs, (c,), (None,))
        self.probe = param(rngs, (c,), (None,))
        self.qkv_w = param(rngs, (c, 3, h, d), (None, None, "heads", None))
        self.qkv_b = param(rngs, (3, h, d), (None, "heads", None))
        self.o_w = param(rngs, (h, d, c), ("heads", None, None))
        self.o_b = param(rngs, (c,), (None,))
        self.ln_s = param(rngs, (c,), (None,), "ones")
        self.ln_b = param(rngs, (c,), (None,))
        self.fc1_w = param(rngs, (c, f), (None, "mlp"))
        self.fc1_b = param(rngs, (f,), ("mlp",))
        self.fc2_w = param(rngs, (f, c), ("mlp", None))
        self.fc2_b = param(rngs, (c,), (None,))

    def __call__(self, x):
        """x [B, N, C]: the tower's output (no post-LayerNorm) → (pooled [B, C] in x's dtype,
        attn [B, N] fp32: the probe's attention over the N tokens, mean over heads, as
        `nn.MultiheadAttention` returns it with its default average_attn_weights=True)."""
        eps = self.cfg.layer_norm_eps
        x = layer_norm(x, self.post_s[...], self.post_b[...], eps)
        w, b = self.qkv_w[...], self.qkv_b[...]
        probe = self.probe[...].astype(x.dtype)[None, None]  # [1, 1, C]: one query, the same for every frame
        q = dense("bnc,chd->bnhd", probe, w[:, 0], b[0])
        q = jnp.broadcast_to(q, (x.shape[0],) + q.shape[1:])
        k = dense("bnc,chd->bnhd", x, w[:, 1], b[1])
        v = dense("bnc,chd->bnhd", x, w[:, 2], b[2])
        o, attn = attention_colmean(q, k, v)  # [B, 1, H, D], [B, N]
        h = dense("bnhd,hdc->bnc", o, self.o_w[...], self.o_b[...])[:, 0]  # [B, C]
        y = layer_norm(h, self.ln_s[...], self.ln_b[...], eps)
        y = dense("...c,cm->...m", y, self.fc1_w[...], self.fc1_b[...], act=partial(jax.nn.gelu, approximate=True))
        return h + dense("...m,mc->...c", y, self.fc2_w[...], self.fc2_b[...]), attn


def bind(cfg: SiglipConfig, head: dict) -> SiglipHead:
    """The head of a tower `cfg` over its parameter tree (`params["siglip_head"]`)."""
    return params_lib.bind(SiglipHead, cfg, head)


def flops(cfg: SiglipConfig, frames: int) -> int:
    """Matmul FLOPs of the head on `frames` frames of N tokens: the probe's query once, keys and
    values of every token, the probe's scores and weighted sum, out_proj and the MLP on one row."""
    n, c, f = cfg.num_patches, cfg.hidden_size, cfg.intermediate_size
    return 2 * c * c + frames * (4 * n * c * c + 4 * n * c + 2 * c * c + 4 * c * f)
