"""One `earlytom bench` run as a library call: preprocess the clip as the model's family reads it
(Qwen2.5-VL: sampled and sized within its pixel bounds, `inputs.bench_video`), load the weights
(a checkpoint, or a named architecture's random weights), time transformers' PyTorch model
first when asked (alone in memory), time every method at every ratio (`time_methods`:
`measure` or `measure_interleaved` on weights already loaded, also what
benchmarks/gpu_check.py runs), relate them to full tokens, and describe the run (`meta`, with
the host and the code's commit) for the JSON; `markdown`, `save_json` and `save_chart` write
the results out."""

from __future__ import annotations

import dataclasses
import datetime
import os
import sys

from earlytom_jax.bench.inputs import BenchVideo, bench_video, prompt_ids
from earlytom_jax.bench.probes import host
from earlytom_jax.bench.reports import find_full, markdown, relate_to_full
from earlytom_jax.bench.timing import BenchResult, MethodTimer, measure, measure_interleaved
from earlytom_jax.checkpoint import siglip_head
from earlytom_jax.compression import registry
from earlytom_jax.errors import ConfigError
from earlytom_jax.models import family
from earlytom_jax.video_qwen import QwenVideoSettings


@dataclasses.dataclass(frozen=True)
class BenchSpec:
    """What a bench run times (the flags of `earlytom bench`): `model` (a checkpoint directory)
    or `arch` (random weights of a named shape); `methods` (registry names or groups) at every
    one of `ratios` (full tokens once); the protocol (`warmup`, `runs`, `timing` "sequential" or
    "interleaved"); `staged` breakdown, `decode_tokens`, `xla` FLOP counts; `reference` "torch"
    to time transformers' full-token model too; `mesh` to shard (e.g. "data=2,model=4");
    `min_pixels`, `max_pixels`: Qwen2.5-VL's frame area bounds (ignored by LLaVA-OneVision,
    which resizes to its square)."""

    model: str | None = None
    arch: str | None = None
    video: str | None = None
    frames: int = 32
    methods: tuple[str, ...] = ("full", "earlytom")
    ratios: tuple[float, ...] = (registry.DEFAULT_RATIO,)
    warmup: int = 2
    runs: int = 5
    timing: str = "sequential"
    dtype: str = "float32"
    staged: bool = True
    decode_tokens: int = 32
    xla: bool = True
    reference: str | None = None
    mesh: str | None = None
    min_pixels: int = QwenVideoSettings.min_pixels
    max_pixels: int = QwenVideoSettings.max_pixels
    batches: tuple[int, ...] = ()  # --batch: batch sizes timed after the methods (`bench.batching`)
    # --siglip-head: the original SigLIP (FastVID's official signals); a named LLaVA architecture
    # gets a random head without it (checkpoint.siglip_head.model_head)
    siglip_head: str | None = None


@dataclasses.dataclass
class BenchRun:
    """A finished run: every method's result, the PyTorch reference's dict (or None), the
    run's description (`meta`) and the name of what was timed (`source`, for a chart's title)."""

    results: list[BenchResult]
    reference: dict | None
    meta: dict
    source: str
    batching: list[dict] | None = None  # `bench.batching.time_batches` rows, with method and ratio

    def markdown(self) -> str:
        text = markdown(self.results, self.reference)
        if self.batching:
            from earlytom_jax.bench import batching

            text += "\n\n" + batching.markdown(self.batching)
        return text

    def save_json(self, path: str) -> None:
        from earlytom_jax.io_utils import atomic_write_text, strict_json

        out = {"meta": self.meta, "results": [r.to_json() for r in self.results], "reference": self.reference,
               "batching": self.batching}
        atomic_write_text(path, strict_json(out, indent=1))  # null, not NaN

    def save_chart(self, path: str) -> None:
        import jax

        from earlytom_jax.chart import save_chart

        m = self.meta
        save_chart(path, self.results, self.reference,
                   title=f"TTFT breakdown: {self.source}, {m['frames']} frames, {m['dtype']}, {jax.devices()[0].platform}")


