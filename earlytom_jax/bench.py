"""TTFT measured the paper's way (spec: frame preprocessing excluded; vision encoding, token
selection, LLM prefill and the first token included; warm-ups, then mean and median), with
compile time apart, a per-stage breakdown, decode throughput, peak memory and FLOP counts.
Methods are timed one after another (`measure`), or interleaved (`measure_interleaved`: round
i holds every method's i-th run) so that per-round ratios survive a host whose speed drifts.

FLOPs come three ways (multiply and add counted as 2):

- `flops`: analytic, what the model needs for its *valid* tokens (flops.prefill_flops), and
  the paper's LLM-only closed form (`paper_llm`);
- `flops_executed`: analytic, what the compiled program executes with its static shapes
  (padding slots, masked attention squares, diagonal key blocks, frame buckets);
- `flops_xla`: XLA's cost analysis of the compiled stages. XLA charges a `while` loop (every
  `lax.scan`: the layer stacks, the blockwise attention) its body *once*, whatever the trip
  count, and a `lax.cond`/`lax.switch` its largest branch. `xla_stage_flops` makes the loops
  count: it walks the stage's jaxpr and adds (trips - 1) x XLA's count of each scan body
  (compiled on its own), nested loops multiplied through; conditionals keep XLA's largest
  branch. So this figure counts every key block of the blockwise causal attention (the
  program skips those above the diagonal) and the largest frame bucket; compare it with
  `flops_executed` computed with conditionals="largest" (`flops_xla["analytic"]`). What is
  left is elementwise work (norms, softmax, GELU, RoPE), which XLA counts and the analytic
  form does not: < 1% of a stage at the real widths, 2-17% at the `tiny` arch's 64/128.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from earlytom_jax import flops, pipeline
from earlytom_jax.models import llava_onevision as lov

STAGES = ("vision", "tokens", "llm")  # the staged breakdown's keys, in pipeline order
NEVER = np.asarray([-1], np.int32)  # an EOS list no token id matches: timed decodes run their full length


def prompt_ids() -> tuple[list[int], list[int]]:
    """Token ids standing in for the paper's prompt around the video, as the qwen_1_5 template
    lays it out: 14 before the video, 25 after (speed depends on the lengths only)."""
    return list(range(14)), list(range(100, 125))


def add_input_args(ap) -> None:
    """The benchmark scripts' shared flags (an argparse parser): --arch, --dtype, --frames,
    --video, --method, --ratio; see `random_inputs` and `named_method`."""
    ap.add_argument("--arch", default="llava-ov-0.5b")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--video", default=None, help="a video file (default: a generated clip)")
    ap.add_argument("--method", default="earlytom")
    ap.add_argument("--ratio", type=float, default=0.1)


def clip_frames(video: str | None, frames: int):
    """The frames a benchmark times: `frames` sampled from `video`, or a generated clip."""
    from earlytom_jax.synthetic import make_clip
    from earlytom_jax.video import load_video

    return load_video(video, frames).frames if video else make_clip(frames, 112)


def random_preprocessor(cfg):
    """SigLIP's preprocessing for a named architecture with random weights (a checkpoint
    directory brings its own: `Preprocessor.from_dir`)."""
    from earlytom_jax.video import Preprocessor

    return Preprocessor(size=cfg.vision.image_size, mean=(0.5,) * 3, std=(0.5,) * 3)


def shallow_encoder(cfg) -> bool:
    """Whether EarlyTom's default layers are mapped onto this encoder's depth when none are
    given (`scale_layers_for_depth`): the tiny and toy encoders, not SigLIP's 26 blocks."""
    return cfg.vision.num_layers < 24


