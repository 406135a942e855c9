"""Where a method's settings come from when the user gives none: one precedence, one place.

For every setting a method takes, the first of these that has it wins:

    1. explicit settings (`--tau`, `--layers`, `--llm-merge-layer`, ...; keyword arguments)
    2. `--preset TASK[@R]` (the published settings, `presets.py`)
    3. the checkpoint's own defaults (below)
    4. the built-in defaults (EarlyTom: layers 6,21,23 of 26 SigLIP blocks, LLM merge layer 18
       of 24; FastV: layer 2 of 24; on Qwen2.5-VL blocks 7,26,28 of 32 and layer 18 of 28), scaled to the model's depth where they fall outside it,
       with a note saying so (round(x · depth / 26) for the encoder, max(1, round(x · layers /
       24)) for the LLM)

An explicit setting (or a preset's) out of the model's range stays an error.

A checkpoint carries its defaults under the key `"earlytom"` of its `config.json` (a converted
directory keeps that file verbatim as `hf_config.json`, so they survive `earlytom convert`;
transformers ignores the key):

    "earlytom": {
      "defaults": {"earlytom": {"layers": [1, 2, 3], "llm_layer": 3}, "fastv": {"layer": 1}},
      "multiple_choice_only": true,
      "note": "what to tell a user who asks anything else"
    }

`defaults` maps a method's registry name to settings it takes (`registry.SETTINGS`);
`multiple_choice_only` says the model only answers lettered multiple-choice questions, and
`note` is the line printed when a prompt is not one (the shipped toy model has both).
"""

from __future__ import annotations

import dataclasses
import os
import re

from earlytom_jax.config import LlavaOVConfig
from earlytom_jax.errors import CheckpointError
from earlytom_jax.io_utils import read_json

CONFIG_KEY = "earlytom"

# The built-in defaults that depend on depth, with the depth they were chosen for:
# method → setting → (value, "vision" | "text", reference depth).
BUILT_IN = {
    "earlytom": {"layers": ((6, 21, 23), "vision", 26), "llm_layer": (18, "text", 24)},
    "fastv": {"layer": (2, "text", 24)},
    "holitom": {"llm_layer": (18, "text", 24)},  # HOLITOM_k of the official scripts
    "prunevid": {"llm_layer": (11, "text", 32)},  # selected_layer 10 (+1) of PLLaVA-7B, scripts/eval.sh
}
# Qwen2.5-VL (docs/qwen-earlytom.md): the paper's blocks scaled to its 32-block encoder,
# round(x · 32 / 26); its LLM has Qwen2-7B's 28 layers and keeps layer 18.
BUILT_IN_FAMILY = {
    "qwen2_5_vl": {
        "earlytom": {"layers": ((7, 26, 28), "vision", 32), "llm_layer": (18, "text", 28)},
        "fastv": {"layer": (2, "text", 28)},
    },
}

SAME_DEFAULTS = {"earlytom_topk": "earlytom", "earlytom_average": "earlytom"}  # ablations of a method


