"""EarlyTom = stage I (frame merging inside SigLIP) + stage II (decoupled spatial selection)
+ stage III (merging inside the LLM), built from segments.py, select.py and llm_merge.py.

Static shapes: frames keep a buffer of capacity T0 with a valid count; after a compression
layer the following blocks run on the smallest of `buckets` evenly spaced frame counts that
holds the frames left (default max(4, T0 // 4), a step of at most 4 frames from 16 frames
up; so the encoder's cost follows T′, with at most `buckets` compiled
variants per block range, all inside one program); the visual buffer has the tight static
capacity of `select.visual_capacity`; stage III compacts the visual span to
`round(capacity · (1 - r_in))` slots.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from earlytom_jax.compression import llm_merge, segments
from earlytom_jax.compression import select as sel
from earlytom_jax.compression.base import NoHooks, frame_buckets
from earlytom_jax.compression.presets import preset as published
from earlytom_jax.compression.registration import DEFAULT_RATIO, check_ratio, register
from earlytom_jax.config import LlavaOVConfig
from earlytom_jax.errors import ConfigError
from earlytom_jax.models import family
from earlytom_jax.models import llava_onevision as lov


SETTINGS = ("preset", "tau", "layers", "alpha", "max_window", "quirks", "llm_layer", "llm_ratio", "llm_noncausal",
            "buckets", "decoupled", "weighted")


@register(name="earlytom", label="EarlyTom", settings=SETTINGS)
@dataclasses.dataclass(frozen=True)
class EarlyTom(NoHooks):
    """EarlyTom settings (defaults: the spec's task-free defaults with stage III on).

    ratio: retention r of visual tokens (of T0·196); tau: segmentation threshold τ;
    layers: SigLIP blocks P after which frames merge (0-based, sorted on use); alpha: EMA
    weight; max_window: M; quirks: reproduce the official code where it differs from the
    paper's prose (the published numbers); llm_layer: k of stage III (None: off);
    llm_ratio: r_in; llm_noncausal: run layer k-1 without the causal mask during prefill, as
    the official code does; buckets: frame-count buckets after a merge (None: max(4, T0 // 4));
    decoupled: stage II's decoupled selection (False: top-k on every frame, the paper's
    ablation); weighted: stage I's weighted merging (False: merged pairs averaged 1/2).

    On Qwen2.5-VL a frame is a temporal patch (two frames) and the budget r counts the merged
    (2x2) tokens of all temporal patches: docs/qwen-earlytom.md. On LLaVA-Video the budget is r
    of T0·169 average-pooled tokens, the importance is pooled the same way, and the grid
    newlines come on top (one after each pooled row that kept a token): docs/llava-video.md.
    """

    families = ("llava_onevision", "llava_video", "qwen2_5_vl")

    ratio: float = DEFAULT_RATIO
    tau: float = 0.6
    layers: tuple[int, ...] = (6, 21, 23)
    alpha: float = 0.9
    max_window: int = 6
    quirks: bool = True
    llm_layer: int | None = 18
    llm_ratio: float = 0.5
    llm_noncausal: bool = False
    buckets: int | None = None
    decoupled: bool = True
    weighted: bool = True

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(sorted(int(i) for i in self.layers)))
        check_ratio(self.ratio)
        if not 0.0 <= self.tau <= 1.0:
            raise ConfigError(f"tau {self.tau} is outside [0, 1]")
        if not self.layers:
            raise ConfigError("EarlyTom needs at least one compression layer")
        if len(set(self.layers)) != len(self.layers) or self.layers[0] < 0:
            raise ConfigError(f"compression layers {self.layers} must be distinct and >= 0")
        if not 0.0 <= self.llm_ratio < 1.0:
            raise ConfigError(f"llm ratio {self.llm_ratio} is outside [0, 1)")
        if self.max_window < 2 or (self.buckets is not None and self.buckets < 1):
            raise ConfigError("max_window must be >= 2 and buckets >= 1")

    @classmethod
    def from_ratio(cls, ratio, cfg, preset: str | None = None, **kw) -> "EarlyTom":
        """As the command line builds it (`registry.build`): the preset first (at this ratio),
        explicit settings override it (defaults scaled to a shallow model come from
        `compression.defaults.settings`). llm_layer None or < 0 turns stage III off."""
        out = dict(published(preset, ratio, getattr(cfg, "family", "llava_onevision"))) if preset else {}
        out["ratio"] = ratio
        if "layers" in kw:
            out["layers"] = tuple(kw.pop("layers"))
        if "llm_layer" in kw:
            k = kw.pop("llm_layer")
            out["llm_layer"] = None if k is None or k < 0 else k
        out.update(kw)
        return cls(**out).check(cfg)

    def check(self, cfg: LlavaOVConfig) -> "EarlyTom":
        """Reject settings the model cannot run (one clear message)."""
        if self.layers[-1] >= cfg.vision.num_layers:
            raise ConfigError(
                f"compression layer {self.layers[-1]} is beyond the encoder's depth "
                f"({cfg.vision.num_layers} blocks: 0..{cfg.vision.num_layers - 1})"
            )
        if self.llm_layer is not None and not 1 <= self.llm_layer < cfg.text.num_layers:
            raise ConfigError(
                f"llm merge layer {self.llm_layer} must be in 1..{cfg.text.num_layers - 1}"
            )
        return self

    # hook 1 ------------------------------------------------------------------------------

    @property
    def encoder_layers(self) -> tuple[int, ...]:
        return self.layers

    def frame_buckets(self, t0: int) -> tuple[int, ...]:
        return frame_buckets(t0, self.buckets or max(4, t0 // 4))

    def encoder_init(self, t0: int):
        return {
            "frames_after_layer": jnp.zeros((len(self.layers),), jnp.int32),
            "step": 0,
            # product of the layers' mixing matrices: merged frame r = Σ_t M[r, t] · input frame t
            "frame_mixing": jnp.eye(t0, dtype=jnp.float32),
            # the input frame each merged frame starts from (its earliest source)
            "frame_sources": jnp.arange(t0, dtype=jnp.int32),
        }

    def encoder_merge(self, x, n, colmean, state, last):
        S = segments.frame_similarity(x)
        W, n_out, _, first = segments.mixing(S, n, self.tau, self.alpha, self.max_window, self.quirks, self.weighted)
        x = segments.apply_mixing(W, x)
        i = state["step"]
        sources = state["frame_sources"]
        state = dict(
            state,
            step=i + 1,
            frames_after_layer=state["frames_after_layer"].at[i].set(n_out),
            frame_mixing=W @ state["frame_mixing"],
            frame_sources=sources[jnp.minimum(first, sources.shape[0] - 1)],
        )
        if last:
            # importance = W · colmean(A): the merged attention's head-and-query mean
            state["importance"] = W @ colmean
            starts, dynamic = segments.final_segments(
                segments.frame_similarity(x), n_out, self.tau, self.alpha, self.max_window, self.quirks
            )
            if not self.decoupled:  # the ablation: every frame selects its own top-k
                dynamic = jnp.arange(dynamic.shape[0]) < n_out
            state["segment_starts"], state["dynamic"] = starts, dynamic
        return x, n_out, state

    def encoder_stats(self, state) -> dict:
        return {k: state[k] for k in ("frames_after_layer", "segment_starts", "dynamic", "frame_mixing",
                                      "frame_sources")}

    # hook 2 ------------------------------------------------------------------------------

    def capacity(self, t0: int, s: int) -> int:
        return sel.visual_capacity(t0, self.ratio, s)

    def select(self, tokens, n, state, cfg, grid=None):
        t0, s, _ = tokens.shape
        if family.is_qwen(cfg):  # a merged token's importance: the mean of its patches'
            imp = state["importance"].reshape(t0, s, -1).mean(-1)
        else:  # pooled as the tokens are (LLaVA-NeXT's get_2dPool on the attention map)
            imp = lov.pool_frames(state["importance"][..., None], cfg)[..., 0]  # [Tc, S]
        k_dyn, n_stat = sel.budget_tables(t0, self.ratio, s)
        keep = sel.select_tokens(
            imp, n, state["dynamic"], jnp.asarray(k_dyn)[n], jnp.asarray(n_stat)[n], self.quirks, grid
        )
        buf, valid, src, count = sel.compact(keep, tokens, self.capacity(t0, s))
        info = {"count": count, "kept_index": src, "kept_per_frame": keep.sum(1), "importance": imp}
        return buf, valid, info

    # hook 3 ------------------------------------------------------------------------------

    def _keep_table(self, span: int) -> np.ndarray:
        return llm_merge.keep_count_table(span, self.llm_ratio)

    def llm_capacity(self, span: int) -> int:
        return int(self._keep_table(span).max())

    def llm_merge(self, h, attn, valid):
        table = jnp.asarray(self._keep_table(h.shape[0]))
        n_keep = table[valid.sum()]
        return llm_merge.merge_visual_span(h, attn, valid, n_keep)


# The ablations of the paper's Qwen2.5-VL table (§6.4) as methods of their own, so that a bench
# or eval command lists them beside EarlyTom (each is EarlyTom with one switch off).


@register(name="earlytom_topk", label="EarlyTom w/o decoupled selection", settings=SETTINGS, group="ablations")
@dataclasses.dataclass(frozen=True)
class EarlyTomTopK(EarlyTom):
    """EarlyTom without decoupled spatial selection: every frame keeps its top-k tokens."""

    decoupled: bool = False


@register(name="earlytom_average", label="EarlyTom w/o weighted merging", settings=SETTINGS, group="ablations")
@dataclasses.dataclass(frozen=True)
class EarlyTomAverage(EarlyTom):
    """EarlyTom without weighted frame merging: merged frame pairs are averaged 1/2."""

    weighted: bool = False