def random_inputs(arch: str, dtype: str, frames: int, video: str | None = None):
    """What the benchmark scripts run on: the named architecture with random weights in
    `dtype` (packed as the pipeline holds them), `frames` frames of `video` (default: a
    generated clip) preprocessed, and the prompt ids. → (cfg, params, pixels, prefix, suffix)."""
    from earlytom_jax.architectures import architecture, random_params
    from earlytom_jax.models import stack

    cfg = architecture(arch)
    params = stack.pack(random_params(cfg, dtype=jnp.dtype(dtype)))
    pixels = jnp.asarray(random_preprocessor(cfg)(clip_frames(video, frames)), dtype)
    prefix, suffix = (jnp.asarray(ids, jnp.int32) for ids in prompt_ids())
    return cfg, params, pixels, prefix, suffix


def named_method(name: str, ratio: float, cfg):
    """A method by name at `ratio` (full tokens: none), with EarlyTom's layers scaled to a
    shallow encoder as `earlytom bench` does."""
    from earlytom_jax.compression import registry

    name = registry.canonical(name)
    kw = {"scale_layers_for_depth": True} if name == "earlytom" and shallow_encoder(cfg) else {}
    return registry.build(name, None if name == "full" else ratio, cfg, **kw)


def timed(fn):
    """fn() → (its result, wall seconds, the process's CPU seconds over all its threads)."""
    c, t = time.process_time(), time.perf_counter()
    out = fn()
    wall = time.perf_counter() - t
    return out, wall, time.process_time() - c


def cores_busy(cpu_s, wall_s) -> float:
    """CPU time over wall time, summed over runs: how many host cores were working, on average.
    On CPU, well below the core count means the program waits (host round trips, a serial
    stretch); XLA:CPU's workers spin briefly before they sleep, so a short wait can still count
    as busy. On accelerators: the host's share only."""
    return sum(cpu_s) / sum(wall_s)


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


# ----------------------------------------------------------------------------- peak memory


def peak_memory_start(scope: str = "the timed prefills and decodes") -> dict:
    """Start a peak-memory window over `scope` (what runs in it, for the JSON). On
    accelerators: the devices' `peak_bytes_in_use` (not resettable: peak since the process
    started). On CPU: the process's peak resident set (VmHWM), reset through
    /proc/self/clear_refs where the kernel allows it, else getrusage's ru_maxrss (peak since
    the process started)."""
    dev = jax.local_devices()
    if dev[0].platform != "cpu":
        stats = [d.memory_stats() or {} for d in dev]
        if all("peak_bytes_in_use" in st for st in stats):
            return {"kind": "device_peak_bytes_in_use", "scope": "max over local devices, since process start"}
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _vmhwm()
        return {"kind": "host_vmhwm", "scope": f"peak resident set of the process during {scope} (reset before them)"}
    except (OSError, ValueError):
        return {"kind": "host_ru_maxrss", "scope": "peak resident set of the process since it started"}


def _vmhwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise ValueError("no VmHWM")


def peak_memory_read(window: dict) -> dict:
    kind = window["kind"]
    if kind == "device_peak_bytes_in_use":
        b = max(int((d.memory_stats() or {}).get("peak_bytes_in_use", 0)) for d in jax.local_devices())
    elif kind == "host_vmhwm":
        b = _vmhwm()
    else:
        ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        b = ru if sys.platform == "darwin" else ru * 1024
    return dict(window, bytes=int(b))


CPU_FEATURES = ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2")  # what decides bf16/f32 dot speed


