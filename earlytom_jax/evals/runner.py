"""The evaluation loop behind `earlytom eval`: one task, one method, resumable, data-parallel.

    samples (task.load) ─► background workers: decode 32 frames + preprocess (look-ahead)
        ─► one worker thread per device group: prefill + on-device greedy decode (jitted;
           prompts left-padded to a multiple of `pad_multiple` tokens, so one program serves
           every question of a task) ─► parse + score ─► OUT/samples.jsonl (fsynced per line)
    at the end: OUT/samples.jsonl rewritten in task order, OUT/results.json (metrics + the
    whole configuration), OUT/submission.json for tasks scored by a server (EgoSchema).

Durability: OUT/config.json pins what the results mean (model, task, data, method, frames,
token limit, dtype); re-running the same command on the same OUT skips the samples already
recorded and runs the rest, and a different configuration is refused. A sample whose video
cannot be read goes to OUT/errors.jsonl (not scored; retried on the next run).

Scale: `mesh="data=N,model=M"` splits the devices into N groups of M; each group holds the
weights (tensor-parallel over its M devices) and answers every N-th sample. Across hosts
(after `jax.distributed.initialize()`), each process runs the groups of its local devices and
writes OUT/samples.host<i>.jsonl; process 0 merges. The samples a group answers depend only
on the sample's index, and each answer only on its own inputs, so any mesh gives the same
records as one device.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
import dataclasses
import datetime
import os
import random
import statistics
import threading
import time

import jax
from tqdm.contrib.logging import logging_redirect_tqdm

from earlytom_jax import flops, sharding
from earlytom_jax.bench import host, package_versions
from earlytom_jax.compression import registry
from earlytom_jax.errors import ConfigError, EarlyTomError
from earlytom_jax.evals import records as rec
from earlytom_jax.progress import bar as progress_bar
from earlytom_jax.io_utils import atomic_write_text, read_json, strict_json
from earlytom_jax.video import load_frame_dir

# lmms-eval let EgoSchema generate up to 1024 tokens (no generation_kwargs in its yaml); the
# answer is one letter, so by default we stop far earlier and record that we did.
TOKEN_CAP = 64


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """What to evaluate and where. `max_new_tokens` None: the task's limit, capped at
    TOKEN_CAP; `limit`: the first N samples of the task (in its order)."""

    model: str
    task: str
    data: str
    out: str
    frames: int = 32
    limit: int | None = None
    max_new_tokens: int | None = None
    dtype: str = "float32"
    mesh: str | None = None
    prefetch: int = 4
    pad_multiple: int = 32
    progress: bool = True
    min_pixels: int = 37632  # Qwen2.5-VL's frame area bounds (the official script's)
    max_pixels: int = 200704
    time_instruction: bool = False  # LLaVA-Video: lmms-eval llava_vid's add_time_instruction
    batch_size: int = 1  # videos per jitted call, split over the mesh's N data groups (each ⌈B / N⌉)
    siglip_head: str | None = None  # the original SigLIP's directory: FastVID's official signals (`VideoLLM.load`)

    def video(self):
        """Qwen2.5-VL's `QwenVideoSettings` of these settings."""
        from earlytom_jax.video_qwen import QwenVideoSettings

        return QwenVideoSettings(frames=self.frames, min_pixels=self.min_pixels, max_pixels=self.max_pixels)


def method_description(method) -> dict:
    """Registry name and every field of a method (JSON-friendly)."""
    d = {"name": registry.name(method), "repr": repr(method)}
    if dataclasses.is_dataclass(method):
        for f in dataclasses.fields(method):
            v = getattr(method, f.name)
            d[f.name] = list(v) if isinstance(v, tuple) else v
    return d


def _versions() -> dict:
    return package_versions(("earlytom-jax", "jax", "jaxlib", "flax", "numpy"))


def _token_limit(task, requested: int | None) -> tuple[int, str | None]:
    if requested is not None:
        if requested < 1:
            raise ConfigError(f"--max-new-tokens {requested}: need at least 1")
        return requested, None
    if task.max_new_tokens > TOKEN_CAP:
        return TOKEN_CAP, (f"{task.name}: lmms-eval allows {task.max_new_tokens} new tokens; capped at "
                           f"{TOKEN_CAP} (the answer is a letter; --max-new-tokens sets another limit)")
    return task.max_new_tokens, None


