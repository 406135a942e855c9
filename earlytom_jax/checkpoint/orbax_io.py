"""HF safetensors checkpoint → converted directory (orbax parameter tree + our config), and back.

The directory's layout and config file: checkpoint/converted.py. The parameters' paths, shapes
and sources: the model module and checkpoint/table.py.

Streaming. `iter_params` yields one tensor (or one layer stack) at a time from memory-mapped
safetensors. Leaves are gathered into small groups (at most `_GROUP_BYTES`, or one tensor when
it is larger) and each group is written with one orbax *partial save*
(`orbax.checkpoint.experimental.v1.partial.save`, which adds new leaves to a pending checkpoint);
`partial.finalize` then merges the pending writes into one ordinary orbax checkpoint of the
whole tree. So at most one group is in memory, never the whole model, and the result loads with
a single `ocp.load` straight into (sharded) jax arrays. Host arrays are not deep-copied by orbax
(`deepcopy_host_arrays=False`; nothing mutates them), arrays are stored uncompressed (restore
speed is the point of converting; zstd saves ~20% of disk on bf16 weights but restores 3x
slower) and chunked at `_CHUNK_BYTES`, so a sharded restore reads only its own chunks and a
restore never holds more than one chunk beyond the result.

Everything is written into `DST.tmp-<random>` next to DST and renamed to DST only after the
result has been validated (every leaf's shape and dtype from the orbax metadata, plus the first
and last layer of a few tensors compared bit for bit with the source). Any failure removes the
temporary directory: DST either appears complete or not at all.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time

import jax
import numpy as np

from earlytom_jax.checkpoint import staging, table
from earlytom_jax.checkpoint.converted import (
    CONFIG_FILE, PARAMS_DIR, config_dict, config_from_json, is_converted, read_config_file, stored_dtype,
)
from earlytom_jax.checkpoint.hf import iter_params, map_tensors, mismatch
from earlytom_jax.checkpoint.placement import resolve_dtype, sharding_lookup
from earlytom_jax.checkpoint.safetensors_io import fresh_maps, open_checkpoint_files
from earlytom_jax.config import ModelConfig, load_config
from earlytom_jax.errors import CheckpointError, one_line
from earlytom_jax.models.params import set_path
from earlytom_jax.progress import bar as progress_bar, human_bytes as _human

__all__ = ["config_from_json", "convert_checkpoint", "is_converted", "load_converted"]

# (source name, name in the converted directory, required)
_COPIES = (
    ("config.json", "hf_config.json", True),
    ("tokenizer.json", "tokenizer.json", True),
    ("preprocessor_config.json", "preprocessor_config.json", True),
    ("tokenizer_config.json", "tokenizer_config.json", False),
    ("video_preprocessor_config.json", "video_preprocessor_config.json", False),
    ("chat_template.json", "chat_template.json", False),
)
_GROUP_BYTES = 256 << 20  # leaves per orbax partial save: flush once this much is gathered
_CHUNK_BYTES = 64 << 20  # zarr chunk size of stored arrays
_HEADROOM_BYTES = 64 << 20  # free space asked for beyond the parameters: orbax metadata, temporary files
# Leaves compared with the source after writing (first and last layer of the stacked ones).
_SPOT = (
    ("vision", "patch_w"),
    ("newline",),
    ("text", "norm"),
    ("vision", "blocks", "q_w"),
    ("text", "layers", "k_w"),
    ("text", "layers", "v_b"),
)


# ----------------------------------------------------------------------------- small helpers


def _proc_status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _peak_rss() -> int | None:
    """Peak resident set size of this process so far (bytes), when the OS tells."""
    hwm = _proc_status_kb("VmHWM")
    if hwm is not None:
        return hwm
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except (ImportError, OSError):
        return None


def _disk_bytes(directory: str) -> int:
    total = 0
    for root, _, files in os.walk(directory):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


def _flatten(tree, prefix=()) -> dict[tuple[str, ...], object]:
    """Nested dicts → {path tuple: leaf}."""
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, prefix + (str(k),)))
        return out
    return {prefix: tree}


def _bit_equal(a, b) -> bool:
    a, b = np.ascontiguousarray(np.asarray(a)), np.ascontiguousarray(np.asarray(b))
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a.view(np.uint8), b.view(np.uint8))


# ----------------------------------------------------------------------------- orbax glue


def _ocp():
    import orbax.checkpoint.experimental.v1 as ocp  # heavy import: only when used

    return ocp


def _save_context():
    ocp = _ocp()
    ctx = ocp.Context()
    ctx.memory.deepcopy_host_arrays = False
    ctx.array.saving.use_compression = False
    ctx.array.saving.storage_options.chunk_byte_size = _CHUNK_BYTES
    return ctx


def _write_group(params_dir: str, group: dict) -> None:
    """Add the leaves of `group` (nested dicts of numpy arrays) to the pending orbax checkpoint."""
    from orbax.checkpoint.experimental.v1 import partial

    response = partial.save_async(params_dir, group)
    try:
        response.result()
    except BaseException:
        # Interrupted (Ctrl-C) or failed while orbax's background thread may still be writing:
        # let it stop before the caller removes the temporary directory under it.
        try:
            response.result()
        except BaseException:
            pass
        raise


def _finalize(params_dir: str) -> None:
    from orbax.checkpoint.experimental.v1 import partial

    partial.finalize(params_dir)


def _stored_metadata(params_dir: str) -> dict[tuple[str, ...], tuple[tuple[int, ...], np.dtype]]:
    """{path: (shape, dtype)} of every leaf, read from the orbax metadata (no array data)."""
    try:
        meta = _ocp().metadata(params_dir).metadata
    except Exception as e:  # orbax raises several types for a missing or broken checkpoint
        raise CheckpointError(f"{params_dir}: cannot read the orbax checkpoint metadata ({one_line(e)})") from None
    return {p: (tuple(m.shape), np.dtype(m.dtype)) for p, m in _flatten(meta).items()}


def _check_stored(params_dir: str, expected: dict, dtype: np.dtype) -> None:
    stored = _stored_metadata(params_dir)
    missing = ["/".join(p) for p in expected if p not in stored]
    extra = ["/".join(p) for p in stored if p not in expected]
    wrong = [
        f"{'/'.join(p)} {stored[p][0]} {stored[p][1].name} != {expected[p]} {dtype.name}"
        for p in expected
        if p in stored and (stored[p][0] != expected[p] or stored[p][1] != dtype)
    ]
    problems = mismatch(missing, extra, wrong)
    if problems:
        raise CheckpointError(f"{params_dir}: stored tensors do not match the config: " + "; ".join(problems))


def _restore(params_dir: str, abstract: dict, partial_load: bool = False) -> dict:
    ocp = _ocp()
    ctx = ocp.Context()
    ctx.pytree.loading.partial_load = partial_load
    # Bound the bytes in flight (read buffers not yet turned into arrays) to two of the largest
    # leaf instead of the whole model: reads go on as soon as earlier arrays are placed.
    largest = max(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in _flatten(abstract).values())
    ctx.memory.read_concurrent_bytes = max(2 * largest, 512 << 20)
    try:
        with ctx:
            return ocp.load(params_dir, abstract)
    except Exception as e:
        raise CheckpointError(f"{params_dir}: cannot restore the parameters ({one_line(e)})") from None


def _spot_check(params_dir: str, cfg: ModelConfig, files: dict, dtype: np.dtype) -> int:
    """Compare the first and last layer of a few stored tensors with the source, bit for bit."""
    canon, rows = map_tensors(files, cfg)
    rows = {r.path: r for r in rows if r.path in _SPOT}
    dev = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    abstract: dict = {}
    for path, r in rows.items():
        shape = ((r.layers,) if r.layers else ()) + r.shape
        set_path(abstract, path, jax.ShapeDtypeStruct(shape, dtype, sharding=dev))
    got = _flatten(_restore(params_dir, abstract, partial_load=True))
    checked = 0
    for path, r in rows.items():
        stored = np.asarray(got[path])
        names = r.sources()
        for i in sorted({0, len(names) - 1}):
            f, n = canon[names[i]]
            if not _bit_equal(stored[i] if r.layers else stored, r.to_ours(f.get(n)).astype(dtype)):
                where = f"{'/'.join(path)}[{i}]" if r.layers else "/".join(path)
                raise CheckpointError(f"{params_dir}: {where} differs from the source after writing")
            checked += 1
    return checked


# ----------------------------------------------------------------------------- conversion


def _no_space(e: BaseException) -> bool:
    while e is not None:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def convert_checkpoint(src: str, dst: str, dtype: str = "bfloat16", progress: bool = True) -> dict:
    """Convert the HF checkpoint directory `src` (any supported layout, single file or sharded)
    into a converted directory `dst` (see the module docstring). Returns a summary dict:
    tensors, bytes (parameter bytes written), disk_bytes, seconds, largest_tensor_bytes,
    rss_start_bytes and peak_rss_bytes (this process's peak so far; None when unknown).

    Also: removed_leftovers (staging directories of killed conversions to DST, removed first)
    and other_staging_dirs (ones kept, with the reason: see checkpoint/staging.py).

    Raises CheckpointError (one line) when DST exists, SRC is not a usable checkpoint, the
    tensors do not match the config, DST's parent is not writable or lacks the space, the disk
    fills up, or the written result fails validation; in every failure case, Ctrl-C and SIGTERM
    included, no DST and no temporary directory is left behind.
    """
    t0 = time.perf_counter()
    rss_start = _proc_status_kb("VmRSS")
    src = os.fspath(src)
    dst = os.path.abspath(os.fspath(dst)).rstrip(os.sep)
    if os.path.lexists(dst):
        raise CheckpointError(f"{dst} already exists; choose another path or remove it")
    dt = resolve_dtype(dtype)
    if not os.path.isdir(src):
        raise CheckpointError(f"{src}: not a directory; point SRC at a HuggingFace checkpoint directory")
    if os.path.abspath(src) == dst:
        raise CheckpointError(f"{dst}: SRC and DST are the same directory")
    # Everything about SRC is checked before anything is written.
    cfg = load_config(src)
    files = fresh_maps(open_checkpoint_files(src))
    map_tensors(files, cfg)  # names and shapes against the config
    for name, _, required in _COPIES:
        if required and not os.path.isfile(os.path.join(src, name)):
            raise CheckpointError(
                f"{os.path.join(src, name)}: not found; the converted checkpoint needs it to be usable "
                "(add it to SRC and convert again)"
            )
    expected = table.shapes(cfg)
    total = sum(int(np.prod(s)) * dt.itemsize for s in expected.values())
    largest = max(int(np.prod(s)) * dt.itemsize for s in expected.values())
    parent = os.path.dirname(dst)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"{parent}: cannot create the destination's parent ({one_line(e)})") from None
    with staging.terminate_as_interrupt():  # SIGTERM cleans up as Ctrl-C does
        removed, kept = staging.sweep(dst)
        try:  # writable? (before the free-space figure, which a read-only disk also reports)
            tmp = staging.create(dst)
        except OSError as e:
            raise CheckpointError(f"{parent}: cannot write there ({one_line(e)}); choose a writable DST") from None
        bar = progress_bar(total, "converting", unit="B", enabled=progress, unit_scale=True)
        done = 0
        try:
            free = shutil.disk_usage(parent).free
            if free < total + _HEADROOM_BYTES:
                raise CheckpointError(
                    f"{parent}: {_human(free)} free but the conversion needs {_human(total + _HEADROOM_BYTES)} "
                    f"({_human(total)} of {dt.name} parameters and {_human(_HEADROOM_BYTES)} for orbax's metadata "
                    "and temporary files); free some space or choose another DST"
                )
            params_dir = os.path.join(tmp, PARAMS_DIR)
            count = 0
            with _save_context():
                group: dict = {}
                gbytes = 0

                def flush():
                    nonlocal group, gbytes, done
                    _write_group(params_dir, group)
                    done += gbytes
                    bar.update(gbytes)
                    group, gbytes = {}, 0

                for path, arr in iter_params(files, cfg, dt):
                    if group and gbytes + arr.nbytes > _GROUP_BYTES:
                        flush()  # keep a big tensor out of a group of small ones
                    set_path(group, path, arr)
                    gbytes += arr.nbytes
                    count += 1
                    del arr
                    if gbytes >= _GROUP_BYTES:
                        flush()
                if group:
                    flush()
                bar.set_postfix_str("finalizing")
                _finalize(params_dir)
            bar.set_postfix_str("validating")
            _check_stored(params_dir, expected, dt)
            spot = _spot_check(params_dir, cfg, files, dt)
            with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
                json.dump(config_dict(cfg, dt), f, indent=1)
            for name, out, _ in _COPIES:
                if os.path.isfile(os.path.join(src, name)):
                    shutil.copyfile(os.path.join(src, name), os.path.join(tmp, out))
            os.remove(os.path.join(tmp, staging.OWNER_FILE))
            if os.path.lexists(dst):
                raise CheckpointError(f"{dst} already exists (created during the conversion); choose another path or remove it")
            os.rename(tmp, dst)
        except BaseException as e:
            bar.close()
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, CheckpointError):
                raise
            if _no_space(e):
                raise CheckpointError(
                    f"{dst}: no space left on device after {_human(done)} of {_human(total)}; nothing was kept, "
                    f"free at least {_human(total)} on {parent} and convert again"
                ) from None
            if isinstance(e, OSError):
                raise CheckpointError(f"{dst}: writing failed, nothing was kept ({one_line(e)})") from None
            raise
    bar.close()
    return {
        "src": os.path.abspath(src),
        "dst": dst,
        "dtype": dt.name,
        "tensors": count,
        "bytes": total,
        "disk_bytes": _disk_bytes(dst),
        "largest_tensor_bytes": largest,
        "spot_checked": spot,
        "seconds": round(time.perf_counter() - t0, 3),
        "rss_start_bytes": rss_start,
        "peak_rss_bytes": _peak_rss(),
        "removed_leftovers": [{"path": p, "bytes": n} for p, n in removed],
        "other_staging_dirs": [{"path": p, "why": why} for p, why in kept],
    }


# ----------------------------------------------------------------------------- loading


def load_converted(directory: str, dtype=None, shardings=None) -> tuple[ModelConfig, dict]:
    """A converted directory → (config, params), restored by orbax straight into jax arrays.

    dtype: None keeps the stored dtype; "float32"/"bfloat16" (or a numpy dtype) casts on read.
    shardings: None puts every array on the first local device; otherwise a pytree of
    `jax.sharding.Sharding` matching the parameter tree, or a callable `path -> Sharding`
    (path: tuple of keys such as ("text", "layers", "q_w")). Each array is read directly into
    its sharding (every device reads only its own chunks; no full host copy first).
    """
    path = os.path.join(directory, CONFIG_FILE)
    d = read_config_file(path)
    cfg = config_from_json(path)
    stored = stored_dtype(d, path)
    target = stored if dtype is None else resolve_dtype(dtype)
    params_dir = os.path.join(directory, PARAMS_DIR)
    if not os.path.isdir(params_dir):
        raise CheckpointError(f"{params_dir}: missing; convert the HF checkpoint again")
    expected = table.shapes(cfg)
    _check_stored(params_dir, expected, stored)
    lookup = sharding_lookup(shardings, expected)
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract: dict = {}
    for p, shape in expected.items():
        sh = lookup(p) if lookup is not None else default
        set_path(abstract, p, jax.ShapeDtypeStruct(shape, target, sharding=sh))
    return cfg, _restore(params_dir, abstract)
