"""Timing: one method's timer (`MethodTimer`: compile apart, warm-ups, timed TTFT calls,
decode, staged breakdown, FLOP counts), the two protocols that drive timers (`measure`: one
method after another; `measure_interleaved`: rounds of one run per method) and their result."""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from earlytom_jax import flops, pipeline, progress
from earlytom_jax.bench.probes import cores_busy, peak_memory_read, peak_memory_start
from earlytom_jax.bench.xla_flops import xla_stage_flops
from earlytom_jax.models import family, stack

STAGES = ("vision", "tokens", "llm")  # the staged breakdown's keys, in pipeline order
NEVER = np.asarray([-1], np.int32)  # an EOS list no token id matches: timed decodes run their full length


def timed(fn):
    """fn() → (its result, wall seconds, the process's CPU seconds over all its threads)."""
    c, t = time.process_time(), time.perf_counter()
    out = fn()
    wall = time.perf_counter() - t
    return out, wall, time.process_time() - c


@dataclasses.dataclass
class BenchResult:
    method: str
    ratio: float | None
    compile_s: float
    ttft_s: list[float]
    stages_s: dict
    frames: int
    visual_tokens: int
    llm_tokens_after_merge: int | None
    flops: dict
    flops_executed: dict | None = None
    flops_xla: dict | None = None
    decode: dict | None = None
    peak_memory: dict | None = None
    ttft_over_reference: float | None = None
    first_token: int | None = None
    at_full_rates: dict | None = None  # `at_full_stage_rates` against the run's full tokens
    paired: dict | None = None  # `paired_speedups` against the run's full tokens
    host_cpu_s: list[float] | None = None  # the process's CPU time (all threads) during each timed TTFT run

    @property
    def decode_tokens_per_s(self) -> float | None:
        return None if not self.decode else self.decode["tokens_per_s"]

    @property
    def host_cores_busy(self) -> float | None:
        """`cores_busy` over the timed TTFT runs."""
        return cores_busy(self.host_cpu_s, self.ttft_s) if self.host_cpu_s else None

    @property
    def ttft_mean(self) -> float:
        return statistics.mean(self.ttft_s)

    @property
    def ttft_median(self) -> float:
        return statistics.median(self.ttft_s)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(ttft_mean_s=self.ttft_mean, ttft_median_s=self.ttft_median,
                 decode_tokens_per_s=self.decode_tokens_per_s, host_cores_busy=self.host_cores_busy,
                 peak_memory_bytes=None if not self.peak_memory else self.peak_memory["bytes"])
        return d


