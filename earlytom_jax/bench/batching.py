"""`earlytom bench --batch 1,2,4`: what answering several videos per jitted call buys.

For each method and batch size B: B clips (the bench clip, sample i with its frames rolled by
i, so that each sample compresses differently), one batched prefill (`pipeline.prefill_batch`,
compiled apart) and one batched decode loop of `decode_tokens` tokens (EOS ignored), timed
`runs` times after `warmup` calls, the batch sizes in rounds (`time_batches`). Reported per B
(medians): the batch's prefill, that prefill divided by B (what a sample's prefill costs inside
the batch), the decode, and samples per second (B over prefill plus decode), beside batch 1's.
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


class BatchTimer:
    """One method at batch size `b` (see the module docstring): `__init__` compiles the batched
    prefill and decode (timed apart) and runs `warmup` calls; `once` is one timed prefill and
    decode; `result` the JSON-ready dict."""

    def __init__(self, params, cfg, pixels, prefix, suffix, method, b: int, warmup: int, decode_tokens: int,
                 video_time: float | None = None):
        tp = cfg.vision.temporal_patch_size if cfg.family == "qwen2_5_vl" else 1
        self.params, self.b, self.steps = params, b, max(1, decode_tokens)
        self.pix = jnp.asarray(batch_pixels(pixels, b, tp), params["vision"]["patch_w"].dtype)
        self.pre = jnp.asarray(prefix, jnp.int32)
        self.suf = jnp.tile(jnp.asarray(suffix, jnp.int32)[None], (b, 1))
        self.valid = jnp.ones(self.suf.shape, bool)
        self.vt = None if video_time is None else jnp.full((b,), video_time, jnp.float32)
        t = time.perf_counter()
        self.prefill = pipeline.prefill_batch.lower(params, self.pix, self.pre, self.suf, cfg, method,
                                                    max(16, self.steps), self.valid, self.vt).compile()
        self.compile_s = time.perf_counter() - t
        out = self._prefill()
        span = pipeline.decode_span(method, out[1], self.pre.shape[0], self.suf.shape[1])
        hooked = {} if span is None else {"method": method, "span": span}
        self.decode = None
        if self.steps > 1:
            self.decode = pipeline.decode_loop_batch.lower(params, out[0], out[2], out[1], cfg, self.steps, NEVER,
                                                           **hooked).compile()
        for _ in range(warmup):
            self.once(record=False)
        self.pre_s: list[float] = []
        self.dec_s: list[float] = []
        self.stats = jax.device_get(out[3])

    def _prefill(self):
        out = self.prefill(self.params, self.pix, self.pre, self.suf, self.valid, self.vt)
        jnp.argmax(out[0], -1).block_until_ready()  # the batch's first tokens on the host side
        return out

    def once(self, record: bool = True) -> None:
        t = time.perf_counter()
        out = self._prefill()
        p = time.perf_counter() - t
        if self.decode is not None:
            t = time.perf_counter()
            jax.block_until_ready(self.decode(self.params, out[0], out[2], out[1], NEVER))
            if record:
                self.dec_s.append(time.perf_counter() - t)
        if record:
            self.pre_s.append(p)

    def result(self) -> dict:
        p = statistics.median(self.pre_s)
        d = statistics.median(self.dec_s) if self.dec_s else 0.0
        return {
            "batch": self.b, "compile_s": self.compile_s, "prefill_s": self.pre_s, "decode_s": self.dec_s,
            "decode_tokens": self.steps, "prefill_median_s": p, "prefill_per_sample_s": p / self.b,
            "decode_median_s": d, "samples_per_s": self.b / (p + d),
            "visual_tokens": [int(x) for x in self.stats["visual_tokens"]],
            "frames": [int(x) for x in self.stats["frames"]],
        }


def time_batches(params, cfg, pixels, prefix, suffix, method, batches, warmup: int, runs: int, decode_tokens: int,
                 video_time: float | None = None) -> list[dict]:
    """One method at every batch size of `batches`, timed in rounds (one prefill and decode per
    size per round), so that a spell of a slower host, which on a shared 2-core VM lasts a
    second or more, falls on every size alike; medians over the rounds."""
    timers = [BatchTimer(params, cfg, pixels, prefix, suffix, method, b, warmup, decode_tokens, video_time)
              for b in batches]
    for _ in range(runs):
        for t in timers:
            t.once()
    return [t.result() for t in timers]


def relate(rows: list[dict]) -> None:
    """Each row's samples/s and per-sample prefill against the same method's batch 1."""
    for r in rows:
        one = next((x for x in rows if x["method"] == r["method"] and x["ratio"] == r["ratio"] and x["batch"] == 1), None)
        if one is not None:
            r["samples_per_s_over_batch1"] = r["samples_per_s"] / one["samples_per_s"]
            r["prefill_per_sample_over_batch1"] = r["prefill_per_sample_s"] / one["prefill_per_sample_s"]


def markdown(rows: list[dict]) -> str:
    """The batching table: one row per (method, ratio, B)."""
    lines = ["| method | ratio | B | prefill (batch, median) | prefill / B | decode (batch) | samples/s | vs B=1 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rel = r.get("samples_per_s_over_batch1")
        lines.append(f"| {r['method']} | {r['ratio'] if r['ratio'] is not None else '-'} | {r['batch']} | "
                     f"{r['prefill_median_s']:.3f} s | {r['prefill_per_sample_s']:.3f} s | {r['decode_median_s']:.3f} s "
                     f"({r['decode_tokens']} tok) | {r['samples_per_s']:.2f} | "
                     f"{'-' if rel is None else f'{rel:.2f}x'} |")
    return "\n".join(lines)
