"""DyCoke (Tao et al., CVPR 2025): temporal token merging (TTM) before the LLM, then dynamic
pruning of the visual KV entries at every decoding step. LLaVA-OneVision only.

Read from the official code, KD-TAO/DyCoke at commit dd74634 (docs/baselines/dycoke.md):

hook 2, TTM (`llava/model/llava_arch.py`, `dycole_ttm`, on the T0 · 196 pooled tokens):
  - stage 1: in each pair of frames (0, 1), (2, 3), ... the odd frame keeps the m tokens least
    cosine-similar to the same position of the even frame before it (tokens L2-normalised first);
  - stage 2: in each group of four frames i = 0, 4, ... < T0 - 4, frame i + 2 keeps the m tokens
    least similar to frame i (raw tokens);
  - m = int((1 - K) · 196) a pruned frame; the others stay whole. A pruned frame's tokens come in
    `torch.topk(largest=False)` order: ascending similarity (ties: lower index first here), not
    raster order. With T0 odd the last frame is left out (the pairs stop at T0 - 1); with
    T0 <= 4 stage 2 has no group (the official code fails there on an empty `torch.stack`; here
    stage 1 alone runs).
hook 4, decoding (`llava/model/language_model/modeling_qwen2.py`, `PrunableDynamicCache`): at
  every decode step, before layer `layer` (L) runs, the new token's attention at layer L - 1
  (softmax over the whole cache, mean over heads) to the first V - 1 visual tokens (the official
  `image_token_length` is the TTM count minus one, so the last visual token and the newline are
  never candidates) is compared (cosine) with the previous step's; when the similarity is below
  `threshold` (0.9; always at the first decode step) layers L.. attend only the
  int((V - 1) · (1 - P)) candidates of highest attention, else every visual token this step.
  The cache itself keeps everything; the prefill and the first token are untouched by it.

Budget: DyCoke's own knob. `--ratio r` is the share a pruned frame keeps, K = 1 - r (`from_ratio`,
the one place); the official LLaVA-OV setting K = 0.7 is r = 0.3. The visual tokens entering the
LLM are F · 196 + P' · int(r · 196) (F whole frames, P' pruned ones: 9 and 23 of 32 frames), not
r · T0 · 196: 9 whole frames are 28% of 32, so no K reaches the shared convention's 25%.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from earlytom_jax.compression.base import NoHooks
from earlytom_jax.compression.registration import register
from earlytom_jax.config import LlavaOVConfig
from earlytom_jax.errors import ConfigError


def ttm_plan(t0: int) -> tuple[tuple[int, int | None], ...]:
    """Every frame TTM keeps, in order, with the frame it is compared with (None: kept whole)."""
    if t0 < 2:
        raise ConfigError(f"DyCoke needs at least 2 frames, got {t0}")
    even = t0 - t0 % 2
    ref = {t: t - 1 for t in range(1, even, 2)}  # stage 1: pairs
    ref.update({i + 2: i for i in range(0, t0 - 4, 4)})  # stage 2: groups of four
    return tuple((t, ref.get(t)) for t in range(even))


def _unit(x):
    """x / max(‖x‖, 1e-8) over the last axis (torch's cosine_similarity eps)."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-8)


def cosine(a, b):
    """Cosine similarity over the last axis, fp32."""
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return jnp.sum(_unit(a) * _unit(b), -1)


@register(name="dycoke", label="DyCoke", settings=("layer", "p", "threshold"))
@dataclasses.dataclass(frozen=True)
class DyCoke(NoHooks):
    """k: TTM's pruning rate K (a pruned frame keeps int((1 - k) · S) tokens); layer: L, the
    decode step's pruning acts on layers L.. from layer L - 1's attention; p: the share of the
    candidate visual KV entries a pruning step drops; threshold: prune only when the attention's
    cosine similarity to the previous step's is below it."""

    k: float = 0.7
    layer: int = 3
    p: float = 0.8
    threshold: float = 0.9

    def __post_init__(self):
        if not 0.0 <= self.k < 1.0:
            raise ConfigError(f"DyCoke K {self.k} is outside [0, 1)")
        if not 0.0 <= self.p < 1.0:
            raise ConfigError(f"DyCoke P {self.p} is outside [0, 1)")

    @classmethod
    def from_ratio(cls, ratio, cfg, layer: int = 3, p: float = 0.8, threshold: float = 0.9) -> "DyCoke":
        """`ratio` r: the share a TTM-pruned frame keeps, K = 1 - r (K = 0.7 is r = 0.3)."""
        return cls(k=1.0 - ratio, layer=layer, p=p, threshold=threshold).check(cfg)

    def check(self, cfg: LlavaOVConfig) -> "DyCoke":
        if not 1 <= self.layer < cfg.text.num_layers:
            raise ConfigError(f"DyCoke layer {self.layer} must be in 1..{cfg.text.num_layers - 1}")
        return self

    # ------------------------------------------------------------------ hook 2: TTM

    def frame_keep(self, s: int) -> int:
        """Tokens a pruned frame keeps: the official int((1 - K) · S), in Python floats."""
        return int((1 - self.k) * s)

    def capacity(self, t0: int, s: int) -> int:
        plan = ttm_plan(t0)
        pruned = sum(r is not None for _, r in plan)
        return (len(plan) - pruned) * s + pruned * self.frame_keep(s)

    def select_flops(self, cfg, t0: int, s: int | None = None) -> int:
        """The cosine similarities: a·b, ‖a‖², ‖b‖² (2 FLOPs a term) per token of a pruned frame."""
        s = cfg.tokens_per_frame if s is None else s
        pruned = sum(r is not None for _, r in ttm_plan(t0))
        return pruned * s * 6 * cfg.text.hidden_size

    def select(self, tokens, n, state, cfg, grid=None):
        """tokens [T0, S, H] → every kept token, frame by frame (buffer exactly `capacity`, all
        valid); info["kept_index"] [Vc] = t·S + s of each slot."""
        t0, s, h = tokens.shape
        plan = ttm_plan(t0)
        m = self.frame_keep(s)
        pruned = [(t, r) for t, r in plan if r is not None]
        order = {}
        if pruned:
            cur = tokens[np.array([t for t, _ in pruned])].astype(jnp.float32)
            ref = tokens[np.array([r for _, r in pruned])].astype(jnp.float32)
            pair = np.array([t % 2 == 1 for t, _ in pruned])[:, None, None]  # stage 1 normalises first
            cur, ref = jnp.where(pair, _unit(cur), cur), jnp.where(pair, _unit(ref), ref)
            low = jnp.argsort(cosine(cur, ref), axis=1, stable=True)[:, :m].astype(jnp.int32)  # [P', m]
            order = {t: low[j] for j, (t, _) in enumerate(pruned)}
        parts = [t * s + (order[t] if r is not None else jnp.arange(s, dtype=jnp.int32)) for t, r in plan]
        kept = jnp.concatenate(parts)
        buf = tokens.reshape(t0 * s, h)[kept]
        return buf, jnp.ones(kept.shape, bool), {"count": jnp.asarray(kept.shape[0], jnp.int32), "kept_index": kept}

    # ------------------------------------------------------------------ hook 4: decoding

    @property
    def decode_layer(self) -> int:
        return self.layer

    def decode_init(self, span: int):
        """State over a visual span of `span` slots (V tokens and the newline): the previous
        step's attention to the V - 1 candidates, and whether there was one."""
        return {"prev": jnp.zeros((span - 2,), jnp.float32), "seen": jnp.asarray(False)}

    def decode_keep(self, attn, valid, state):
        """attn [span] fp32, valid [span] → (keep [span]: the slots layers `layer`.. attend this
        step, state)."""
        n = attn.shape[0] - 2
        cand = attn[:n]
        n_keep = int(n * (1 - self.p))
        prune = ~state["seen"] | (cosine(cand, state["prev"]) < self.threshold)
        top = jax.lax.top_k(cand, n_keep)[1] if n_keep else jnp.zeros((0,), jnp.int32)
        picked = jnp.zeros((n,), bool).at[top].set(True)
        keep = jnp.concatenate([jnp.where(prune, picked, True), jnp.ones((2,), bool)])
        return keep & valid, {"prev": cand, "seen": jnp.asarray(True)}