class MethodTimer:
    """One method's share of a benchmark, in the phases `measure` and `measure_interleaved`
    put in order: `prepare` (compile, timed apart; warm-ups), `time_once` (one timed TTFT call
    of the fused prefill program, first token fetched to the host), `finish` (decode, peak
    memory, staged breakdown, FLOP counts → BenchResult).

    mesh: run under `jax.set_mesh(mesh)` (params and pixels already placed on it).
    video_time: Qwen2.5-VL's seconds per temporal patch (`pipeline.prefill`'s; a Python float,
    passed as a traced fp32 scalar), None for LLaVA-OneVision."""

    def __init__(self, params, cfg, pixels, prefix_ids, suffix_ids, method, name: str, ratio=None, mesh=None,
                 video_time: float | None = None):
        self.params, self.cfg, self.pixels, self.method, self.name, self.ratio = params, cfg, pixels, method, name, ratio
        self.pre = jnp.asarray(prefix_ids, jnp.int32)
        self.suf = jnp.asarray(suffix_ids, jnp.int32)
        self.mesh = mesh
        self.video_time = None if video_time is None else jnp.float32(video_time)
        self.times: list[float] = []
        self.cpu: list[float] = []  # process CPU seconds of each timed run
        self.compiled = self.compile_s = self.first = self.stats = self.decode = self.decode_compile_s = None
        self.kept = None  # (logits, caches, position) of the last timed run, when asked to keep it

    def _ctx(self):
        return contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)

    def _timing(self) -> dict:
        """The prefill's `video_time` keyword where the family takes one (Qwen2.5-VL), else none."""
        return {} if self.video_time is None else {"video_time": self.video_time}

    def _run(self):
        return self.compiled(self.params, self.pixels, self.pre, self.suf, **self._timing())

    def prepare(self, warmup: int, decode_tokens: int) -> None:
        """Compile the prefill (timed apart), `warmup` untimed calls; and, when decoding is
        timed, compile the decode loop on the last call's output and warm it up."""
        with self._ctx():
            t = time.perf_counter()
            self.compiled = pipeline.prefill_jit.lower(self.params, self.pixels, self.pre, self.suf, self.cfg,
                                                       self.method, max(16, decode_tokens), **self._timing()).compile()
            self.compile_s = time.perf_counter() - t
            out = None
            for _ in range(warmup):
                out = jax.block_until_ready(self._run())
            if decode_tokens > 1:
                logits, caches, pos, _ = out if out is not None else self._run()
                span = pipeline.decode_span(self.method, caches, self.pre.shape[0], self.suf.shape[0])
                hooked = {} if span is None else {"method": self.method, "span": span}  # decode-time pruning
                t = time.perf_counter()
                self.decode = pipeline.decode_loop.lower(self.params, logits, pos, caches, self.cfg, decode_tokens,
                                                         NEVER, **hooked).compile()
                self.decode_compile_s = time.perf_counter() - t
                for _ in range(max(1, warmup)):
                    jax.block_until_ready(self.decode(self.params, logits, pos, caches, NEVER))

    def time_once(self, keep: bool = False) -> float:
        """One timed TTFT call; keep: hold its output (logits, caches, position) for `finish`'s
        decode, so that no further prefill is needed."""
        out = None

        def run():
            nonlocal out
            out = self._run()
            return int(jnp.argmax(out[0])), out[3]

        with self._ctx():
            (self.first, self.stats), dt, cpu = timed(run)
        self.kept = out[:3] if keep else None
        self.times.append(dt)
        self.cpu.append(cpu)
        return dt

    def finish(self, runs: int, staged: bool, decode_tokens: int, xla: bool, window: dict | None = None) -> BenchResult:
        """`runs` timed greedy decodes of `decode_tokens` tokens in one on-device loop (EOS
        ignored, so the count is fixed), inside the peak-memory `window` that `measure` opened
        before the timed runs, from the last timed run's kept output; without them (interleaved
        timing, where other methods ran in between) inside a window of their own after one more
        untimed prefill. Then one staged run for the breakdown; then the FLOP counts (see the
        module docstring)."""
        params, pixels, pre, suf, cfg, method = self.params, self.pixels, self.pre, self.suf, self.cfg, self.method
        decode = None
        with self._ctx():
            if window is not None and self.kept is not None:
                (logits, caches, pos), self.kept = self.kept, None
            else:
                window = peak_memory_start(scope="one untimed prefill and the timed decodes")
                logits, caches, pos, _ = jax.block_until_ready(self._run())
            if decode_tokens > 1:
                dec_times = []
                for _ in range(max(1, runs)):
                    t = time.perf_counter()
                    toks, count = self.decode(params, logits, pos, caches, NEVER)
                    count = int(count)
                    dec_times.append(time.perf_counter() - t)
                steps = count - 1  # the first token came from the prefill
                decode = {"new_tokens": count, "decode_steps": steps, "compile_s": self.decode_compile_s,
                          "tokens": jax.device_get(toks[:count]).tolist(),
                          "seconds": dec_times, "tokens_per_s": steps / statistics.mean(dec_times),
                          "tokens_per_s_median": steps / statistics.median(dec_times),
                          "note": "greedy, one on-device loop, EOS ignored; tokens/s = decode steps / wall time"}
            peak = peak_memory_read(window)
            del logits, caches
            stages = {}
            if staged:
                vt = self.video_time
                pipeline.staged_prefill(params, pixels, pre, suf, cfg, method, 16, vt)  # compile the stages
                _, stages = pipeline.staged_prefill(params, pixels, pre, suf, cfg, method, 16, vt)
            frame_loop = stack.frame_loop(pixels.dtype)
        stats = {k: jax.device_get(v).tolist() for k, v in self.stats.items()
                 if k in FLOP_STATS}
        text = pre.shape[0] + suf.shape[0]
        f, executed = stage_flops(cfg, pixels.shape, text, stats, method, frame_loop=frame_loop)
        fx = None
        if xla:
            fx = xla_stage_flops(params, cfg, pixels.shape[0], pre.shape[0], suf.shape[0], method, 16,
                                 pixel_shape=pixels.shape)
            _, same = stage_flops(cfg, pixels.shape, text, stats, method, conditionals="largest")
            fx["analytic"] = same
            fx["xla_over_analytic"] = {k: fx[k] / same[k] for k in STAGES + ("total",) if same[k]}
        return BenchResult(
            method=self.name, ratio=self.ratio, compile_s=self.compile_s, ttft_s=list(self.times), stages_s=stages,
            frames=int(stats["frames"]), visual_tokens=int(stats["visual_tokens"]),
            llm_tokens_after_merge=stats.get("llm_kept"),
            flops=dict(vision=f.vision, tokens=f.tokens, llm=f.llm, total=f.total, paper_llm=f.paper_llm),
            flops_executed=executed, flops_xla=fx, decode=decode, peak_memory=peak,
            first_token=self.first, host_cpu_s=list(self.cpu),
        )