def host_cpu(cpuinfo: str | None = None) -> dict:
    """The host CPU as benchmark tables should name it: model, logical cores, and the few
    instruction-set features that decide matmul speed (PyTorch's bf16 runs on AMX or AVX512-BF16
    where they exist; XLA:CPU computes bf16 dots in f32). `cpuinfo`: /proc/cpuinfo's text
    (read when None; on other systems only the core count is known)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            cpuinfo = ""
    model, flags = None, set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return {"model": model, "logical_cores": os.cpu_count(),
            "features": [f for f in CPU_FEATURES if f in flags]}


def host() -> dict:
    """Where a measurement ran, for the JSON of benchmarks and evaluations: JAX's devices, the
    OS platform and the CPU (`host_cpu`)."""
    return {"devices": [str(d) for d in jax.devices()], "platform": platform.platform(), "cpu": host_cpu()}


# ----------------------------------------------------------------------------- XLA's count


def _cost_flops(stage) -> float:
    ca = stage.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    return float((ca or {}).get("flops", 0.0))


class _LoopAwareCount:
    """XLA's count of a function made loop-aware (see the module docstring)."""

    def __init__(self, compile_parts: bool = False):
        self.compile_parts = compile_parts
        self._cache: dict = {}
        self.while_loops = 0  # loops of unknown trip count, charged once as XLA does

    def part_flops(self, closed) -> float:
        key = id(closed)
        if key not in self._cache:
            from jax._src import core

            avals = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in closed.in_avals]
            lowered = jax.jit(core.jaxpr_as_fun(closed)).lower(*avals)
            self._cache[key] = (closed, _cost_flops(lowered.compile() if self.compile_parts else lowered))
        return self._cache[key][1]

    def _has_loop(self, jaxpr) -> bool:
        from jax._src import core

        jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
        return any(
            e.primitive.name in ("scan", "while") or any(self._has_loop(j) for j in core.jaxprs_in_params(e.params))
            for e in jaxpr.eqns
        )

    def extra(self, jaxpr) -> float:
        """FLOPs XLA's single count of `jaxpr` leaves out of its loops' other iterations."""
        from jax._src import core

        jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
        total = 0.0
        for e in jaxpr.eqns:
            name = e.primitive.name
            if name == "scan":
                body, trips = e.params["jaxpr"], int(e.params["length"])
                total += (trips - 1) * self.part_flops(body) + trips * self.extra(body)
            elif name == "cond":
                branches = e.params["branches"]
                if any(self._has_loop(b) for b in branches):
                    own = [self.part_flops(b) for b in branches]
                    total += max(c + self.extra(b) for c, b in zip(own, branches)) - max(own)
            else:
                if name == "while":
                    self.while_loops += 1
                for sub in core.jaxprs_in_params(e.params):
                    total += self.extra(sub)
        return total