def _identity(s: EvalSettings, method, max_new: int) -> dict:
    return {
        "model": os.path.abspath(s.model), "task": s.task, "data": os.path.abspath(s.data),
        "method": repr(method), "frames": s.frames, "max_new_tokens": max_new, "dtype": s.dtype,
        "time_instruction": s.time_instruction,
        "siglip_head": None if s.siglip_head is None else os.path.abspath(s.siglip_head),
    }


# identity keys added after results directories existed, with the value such a directory ran with
_IDENTITY_DEFAULTS = {"time_instruction": False, "siglip_head": None}


def _check_identity(out: str, ident: dict) -> None:
    path = os.path.join(out, "config.json")
    if os.path.exists(path):
        old = read_json(path)
        diff = [k for k in ident if old.get(k, _IDENTITY_DEFAULTS.get(k)) != ident[k]]
        if diff:
            k = diff[0]
            raise ConfigError(
                f"{out} holds results for {k}={old.get(k)!r}, not {ident[k]!r}; "
                "use another --out, or the same settings to resume"
            )
    else:
        atomic_write_text(path, strict_json(ident, indent=1))


def device_groups(mesh_spec: str | None) -> tuple[list, list[int]]:
    """→ (meshes of this process's device groups, their global group indices). Without a
    mesh: one group on the default device ([None], [0])."""
    if not mesh_spec:
        return [None], [0]
    mesh = sharding.parse_mesh(mesh_spec)
    me = jax.process_index()
    groups, index = [], []
    for i in range(mesh.devices.shape[0]):
        row = mesh.devices[i : i + 1]
        if all(d.process_index == me for d in row.flat):
            groups.append(jax.sharding.Mesh(row, ("data", "model")))
            index.append(i)
    return groups, index


def _record(task, sample, ans, cfg, method, n_prompt_tokens: int, frames: int, pixel_shape, batch: int = 1) -> dict:
    parsed, drawn = task.parse(ans.text, sample, random.Random(f"{task.name}:{sample.id}"))
    correct = task.correct(parsed, sample)
    stats = ans.stats
    if cfg.family == "qwen2_5_vl":  # its encoder's work depends on the frame size
        pf = flops.qwen_prefill_flops(cfg, flops.qwen_grid(cfg.vision, pixel_shape), n_prompt_tokens, stats, method)
    else:
        pf = flops.prefill_flops(cfg, frames, n_prompt_tokens, stats, method)
    return {
        "id": sample.id, "prompt": sample.context, "answer": ans.text, "parsed": parsed,
        "random": bool(drawn), "gold": sample.gold, "correct": correct,
        "visual_tokens": int(stats["visual_tokens"]), "frames_after_merge": int(stats.get("frames", frames)),
        "llm_kept": stats.get("llm_kept"), "ttft_s": round(ans.ttft_s, 6), "batch": batch,
        "new_tokens": len(ans.tokens),
        "flops": pf.total, "flops_paper_llm": pf.paper_llm, "meta": sample.meta,
    }


class _Writer:
    """Thread-safe: append a record (or an error), advance the progress bar."""

    def __init__(self, path: str, err_path: str, bar):
        self.log = rec.RecordLog(path)
        self.err_path = err_path
        self.bar = bar
        self.errors = 0
        self.lock = threading.Lock()

    def put(self, record: dict) -> None:
        with self.lock:
            self.log.append(record)
            self.bar.update()

    def error(self, sample, exc: Exception) -> None:
        with self.lock:
            with rec.RecordLog(self.err_path) as log:
                log.append({"id": sample.id, "video": sample.video, "error": str(exc)})
            self.errors += 1
            self.bar.set_postfix_str(f"{self.errors} unreadable", refresh=False)
            self.bar.update()

    def close(self):
        self.log.close()
        self.bar.close()