# what the FLOP counter reads of a prefill's stats
FLOP_STATS = ("frames", "visual_tokens", "llm_kept", "frames_after_layer", "llm_kept_stages", "llm_query_rows",
              "llm_query_slots", "llm_span_bucket", "signals_head")


def stage_flops(cfg, pixel_shape, text_tokens: int, stats: dict, method, conditionals: str = "executed",
                frame_loop: bool = False):
    """(exact `flops.PrefillFlops`, executed counts dict) of one prefill of pixels of
    `pixel_shape` ([T0, 3, S, S], or Qwen2.5-VL's [T', 3, H, W], whose grid the encoder's
    count needs), from the statistics the pipeline returned (Python values); frame_loop: the
    encoder ran frames one at a time (`stack.frame_loop`)."""
    if family.is_qwen(cfg):
        grid = flops.qwen_grid(cfg.vision, pixel_shape)
        return (flops.qwen_prefill_flops(cfg, grid, text_tokens, stats, method),
                flops.qwen_executed_prefill_flops(cfg, grid, text_tokens, stats, method, conditionals, frame_loop))
    t0 = pixel_shape[0]
    return (flops.prefill_flops(cfg, t0, text_tokens, stats, method),
            flops.executed_prefill_flops(cfg, t0, text_tokens, stats, method, conditionals, frame_loop))


def rounds(runs: int, desc: str, bar: bool):
    """range(runs), drawn as a progress bar (`progress.bar`) when `bar` (cleared when done)."""
    return progress.bar(runs, desc, "run", enabled=bar, leave=False, iterable=range(runs))


def measure(timer: MethodTimer, warmup: int = 2, runs: int = 5, staged: bool = True,
            decode_tokens: int = 32, xla: bool = True, bar: bool = False) -> BenchResult:
    """One method on its own: `prepare`, `runs` timed TTFT calls, `finish`. bar: a progress
    bar over the timed calls."""
    timer.prepare(warmup, decode_tokens)
    window = peak_memory_start(scope="the timed prefills and decodes")
    for i in rounds(runs, f"{timer.name}: timed runs", bar):
        timer.time_once(keep=i == runs - 1)
    return timer.finish(runs, staged, decode_tokens, xla, window=window if runs else None)


def measure_interleaved(timers: list[MethodTimer], warmup: int = 2, runs: int = 5, staged: bool = True,
                        decode_tokens: int = 32, xla: bool = True, progress=None,
                        bar: bool = False) -> list[BenchResult]:
    """Several methods timed in rounds: every method compiled and warmed up first, then `runs`
    rounds of one timed TTFT call per method, so that a host whose speed drifts over minutes (a
    shared VM; thermal limits) slows every method's i-th run alike and the ratios between
    methods hold; then each method's `finish`. `progress(result)` is called as each finishes;
    bar: a progress bar over the rounds."""
    for timer in timers:
        timer.prepare(warmup, decode_tokens)
    for _ in rounds(runs, "timed rounds", bar):
        for timer in timers:
            timer.time_once()
    results = []
    for timer in timers:
        results.append(timer.finish(runs, staged, decode_tokens, xla))
        if progress:
            progress(results[-1])
    return results