def _abstract(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def xla_stage_flops(params, cfg, t0: int, prefix_len: int, suffix_len: int, method, max_new: int = 16,
                    compile_parts: bool = False) -> dict:
    """XLA's cost analysis of the three compiled prefill stages of `method` (the very jitted
    functions `pipeline.staged_prefill` times; for one device, from abstract shapes, so after
    a staged run without a mesh the compiled programs come from JAX's cache), made loop-aware.
    Loop bodies and branches are costed from their lowered HLO (`compile_parts=True`: compiled
    too; slower, same figures within 0.5%). Call it outside any `jax.set_mesh`: the count is
    of the model, not of one partition.
    → {"vision", "tokens", "llm", "total", "as_reported": {...}, "while_loops_counted_once"}."""
    count = _LoopAwareCount(compile_parts)
    size = cfg.vision.image_size
    P = _abstract(params)
    pix = jax.ShapeDtypeStruct((t0, 3, size, size), params["vision"]["patch_w"].dtype)
    pre = jax.ShapeDtypeStruct((prefix_len,), jnp.int32)
    suf = jax.ShapeDtypeStruct((suffix_len,), jnp.int32)
    feats, n, state = jax.eval_shape(pipeline._stage_vision, P, pix, cfg, method)
    h, valid, positions, _, _ = jax.eval_shape(pipeline._stage_tokens, P, feats, n, state, pre, suf, cfg, method)
    span = (prefix_len, h.shape[1] - suffix_len)
    stages = (
        ("vision", pipeline._stage_vision, (P, pix), (cfg, method)),
        ("tokens", pipeline._stage_tokens, (P, feats, n, state, pre, suf), (cfg, method)),
        ("llm", pipeline._stage_llm, (P, h, valid, positions), (span, cfg, method, max_new)),
    )
    out, raw = {}, {}
    for name, stage, args, static in stages:
        raw[name] = _cost_flops(stage.lower(*args, *static).compile())
        jaxpr = jax.make_jaxpr(lambda *a, stage=stage, static=static: stage(*a, *static))(*args)
        out[name] = raw[name] + count.extra(jaxpr)
    out["total"] = out["vision"] + out["tokens"] + out["llm"]
    raw["total"] = raw["vision"] + raw["tokens"] + raw["llm"]
    out["as_reported"] = raw
    out["while_loops_counted_once"] = count.while_loops
    return out


class MethodTimer:
    """One method's share of a benchmark, in the phases `measure` and `measure_interleaved`
    put in order: `prepare` (compile, timed apart; warm-ups), `time_once` (one timed TTFT call
    of the fused prefill program, first token fetched to the host), `finish` (decode, peak
    memory, staged breakdown, FLOP counts → BenchResult).

    mesh: run under `jax.set_mesh(mesh)` (params and pixels already placed on it)."""

    def __init__(self, params, cfg, pixels, prefix_ids, suffix_ids, method, name: str, ratio=None, mesh=None):
        self.params, self.cfg, self.pixels, self.method, self.name, self.ratio = params, cfg, pixels, method, name, ratio
        self.pre = jnp.asarray(prefix_ids, jnp.int32)
        self.suf = jnp.asarray(suffix_ids, jnp.int32)
        self.mesh = mesh
        self.times: list[float] = []
        self.cpu: list[float] = []  # process CPU seconds of each timed run
        self.compiled = self.compile_s = self.first = self.stats = self.decode = self.decode_compile_s = None
        self.kept = None  # (logits, caches, position) of the last timed run, when asked to keep it

    def _ctx(self):
        return contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)

    def _run(self):
        return self.compiled(self.params, self.pixels, self.pre, self.suf)

    def prepare(self, warmup: int, decode_tokens: int) -> None:
        """Compile the prefill (timed apart), `warmup` untimed calls; and, when decoding is
        timed, compile the decode loop on the last call's output and warm it up."""
        with self._ctx():
            t = time.perf_counter()
            self.compiled = pipeline.prefill_jit.lower(self.params, self.pixels, self.pre, self.suf, self.cfg,
                                                       self.method, max(16, decode_tokens)).compile()
            self.compile_s = time.perf_counter() - t
            out = None
            for _ in range(warmup):
                out = jax.block_until_ready(self._run())
            if decode_tokens > 1:
                logits, caches, pos, _ = out if out is not None else self._run()
                t = time.perf_counter()
                self.decode = pipeline.decode_loop.lower(self.params, logits, pos, caches, self.cfg, decode_tokens,
                                                         NEVER).compile()
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
                          "seconds": dec_times, "tokens_per_s": steps / statistics.mean(dec_times),
                          "tokens_per_s_median": steps / statistics.median(dec_times),
                          "note": "greedy, one on-device loop, EOS ignored; tokens/s = decode steps / wall time"}
            peak = peak_memory_read(window)
            del logits, caches
            stages = {}
            if staged:
                pipeline.staged_prefill(params, pixels, pre, suf, cfg, method, 16)  # compile the stages
                _, stages = pipeline.staged_prefill(params, pixels, pre, suf, cfg, method, 16)
        stats = {k: jax.device_get(v).tolist() for k, v in self.stats.items()
                 if k in ("frames", "visual_tokens", "llm_kept", "frames_after_layer")}
        text = pre.shape[0] + suf.shape[0]
        f = flops.prefill_flops(cfg, pixels.shape[0], text, stats, method)
        executed = flops.executed_prefill_flops(cfg, pixels.shape[0], text, stats, method)
        fx = None
        if xla:
            fx = xla_stage_flops(params, cfg, pixels.shape[0], pre.shape[0], suf.shape[0], method, 16)
            same = flops.executed_prefill_flops(cfg, pixels.shape[0], text, stats, method, conditionals="largest")
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


def measure(timer: MethodTimer, warmup: int = 2, runs: int = 5, staged: bool = True,
            decode_tokens: int = 32, xla: bool = True) -> BenchResult:
    """One method on its own: `prepare`, `runs` timed TTFT calls, `finish`."""
    timer.prepare(warmup, decode_tokens)
    window = peak_memory_start(scope="the timed prefills and decodes")
    for i in range(runs):
        timer.time_once(keep=i == runs - 1)
    return timer.finish(runs, staged, decode_tokens, xla, window=window if runs else None)


