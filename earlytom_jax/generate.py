"""Greedy generation for one video and question, with TTFT timing and compression statistics."""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from earlytom_jax import pipeline
from earlytom_jax.config import LlavaOVConfig


@dataclasses.dataclass
class Generation:
    """What one call produced. `stats` holds the compression statistics as Python values."""

    tokens: list[int]
    first_logits: np.ndarray  # [V] fp32
    ttft_s: float  # prefill + first token, inputs already on device
    decode_s: float  # the remaining tokens
    stats: dict

    @property
    def tokens_per_s(self) -> float:
        n = len(self.tokens) - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else float("nan")


def to_python(stats: dict) -> dict:
    out = {}
    for k, v in stats.items():
        a = np.asarray(v)
        out[k] = a.item() if a.ndim == 0 else a.tolist()
    return out


def generate(
    params,
    cfg: LlavaOVConfig,
    pixels,
    prefix_ids,
    suffix_ids,
    method=None,
    max_new_tokens: int = 32,
    eos_ids=(),
    on_token: Callable[[int], None] | None = None,
    suffix_valid=None,
) -> Generation:
    """Prefill, then greedy decoding until an EOS id or `max_new_tokens`.

    With `on_token`, tokens are decoded one jitted step at a time and passed to the callback as
    they come (streaming); without it, all steps run in one device loop with no host sync per
    token, and tokens after the first EOS are cut on the host. `suffix_valid` marks padding in
    `suffix_ids` (see `pipeline.pad_suffix`).
    """
    pixels = jnp.asarray(pixels, params["vision"]["patch_w"].dtype)
    prefix = jnp.asarray(prefix_ids, jnp.int32)
    suffix = jnp.asarray(suffix_ids, jnp.int32)
    eos = jnp.asarray(list(eos_ids) or [-1], jnp.int32)
    max_new = max(1, int(max_new_tokens))

    t0 = time.perf_counter()
    logits, caches, pos, stats = pipeline.prefill_jit(params, pixels, prefix, suffix, cfg, method, max_new, suffix_valid)
    first = int(jnp.argmax(logits))
    ttft = time.perf_counter() - t0

    t1 = time.perf_counter()
    if on_token is not None:
        tokens = [first]
        on_token(first)
        tok = jnp.asarray([first], jnp.int32)
        for i in range(max_new - 1):
            if tokens[-1] in eos_ids:
                break
            step_logits, caches = pipeline.decode_step_jit(params, tok, pos + i, caches, jnp.asarray(i, jnp.int32), cfg)
            nxt = int(jnp.argmax(step_logits))
            tokens.append(nxt)
            on_token(nxt)
            tok = jnp.asarray([nxt], jnp.int32)
    elif max_new > 1:
        toks, count = pipeline.decode_loop(params, logits, pos, caches, cfg, max_new, eos)
        tokens = np.asarray(toks)[: int(count)].tolist()
    else:
        tokens = [first]
    decode = time.perf_counter() - t1
    return Generation(tokens, np.asarray(logits), ttft, decode, to_python(stats))
