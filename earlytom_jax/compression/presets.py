"""The published EarlyTom settings per task and retention ratio: LLaVA-OV (32 frames,
`scripts/ov/eval_ov-7b_earlytom.sh` of viridisGreen/EarlyTom at b909322) and LLaVA-Video (64
frames, `scripts/llava-vid/eval_vid-7b_earlytom.sh`: the same table except VideoMME at 0.25,
tau 0.6 instead of 0.7, and LongVideoBench at 0.25, layers 6,21,23 instead of 4,14,24)."""

from __future__ import annotations

from earlytom_jax.compression.registration import DEFAULT_RATIO
from earlytom_jax.errors import ConfigError

RATIOS = (0.10, 0.15, 0.20, 0.25)

# task: (tau per ratio, layers per ratio), ratios in RATIOS order
PUBLISHED = {
    "mvbench": ((0.65, 0.8, 0.8, 0.8), ((8, 14, 20), (6, 14, 20), (6, 14, 20), (6, 14, 20))),
    "videomme": ((0.3, 0.4, 0.5, 0.7), ((10, 21, 23), (8, 21, 23), (8, 21, 23), (10, 21, 23))),
    "longvideobench": ((0.3, 0.5, 0.6, 0.8), ((10, 21, 23), (10, 21, 23), (10, 21, 23), (4, 14, 24))),
    "egoschema": ((0.3, 0.5, 0.6, 0.7), ((10, 21, 23),) * 4),
}

# Where a family's script differs: family → task → ratio → settings replaced.
FAMILY_EXCEPTIONS = {
    "llava_video": {
        "videomme": {0.25: dict(tau=0.6)},
        "longvideobench": {0.25: dict(layers=(6, 21, 23))},
    },
}

# When no task is named (the official code's defaults, with M = 6).
DEFAULT = dict(tau=0.6, layers=(6, 21, 23), max_window=6, alpha=0.9, llm_layer=18, llm_ratio=0.5)


def preset(name: str, ratio: float | None = None, family: str = "llava_onevision") -> dict:
    """EarlyTom keyword arguments for "TASK" or "TASK@RATIO" (e.g. "videomme@0.1"), as the
    official script of the model `family` sets them ("llava_onevision"; "llava_video": its
    `FAMILY_EXCEPTIONS`; any other family takes LLaVA-OV's table)."""
    task, _, r = name.partition("@")
    task = task.strip().lower()
    if task not in PUBLISHED:
        raise ConfigError(f"unknown preset {task!r}; choose one of {', '.join(PUBLISHED)}")
    if r:
        try:
            ratio = float(r)
        except ValueError:
            raise ConfigError(f"preset {name!r}: {r!r} is not a ratio") from None
    ratio = DEFAULT_RATIO if ratio is None else ratio
    matches = [i for i, x in enumerate(RATIOS) if abs(x - ratio) < 1e-9]
    if not matches:
        raise ConfigError(f"preset {task}: published ratios are {', '.join(map(str, RATIOS))}, not {ratio}")
    taus, layers = PUBLISHED[task]
    i = matches[0]
    out = dict(DEFAULT, ratio=RATIOS[i], tau=taus[i], layers=layers[i])
    out.update(FAMILY_EXCEPTIONS.get(family, {}).get(task, {}).get(RATIOS[i], {}))
    return out
