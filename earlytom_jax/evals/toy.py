"""The toy benchmark: accuracy per question type of the model trained here (earlytom_jax/toy),
for full tokens and every compression method at matched visual-token budgets, on held-out
procedural clips. Offline, minutes on a CPU.

    python -m earlytom_jax.evals.toy [--model DIR] [--per-type 200] [--json OUT.json] [--md OUT.md]

Each method runs through the same public path as `earlytom run` (VideoLLM.answer: the jitted
prefill with the method's hooks, then greedy decoding); the answer is the first letter A-D of
the generated text (no letter: wrong).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from earlytom_jax.errors import ConfigError
from earlytom_jax.progress import bar, say
from earlytom_jax.toy import data

TOY_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "toy")


BASELINES = ("visionzip", "fastv", "uniform_frames", "uniform_tokens")
# The paper's other baselines, each at the ratio r by its own budget convention (docs/baselines/),
# with its layers scaled to the toy's depth by `compression.defaults` (HoliTom's K 18 of 28 → 3,
# PruneVid's selected layer 10 (+1) of 32 → 1; PyramidDrop's stages 8,16,24 of 32 → 1,2,3 and
# DyCoke's decode layer 3 fit as they are). PyramidDrop also at its published schedule λ = 0.5.
OWN_BUDGET = ("holitom", "fastvid", "pdrop", "dycoke", "prunevid")


def build(name: str, ratio: float | None, cfg, stage3: bool = True):
    """A method with the toy model's layer choices (EarlyTom's P and k and FastV's K at the
    official defaults' relative depth; the other baselines' layers as `compression.defaults`
    scales them to the toy's depth)."""
    from earlytom_jax.compression import defaults, registry
    from earlytom_jax.toy.model import TOY_FASTV_LAYER, TOY_LAYERS, TOY_LLM_LAYER

    if name == "earlytom":
        return registry.build(name, ratio, cfg, layers=TOY_LAYERS, llm_layer=TOY_LLM_LAYER if stage3 else None)
    if name == "fastv":
        return registry.build(name, ratio, cfg, layer=TOY_FASTV_LAYER)
    return registry.build(name, ratio, cfg, **defaults.settings(name, cfg)[0])


def parse_letter(text: str) -> str | None:
    t = text.strip()
    return t[0] if t and t[0] in data.LETTERS else None


