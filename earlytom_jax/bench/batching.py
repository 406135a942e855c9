"""`earlytom bench --batch 1,2,4`: what answering several videos per jitted call buys.

For each method and batch size B: B clips (the bench clip, sample i with its frames rolled by
i, so that each sample compresses differently), one batched prefill (`pipeline.prefill_batch`,
compiled apart) and one batched decode loop of `decode_tokens` tokens (EOS ignored), timed
`runs` times after `warmup` calls. Reported per B: the batch's prefill, that prefill divided
by B (what a sample's prefill costs inside the batch), the decode, and samples per second
(B over prefill plus decode), each beside batch 1's.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from earlytom_jax import pipeline
from earlytom_jax.bench.timing import NEVER


def batch_pixels(pixels: np.ndarray, b: int, tp: int = 1) -> np.ndarray:
    """[B, T, ...]: sample i is `pixels` with its frames rolled by i units of `tp` frames
    (Qwen2.5-VL's temporal patches stay whole)."""
    return np.stack([np.roll(np.asarray(pixels), i * tp, axis=0) for i in range(b)])


def time_batch(params, cfg, pixels, prefix, suffix, method, b: int, warmup: int, runs: int, decode_tokens: int,
               video_time: float | None = None) -> dict:
    """One method at batch size `b` (see the module docstring) → a JSON-ready dict."""
    tp = cfg.vision.temporal_patch_size if cfg.family == "qwen2_5_vl" else 1
    pix = jnp.asarray(batch_pixels(pixels, b, tp), params["vision"]["patch_w"].dtype)
    pre = jnp.asarray(prefix, jnp.int32)
    suf = jnp.tile(jnp.asarray(suffix, jnp.int32)[None], (b, 1))
    valid = jnp.ones(suf.shape, bool)
    vt = None if video_time is None else jnp.full((b,), video_time, jnp.float32)
    steps = max(1, decode_tokens)
    t = time.perf_counter()
    prefill = pipeline.prefill_batch.lower(params, pix, pre, suf, cfg, method, max(16, steps), valid, vt).compile()
    compile_s = time.perf_counter() - t

    def run_prefill():
        out = prefill(params, pix, pre, suf, valid, vt)
        jnp.argmax(out[0], -1).block_until_ready()  # the batch's first tokens on the host side
        return out

    out = run_prefill()
    span = pipeline.decode_span(method, jax.tree.map(lambda x: x[0], out[1]), pre.shape[0], suf.shape[1])
    hooked = {} if span is None else {"method": method, "span": span}
    decode = None
    if steps > 1:
        decode = pipeline.decode_loop_batch.lower(params, out[0], out[2], out[1], cfg, steps, NEVER,
                                                  **hooked).compile()
    for _ in range(warmup):
        out = run_prefill()
        if decode is not None:
            jax.block_until_ready(decode(params, out[0], out[2], out[1], NEVER))
    pre_s, dec_s = [], []
    for _ in range(runs):
        t = time.perf_counter()
        out = run_prefill()
        pre_s.append(time.perf_counter() - t)
        if decode is not None:
            t = time.perf_counter()
            jax.block_until_ready(decode(params, out[0], out[2], out[1], NEVER))
            dec_s.append(time.perf_counter() - t)
    stats = jax.device_get(out[3])
    p, d = statistics.mean(pre_s), statistics.mean(dec_s) if dec_s else 0.0
    return {
        "batch": b, "compile_s": compile_s, "prefill_s": pre_s, "decode_s": dec_s, "decode_tokens": steps,
        "prefill_mean_s": p, "prefill_per_sample_s": p / b, "decode_mean_s": d,
        "samples_per_s": b / (p + d), "visual_tokens": [int(x) for x in stats["visual_tokens"]],
        "frames": [int(x) for x in stats["frames"]],
    }


def relate(rows: list[dict]) -> None:
    """Each row's samples/s and per-sample prefill against the same method's batch 1."""
    for r in rows:
        one = next((x for x in rows if x["method"] == r["method"] and x["ratio"] == r["ratio"] and x["batch"] == 1), None)
        if one is not None:
            r["samples_per_s_over_batch1"] = r["samples_per_s"] / one["samples_per_s"]
            r["prefill_per_sample_over_batch1"] = r["prefill_per_sample_s"] / one["prefill_per_sample_s"]


def markdown(rows: list[dict]) -> str:
    """The batching table: one row per (method, ratio, B)."""
    lines = ["| method | ratio | B | prefill (batch) | prefill / B | decode (batch) | samples/s | vs B=1 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rel = r.get("samples_per_s_over_batch1")
        lines.append(f"| {r['method']} | {r['ratio'] if r['ratio'] is not None else '-'} | {r['batch']} | "
                     f"{r['prefill_mean_s']:.3f} s | {r['prefill_per_sample_s']:.3f} s | {r['decode_mean_s']:.3f} s "
                     f"({r['decode_tokens']} tok) | {r['samples_per_s']:.2f} | "
                     f"{'-' if rel is None else f'{rel:.2f}x'} |")
    return "\n".join(lines)