def built_in(name: str, cfg) -> dict:
    """Method `name`'s depth-dependent built-in defaults for `cfg`'s family."""
    return BUILT_IN_FAMILY.get(getattr(cfg, "family", ""), BUILT_IN).get(SAME_DEFAULTS.get(name, name), {})


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What a checkpoint says about itself (its `config.json` key "earlytom"); empty for most."""

    defaults: dict = dataclasses.field(default_factory=dict)  # method name → {setting: value}
    multiple_choice_only: bool = False
    note: str | None = None

    def open_question_note(self, prompt: str) -> str | None:
        """The note to print when `prompt` is not a lettered multiple-choice question and the
        model only knows those; None otherwise."""
        if not self.multiple_choice_only or is_multiple_choice(prompt):
            return None
        return self.note or "this model only answers lettered multiple-choice questions; it answers anything else with a letter"


def is_multiple_choice(prompt: str) -> bool:
    """At least two lettered options ("A. ...", "B. ...") on lines of their own."""
    return len(re.findall(r"(?m)^\s*\(?[A-H][.)]\s+\S", prompt)) >= 2


def _config_path(directory: str) -> str | None:
    for name in ("config.json", "hf_config.json"):  # HF layout; a converted directory's copy
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    return None


def read_model_info(directory: str) -> ModelInfo:
    """The "earlytom" key of the checkpoint's config.json (or a converted directory's
    hf_config.json); an empty ModelInfo when there is none. A malformed key is a one-line
    CheckpointError."""
    from earlytom_jax.compression import registry

    path = _config_path(directory)
    if path is None:
        return ModelInfo()
    d = read_json(path)
    if not isinstance(d, dict) or CONFIG_KEY not in d:
        return ModelInfo()
    e = d[CONFIG_KEY]
    where = f"{path}: key {CONFIG_KEY!r}"
    if not isinstance(e, dict):
        raise CheckpointError(f"{where} must be an object, not {type(e).__name__}; fix or remove it")
    defaults = e.get("defaults", {})
    if not isinstance(defaults, dict) or not all(isinstance(v, dict) for v in defaults.values()):
        raise CheckpointError(f"{where}: \"defaults\" must map method names to objects of settings")
    clean = {}
    for name, settings in defaults.items():
        if name not in registry.METHODS:
            raise CheckpointError(f"{where}: unknown method {name!r} in \"defaults\" (methods: {', '.join(registry.METHODS)})")
        unknown = sorted(set(settings) - set(registry.SETTINGS[name]))
        if unknown:
            raise CheckpointError(f"{where}: method {name} takes no setting {', '.join(unknown)}")
        clean[name] = {k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()}
    note = e.get("note")
    return ModelInfo(clean, bool(e.get("multiple_choice_only", False)), str(note) if note else None)


def _scaled(value, part: str, reference: int, cfg: LlavaOVConfig):
    """`value` (an int or ints) if every one fits the model's depth, else scaled to it."""
    if part == "vision":
        depth = cfg.vision.num_layers
        fits = max(value) < depth
        return value if fits else tuple(sorted({min(depth - 1, round(x * depth / reference)) for x in value}))
    depth = cfg.text.num_layers
    fits = 1 <= value < depth
    return value if fits else max(1, min(depth - 1, round(value * depth / reference)))


def settings(name: str, cfg: LlavaOVConfig, explicit: dict | None = None, preset: str | None = None,
             info: ModelInfo | None = None) -> tuple[dict, list[str]]:
    """The settings to build method `name` with (keyword arguments of `registry.build`) and
    the notes to show, by the precedence in the module docstring. `explicit`: settings the
    user gave (None values count as not given); `preset`: "TASK" or "TASK@R"; `info`: the
    checkpoint's (`read_model_info`)."""
    from earlytom_jax.compression import registry

    takes = registry.SETTINGS[name]
    kw = {k: v for k, v in (explicit or {}).items() if v is not None}
    if preset and "preset" in takes:
        kw["preset"] = preset  # the method applies it under the explicit settings
        return kw, []
    for key, value in ((info or ModelInfo()).defaults.get(name) or {}).items():
        kw.setdefault(key, value)
    scaled = []
    for key, (value, part, reference) in built_in(name, cfg).items():
        if key in takes and key not in kw:
            new = _scaled(value, part, reference, cfg)
            kw[key] = new
            if new != value:
                show = lambda v: ",".join(map(str, v)) if isinstance(v, tuple) else str(v)  # noqa: E731
                scaled.append(f"{key} {show(value)} -> {show(new)}")
    notes = []
    if scaled:
        flags = "--layers/--llm-merge-layer" if SAME_DEFAULTS.get(name, name) == "earlytom" else "--llm-merge-layer"
        notes.append(f"note: {registry.LABELS[name]}'s default {'; '.join(scaled)} (scaled to this model's "
                     f"{cfg.vision.num_layers} encoder blocks and {cfg.text.num_layers} LLM layers; {flags} set them)")
    return kw, notes
