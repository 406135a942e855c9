"""Greedy generation for one video and question, with TTFT timing and compression statistics."""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from earlytom_jax import pipeline
from earlytom_jax.config import ModelConfig


@dataclasses.dataclass
class Generation:
    """What one call produced. `stats` holds the compression statistics as Python values."""

    tokens: list[int]
    first_logits: np.ndarray  # [V] fp32
    ttft_s: float  # prefill + first token, inputs already on device, compiled program
    decode_s: float  # the timed decode steps (`decode_timed` tokens), compiled program
    stats: dict
    compile_s: float = 0.0  # compiling the prefill and decode programs (0 when cached)
    decode_timed: int | None = None  # tokens that `decode_s` covers (default: all but the first)

    @property
    def tokens_per_s(self) -> float | None:
        """Decode rate over the timed steps; None when there were none (one token)."""
        n = len(self.tokens) - 1 if self.decode_timed is None else self.decode_timed
        return n / self.decode_s if n > 0 and self.decode_s > 0 else None


def to_python(stats: dict) -> dict:
    out = {}
    for k, v in stats.items():
        a = np.asarray(v)
        out[k] = a.item() if a.ndim == 0 else a.tolist()
    return out


def generate(
    params,
    cfg: ModelConfig,
    pixels,
    prefix_ids,
    suffix_ids,
    method=None,
    max_new_tokens: int = 32,
    eos_ids=(),
    on_token: Callable[[int], None] | None = None,
    suffix_valid=None,
    video_time=None,
) -> Generation:
    """Prefill, then greedy decoding until an EOS id or `max_new_tokens`.

    With `on_token`, tokens are decoded one jitted step at a time and passed to the callback as
    they come (streaming); without it, all steps run in one device loop with no host sync per
    token, and tokens after the first EOS are cut on the host. `suffix_valid` marks padding in
    `suffix_ids` (see `pipeline.pad_suffix`); `video_time`: Qwen2.5-VL's seconds per temporal
    patch (`pipeline.prefill`).

    Timings leave compilation out (as `bench` does): a call that compiles the prefill runs it
    again to time TTFT, one that compiles the decode loop runs it again to time decoding, and
    when streaming, a first step that compiles is left out of the rate; the compile time is
    `compile_s`.
    """
    pixels = jnp.asarray(pixels, params["vision"]["patch_w"].dtype)
    prefix = jnp.asarray(prefix_ids, jnp.int32)
    suffix = jnp.asarray(suffix_ids, jnp.int32)
    eos = jnp.asarray(list(eos_ids) or [-1], jnp.int32)
    max_new = max(1, int(max_new_tokens))

    def prefill():
        t = time.perf_counter()
        out = pipeline.prefill_jit(params, pixels, prefix, suffix, cfg, method, max_new, suffix_valid, video_time)
        first = int(jnp.argmax(out[0]))
        return out, first, time.perf_counter() - t

    compile_s = 0.0
    before = pipeline.prefill_jit._cache_size()
    out, first, ttft = prefill()
    if pipeline.prefill_jit._cache_size() > before:  # that call compiled: time the compiled program
        del out  # (its KV caches) before the second call allocates its own
        out, first, ttft_warm = prefill()
        compile_s += max(0.0, ttft - ttft_warm)
        ttft = ttft_warm
    logits, caches, pos, stats = out
    del out
    span = pipeline.decode_span(method, caches, prefix.shape[0], suffix.shape[0])  # hook 4's, or None
    hooked = {} if span is None else {"method": method, "span": span}

    timed = None
    t1 = time.perf_counter()
    if on_token is not None:
        tokens = [first]
        on_token(first)
        tok = jnp.asarray([first], jnp.int32)
        step_fn = pipeline.decode_step_jit
        if hooked:  # hook 4: the caches split once, the method's state carried from step to step
            caches = pipeline.split_caches(caches, method.decode_layer)
            state = method.decode_init(span[1] - span[0])

            def pruned_step(params, tok, p, caches, i, cfg):
                nonlocal state
                out, caches, state, _ = pipeline.decode_step_pruned_jit(params, tok, p, caches, i, cfg, method, span,
                                                                        state)
                return out, caches

            pruned_step._cache_size = pipeline.decode_step_pruned_jit._cache_size
            step_fn = pruned_step
        for i in range(max_new - 1):
            if tokens[-1] in eos_ids:
                break
            before = step_fn._cache_size()
            step_logits, caches = step_fn(params, tok, pos + i, caches, jnp.asarray(i, jnp.int32), cfg)
            nxt = int(jnp.argmax(step_logits))
            if i == 0 and step_fn._cache_size() > before:  # a compiling step: not in the rate
                compile_s += time.perf_counter() - t1
                t1, timed = time.perf_counter(), -1
            tokens.append(nxt)
            on_token(nxt)
            tok = jnp.asarray([nxt], jnp.int32)
        if timed is not None:
            timed = len(tokens) - 2
    elif max_new > 1:
        def decode():
            t = time.perf_counter()
            toks, count = pipeline.decode_loop(params, logits, pos, caches, cfg, max_new, eos, **hooked)
            return np.asarray(toks)[: int(count)].tolist(), time.perf_counter() - t

        before = pipeline.decode_loop._cache_size()
        tokens, decode_s = decode()
        if pipeline.decode_loop._cache_size() > before:  # that call compiled: time the compiled loop
            tokens, warm = decode()
            compile_s += max(0.0, decode_s - warm)
            decode_s = warm
    else:
        tokens = [first]
    if on_token is not None or max_new <= 1:
        decode_s = time.perf_counter() - t1
    return Generation(tokens, np.asarray(logits), ttft, decode_s, to_python(stats), compile_s, timed)