def measure_interleaved(timers: list[MethodTimer], warmup: int = 2, runs: int = 5, staged: bool = True,
                        decode_tokens: int = 32, xla: bool = True, progress=None) -> list[BenchResult]:
    """Several methods timed in rounds: every method compiled and warmed up first, then `runs`
    rounds of one timed TTFT call per method, so that a host whose speed drifts over minutes (a
    shared VM; thermal limits) slows every method's i-th run alike and the ratios between
    methods hold; then each method's `finish`. `progress(result)` is called as each finishes."""
    for timer in timers:
        timer.prepare(warmup, decode_tokens)
    for _ in range(runs):
        for timer in timers:
            timer.time_once()
    results = []
    for timer in timers:
        results.append(timer.finish(runs, staged, decode_tokens, xla))
        if progress:
            progress(results[-1])
    return results


def paired_speedups(r: BenchResult, full: BenchResult) -> dict | None:
    """Full's i-th TTFT over the method's i-th: with interleaved timing the two ran within one
    round, so the per-round ratio cancels a host's drift between rounds. → None unless both
    have the same number of runs; else {"rounds": [...], "median": m, "min": a, "max": b}."""
    if r is full or len(r.ttft_s) != len(full.ttft_s):
        return None
    rounds = [f / t for f, t in zip(full.ttft_s, r.ttft_s)]
    return {"rounds": rounds, "median": statistics.median(rounds), "min": min(rounds), "max": max(rounds)}


def find_full(results: list[BenchResult]) -> BenchResult | None:
    """The run's full-token result, if it has one."""
    return next((r for r in results if r.method == "full"), None)


def relate_to_full(results: list[BenchResult], interleaved: bool) -> None:
    """Set every other method's `at_full_rates` against the run's full tokens, and its `paired`
    per-round speed-ups only when the methods were timed interleaved: one after another, full's
    i-th run and the method's i-th lie minutes apart and a per-round ratio cancels nothing."""
    full = find_full(results)
    for r in results:
        if full is not None and r is not full:
            r.at_full_rates = at_full_stage_rates(r, full)
            r.paired = paired_speedups(r, full) if interleaved else None


def at_full_stage_rates(r: BenchResult, full: BenchResult) -> dict | None:
    """Splits a shortfall of a method's speed-up against its FLOPs ratio into its two causes.

    The FLOPs ratio (full's exact FLOPs over the method's) prices every FLOP alike. A device
    has a FLOP rate per stage (on 2-core CPUs SigLIP's 729-token blocks run slower per FLOP
    than a long LLM prefill), so a method whose savings lie mostly in the faster stage saves
    less time per FLOP saved; and a stage left with fewer rows runs at a lower rate itself
    (each weight matrix is streamed and packed once per pass, whatever the row count).

    → None unless both have staged times; else {"seconds": {stage: s, "total": s}, the method's
    exact FLOPs of each stage at full's FLOP rate in that stage; "flops_ratio"; "speedup": full's
    staged total over that total, what the method would reach if none of its stages ran slower
    per FLOP than full's; "stage_efficiency": that total over the method's own staged total (1.0:
    as fast per FLOP as full's stages; below: smaller products, or overhead)}."""
    if not (r.stages_s and full.stages_s):
        return None
    sec = {k: r.flops[k] * full.stages_s[k] / full.flops[k] if full.flops[k] else r.stages_s[k] for k in STAGES}
    sec["total"] = sum(sec[k] for k in STAGES)
    full_t = sum(full.stages_s[k] for k in STAGES)
    own_t = sum(r.stages_s[k] for k in STAGES)
    return {"seconds": sec, "flops_ratio": full.flops["total"] / r.flops["total"],
            "speedup": full_t / sec["total"], "stage_efficiency": sec["total"] / own_t}


def _label(r: BenchResult) -> str:
    return r.method if r.ratio is None else f"{r.method} {r.ratio}"


