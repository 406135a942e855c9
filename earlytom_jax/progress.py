"""tqdm progress bars for the loops a user waits on (conversion, evaluation, bench runs, the
toy benchmark, toy training), and printing beside them.

Bars go to stderr. On a terminal they redraw in place; anywhere else (a log file, a pipe)
they still report, but at most once every `QUIET_INTERVAL` seconds, so a long run does not
fill its log with redraws. `say` prints a line to stdout without tearing a bar.
"""

from __future__ import annotations

import sys

try:
    from tqdm import tqdm
except ImportError:  # a dependency, but a copy installed with --no-deps (a lent GPU machine) may lack it
    tqdm = None

QUIET_INTERVAL = 30.0  # seconds between redraws when stderr is not a terminal


class _Silent:
    """What `bar` gives without tqdm: iterates and counts, draws nothing."""

    def __init__(self, iterable=None, initial: int = 0):
        self.iterable, self.n = iterable, initial

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.n += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix_str(self, *_, **__) -> None:
        pass

    set_postfix = set_description = set_postfix_str

    def close(self) -> None:
        pass


def bar(total: int | None, desc: str, unit: str = "it", enabled: bool = True, initial: int = 0, leave: bool = True,
        iterable=None, unit_scale: bool = False):
    """A tqdm bar on stderr, over `iterable` if given; `initial` counts work done before this
    run (e.g. resumed samples), shown but left out of the rate; `unit_scale` writes large
    counts with SI prefixes (bytes as kB, MB, GB); `enabled=False` draws nothing. Without tqdm:
    a `_Silent` counter."""
    if tqdm is None:
        return _Silent(iterable, initial)
    stderr = sys.stderr
    return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, disable=not enabled, leave=leave,
                unit_scale=unit_scale, unit_divisor=1000, file=stderr, dynamic_ncols=True,
                mininterval=0.1 if stderr.isatty() else QUIET_INTERVAL)


def say(*parts, **_) -> None:
    """print(*parts) to stdout, flushed, with any bar on the terminal lifted out of the way (a
    drop-in for the `log=print` callbacks: keyword arguments such as flush=True are accepted
    and ignored). Off a terminal the bars are not in the way, and clearing them would only
    write noise into the log."""
    if tqdm is None or not sys.stderr.isatty():
        print(*parts, flush=True)
        return
    with tqdm.external_write_mode(file=sys.stdout):
        print(*parts, flush=True)


def human_bytes(n: float) -> str:
    """A byte count for messages: "512 B", "1.94 MB", "10.49 GB" (powers of 1000)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000.0
    return f"{n:.2f} TB"


def status(text: str | None) -> None:
    """A transient status line on stderr for a wait with no count (loading, compiling): on a
    terminal it replaces the previous one in place, and `status(None)` erases it; anywhere else
    (a log, a pipe, tests) nothing is written, so stderr keeps only results and errors."""
    if not sys.stderr.isatty():
        return
    sys.stderr.write("\r\x1b[K" + (text or ""))
    sys.stderr.flush()
