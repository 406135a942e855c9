"""Several methods over one task, each in its own resumable run, summed up in one table like
the paper's (accuracy, visual tokens, TTFT, FLOPs)."""

from __future__ import annotations

import dataclasses
import os

from earlytom_jax.evals.runner import EvalSettings, run_eval
from earlytom_jax.io_utils import atomic_write_text, strict_json

# the number each task reports first (as lmms-eval prints it; see the task modules)
HEADLINE = {
    "mvbench": "mean",
    "videomme": "overall",
    "egoschema_subset": "score",
    "longvideobench": "overall",
}


def headline(task: str, metrics: dict):
    key = HEADLINE.get(task)
    return metrics.get(key) if key else None


def run_tag(name: str, ratio: float | None) -> str:
    """Sub-directory of one method's run, e.g. `earlytom-r0.1`, `full`."""
    return name if ratio is None else f"{name}-r{ratio:g}"


def compare(s: EvalSettings, runs: list[tuple[str, float | None, object]], llm=None) -> list[dict]:
    """runs: (name, ratio, method). Each goes to OUT/<tag>/ (resumable like any run); the
    table goes to OUT/compare.md and OUT/compare.json. → table rows."""
    from earlytom_jax.api import VideoLLM

    if llm is None:
        llm = VideoLLM.load(s.model, s.dtype, s.mesh, video=s.video(), siglip_head=s.siglip_head)
    rows = []
    for name, ratio, method in runs:
        tag = run_tag(name, ratio)
        print(f"== {tag}", flush=True)
        res = run_eval(dataclasses.replace(s, out=os.path.join(s.out, tag)), method, llm)
        sp = res["speed"]
        rows.append({
            "method": name, "ratio": ratio, "score": headline(s.task, res["metrics"]),
            "complete": res["complete"], "visual_tokens": sp["visual_tokens_mean"],
            "ttft_s": sp["ttft_mean_s"], "tflops": sp["flops_mean"] / 1e12,
            "tflops_paper_llm": sp["flops_paper_llm_mean"] / 1e12, "dir": tag,
        })
    md = markdown(s.task, rows)
    atomic_write_text(os.path.join(s.out, "compare.json"), strict_json(rows, indent=1))
    atomic_write_text(os.path.join(s.out, "compare.md"), md + "\n")
    return rows


def markdown(task: str, rows: list[dict]) -> str:
    """Paper-style table; TTFT and FLOPs also relative to the full-token row when present."""
    full = next((r for r in rows if r["method"] == "full"), None)
    out = [f"| method | r | {task} | visual tokens | TTFT (s) | TFLOPs (all stages) | TFLOPs (paper, LLM) |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        score = "-" if r["score"] is None else f"{r['score']:.4g}" + ("" if r["complete"] else " (partial)")
        ttft = f"{r['ttft_s']:.3f}"
        fl = f"{r['tflops']:.3f}"
        if full is not None and r is not full:
            ttft += f" ({full['ttft_s'] / r['ttft_s']:.2f}x)"
            fl += f" ({100 * r['tflops'] / full['tflops']:.0f}%)"
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:g}"
        out.append(f"| {r['method']} | {ratio} | {score} | {r['visual_tokens']:.0f} | {ttft} | {fl} | {r['tflops_paper_llm']:.3f} |")
    return "\n".join(out)
