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
- `flops_xla`: XLA's cost analysis of the compiled stages, made loop-aware (`xla_flops`).

The package, by concern: `inputs` (random-weight inputs, prompt ids, the clip, the scripts'
shared flags), `timing` (timers, `measure`, `measure_interleaved`, `BenchResult`),
`xla_flops` (the loop-aware walk of XLA's cost analysis), `probes` (peak memory, the host's
CPU, busy cores, the code's commit), `reports` (the markdown table, speed-ups against full
tokens), `session` (the whole `earlytom bench` run: loading, the PyTorch reference, JSON,
chart). The names below are re-exported so that `bench.X` reaches each.
"""

from earlytom_jax.bench.inputs import (BenchVideo, add_input_args, bench_video, clip_frames, named_method, prompt_ids,
                                       random_inputs, random_preprocessor)
from earlytom_jax.bench.probes import (CPU_FEATURES, code_commit, cores_busy, host, host_cpu, host_peak_start,
                                       package_versions, peak_memory_read, peak_memory_start)
from earlytom_jax.bench.reports import at_full_stage_rates, find_full, markdown, paired_speedups, relate_to_full
from earlytom_jax.bench.timing import (NEVER, STAGES, BenchResult, MethodTimer, measure, measure_interleaved, rounds,
                                       timed)
from earlytom_jax.bench.xla_flops import xla_stage_flops

__all__ = [
    "CPU_FEATURES", "NEVER", "STAGES", "BenchResult", "BenchVideo", "MethodTimer", "add_input_args",
    "at_full_stage_rates", "bench_video", "clip_frames", "code_commit", "cores_busy", "find_full", "host", "host_cpu",
    "host_peak_start", "markdown", "measure", "measure_interleaved", "named_method", "package_versions",
    "paired_speedups", "peak_memory_read", "peak_memory_start", "prompt_ids", "random_inputs", "random_preprocessor",
    "relate_to_full", "rounds", "timed", "xla_stage_flops",
]