def to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _load(spec: BenchSpec, mesh, video: BenchVideo, prefix, suffix):
    """(cfg, params, reference or None, weights' description). The PyTorch reference runs
    first, alone in memory, so that the 7B shape (15 GB in bf16) never needs two models on a
    24 GB host; its weights then move into our tree."""
    import jax

    from earlytom_jax import sharding as shd
    from earlytom_jax.architectures import architecture, param_shapes, random_params
    from earlytom_jax.checkpoint.load import load_hf

    if spec.reference == "torch":
        from earlytom_jax import bench_torch

        def reference_of(model, cfg):
            return bench_torch.measure(model, video.pixels, prefix, suffix, cfg, spec.warmup, spec.runs,
                                       decode_tokens=spec.decode_tokens, video_time=video.video_time)
    reference = None
    if spec.model:
        from earlytom_jax.checkpoint.load import load_config

        cfg = load_config(spec.model)
        if spec.reference == "torch":
            torch_model = bench_torch.load_pretrained(spec.model, spec.dtype, cfg.family)
            reference = reference_of(torch_model, cfg)
            del torch_model
        shardings = None if mesh is None else shd.plan_shardings(param_shapes(cfg), mesh)[0]
        cfg, params = load_hf(spec.model, spec.dtype, shardings, cfg=cfg)
        return cfg, params, reference, spec.model
    cfg = architecture(spec.arch)
    shardings = None if mesh is None else shd.plan_shardings(param_shapes(cfg), mesh)[0]
    if spec.reference == "torch":
        # the random transformers model first; our tree gets its very weights
        torch_model = bench_torch.build_random(cfg, spec.dtype)
        reference = reference_of(torch_model, cfg)
        params = bench_torch.params_from_torch(torch_model, cfg, spec.dtype, shardings, release=True, held=True)
        del torch_model
        return cfg, params, reference, f"random ({spec.arch}), the same in JAX and in the PyTorch reference"
    params = random_params(cfg, dtype=jax.numpy.dtype(spec.dtype))
    if mesh is not None:
        params, _ = shd.shard_params(params, mesh)
    return cfg, params, reference, f"random ({spec.arch})"


def source_config(arch: str | None, model: str | None):
    """The config of a named architecture `arch`, else of the checkpoint directory `model`
    (read from its files, no weights)."""
    from earlytom_jax.architectures import architecture
    from earlytom_jax.checkpoint.load import load_any_config

    return architecture(arch) if arch else load_any_config(model)


def default_methods(cfg) -> tuple[str, ...]:
    """`earlytom bench`'s methods when --methods is not given: full tokens and EarlyTom."""
    return ("full", "earlytom")


def check_spec_frames(spec: BenchSpec, make_method, text_tokens: int, video: BenchVideo | None = None) -> None:
    """Every method's prompt at --frames within the context and the frames within the memory
    available (`api.check_frames`), before any weight is loaded: from the config alone for
    LLaVA-OneVision (no clip yet); for Qwen2.5-VL, whose length depends on the frame size, at
    the size of the preprocessed clip `video`."""
    from earlytom_jax.api import check_frames, sized_settings

    cfg = source_config(spec.arch, spec.model)
    frames, settings = spec.frames, None
    if video is not None and family.is_qwen(cfg):
        frames = video.pixels.shape[0]
        settings = sized_settings(QwenVideoSettings(frames, spec.min_pixels, spec.max_pixels), video.pixels.shape)
    for name, r in spec_methods(spec):
        check_frames(cfg, make_method(cfg, name, r), frames, text_tokens, max(16, spec.decode_tokens), settings=settings)


def spec_methods(spec: BenchSpec) -> list[tuple[str, float | None]]:
    """(name, ratio) of every method `spec` times, in order: full tokens once (ratio None),
    every other method at each of `spec.ratios`, a method written NAME@R at R alone (e.g.
    pdrop@0.5: PyramidDrop at its published schedule beside the others at --ratios).
    ConfigError (one line) on an unknown name or a bad R."""
    out: list[tuple[str, float | None]] = []
    for item in spec.methods:
        text, at, r = str(item).partition("@")
        ratios = [registry.check_ratio(r)] if at else list(spec.ratios)
        for name in registry.resolve([text]):
            for x in ([None] if name == "full" else ratios):
                if (name, x) not in out:
                    out.append((name, x))
    return out


def time_methods(spec: BenchSpec, make_method, cfg, params, pix_np, prefix, suffix, mesh=None, log=to_stderr,
                 after=None, video_time: float | None = None) -> list[BenchResult]:
    """Time every method of `spec` (`spec_methods`) on weights already loaded, with its protocol,
    and relate them to full tokens (`relate_to_full`). params: the tree as loaded (packed here
    for CPU: its bf16 leaves are consumed); pix_np: preprocessed frames [T, 3, S, S] (Qwen2.5-VL:
    [T', 3, H, W], with `video_time` its seconds per temporal patch); prefix, suffix: prompt ids.
    `log(line)` as each method finishes, then `after(result)`."""
    import jax

    from earlytom_jax import sharding as shd
    from earlytom_jax.models import stack

    params = stack.pack(params)  # bf16 on CPU: no f32 copy of the layer stacks (see models/stack.py)
    pixels = jax.numpy.asarray(pix_np, params["vision"]["patch_w"].dtype)
    if mesh is not None:
        pixels = jax.device_put(pixels, shd.frames_sharding(mesh, pixels.shape[0]))
    timers = [MethodTimer(params, cfg, pixels, prefix, suffix, make_method(cfg, name, r), name, r, mesh, video_time)
              for name, r in spec_methods(spec)]

    def progress(res):
        log(f"{res.method} r={res.ratio}: TTFT mean {res.ttft_mean:.3f} s (compile {res.compile_s:.1f} s)")
        if after is not None:
            after(res)

    opts = dict(warmup=spec.warmup, runs=spec.runs, staged=spec.staged, decode_tokens=spec.decode_tokens,
                xla=spec.xla, bar=True)
    if spec.timing == "interleaved":
        results = measure_interleaved(timers, progress=progress, **opts)
    else:
        results = []
        for timer in timers:
            results.append(measure(timer, **opts))
            progress(results[-1])
    relate_to_full(results, interleaved=spec.timing == "interleaved")
    return results


