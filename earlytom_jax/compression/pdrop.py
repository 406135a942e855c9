"""PyramidDrop (a baseline inside the LLM; Xing et al., CVPR 2025): the LLM runs in stages; at
each stage layer K_i the visual tokens are ranked by the attention the last prompt token pays
them and the least attended are dropped, keeping int(N · λ^i) of the N visual slots that entered
the LLM, for all later layers. All frames and all tokens reach the LLM (hooks 1 and 2 are the
full model's); the visual span is the N = T0·196 tokens and the newline (LLaVA-Video: every grid
newline too; Qwen2.5-VL: the T·S merged tokens).

As the official code (Cooperx521/PyramidDrop, `llava/model/modeling_llama_pdrop.py`,
`pdrop_forward` and `pdrop_rank_drop`; docs/baselines/pdrop.md):
- the signal of stage i is layer K_i's own attention (its input norm, q/k projections and RoPE
  applied to the unpruned sequence, causal softmax over every key), the last prompt token's row,
  mean over heads, read on the visual span (`llm_signal_layer` "at");
- the kept tokens keep their order; the sequence after a drop is renumbered (contiguous RoPE
  ids), and a decoded token's id in the layers of stage i is shifted back by the tokens dropped
  so far (`llm_renumber`). Qwen2.5-VL's 3-D ids are not renumbered (the official code is
  LLaMA-only).

Budget convention (the one place it is set): `--ratio r` is the per-stage retention λ = r
(r = 0.5 is the official setting); the default stage layers are the official (8, 16, 24) of 32
layers as quarters of the depth: round(depth · j / 4), j = 1, 2, 3 (24 layers: 6, 12, 18;
28 layers: 7, 14, 21).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from earlytom_jax.compression.base import NoHooks
from earlytom_jax.compression.llm_merge import keep_mask
from earlytom_jax.compression.registration import register
from earlytom_jax.errors import ConfigError

OFFICIAL_LAMBDA = 0.5
OFFICIAL_LAYERS, OFFICIAL_DEPTH = (8, 16, 24), 32


def default_layers(depth: int) -> tuple[int, ...]:
    """The official stage layers (8, 16, 24 of 32) scaled to `depth`: round(depth · K / 32)."""
    return tuple(round(depth * k / OFFICIAL_DEPTH) for k in OFFICIAL_LAYERS)


def keep_table(span0: int, lam: float, stage: int) -> np.ndarray:
    """int32 [span0 + 1]: entry N = int(N · λ^(stage+1)), the visual slots kept after `stage`
    (0-based) of N that entered the LLM (the official `int(image_tokens · ratio_list[stage+1])`)."""
    return np.array([int(n * lam ** (stage + 1)) for n in range(span0 + 1)], np.int32)


@register(name="pdrop", label="PyramidDrop", settings=("stage_layers",))
@dataclasses.dataclass(frozen=True)
class PyramidDrop(NoHooks):
    """stage_layers: K_1 < K_2 < ... (tokens are dropped before layer K_i runs; official 8, 16,
    24 of 32); lam: λ, each stage keeps λ of the previous one's share (official 0.5)."""

    families = ("llava_onevision", "llava_video", "qwen2_5_vl")
    llm_signal_layer = "at"
    llm_renumber = True

    stage_layers: tuple[int, ...] = OFFICIAL_LAYERS
    lam: float = OFFICIAL_LAMBDA
    name = "pdrop"

    def __post_init__(self):
        object.__setattr__(self, "stage_layers", tuple(int(k) for k in self.stage_layers))
        if not 0.0 < self.lam <= 1.0:
            raise ConfigError(f"PyramidDrop lambda {self.lam} is outside (0, 1]")
        ks = self.stage_layers
        if not ks or any(b <= a for a, b in zip(ks, ks[1:])) or ks[0] < 1:
            raise ConfigError(f"PyramidDrop stage layers {ks} must be increasing and at least 1")

    @classmethod
    def from_ratio(cls, ratio, cfg, stage_layers=None) -> "PyramidDrop":
        """λ = ratio; stage layers `default_layers(depth)` unless given."""
        layers = default_layers(cfg.text.num_layers) if stage_layers is None else tuple(stage_layers)
        return cls(stage_layers=layers, lam=float(ratio)).check(cfg)

    def check(self, cfg) -> "PyramidDrop":
        nl = cfg.text.num_layers
        if self.stage_layers[-1] >= nl:
            raise ConfigError(f"PyramidDrop stage layer {self.stage_layers[-1]} must be in 1..{nl - 1}")
        return self

    @property
    def llm_layers(self) -> tuple[int, ...]:
        return self.stage_layers

    def llm_stage_capacity(self, stage: int, span0: int) -> int:
        return int(keep_table(span0, self.lam, stage)[span0])

    def llm_stage_merge(self, stage, h, attn, valid, count0, span0):
        n_keep = jnp.asarray(keep_table(span0, self.lam, stage))[count0]
        return h, keep_mask(attn, valid, n_keep)