def _n(x: float) -> str:
    """3 significant digits, thousands separated (65.6, 0.00791, 6,418)."""
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.3g}"


def markdown(results: list[BenchResult], reference: dict | None = None) -> str:
    """The paper-style table; `reference` (bench_torch.measure's dict) adds its line."""
    full = find_full(results)
    rows = ["| method | ratio | frames left | visual tokens | GFLOPs (exact) | GFLOPs (XLA) | LLM GFLOPs (paper form) | TTFT mean s | median s | vs full | compile s | vision / tokens / LLM s | decode tok/s | peak MB |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        vs = f"{full.ttft_mean / r.ttft_mean:.2f}x" if full else "-"
        st = " / ".join(_n(r.stages_s[k]) for k in STAGES) if r.stages_s else "-"
        vis = f"{r.visual_tokens}" + (f" → {r.llm_tokens_after_merge}" if r.llm_tokens_after_merge is not None else "")
        xla = _n(r.flops_xla["total"] / 1e9) if r.flops_xla else "-"
        dec = _n(r.decode_tokens_per_s) if r.decode else "-"
        mem = f"{r.peak_memory['bytes'] / 2**20:,.0f}" if r.peak_memory else "-"
        rows.append(
            f"| {r.method} | {r.ratio if r.ratio is not None else '-'} | {r.frames} | {vis} | "
            f"{_n(r.flops['total'] / 1e9)} | {xla} | {_n(r.flops['paper_llm'] / 1e9)} | {_n(r.ttft_mean)} | "
            f"{_n(r.ttft_median)} | {vs} | {r.compile_s:.1f} | {st} | {dec} | {mem} |"
        )
    if reference:
        vs = f"{full.ttft_mean / reference['ttft_mean_s']:.2f}x" if full else "-"
        rows.append(
            f"| {reference['label']} | - | {reference['frames']} | {reference['visual_tokens']} | - | - | - | "
            f"{_n(reference['ttft_mean_s'])} | {_n(reference['ttft_median_s'])} | {vs} | - | - | - | - |"
        )
        if full:
            rows.append("")
            rows.append(f"JAX full / PyTorch full TTFT (mean): {full.ttft_mean / reference['ttft_mean_s']:.2f}")
    paired = [r for r in results if r.paired]
    if paired:
        rows.append("")
        rows.append("TTFT speed-up per round (full's i-th run over the method's i-th; see bench.paired_speedups):")
        for r in paired:
            p = r.paired
            rows.append(f"- {r.method} {r.ratio if r.ratio is not None else ''}: median {p['median']:.2f}x "
                        f"(rounds {p['min']:.2f}-{p['max']:.2f}x)")
    busy = [f"{_label(r)} {r.host_cores_busy:.2f}" for r in results if r.host_cores_busy is not None]
    if reference and "host_cores_busy" in reference:
        busy.append(f"PyTorch full {reference['host_cores_busy']:.2f}")
    if busy:
        rows.append("")
        rows.append(f"Host CPU cores busy during the timed TTFT runs (process CPU time / wall time, "
                    f"{os.cpu_count()} logical cores here): " + ", ".join(busy))
    checks = [(r, r.at_full_rates) for r in results if r.at_full_rates]
    if checks:
        rows.append("")
        rows.append("Speed-up against the FLOPs ratio, by stage rates (staged runs; see bench.at_full_stage_rates):")
        for r, a in checks:
            speedup = full.ttft_mean / r.ttft_mean
            rows.append(
                f"- {r.method} {r.ratio if r.ratio is not None else ''}: TTFT speed-up {speedup:.2f}x "
                f"= {speedup / a['flops_ratio']:.2f} of the FLOPs ratio {a['flops_ratio']:.2f}x; "
                f"at full's FLOP rate per stage its FLOPs would give {a['speedup']:.2f}x "
                f"({a['speedup'] / a['flops_ratio']:.2f} of it); its stages ran at {a['stage_efficiency']:.2f} of those rates"
            )
    return "\n".join(rows)