def run(spec: BenchSpec, make_method, log=to_stderr) -> BenchRun:
    """Time `spec`; make_method(cfg, name, ratio) builds each method (None ratio: full
    tokens). `log(line)`: one line as the reference and each method finish (default: stderr).
    ConfigError (one line) on a bad spec, a misspelt method or a missing torch, before any
    loading."""
    from earlytom_jax import sharding as shd

    if spec.frames < 1 or spec.runs < 1 or spec.warmup < 0 or spec.decode_tokens < 0:
        raise ConfigError("need --frames >= 1, --runs >= 1, --warmup >= 0 and --decode-tokens >= 0")
    if any(b < 1 for b in spec.batches):
        raise ConfigError(f"--batch {','.join(map(str, spec.batches))}: every batch size needs to be at least 1")
    spec_methods(spec)  # before any loading: a misspelt name fails at once
    mesh = shd.parse_mesh(spec.mesh) if spec.mesh else None
    if spec.reference == "torch":
        from earlytom_jax import bench_torch

        bench_torch.require()  # fail before any work when torch is missing
    cfg = source_config(spec.arch, spec.model)
    for name, _ in spec_methods(spec):  # a method not adapted to the family: before the clip is read
        registry.check_family(name, cfg)
    prefix, suffix = prompt_ids(cfg)
    if family.is_qwen(cfg):
        settings = QwenVideoSettings(spec.frames, spec.min_pixels, spec.max_pixels)
        video = bench_video(cfg, spec.video, spec.frames, spec.model, settings)
        check_spec_frames(spec, make_method, len(prefix) + len(suffix), video)
    else:
        check_spec_frames(spec, make_method, len(prefix) + len(suffix))  # before the clip is made
        video = bench_video(cfg, spec.video, spec.frames, spec.model)
    cfg, params, reference, weights = _load(spec, mesh, video, prefix, suffix)
    params = siglip_head.with_head(params, siglip_head.model_head(cfg, spec.model, spec.siglip_head, spec.dtype, mesh))
    if reference is not None:
        log(f"PyTorch full: TTFT mean {reference['ttft_mean_s']:.3f} s")
    results = time_methods(spec, make_method, cfg, params, video.pixels, prefix, suffix, mesh, log,
                           video_time=video.video_time)
    batch_rows = None
    if spec.batches:
        from earlytom_jax.bench import batching
        from earlytom_jax.models import stack

        batch_rows = []
        packed = stack.pack(params)
        for name, r in spec_methods(spec):
            rows = batching.time_batches(packed, cfg, video.pixels, prefix, suffix, make_method(cfg, name, r),
                                         spec.batches, spec.warmup, spec.runs, spec.decode_tokens, video.video_time)
            for row in rows:
                batch_rows.append({"method": name, "ratio": r, **row})
                log(f"{name} r={r} batch {row['batch']}: prefill {row['prefill_median_s']:.3f} s, "
                    f"{row['samples_per_s']:.2f} samples/s")
        batching.relate(batch_rows)
    full = find_full(results)
    if reference is not None:
        for r in results:
            r.ttft_over_reference = r.ttft_mean / reference["ttft_mean_s"]
        if full is not None:
            reference["jax_full_over_torch_full"] = full.ttft_mean / reference["ttft_mean_s"]
            reference["jax_full_over_torch_full_median"] = full.ttft_median / reference["ttft_median_s"]
            reference["same_first_token_as_jax_full"] = full.first_token == reference["first_token"]
            if reference.get("decode") and full.decode:
                reference["same_tokens_as_jax_full"] = reference["decode"]["tokens"] == full.decode["tokens"]
    meta = {"date": datetime.date.today().isoformat(), **host(), "weights": weights,
            "video": spec.video or "generated clip",
            "frames": spec.frames, "dtype": spec.dtype, "warmup": spec.warmup, "runs": spec.runs, "timing": spec.timing,
            "decode_tokens": spec.decode_tokens, "batches": list(spec.batches), "mesh": None if mesh is None else shd.describe(mesh),
            "reference": spec.reference, "command": " ".join(sys.argv),
            "xla_flags": os.environ.get("XLA_FLAGS", "")}
    if video.meta:
        meta["video_input"] = video.meta
    source = spec.arch or os.path.basename(os.path.normpath(spec.model))
    return BenchRun(results, reference, meta, source, batch_rows)