def run(model_dir: str = TOY_DIR, per_type: int = 200, ratios=(0.25, 0.10), log=say, progress: bool = True,
        own_budget=OWN_BUDGET) -> dict:
    """Full tokens; then per ratio r: EarlyTom (with and without stage III), each baseline
    at exactly EarlyTom's budget *per clip*: EarlyTom's stage II hands the LLM a data-dependent
    number c of tokens, so a baseline answers that clip at ratio c / (T0·S) (uniform frames
    at the nearest whole number of frames; FastV keeps c tokens from its layer on); then each
    of `own_budget` at r by its own convention (PyramidDrop also once at λ = 0.5).

    → {"rows": [{label, name, ratio, accuracy: {kind: acc}, mean, visual_tokens, llm_tokens,
    seconds}], "per_type": n, "model": dir}. `log` gets one line per row; `progress`: a bar
    over each row's clips (stderr)."""
    from earlytom_jax.api import VideoLLM
    from earlytom_jax.compression import registry

    llm = VideoLLM.load(model_dir)
    cfg = llm.cfg
    full_tokens = 16 * cfg.tokens_per_frame
    samples = [s for k in data.KINDS for s in data.held_out(k, per_type)]
    pixels = [llm.preprocessor(s.frames) for s in samples]
    cache: dict = {}

    def method(name, ratio, stage3=True):
        key = (name, None if ratio is None else round(ratio * full_tokens), stage3)
        if key not in cache:
            cache[key] = build(name, ratio, cfg, stage3)
        return cache[key]

    def evaluate(label, name, ratio, pick):
        t = time.time()
        right = {k: 0 for k in data.KINDS}
        vis, kept = [], []
        with bar(len(samples), label, "clip", progress, leave=False) as clips:
            for i, (s, px) in enumerate(zip(samples, pixels)):
                ans = llm.answer(px, s.prompt, pick(i), max_new_tokens=2, pad_multiple=64)
                right[s.kind] += parse_letter(ans.text) == s.answer
                vis.append(int(ans.stats["visual_tokens"]) - 1)  # without the newline
                # without the newline; a method that may drop the newline too (PyramidDrop) can keep 0
                kept.append(max(0, int(ans.stats.get("llm_kept", ans.stats["visual_tokens"])) - 1))
                clips.update()
        acc = {k: v / per_type for k, v in right.items()}
        row = {"label": label, "name": name, "ratio": ratio, "accuracy": acc,
               "mean": float(np.mean(list(acc.values()))), "visual_tokens": float(np.mean(vis)),
               "llm_tokens": float(np.mean(kept)), "seconds": round(time.time() - t, 1), "_counts": vis}
        log(f"{label:30s} " + "  ".join(f"{k} {v:.3f}" for k, v in acc.items())
            + f"  tokens {row['visual_tokens']:.1f}  ({row['seconds']:.0f} s)", flush=True)
        return row

    rows = [evaluate("full tokens", "full", None, lambda i: method("full", None))]
    for r in ratios:
        et = evaluate(f"EarlyTom {r:.0%}", "earlytom", r, lambda i: method("earlytom", r))
        rows.append(et)
        rows.append(evaluate(f"EarlyTom {r:.0%}, no stage III", "earlytom", r,
                             lambda i: method("earlytom", r, stage3=False)))
        counts = et["_counts"]
        for name in BASELINES:
            rows.append(evaluate(f"{registry.LABELS[name]} at EarlyTom {r:.0%}'s budget", name, r,
                                 lambda i, n=name: method(n, counts[i] / full_tokens)))
        for name in own_budget:
            label = f"{registry.LABELS[name]} at r = {r:g} (its own budget)"
            try:
                method(name, r)
            except ConfigError as e:  # e.g. HoliTom keeps a token per frame: r >= 1/9 on the toy's 3 x 3
                log(f"{label:30s} not run: {e}", flush=True)
                rows.append({"label": label, "name": name, "ratio": r, "skipped": str(e)})
                continue
            rows.append(evaluate(label, name, r, lambda i, n=name: method(n, r)))
    if "pdrop" in own_budget:
        rows.append(evaluate("PyramidDrop at λ = 0.5 (published schedule)", "pdrop", 0.5,
                             lambda i: method("pdrop", 0.5)))
    for row in rows:
        row.pop("_counts", None)
    return {"model": os.path.abspath(model_dir), "per_type": per_type, "frames": 16,
            "tokens_full": full_tokens, "rows": rows}


def markdown(result: dict) -> str:
    kinds = list(data.KINDS)
    head = "| method | visual tokens → LLM | " + " | ".join(kinds) + " | mean |"
    lines = [head, "|" + "---|" * (len(kinds) + 3)]
    for r in result["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['label']} | not run: {r['skipped']} |" + " - |" * (len(kinds) + 1))
            continue
        tok = f"{r['visual_tokens']:.1f}"
        if r["llm_tokens"] != r["visual_tokens"]:
            tok += f" → {r['llm_tokens']:.1f}"
        lines.append(f"| {r['label']} | {tok} | " + " | ".join(f"{100 * r['accuracy'][k]:.1f}" for k in kinds)
                     + f" | {100 * r['mean']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from earlytom_jax.io_utils import atomic_write_text

    ap = argparse.ArgumentParser(description="accuracy of the toy model per question type and method")
    ap.add_argument("--model", default=TOY_DIR)
    ap.add_argument("--per-type", type=int, default=200)
    ap.add_argument("--ratios", default="0.25,0.1")
    ap.add_argument("--own-budget", default=",".join(OWN_BUDGET),
                    help="the baselines run at each ratio by their own budget convention (comma-separated; empty: none)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None)
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    a = ap.parse_args(argv)
    own = tuple(x.strip() for x in a.own_budget.split(",") if x.strip())
    res = run(a.model, a.per_type, tuple(float(x) for x in a.ratios.split(",")), progress=not a.quiet, own_budget=own)
    md = markdown(res)
    print(md)
    if a.json:
        atomic_write_text(a.json, json.dumps(res, indent=2) + "\n")
    if a.md:
        atomic_write_text(a.md, md + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