def _worker(llm, task, method, items, s: EvalSettings, max_new: int, pool, writer, stop: threading.Event,
            batch: int = 1):
    """Answer `items` in order on one device group, decoding videos `s.prefetch` ahead, `batch`
    videos of one pixel shape per jitted call (a smaller batch, the last or one cut short by a
    change of shape, is filled up to `batch` and reuses the program)."""
    def load(sample):
        """(pixels, video_time) of one sample: a video file as the model's family samples it; a
        folder of frames (MVBench) read as `s.frames` evenly spaced stills, then preprocessed
        (for Qwen2.5-VL at its pixel bounds: lmms-eval's qwen2_5_vl passes no folder on at all)."""
        if os.path.isdir(sample.video):
            vf = load_frame_dir(sample.video, s.frames)
        else:
            vf = llm.load_video(sample.video, s.frames)
        return (*llm.prepare(vf.frames), vf)

    pending: collections.deque = collections.deque()
    it = iter(items)

    def fill():
        while len(pending) < max(1, s.prefetch, batch):
            sample = next(it, None)
            if sample is None:
                return
            pending.append((sample, pool.submit(load, sample)))

    def record(sample, ans, pixels, question, batch):
        ids = llm.prompt_ids(question)
        # the frames encoded: LLaVA-Video's 1-a-second sampling may give fewer than --frames
        writer.put(_record(task, sample, ans, llm.cfg, method, len(ids.prefix) + len(ids.suffix), pixels.shape[0],
                           pixels.shape, batch))

    group: list = []  # loaded samples of one pixel shape waiting for a batch

    def flush():
        if batch == 1:
            for sample, pixels, video_time, question in group:
                ans = llm.answer(pixels, question, method, max_new, pad_multiple=s.pad_multiple, video_time=video_time)
                record(sample, ans, pixels, question, 1)
        elif group:
            answers = llm.answer_batch([g[1] for g in group], [g[3] for g in group], method, max_new,
                                       s.pad_multiple, batch, [g[2] for g in group])
            for (sample, pixels, _, question), ans in zip(group, answers):
                record(sample, ans, pixels, question, len(group))
        group.clear()

    fill()
    while pending and not stop.is_set():
        sample, fut = pending.popleft()
        fill()
        try:
            pixels, video_time, vf = fut.result()
        except EarlyTomError as e:
            writer.error(sample, e)
            continue
        if group and group[0][1].shape != pixels.shape:
            flush()
        group.append((sample, pixels, video_time, llm.question_for(sample.context, vf)))
        if len(group) == batch or not pending:
            flush()
    if not stop.is_set():
        flush()


