"""The staging directory a conversion writes into (`DST.tmp-<random>`, renamed to DST once
validated), and what is left of conversions that were killed.

The directory records its owner (`owner.json`: process id and host) as soon as it exists. A
failure, Ctrl-C or SIGTERM removes it (`terminate_as_interrupt` turns SIGTERM into an exception
for the duration of a conversion, so the same clean-up runs). Only SIGKILL or a crash of the
machine leaves one behind; the next conversion to the same DST removes a leftover whose owner
is known to be dead on this host, and names any other one.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import secrets
import shutil
import signal
import socket
import threading

OWNER_FILE = "owner.json"


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived during a conversion: handled as an interrupt (Ctrl-C) is."""


@contextlib.contextmanager
def terminate_as_interrupt():
    """Within the block, SIGTERM raises `Terminated` (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated("terminated (SIGTERM); the partial conversion was removed")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def create(dst: str) -> str:
    """Make `DST.tmp-<random>` with its owner record; → its path."""
    tmp = f"{dst}.tmp-{secrets.token_hex(4)}"
    os.mkdir(tmp)
    with open(os.path.join(tmp, OWNER_FILE), "w") as f:
        json.dump({"pid": os.getpid(), "host": socket.gethostname()}, f)
    return tmp


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _size(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(root, name))
    return total


def leftovers(dst: str) -> tuple[list[tuple[str, int]], list[tuple[str, str]]]:
    """Staging directories of earlier conversions to `dst`: (removable, others). removable:
    (path, bytes) of those whose owner process is dead on this host; others: (path, why) of
    those still owned by a live process, or by another host, or with no owner record."""
    removable, others = [], []
    host = socket.gethostname()
    for path in sorted(glob.glob(glob.escape(dst) + ".tmp-*")):
        if not os.path.isdir(path):
            continue
        try:
            with open(os.path.join(path, OWNER_FILE)) as f:
                owner = json.load(f)
            pid, their_host = int(owner["pid"]), str(owner["host"])
        except (OSError, ValueError, KeyError, TypeError):
            others.append((path, "no owner recorded"))
            continue
        if their_host != host:
            others.append((path, f"written from host {their_host}"))
        elif _alive(pid):
            others.append((path, f"process {pid} is still running"))
        else:
            removable.append((path, _size(path)))
    return removable, others


def sweep(dst: str) -> tuple[list[tuple[str, int]], list[tuple[str, str]]]:
    """Remove the leftovers of killed conversions to `dst` (see `leftovers`); → (removed,
    kept with the reason)."""
    removable, others = leftovers(dst)
    for path, _ in removable:
        shutil.rmtree(path, ignore_errors=True)
    return removable, others
