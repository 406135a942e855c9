"""What the pipeline asks of a compression method, and helpers shared by methods.

A method is a frozen (hashable) dataclass, passed to the jitted pipeline as a static
argument, with any of these hooks (see pipeline.py for where each one acts):

hook 0, before the vision encoder
    input_frames(t0) -> tuple[int] | None   the input frames to encode (None: all T0)
hook 1, inside the vision encoder
    encoder_layers: tuple[int, ...]   blocks after which `encoder_merge` runs (sorted;
                                      negative counts from the end, -1 = the last block)
    encoder_keys: bool | str          also pass `keys` [Tc,N,D] (that block's keys, mean
                                      over heads) to `encoder_merge` as a keyword; "heads"
                                      (Qwen2.5-VL only): `keys` and `queries` [Tc,N,heads,D],
                                      the block's rotated keys and queries per head
    frame_buckets(t0) -> tuple[int]   frame counts the later blocks may run on
    encoder_init(t0) -> state
    encoder_merge(x [Tc,N,C], n, colmean [Tc,N], state, last[, keys[, queries]]) -> (x, n, state)
    encoder_stats(state) -> dict
    head_signals(head, x [T0,N,C], state, cfg) -> state   optional, LLaVA only (FastVID): called on the
                                      encoder's output with the SigLIP head's tree (params["siglip_head"],
                                      models/siglip_head.py; None when not loaded)
    token_merging: bool               instead of all the above, the method runs the blocks:
    encode_tokens(vision, x [T,N,C], cfg) -> x [T,N',C]   (ToMe: fewer tokens per frame; vision: SiglipEncoder)
hook 2, after projector and pooling
    pooled: bool                      False: the projector's tokens without the 2x2 pooling
    select(tokens [Tc,S,H], n, state, cfg[, grid]) -> (buffer [Vc,H], valid [Vc], info with "count"
                                      and, where it picks tokens, "kept_index" [Vc] (t·S + s, -1 padding))
                                      Qwen2.5-VL: merged tokens of a (mh, mw) `grid`; colmean/keys
                                      of hook 1 come in the processor's patch order (each merged
                                      token's patches consecutive)
hook 3, inside the LLM (prefill only; `pipeline.llm_prefill`)
    llm_layers: tuple[int, ...]       stage layers K_1 < K_2 < ...: stage i acts on the visual span
                                      before layer K_i runs, for all later layers (default: (llm_layer,),
                                      or () when llm_layer is None); a single-stage method sets only
    llm_layer: int | None             (FastV, EarlyTom's stage III)
    llm_signal_layer: str             whose attention stage i reads: "before" (default) the
                                      probabilities of layer K_i - 1 itself, run on the whole
                                      sequence; "at": layer K_i's queries and keys of its input,
                                      computed as a probe before the drop (PyramidDrop)
    llm_query: str                    which query rows: "last_row" (default; the last prompt slot) or
                                      "suffix_rows" (every valid slot after the visual span, e.g. the
                                      question; causal: a row sees keys up to itself), probabilities
                                      averaged over heads, then over those rows
    llm_reduce: str                   "mean" (default: the averages above) or "max": the maximum over
                                      heads, then over the valid query rows (PruneVid)
    llm_noncausal: bool               run layer K_i - 1 without the causal mask ("before" only)
    llm_renumber: bool                the survivors and the text after them take contiguous RoPE ids
                                      (1-D positions only: LLaVA-OV/Video; Qwen2.5-VL's 3-D ids stay);
                                      decoding then shifts the new token's id per cache group
    llm_prune_caches: bool            also mark the span slots a later stage drops invalid in the
                                      earlier stages' KV caches (decode steps never attend them)
    llm_stage_capacity(i, span0) -> int   static length of the visual span after stage i; span0: the
                                      static length of the span entering the LLM (default: stage 0 →
                                      llm_capacity(span0))
    llm_stage_merge(i, h [span,H], attn [span], valid [span], count0, span0) -> (h, keep [span])
                                      span: the current span (stage i-1's capacity); count0: int32 valid
                                      slots of the span entering the LLM, span0 its static length
                                      (default → llm_merge(h, attn, valid))
    llm_span_info: tuple[str, ...]    names of hook 2's `info` arrays ([Vc], per buffer slot) the stage
                                      merge needs (default: none); the pipeline pads each at the end with
                                      -1 to span0 (`pipeline.llm_span_info`; LLaVA-OV's newline lies in
                                      hook 2's -1 padding; not on LLaVA-Video's grid layout), re-indexes it
                                      to the current span, and passes the dict as the keyword `span_info`:
                                      llm_stage_merge(i, h, attn, valid, count0, span0, span_info={name: [span]})
    llm_capacity(span) -> int, llm_merge(h, attn, valid) -> (h, keep)   the single-stage forms
    llm_span_buckets(span0) -> tuple[int, ...]   ascending span lengths ending at span0 (default
                                      (span0,): none): the LLM prefill runs on the smallest that holds
                                      the span's last valid slot, the slots after it left out
                                      (`llm_stages.llm_prefill_bucketed`); for a method whose hook 2
                                      fills its buffer to a count known only on device (PruneVid)
    Each stage compacts the span (kept slots first, in order) to its capacity; the KV caches are one
    CacheGroup per layer range ([0, K_1), [K_1, K_2), ..., [K_n, depth)).
hook 4, at every decode step (`pipeline.decode_loop`; LLaVA-OneVision, methods without hook 3)
    decode_layer: int | None          L: layer L - 1's attention of the new token picks the visual
                                      slots layers L.. attend this step (None: off, decoding as ever)
    decode_init(span) -> state        span: static slots of the visual span (tokens and newline)
    decode_keep(attn [span], valid [span], state) -> (keep [span], state)
                                      attn: layer L - 1's probabilities (mean over heads) of the new
                                      token to the span's slots; keep masks the span in the valid
                                      masks of layers L.. for this step only (the caches keep all)

A method runs on the model families it names (`families`, config.py's `cfg.family`; default
LLaVA-OneVision alone); the pipeline refuses it on any other in one line (`pipeline.check_family`).
On LLaVA-Video (grid newlines) hook 2's `kept_index` places the tokens: the pipeline lays them
out frame by frame in raster order with a newline after each pooled row that kept one, or after
every row when the method's `grid_newline_rows` is "all" (`models.llava_onevision.grid_newlines`).

A method that leaves a hook out inherits the no-op below. For the FLOP counter a method may
also say how many frames it encodes (`input_frames`) and what its hook 2 computes beyond
projector and pooling (`select_flops(cfg, t0, s=None)`; s: tokens per frame, which on
Qwen2.5-VL (mh·mw merged tokens per temporal patch) the caller must give).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from earlytom_jax.compression.registration import register
from earlytom_jax.errors import ConfigError


def frame_buckets(capacity: int, count: int) -> tuple[int, ...]:
    """`count` evenly spaced frame counts up to `capacity` (e.g. 32, 4 → 8, 16, 24, 32)."""
    return tuple(sorted({max(1, -(-capacity * j // count)) for j in range(1, count + 1)}))


def token_budget(t0: int, ratio: float, s: int = 196) -> int:
    """The shared budget convention: round(r · T0 · S) visual tokens (Python's round)."""
    return round(ratio * t0 * s)


def frame_budgets(t0: int, ratio: float, s: int = 196) -> np.ndarray:
    """`token_budget` spread over the T0 frames as evenly as possible: frame t gets
    floor((t+1)·B/T0) - floor(t·B/T0) tokens (B/T0 rounded down or up). int32 [T0]."""
    b = token_budget(t0, ratio, s)
    if b < 1:
        raise ConfigError(f"ratio {ratio} keeps no token of {t0} frames x {s}")
    edges = (np.arange(t0 + 1) * b) // t0
    return np.diff(edges).astype(np.int32)


class NoHooks:
    """Defaults: no frame merging, keep every token, no in-LLM merging."""

    families: tuple[str, ...] = ("llava_onevision",)
    grid_newline_rows = "kept"  # LLaVA-Video: a newline after each row that kept a token ("all": every row)
    encoder_layers: tuple[int, ...] = ()
    encoder_keys = False
    token_merging = False
    pooled = True
    llm_layer = None
    llm_noncausal = False
    llm_signal_layer = "before"
    llm_query = "last_row"
    llm_renumber = False
    llm_prune_caches = False
    llm_reduce = "mean"
    llm_span_info: tuple[str, ...] = ()
    decode_layer = None  # hook 4: no decode-time pruning

    def input_frames(self, t0: int) -> tuple[int, ...] | None:
        return None

    def frame_buckets(self, t0: int) -> tuple[int, ...]:
        return (t0,)

    def encoder_init(self, t0: int):
        return {}

    def encoder_merge(self, x, n, colmean, state, last):
        return x, n, state

    def encoder_stats(self, state) -> dict:
        return {}

    def select_flops(self, cfg, t0: int, s: int | None = None) -> int:
        """Hook 2's work beyond projector and pooling for t0 frames of s tokens each (s: None =
        LLaVA-OV's fixed `cfg.tokens_per_frame`; Qwen2.5-VL's mh·mw depends on the frame size)."""
        return 0

    def capacity(self, t0: int, s: int) -> int:
        """Static length of the visual-token buffer (before the newline)."""
        return t0 * s

    def select(self, tokens, n, state, cfg, grid=None):
        t, s, h = tokens.shape
        count = jnp.asarray(t * s, jnp.int32)
        return tokens.reshape(t * s, h), jnp.ones((t * s,), bool), {"count": count}

    def llm_capacity(self, span: int) -> int:
        return span

    def llm_merge(self, h, attn, valid):
        return h, valid

    @property
    def llm_layers(self) -> tuple[int, ...]:
        return () if self.llm_layer is None else (self.llm_layer,)

    def llm_stage_capacity(self, stage: int, span0: int) -> int:
        return self.llm_capacity(span0)

    def llm_stage_merge(self, stage: int, h, attn, valid, count0, span0: int):
        return self.llm_merge(h, attn, valid)

    def llm_span_buckets(self, span0: int) -> tuple[int, ...]:
        return (span0,)

    def decode_init(self, span: int):
        return {}

    def decode_keep(self, attn, valid, state):
        return valid, state


@register(name="full", label="full tokens", takes_ratio=False)
@dataclasses.dataclass(frozen=True)
class FullTokens(NoHooks):
    """The uncompressed model: every pooled token of every frame, as transformers runs it
    (LLaVA-Video: as LLaVA-NeXT's `llava_vid` path runs it)."""

    families = ("llava_onevision", "llava_video", "qwen2_5_vl")
