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

`build(name, ratio, cfg, **settings)` validates the name, the ratio and the settings and
returns a checked method; EarlyTom and FastV are built as the command line builds them.
"""

from __future__ import annotations

from earlytom_jax.compression.base import FullTokens, token_budget
from earlytom_jax.compression.earlytom import EarlyTom
from earlytom_jax.compression.fastv import FastV
from earlytom_jax.compression.presets import preset as published
from earlytom_jax.compression.tome import ToMe
from earlytom_jax.compression.uniform import UniformFrames, UniformTokens
from earlytom_jax.compression.visionzip import VisionZip
from earlytom_jax.config import LlavaOVConfig
from earlytom_jax.errors import ConfigError

METHODS = ("full", "earlytom", "fastv", "visionzip", "uniform_tokens", "uniform_frames", "tome")

__all__ = ["GROUPS", "LABELS", "METHODS", "SETTINGS", "build", "canonical", "label", "resolve", "token_budget"]


def _full(ratio, cfg):
    return FullTokens()


def _earlytom(ratio, cfg, preset: str | None = None, scale_layers_for_depth: bool = False, **kw):
    """As the command line builds it (`cli._method_from_args`): the preset first (at this ratio), explicit settings
    override it; scale_layers_for_depth maps the default layers 6, 21, 23 of 26 onto the
    encoder's depth when neither layers nor a preset are given, and the llm layer 18 of 24
    onto the LLM's when llm_layer is not given. llm_layer None or < 0 turns stage III off."""
    out = dict(published(preset, ratio)) if preset else {}
    out["ratio"] = ratio
    if "layers" in kw:
        out["layers"] = tuple(kw.pop("layers"))
    elif scale_layers_for_depth and not preset:
        depth = cfg.vision.num_layers
        out["layers"] = tuple(sorted({min(depth - 1, round(x * depth / 26)) for x in (6, 21, 23)}))
    if "llm_layer" in kw:
        k = kw.pop("llm_layer")
        out["llm_layer"] = None if k is None or k < 0 else k
    elif scale_layers_for_depth:
        out["llm_layer"] = max(1, round(18 * cfg.text.num_layers / 24))
    out.update(kw)
    return EarlyTom(**out).check(cfg)


def _fastv(ratio, cfg, layer: int = 2):
    return FastV(layer=layer, drop=1.0 - ratio).check(cfg)


def _visionzip(ratio, cfg, **kw):
    return VisionZip(ratio=ratio, **kw).check(cfg)


def _uniform_tokens(ratio, cfg, **kw):
    return UniformTokens(ratio=ratio, **kw)


def _uniform_frames(ratio, cfg):
    return UniformFrames(ratio=ratio)


def _tome(ratio, cfg):
    return ToMe(ratio=ratio).check(cfg)


_BUILDERS = {
    "full": _full,
    "earlytom": _earlytom,
    "fastv": _fastv,
    "visionzip": _visionzip,
    "uniform_tokens": _uniform_tokens,
    "uniform_frames": _uniform_frames,
    "tome": _tome,
}

SETTINGS = {
    "full": (),
    "earlytom": ("preset", "scale_layers_for_depth", "tau", "layers", "alpha", "max_window", "quirks",
                 "llm_layer", "llm_ratio", "llm_noncausal", "buckets"),
    "fastv": ("layer",),
    "visionzip": ("per_frame", "dominant_ratio", "quirks"),
    "uniform_tokens": ("mode",),
    "uniform_frames": (),
    "tome": (),
}
assert tuple(_BUILDERS) == tuple(SETTINGS) == METHODS


GROUPS = {"uniform": ("uniform_tokens", "uniform_frames")}

LABELS = {"full": "full tokens", "earlytom": "EarlyTom", "fastv": "FastV", "visionzip": "VisionZip",
          "uniform_tokens": "uniform tokens", "uniform_frames": "uniform frames", "tome": "ToMe"}  # for tables and print-outs
_CLASSES = {FullTokens: "full", EarlyTom: "earlytom", FastV: "fastv", VisionZip: "visionzip",
            UniformTokens: "uniform_tokens", UniformFrames: "uniform_frames", ToMe: "tome"}
assert tuple(LABELS) == tuple(_CLASSES.values()) == METHODS


def label(method) -> str:
    """The display name of a built method ("full tokens", "EarlyTom", ...)."""
    return LABELS[_CLASSES[type(method)]]


def canonical(name: str) -> str:
    """A method's registry name from a user's spelling ("VisionZip", "uniform-tokens");
    ConfigError (one line) when there is none."""
    key = str(name).strip().lower().replace("-", "_")
    if key not in _BUILDERS:
        raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}"
                          + "".join(f" ({g} = {' and '.join(m)})" for g, m in GROUPS.items()))
    return key


def resolve(names) -> list[str]:
    """Registry names for a list of user spellings, with groups (`GROUPS`) expanded and
    repeats dropped, in order."""
    out: list[str] = []
    for name in names:
        key = str(name).strip().lower().replace("-", "_")
        for k in GROUPS.get(key) or (canonical(name),):
            if k not in out:
                out.append(k)
    return out


def build(name: str, ratio: float | None, cfg: LlavaOVConfig, **kw):
    """The method `name` at retention `ratio` (None only for "full"), checked against `cfg`;
    `kw`: the method's settings (`SETTINGS[name]`).

    Raises ConfigError (one line) on an unknown name, a ratio outside (0, 1], a setting the
    method does not take, or a setting the method rejects."""
    key = canonical(name)
    if ratio is None and key != "full":
        raise ConfigError(f"method {key} needs a ratio in (0, 1]")
    if ratio is not None:
        try:
            ratio = float(ratio)
        except (TypeError, ValueError):
            raise ConfigError(f"ratio {ratio!r} is not a number") from None
        if not 0.0 < ratio <= 1.0:
            raise ConfigError(f"ratio {ratio} is outside (0, 1]")
    unknown = sorted(set(kw) - set(SETTINGS[key]))
    if unknown:
        allowed = ", ".join(SETTINGS[key]) or "none"
        raise ConfigError(f"method {key} takes no setting {', '.join(unknown)} (settings: {allowed})")
    return _BUILDERS[key](ratio, cfg, **kw)