def generate_batch(
    params,
    cfg: ModelConfig,
    pixels,
    prefix_ids,
    suffix_ids,
    suffix_valid,
    method=None,
    max_new_tokens: int = 32,
    eos_ids=(),
    video_time=None,
    samples: int | None = None,
) -> list[Generation]:
    """`generate` for B videos of one shape at once: one prefill (`pipeline.prefill_batch`), one
    device loop of greedy steps over the batch (`pipeline.decode_loop_batch`), each sample cut
    at its own first EOS. pixels [B, ...]; suffix_ids/suffix_valid [B, Q] (`pipeline.pad_suffixes`);
    video_time fp32 [B] or None; samples: how many leading rows are real (the rest fill a
    partial batch up to the compiled B and are dropped).

    → one Generation per real sample. Its ttft_s and decode_s are the batch's (what each sample
    waited); compile time is left out as in `generate`.
    """
    pixels = jnp.asarray(pixels, params["vision"]["patch_w"].dtype)
    prefix = jnp.asarray(prefix_ids, jnp.int32)
    eos = jnp.asarray(list(eos_ids) or [-1], jnp.int32)
    max_new = max(1, int(max_new_tokens))
    b = pixels.shape[0]
    samples = b if samples is None else samples

    def prefill():
        t = time.perf_counter()
        out = pipeline.prefill_batch(params, pixels, prefix, suffix_ids, cfg, method, max_new, suffix_valid, video_time)
        first = np.asarray(jnp.argmax(out[0], axis=-1))
        return out, first, time.perf_counter() - t

    compile_s = 0.0
    before = pipeline.prefill_batch._cache_size()
    out, first, ttft = prefill()
    if pipeline.prefill_batch._cache_size() > before:
        del out
        out, first, warm = prefill()
        compile_s += max(0.0, ttft - warm)
        ttft = warm
    logits, caches, pos, stats = out
    del out
    # hook 4's span: the batch's caches have the groups and lengths of each sample's
    span = pipeline.decode_span(method, caches, prefix.shape[0], suffix_ids.shape[1])
    hooked = {} if span is None else {"method": method, "span": span}
    decode_s = 0.0
    if max_new > 1:
        def decode():
            t = time.perf_counter()
            toks, count = pipeline.decode_loop_batch(params, logits, pos, caches, cfg, max_new, eos, **hooked)
            return np.asarray(toks), np.asarray(count), time.perf_counter() - t

        before = pipeline.decode_loop_batch._cache_size()
        toks, count, decode_s = decode()
        if pipeline.decode_loop_batch._cache_size() > before:
            toks, count, warm = decode()
            compile_s += max(0.0, decode_s - warm)
            decode_s = warm
    else:
        toks, count = first[:, None], np.ones((b,), np.int32)
    logits = np.asarray(logits)
    stats = jax.tree.map(np.asarray, stats)
    out = []
    for i in range(samples):
        n = int(count[i])
        s = to_python({k: v[i] for k, v in stats.items()})
        out.append(Generation(toks[i, :n].tolist(), logits[i], ttft, decode_s, s, compile_s,
                              decode_timed=max(0, int(count[:samples].max()) - 1)))
    return out
