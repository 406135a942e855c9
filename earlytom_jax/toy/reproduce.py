"""Re-run the toy model's training from the settings and seed recorded with a checkpoint, and
compare held-out accuracy per question type with full tokens (the goal: within 2 points per
type). A benchmark script, not part of the test suite: training takes about 2 hours on one
CPU core.

    python -m earlytom_jax.toy.reproduce --out /tmp/toy-rerun            # re-run the shipped recipe
    python -m earlytom_jax.toy.reproduce --out /tmp/toy-s1 --seed 1      # same recipe, another seed
    python -m earlytom_jax.toy.reproduce --trained /tmp/toy-rerun        # compare an existing run

Exit status 0 when every type is within the tolerance, 1 when one is not.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from earlytom_jax.toy import data


def recorded_settings(checkpoint: str, seed: int | None = None):
    """The `TrainSettings` a checkpoint's training.json records (fields it lacks: defaults),
    with `seed` replaced when given."""
    from earlytom_jax.errors import ConfigError
    from earlytom_jax.toy.record import read_record
    from earlytom_jax.toy.train import TrainSettings

    record = read_record(checkpoint)
    if record is None:
        raise ConfigError(f"{os.path.join(checkpoint, 'training.json')}: no training record, so no recipe to re-run; "
                          f"pass --trained DIR to compare two checkpoints instead")
    recorded = record.get("settings", {})
    names = {f.name for f in dataclasses.fields(TrainSettings)}
    st = TrainSettings(**{k: v for k, v in recorded.items() if k in names})
    return st if seed is None else dataclasses.replace(st, seed=seed)


def full_token_accuracy(model_dir: str, per_type: int) -> dict[str, float]:
    """Held-out accuracy per type with full tokens, as the toy benchmark's first row."""
    from earlytom_jax.evals.toy import run

    return run(model_dir, per_type, ratios=(), log=lambda *a, **k: None)["rows"][0]["accuracy"]


def compare(reference: dict[str, float], rerun: dict[str, float], tolerance: float) -> dict:
    """Per type: both accuracies and the difference in points; `within` when every |diff| is at
    most `tolerance` points."""
    rows = {k: {"reference": reference[k], "rerun": rerun[k], "diff_points": 100 * (rerun[k] - reference[k])}
            for k in data.KINDS}
    worst = max(abs(r["diff_points"]) for r in rows.values())
    return {"types": rows, "max_abs_diff_points": worst, "tolerance_points": tolerance, "within": worst <= tolerance}


def main(argv=None) -> int:
    from earlytom_jax.errors import EarlyTomError
    from earlytom_jax.evals.toy import TOY_DIR
    from earlytom_jax.io_utils import atomic_write_text

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--against", default=TOY_DIR, help="the checkpoint whose recorded recipe is re-run (default: shipped)")
    ap.add_argument("--out", default=None, help="where the re-run saves its checkpoint")
    ap.add_argument("--trained", default=None, help="compare this checkpoint instead of training one")
    ap.add_argument("--seed", type=int, default=None, help="train with this seed instead of the recorded one")
    ap.add_argument("--per-type", type=int, default=200)
    ap.add_argument("--tolerance", type=float, default=2.0, help="points per type")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if (a.out is None) == (a.trained is None):
        ap.error("give --out DIR (train, then compare) or --trained DIR (compare only)")
    try:
        if a.trained is None:
            from earlytom_jax.toy.train import train

            st = recorded_settings(a.against, a.seed)
            print(f"training {a.out} with the recipe of {a.against}: {st}", flush=True)
            train(st, a.out)
        result = compare(full_token_accuracy(a.against, a.per_type),
                         full_token_accuracy(a.trained or a.out, a.per_type), a.tolerance)
    except EarlyTomError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result.update(against=os.path.abspath(a.against), rerun=os.path.abspath(a.trained or a.out), per_type=a.per_type)
    print(f"| type | {os.path.basename(a.against.rstrip('/'))} | re-run | diff (points) |\n|---|---|---|---|")
    for k, r in result["types"].items():
        print(f"| {k} | {100 * r['reference']:.1f} | {100 * r['rerun']:.1f} | {r['diff_points']:+.1f} |")
    verdict = "within" if result["within"] else "NOT within"
    print(f"largest difference {result['max_abs_diff_points']:.1f} points: {verdict} {a.tolerance:g} points per type")
    if a.json:
        atomic_write_text(a.json, json.dumps(result, indent=2) + "\n")
    return 0 if result["within"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
