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
