"""Atomic file writes: a reader never sees a half-written file."""

from __future__ import annotations

import json
import os
import tempfile


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def readable_by_all(path: str) -> None:
    """Mode 0666 under the umask, as open() would give: mkstemp's (and some writers') 0600
    would make shipped files private."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over `path`."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        readable_by_all(tmp)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read_json(path: str):
    """Parse a JSON file; an unreadable or malformed one is a one-line CheckpointError."""
    from earlytom_jax.errors import CheckpointError

    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot be read as JSON ({e.__class__.__name__}: {e})") from None


def check_writable(path: str, flag: str) -> None:
    """Before any expensive work: can a file be written at `path` (the value of `flag`, e.g.
    "--out")? Creates and removes a temporary file beside it, so a read-only file system, a
    missing folder, a parent that is a file, or a path that is a folder all fail here, as one
    line (ConfigError), rather than after the work."""
    from earlytom_jax.errors import ConfigError

    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ConfigError(f"{flag} {path}: is a folder; give a file name")
    if not os.path.isdir(directory):
        what = "is a file, not a folder" if os.path.exists(directory) else "does not exist"
        raise ConfigError(f"{flag} {path}: its folder {directory} {what}; create it or choose another path")
    _probe_write(directory, flag, path)


def check_writable_dir(path: str, flag: str) -> None:
    """Before any expensive work: can the folder `path` be created (or written in, when it
    exists)? One line (ConfigError) when a part of it is a file or its nearest existing
    folder is read-only."""
    from earlytom_jax.errors import ConfigError

    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{flag} {path}: is a file, not a folder; choose another path")
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(f"{flag} {path}: {existing} is a file, not a folder; choose another path")
    _probe_write(existing, flag, path)


def _probe_write(directory: str, flag: str, path: str) -> None:
    """Create and remove a file in `directory`; ConfigError (one line) when that fails."""
    from earlytom_jax.errors import ConfigError

    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-check-")
        os.close(fd)
        os.remove(tmp)
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot write in {directory} ({e.strerror or e}); "
                          "choose a writable path") from None


def finite_or_none(obj):
    """`obj` with every non-finite float (NaN, ±inf) replaced by None, through dicts, lists
    and tuples (numpy scalars become Python values): what strict JSON can hold."""
    import math

    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def strict_json(obj, **kw) -> str:
    """json.dumps of `obj` as strict JSON: null where a float is NaN or infinite (which
    json.dumps would write as NaN / Infinity, rejected by strict parsers)."""
    return json.dumps(finite_or_none(obj), allow_nan=False, **kw)
