"""Where a compression method registers itself, and the rules every method's ratio follows.

A method's module applies the decorator to its class:

    @register(name="visionzip", label="VisionZip", settings=("per_frame", "dominant_ratio", "quirks"))
    @dataclasses.dataclass(frozen=True)
    class VisionZip(NoHooks): ...

and `registry` (which loads the method modules) finds it by name: `registry.build`,
`METHODS`, `LABELS`, `SETTINGS` and the command line's `--method` all read `TABLE`. The
registered class is built as `cls.from_ratio(ratio, cfg, **settings)` when it defines that
classmethod, else as `cls(ratio=ratio, **settings)` (`cls(**settings)` for a method that takes
no ratio), then `.check(cfg)` when it has a `check`.

This module imports no method, so a method's module may import it without a cycle.
"""

from __future__ import annotations

import dataclasses
import itertools

from earlytom_jax.errors import ConfigError

DEFAULT_RATIO = 0.1  # the retention ratio when none is given: the paper's headline setting


def check_ratio(ratio) -> float:
    """`ratio` as a float in (0, 1] (the one range every method's retention ratio has);
    ConfigError (one line) otherwise."""
    try:
        value = float(ratio)
    except (TypeError, ValueError):
        raise ConfigError(f"ratio {ratio!r} is not a number") from None
    if not 0.0 < value <= 1.0:
        raise ConfigError(f"ratio {value} is outside (0, 1]")
    return value


@dataclasses.dataclass(frozen=True)
class Registration:
    """A registered method: its registry `name`, display `label` (tables, print-outs), class,
    the settings `build` accepts beside the ratio, whether it takes a ratio at all (full tokens
    does not), and the `group` name that selects it with its siblings (e.g. "uniform")."""

    name: str
    label: str
    cls: type
    settings: tuple[str, ...] = ()
    takes_ratio: bool = True
    group: str | None = None
    seq: int = 0  # registration order

    def build(self, ratio, cfg, **settings):
        """The method at `ratio` (ignored when it takes none) with `settings`, checked against `cfg`."""
        make = getattr(self.cls, "from_ratio", None)
        if make is not None:
            return make(ratio, cfg, **settings)
        method = self.cls(ratio=ratio, **settings) if self.takes_ratio else self.cls(**settings)
        check = getattr(method, "check", None)
        return method if check is None else check(cfg)


TABLE: dict[str, Registration] = {}  # every registered method by name
_counter = itertools.count()


def register(name: str, label: str, settings: tuple[str, ...] = (), takes_ratio: bool = True,
             group: str | None = None):
    """Class decorator: register the method class under `name` (see the module docstring).
    A second class under a name already taken is an error; registering the same class again
    (a module reloaded) replaces its entry."""

    def deco(cls):
        old = TABLE.get(name)
        if old is not None and old.cls.__qualname__ != cls.__qualname__:
            raise ValueError(f"compression method {name!r} is already registered ({old.cls.__qualname__})")
        TABLE[name] = Registration(name, label, cls, tuple(settings), takes_ratio, group,
                                   old.seq if old else next(_counter))
        return cls

    return deco