def run_eval(s: EvalSettings, method, llm=None) -> dict:
    """Run (or resume) one evaluation; returns the results dict also written to
    OUT/results.json. `llm`: an already loaded VideoLLM (else loaded from s.model)."""
    from earlytom_jax.api import VideoLLM
    from earlytom_jax.evals.tasks import get_task

    if s.frames < 1:
        raise ConfigError(f"--frames {s.frames}: need at least 1")
    task = get_task(s.task)
    max_new, note = _token_limit(task, s.max_new_tokens)
    samples = task.load(s.data)
    if s.limit is not None:
        samples = samples[: max(0, s.limit)]
    if not samples:
        raise ConfigError(f"{s.data}: no samples to evaluate for {s.task}")
    groups, index = device_groups(s.mesh)
    n_groups = sharding.parse_mesh(s.mesh).devices.shape[0] if s.mesh else 1
    if s.batch_size < 1:
        raise ConfigError(f"--batch-size {s.batch_size}: need at least 1")
    batch = -(-s.batch_size // n_groups)  # each data group's share of the batch, rounded up

    os.makedirs(s.out, exist_ok=True)
    if llm is None:
        llm = VideoLLM.load(s.model, s.dtype, groups[0], video=s.video(), time_instruction=s.time_instruction,
                            siglip_head=s.siglip_head)
    else:
        if s.time_instruction and llm.cfg.family != "llava_video":
            raise ConfigError("--time-instruction is LLaVA-Video's; leave it out for this model")
        llm = dataclasses.replace(llm, time_instruction=s.time_instruction)
        if groups[0] is not None:
            llm = llm.placed(groups[0])
    if hasattr(method, "check"):
        method = method.check(llm.cfg)
    _check_identity(s.out, _identity(s, method, max_new))
    if note:
        print(f"note: {note}", flush=True)

    multi = jax.process_count() > 1
    own = os.path.join(s.out, f"samples.host{jax.process_index()}.jsonl" if multi else "samples.jsonl")
    done = rec.collect(rec.shard_files(s.out))
    wanted = {x.id for x in samples}
    n_done = len(wanted & done.keys())
    per_group = {g: [] for g in index}
    for i, x in enumerate(samples):
        if i % n_groups in per_group and x.id not in done:
            per_group[i % n_groups].append(x)
    models = [llm] + [llm.placed(m) for m in groups[1:]]

    todo = sum(len(v) for v in per_group.values())
    if n_done:
        print(f"resuming {s.out}: {n_done} of {len(samples)} samples done, {todo} to run here", flush=True)
    bar = progress_bar(len(samples), s.task, "sample", s.progress, initial=n_done)
    writer = _Writer(own, os.path.join(s.out, "errors.jsonl"), bar)
    stop = threading.Event()
    t_start = time.perf_counter()
    try:
        # warnings logged meanwhile (a truncated video) print above the bar, not through it
        with logging_redirect_tqdm() if s.progress else contextlib.nullcontext(), \
                cf.ThreadPoolExecutor(max(1, s.prefetch), thread_name_prefix="video") as pool, \
                cf.ThreadPoolExecutor(len(models), thread_name_prefix="device") as workers:
            futs = [workers.submit(_worker, m, task, method, per_group[g], s, max_new, pool, writer, stop, batch)
                    for m, g in zip(models, index)]
            try:
                for f in cf.as_completed(futs):
                    f.result()
            except BaseException:
                stop.set()
                raise
    finally:
        writer.close()
    wall = time.perf_counter() - t_start

    if multi:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("earlytom-eval-done")
        if jax.process_index() != 0:
            return {}
    merged = rec.collect(rec.shard_files(s.out))
    rows = rec.write_merged(os.path.join(s.out, "samples.jsonl"), merged, [x.id for x in samples])
    errors = {r["id"] for r in rec.read_records(os.path.join(s.out, "errors.jsonl"))} - merged.keys()
    results = _results(s, task, method, max_new, note, rows, len(samples), errors, llm, wall)
    sub = task.submission(rows)
    if sub is not None:
        atomic_write_text(os.path.join(s.out, "submission.json"), strict_json(sub, indent=1))
    atomic_write_text(os.path.join(s.out, "results.json"), strict_json(results, indent=1))  # null, not NaN
    return results


def _results(s, task, method, max_new, note, rows, n_samples, errors, llm, wall) -> dict:
    ttft = [r["ttft_s"] for r in rows]
    mean = (lambda xs: statistics.fmean(xs) if xs else None)
    return {
        "task": task.name,
        "complete": len(rows) == n_samples,
        "metrics": task.metrics(rows),
        "counts": {"samples": n_samples, "recorded": len(rows), "unreadable": len(errors),
                   "random_draws": sum(bool(r["random"]) for r in rows)},
        "speed": {"ttft_mean_s": mean(ttft), "ttft_median_s": statistics.median(ttft) if ttft else None,
                  "wall_s_this_run": round(wall, 3),
                  "visual_tokens_mean": mean([r["visual_tokens"] for r in rows]),
                  "flops_mean": mean([r["flops"] for r in rows]),
                  "flops_paper_llm_mean": mean([r["flops_paper_llm"] for r in rows])},
        "config": {
            "model": os.path.abspath(s.model), "task": s.task, "data": os.path.abspath(s.data),
            "method": method_description(method), "frames": s.frames, "max_new_tokens": max_new,
            "token_limit_note": note, "dtype": s.dtype, "mesh": s.mesh, "limit": s.limit,
            "pad_multiple": s.pad_multiple, "batch_size": s.batch_size, "model_config": dataclasses.asdict(llm.cfg),
            "versions": _versions(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            **host(),
        },
    }


def summary_lines(results: dict) -> list[str]:
    """A small table of the metrics (nested dicts flattened as a/b), for the terminal."""
    flat = []

    def walk(prefix, v):
        if isinstance(v, dict):
            for k, x in v.items():
                walk(f"{prefix}/{k}" if prefix else str(k), x)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            flat.append((prefix, v))

    walk("", results.get("metrics", {}))
    width = max([len(k) for k, _ in flat] + [6])
    lines = [f"{'metric'.ljust(width)}  value", f"{'-' * width}  -----"]
    lines += [f"{k.ljust(width)}  {v:.4g}" if isinstance(v, float) else f"{k.ljust(width)}  {v}" for k, v in flat]
    c, sp = results["counts"], results["speed"]
    lines.append(f"{c['recorded']}/{c['samples']} samples, {c['random_draws']} random fallbacks, "
                 f"{c['unreadable']} unreadable; TTFT mean {sp['ttft_mean_s']:.3f} s, "
                 f"visual tokens {sp['visual_tokens_mean']:.0f}")
    return lines


