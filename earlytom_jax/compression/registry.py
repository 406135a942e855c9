"""Every compression method by name, built from one retention ratio r with one budget
convention: r of the T0 · 196 pooled visual tokens (`base.token_budget`).

    full            every token (r is ignored)
    earlytom        r as EarlyTom's stage-II retention (about r·T0·196 tokens, data dependent)
    fastv           all tokens enter the LLM; from layer `layer` on round(r · (T0·196 + 1)) of
                    the visual span (newline included) are kept: drop = 1 - r
    visionzip       exactly round(r·T0·196) tokens (dominant + contextual per frame)
    uniform_tokens  exactly round(r·T0·196) tokens (uniform 2-D cells per frame)
    uniform_frames  max(1, round(r·T0)) frames with all 196 tokens (frame-granular)
    tome            ToMe in every encoder block: round(r·196) merged tokens per frame, no pooling
    holitom         about r·T0·196 tokens (data dependent), then half of them from layer 18
    fastvid         at most T0·int(196·r) tokens (FastVID's RETAIN_RATIO; Qwen2.5-VL: T·int(S·r);
                    LLaVA-Video: T0·int(169·r))
    pdrop           all tokens enter the LLM; r is PyramidDrop's per-stage λ (published 0.5)
    dycoke          r is the share of its tokens a pruned frame keeps (K = 1 - r)
    prunevid        r / 0.5 of each merged group kept from layer selected_layer + 1

The paper's baselines' conventions and their sources: docs/baselines/<name>.md.

Each method registers itself in its own module (`registration.register`); this module imports
every module of the `compression` package, so a new method is one new file there (plus its
test), and derives `METHODS`, `LABELS`, `SETTINGS` and `GROUPS` from the registrations, read
when accessed, so a method registered later (a plug-in, a test) is listed too. The built-in
methods are listed in `METHOD_MODULES` order; any other after them, in registration order.

`build(name, ratio, cfg, **settings)` validates the name, the ratio and the settings and
returns a checked method; EarlyTom and FastV are built as the command line builds them.
"""

from __future__ import annotations

import importlib
import pkgutil

import earlytom_jax.compression as _package
from earlytom_jax.compression import registration
from earlytom_jax.compression.base import token_budget
from earlytom_jax.compression.presets import preset as published
from earlytom_jax.compression.registration import DEFAULT_RATIO, check_ratio, register
from earlytom_jax.config import FAMILIES, LlavaOVConfig
from earlytom_jax.errors import ConfigError

# The order METHODS lists the built-in methods in (by module); a method of any other module
# of the package is found as well and listed after them.
METHOD_MODULES = ("base", "earlytom", "fastv", "visionzip", "uniform", "tome",
                  "holitom", "fastvid", "pdrop", "dycoke", "prunevid")
for _module in pkgutil.iter_modules(_package.__path__):
    if _module.name != "registry":
        importlib.import_module(f"{_package.__name__}.{_module.name}")

__all__ = ["DEFAULT_RATIO", "GROUPS", "LABELS", "METHODS", "SETTINGS", "build", "canonical", "check_ratio",
           "default_ratio", "label", "register", "resolve", "token_budget"]


def _order(reg: registration.Registration):
    module = reg.cls.__module__.removeprefix("earlytom_jax.compression.")
    return (METHOD_MODULES.index(module) if module in METHOD_MODULES else len(METHOD_MODULES), reg.seq)


def registrations() -> list[registration.Registration]:
    """Every registered method, built-in ones first in `METHOD_MODULES` order, then the rest
    in the order they registered."""
    return sorted(registration.TABLE.values(), key=_order)


def _groups() -> dict[str, tuple[str, ...]]:
    groups: dict[str, tuple[str, ...]] = {}
    for r in registrations():
        if r.group:
            groups[r.group] = groups.get(r.group, ()) + (r.name,)
    return groups


_DERIVED = {
    "METHODS": lambda: tuple(r.name for r in registrations()),
    "LABELS": lambda: {r.name: r.label for r in registrations()},  # for tables and print-outs
    "SETTINGS": lambda: {r.name: r.settings for r in registrations()},
    "GROUPS": _groups,
}


def __getattr__(attr: str):
    """METHODS (names), LABELS (name → display name), SETTINGS (name → settings `build`
    takes) and GROUPS (group → names), computed from the registrations when read."""
    if attr in _DERIVED:
        return _DERIVED[attr]()
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


def _registration(method) -> registration.Registration:
    """The registration of a built method's class, or of its nearest registered base (a
    family's variant such as FastVID's Qwen2.5-VL class, built by the registered one)."""
    by_cls = {r.cls: r for r in registration.TABLE.values()}
    for cls in type(method).__mro__:
        if cls in by_cls:
            return by_cls[cls]
    raise KeyError(type(method).__qualname__)


def label(method) -> str:
    """The display name of a built method ("full tokens", "EarlyTom", ...)."""
    return _registration(method).label


def name(method) -> str:
    """The registry name of a built method ("full", "earlytom", ...)."""
    return _registration(method).name


def canonical(name: str) -> str:
    """A method's registry name from a user's spelling ("VisionZip", "uniform-tokens");
    ConfigError (one line) when there is none."""
    key = str(name).strip().lower().replace("-", "_")
    if key not in registration.TABLE:
        raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(r.name for r in registrations())}"
                          + "".join(f" ({g} = {' and '.join(m)})" for g, m in _groups().items()))
    return key


def resolve(names) -> list[str]:
    """Registry names for a list of user spellings, with groups (`GROUPS`) expanded and
    repeats dropped, in order."""
    groups = _groups()
    out: list[str] = []
    for name in names:
        key = str(name).strip().lower().replace("-", "_")
        for k in groups.get(key) or (canonical(name),):
            if k not in out:
                out.append(k)
    return out


def default_ratio(preset: str | None = None) -> float:
    """The ratio when none is given: that of a preset "TASK@RATIO", else `DEFAULT_RATIO`."""
    return published(preset)["ratio"] if preset and "@" in preset else DEFAULT_RATIO


def check_family(name: str, cfg) -> None:
    """ConfigError (one line) unless the method `name` runs on `cfg`'s model family (its
    class's `families`)."""
    families = getattr(registration.TABLE[canonical(name)].cls, "families", ("llava_onevision",))
    if cfg.family not in families:
        raise ConfigError(f"method {canonical(name)!r} is not adapted to {FAMILIES[cfg.family]} yet "
                          f"(it runs on {', '.join(FAMILIES[f] for f in families)}); "
                          "use another --method")


def build(name: str, ratio: float | None, cfg: LlavaOVConfig, **kw):
    """The method `name` at retention `ratio` (None only for "full"), checked against `cfg`;
    `kw`: the method's settings (`SETTINGS[name]`).

    Raises ConfigError (one line) on an unknown name, a method not adapted to `cfg`'s family
    (`check_family`), a ratio outside (0, 1], a setting the method does not take, or a setting
    the method rejects."""
    check_family(name, cfg)
    reg = registration.TABLE[canonical(name)]
    if ratio is None and reg.takes_ratio:
        raise ConfigError(f"method {reg.name} needs a ratio in (0, 1]")
    if ratio is not None:
        ratio = check_ratio(ratio)
    unknown = sorted(set(kw) - set(reg.settings))
    if unknown:
        allowed = ", ".join(reg.settings) or "none"
        raise ConfigError(f"method {reg.name} takes no setting {', '.join(unknown)} (settings: {allowed})")
    return reg.build(ratio, cfg, **kw)
