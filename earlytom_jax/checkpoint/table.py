"""The one table from checkpoint tensors to the model's parameters.

Each row names a parameter of the family's model (`models.llava_onevision.LlavaOneVision`,
`models.qwen2_5_vl.Qwen25VL`: `TABLES[cfg.family]`; its path in the state,
e.g. ("text", "layers", "q_w")), the tensor it comes from under its canonical checkpoint name
(`hf.canonical_name` reduces every supported layout to these; `{i}` stands for the layer of
a stacked parameter) and the `Layout` that turns the checkpoint's torch layout into ours. Shapes
are the module's: a row adds none of its own. Loading (`hf.iter_params`), conversion and its
checks (orbax_io), export back to HF (export.py) and the PyTorch reference's weights
(bench_torch) read this table; sharding reads the modules' logical axes (models/params.py).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np

from earlytom_jax.config import ModelConfig
from earlytom_jax.models import family
from earlytom_jax.models import params as model_params


@dataclasses.dataclass(frozen=True)
class Layout:
    """A pure re-indexing between a checkpoint tensor (torch layout) and ours, for one layer:
    to_ours(x, our_shape), to_source(y) and source_shape(our_shape)."""

    name: str
    to_ours: Callable[[np.ndarray, tuple[int, ...]], np.ndarray]
    to_source: Callable[[np.ndarray], np.ndarray]
    source_shape: Callable[[tuple[int, ...]], tuple[int, ...]]


def _side(k: int) -> int:
    return math.isqrt(k // 3)


SAME = Layout("same", lambda x, s: x, lambda y: y, lambda s: s)
# torch Linear weight [out, in] → [in, out]
LINEAR = Layout("linear", lambda x, s: x.T, lambda y: y.T, lambda s: (s[1], s[0]))
# q/k/v weight [H·D, C] → [C, H, D]
HEADS_IN = Layout("heads_in", lambda x, s: x.T.reshape(s), lambda y: y.reshape(y.shape[0], -1).T,
                  lambda s: (s[1] * s[2], s[0]))
# q/k/v bias [H·D] → [H, D]
HEADS_BIAS = Layout("heads_bias", lambda x, s: x.reshape(s), lambda y: y.reshape(-1), lambda s: (s[0] * s[1],))
# output projection weight [C, H·D] → [H, D, C]
HEADS_OUT = Layout("heads_out", lambda x, s: x.T.reshape(s), lambda y: y.reshape(-1, y.shape[-1]).T,
                   lambda s: (s[2], s[0] * s[1]))
# patch embedding conv kernel [C, 3, p, p] → [3·p·p, C]
PATCH = Layout("patch", lambda x, s: x.reshape(x.shape[0], -1).T,
               lambda y: y.T.reshape(y.shape[1], 3, _side(y.shape[0]), _side(y.shape[0])),
               lambda s: (s[1], 3, _side(s[0]), _side(s[0])))

# Conv3d kernel [C, 3, tp, p, p] → [3, tp, p, p, C]
PATCH3D = Layout("patch3d", lambda x, s: np.moveaxis(x, 0, -1), lambda y: np.moveaxis(y, -1, 0),
                 lambda s: (s[-1],) + tuple(s[:-1]))
# fused q/k/v weight [3·H·D, C] → [C, 3, H, D], its bias [3·H·D] → [3, H, D]
QKV_IN = Layout("qkv_in", lambda x, s: x.T.reshape(s), lambda y: y.reshape(y.shape[0], -1).T,
                lambda s: (s[1] * s[2] * s[3], s[0]))
QKV_BIAS = Layout("qkv_bias", lambda x, s: x.reshape(s), lambda y: y.reshape(-1), lambda s: (s[0] * s[1] * s[2],))

_VB = "vision.encoder.layers.{i}."
_TB = "text.layers.{i}."
_QB = "vision.blocks.{i}."

# the LLM's rows, shared by both families
_TEXT: dict[tuple[str, ...], tuple[str, Layout]] = {
    ("text", "embed"): ("text.embed_tokens.weight", SAME),
    ("text", "norm"): ("text.norm.weight", SAME),
    ("text", "lm_head"): ("lm_head.weight", SAME),
    ("text", "layers", "ln1"): (_TB + "input_layernorm.weight", SAME),
    ("text", "layers", "ln2"): (_TB + "post_attention_layernorm.weight", SAME),
    ("text", "layers", "q_w"): (_TB + "self_attn.q_proj.weight", HEADS_IN),
    ("text", "layers", "k_w"): (_TB + "self_attn.k_proj.weight", HEADS_IN),
    ("text", "layers", "v_w"): (_TB + "self_attn.v_proj.weight", HEADS_IN),
    ("text", "layers", "q_b"): (_TB + "self_attn.q_proj.bias", HEADS_BIAS),
    ("text", "layers", "k_b"): (_TB + "self_attn.k_proj.bias", HEADS_BIAS),
    ("text", "layers", "v_b"): (_TB + "self_attn.v_proj.bias", HEADS_BIAS),
    ("text", "layers", "o_w"): (_TB + "self_attn.o_proj.weight", HEADS_OUT),
    ("text", "layers", "gate_w"): (_TB + "mlp.gate_proj.weight", LINEAR),
    ("text", "layers", "up_w"): (_TB + "mlp.up_proj.weight", LINEAR),
    ("text", "layers", "down_w"): (_TB + "mlp.down_proj.weight", LINEAR),
}

# parameter path → (canonical checkpoint name, layout)
TABLE: dict[tuple[str, ...], tuple[str, Layout]] = {
    ("vision", "patch_w"): ("vision.embeddings.patch_embedding.weight", PATCH),
    ("vision", "patch_b"): ("vision.embeddings.patch_embedding.bias", SAME),
    ("vision", "pos"): ("vision.embeddings.position_embedding.weight", SAME),
    ("vision", "blocks", "ln1_s"): (_VB + "layer_norm1.weight", SAME),
    ("vision", "blocks", "ln1_b"): (_VB + "layer_norm1.bias", SAME),
    ("vision", "blocks", "ln2_s"): (_VB + "layer_norm2.weight", SAME),
    ("vision", "blocks", "ln2_b"): (_VB + "layer_norm2.bias", SAME),
    ("vision", "blocks", "q_w"): (_VB + "self_attn.q_proj.weight", HEADS_IN),
    ("vision", "blocks", "k_w"): (_VB + "self_attn.k_proj.weight", HEADS_IN),
    ("vision", "blocks", "v_w"): (_VB + "self_attn.v_proj.weight", HEADS_IN),
    ("vision", "blocks", "q_b"): (_VB + "self_attn.q_proj.bias", HEADS_BIAS),
    ("vision", "blocks", "k_b"): (_VB + "self_attn.k_proj.bias", HEADS_BIAS),
    ("vision", "blocks", "v_b"): (_VB + "self_attn.v_proj.bias", HEADS_BIAS),
    ("vision", "blocks", "o_w"): (_VB + "self_attn.out_proj.weight", HEADS_OUT),
    ("vision", "blocks", "o_b"): (_VB + "self_attn.out_proj.bias", SAME),
    ("vision", "blocks", "fc1_w"): (_VB + "mlp.fc1.weight", LINEAR),
    ("vision", "blocks", "fc1_b"): (_VB + "mlp.fc1.bias", SAME),
    ("vision", "blocks", "fc2_w"): (_VB + "mlp.fc2.weight", LINEAR),
    ("vision", "blocks", "fc2_b"): (_VB + "mlp.fc2.bias", SAME),
    ("projector", "w1"): ("projector.1.weight", LINEAR),
    ("projector", "b1"): ("projector.1.bias", SAME),
    ("projector", "w2"): ("projector.2.weight", LINEAR),
    ("projector", "b2"): ("projector.2.bias", SAME),
    ("newline",): ("newline", SAME),
    **_TEXT,
}


QWEN_TABLE: dict[tuple[str, ...], tuple[str, Layout]] = {
    ("vision", "patch_w"): ("vision.patch_embed.proj.weight", PATCH3D),
    ("vision", "blocks", "ln1"): (_QB + "norm1.weight", SAME),
    ("vision", "blocks", "ln2"): (_QB + "norm2.weight", SAME),
    ("vision", "blocks", "qkv_w"): (_QB + "attn.qkv.weight", QKV_IN),
    ("vision", "blocks", "qkv_b"): (_QB + "attn.qkv.bias", QKV_BIAS),
    ("vision", "blocks", "o_w"): (_QB + "attn.proj.weight", HEADS_OUT),
    ("vision", "blocks", "o_b"): (_QB + "attn.proj.bias", SAME),
    **{("vision", "blocks", f"{n}_w"): (_QB + f"mlp.{n}_proj.weight", LINEAR) for n in ("gate", "up", "down")},
    **{("vision", "blocks", f"{n}_b"): (_QB + f"mlp.{n}_proj.bias", SAME) for n in ("gate", "up", "down")},
    ("vision", "merger", "ln"): ("vision.merger.ln_q.weight", SAME),
    ("vision", "merger", "w1"): ("vision.merger.mlp.0.weight", LINEAR),
    ("vision", "merger", "b1"): ("vision.merger.mlp.0.bias", SAME),
    ("vision", "merger", "w2"): ("vision.merger.mlp.2.weight", LINEAR),
    ("vision", "merger", "b2"): ("vision.merger.mlp.2.bias", SAME),
    **_TEXT,
}

TABLES = {"llava_onevision": TABLE, "llava_video": TABLE, "qwen2_5_vl": QWEN_TABLE}  # LLaVA-Video: OV's tensors

# the probe [1, 1, C] → [C]
PROBE = Layout("probe", lambda x, s: x.reshape(s), lambda y: y.reshape(1, 1, -1), lambda s: (1, 1, s[0]))
_HB = "vision.head."

# the original SigLIP's post-LayerNorm and attention-pooling head (`models.siglip_head.SiglipHead`,
# params["siglip_head"]), from a second checkpoint: FastVID's signals (checkpoint/siglip_head.py)
HEAD_TABLE: dict[tuple[str, ...], tuple[str, Layout]] = {
    ("post_s",): ("vision.post_layernorm.weight", SAME),
    ("post_b",): ("vision.post_layernorm.bias", SAME),
    ("probe",): (_HB + "probe", PROBE),
    ("qkv_w",): (_HB + "attention.in_proj_weight", QKV_IN),
    ("qkv_b",): (_HB + "attention.in_proj_bias", QKV_BIAS),
    ("o_w",): (_HB + "attention.out_proj.weight", HEADS_OUT),
    ("o_b",): (_HB + "attention.out_proj.bias", SAME),
    ("ln_s",): (_HB + "layernorm.weight", SAME),
    ("ln_b",): (_HB + "layernorm.bias", SAME),
    ("fc1_w",): (_HB + "mlp.fc1.weight", LINEAR),
    ("fc1_b",): (_HB + "mlp.fc1.bias", SAME),
    ("fc2_w",): (_HB + "mlp.fc2.weight", LINEAR),
    ("fc2_b",): (_HB + "mlp.fc2.bias", SAME),
}


@dataclasses.dataclass(frozen=True)
class Row:
    """One parameter of a model `cfg`: its path, the checkpoint tensor(s) it comes from, the
    layout between them, and the shapes on both sides (per layer for a stack of `layers`)."""

    path: tuple[str, ...]
    source: str  # canonical checkpoint name; "{i}" marks a per-layer tensor
    layout: Layout
    shape: tuple[int, ...]  # ours, one layer
    layers: int = 0  # > 0: stacked over this many layers

    @property
    def source_shape(self) -> tuple[int, ...]:
        return tuple(self.layout.source_shape(self.shape))

    def sources(self) -> list[str]:
        """The canonical checkpoint names this parameter is read from, layer by layer."""
        return [self.source.format(i=i) for i in range(self.layers)] if self.layers else [self.source]

    def to_ours(self, x) -> np.ndarray:
        """One checkpoint tensor (one layer's) → our layout."""
        return self.layout.to_ours(x, self.shape)

    def to_source(self, y) -> np.ndarray:
        """One layer of our parameter → the checkpoint's layout."""
        return self.layout.to_source(y)


def shapes(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{path: shape} of every parameter of the model `cfg` (the module's), in loader order."""
    return model_params.shapes(family.module(cfg), cfg)


def head_rows(vcfg) -> list[Row]:
    """A `Row` for every parameter of the SigLIP head of a tower `vcfg` (`SiglipConfig`), in
    the module's order (`HEAD_TABLE`)."""
    from earlytom_jax.models.siglip_head import SiglipHead

    return [Row(path, *HEAD_TABLE[path], shape) for path, shape in model_params.shapes(SiglipHead, vcfg).items()]


def rows(cfg: ModelConfig) -> list[Row]:
    """A `Row` for every parameter of the model `cfg`, in the module's order. A parameter
    without a row of its family's table is a bug: ValueError."""
    out = []
    table = TABLES[cfg.family]
    for path, shape in shapes(cfg).items():
        if path not in table:
            raise ValueError(f"parameter {'/'.join(path)} has no row in checkpoint.table.TABLES[{cfg.family!r}]")
        source, layout = table[path]
        stacked = "{i}" in source  # then the module's shape leads with the layer axis
        out.append(Row(path, source, layout, shape[1:] if stacked else shape, shape[0] if stacked else 0))
    return out
