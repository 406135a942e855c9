"""A one-line progress bar on stderr (redrawn with `\\r`): done / total, rate, ETA."""

from __future__ import annotations

import sys
import time
from typing import Callable


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000.0
    return f"{n:.2f} TB"


def _count(n: float) -> str:
    return f"{n:.0f}" if float(n).is_integer() else f"{n:.2f}"


class Progress:
    """progress = Progress(total, enabled, "converting", human_bytes); progress.update(done);
    progress.close(). `start` counts work done before this run (e.g. resumed samples), which
    is shown but left out of the rate."""

    def __init__(self, total: int, enabled: bool = True, label: str = "", fmt: Callable[[float], str] = _count, start: int = 0, unit: str = ""):
        self.total, self.enabled, self.label, self.fmt = max(int(total), 1), enabled, label, fmt
        self.base = start
        self.unit = unit
        self.t0 = time.perf_counter()
        self.last = 0.0
        self.drawn = False

    def update(self, done: int, note: str = "", force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self.last < 0.1 and done < self.total:
            return
        self.last = now
        elapsed = max(now - self.t0, 1e-9)
        frac = min(done / self.total, 1.0)
        rate = (done - self.base) / elapsed
        eta = (self.total - done) / rate if rate > 0 and done < self.total else 0.0
        width = 24
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        line = (
            f"\r{self.label} [{bar}] {self.fmt(done)}/{self.fmt(self.total)} {frac * 100:5.1f}% "
            f"{self.fmt(rate)}{self.unit}/s ETA {int(eta) // 60}:{int(eta) % 60:02d} {note}"
        )
        sys.stderr.write(line.ljust(100))
        sys.stderr.flush()
        self.drawn = True

    def close(self) -> None:
        if self.enabled and self.drawn:
            sys.stderr.write("\n")
            sys.stderr.flush()
