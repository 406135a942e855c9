"""Reports: speed-ups against the run's full tokens (per round, by stage rates) and the
paper-style markdown table."""

from __future__ import annotations

import os
import statistics

from earlytom_jax.bench.timing import STAGES, BenchResult


def paired_speedups(r: BenchResult, full: BenchResult) -> dict | None:
    """Full's i-th TTFT over the method's i-th: with interleaved timing the two ran within one
    round, so the per-round ratio cancels a host's drift between rounds. → None unless both
    have the same number of runs; else {"rounds": [...], "median": m, "min": a, "max": b}."""
    if r is full or len(r.ttft_s) != len(full.ttft_s):
        return None
    rounds = [f / t for f, t in zip(full.ttft_s, r.ttft_s)]
    return {"rounds": rounds, "median": statistics.median(rounds), "min": min(rounds), "max": max(rounds)}


def find_full(results: list[BenchResult]) -> BenchResult | None:
    """The run's full-token result, if it has one."""
    return next((r for r in results if r.method == "full"), None)


def relate_to_full(results: list[BenchResult], interleaved: bool) -> None:
    """Set every other method's `at_full_rates` against the run's full tokens, and its `paired`
    per-round speed-ups only when the methods were timed interleaved: one after another, full's
    i-th run and the method's i-th lie minutes apart and a per-round ratio cancels nothing."""
    full = find_full(results)
    for r in results:
        if full is not None and r is not full:
            r.at_full_rates = at_full_stage_rates(r, full)
            r.paired = paired_speedups(r, full) if interleaved else None


def at_full_stage_rates(r: BenchResult, full: BenchResult) -> dict | None:
    """Splits a shortfall of a method's speed-up against its FLOPs ratio into its two causes.

    The FLOPs ratio (full's exact FLOPs over the method's) prices every FLOP alike. A device
    has a FLOP rate per stage (on 2-core CPUs SigLIP's 729-token blocks run slower per FLOP
    than a long LLM prefill), so a method whose savings lie mostly in the faster stage saves
    less time per FLOP saved; and a stage left with fewer rows runs at a lower rate itself
    (each weight matrix is streamed and packed once per pass, whatever the row count).

    → None unless both have staged times; else {"seconds": {stage: s, "total": s}, the method's
    exact FLOPs of each stage at full's FLOP rate in that stage; "flops_ratio"; "speedup": full's
    staged total over that total, what the method would reach if none of its stages ran slower
    per FLOP than full's; "stage_efficiency": that total over the method's own staged total (1.0:
    as fast per FLOP as full's stages; below: smaller products, or overhead)}."""
    if not (r.stages_s and full.stages_s):
        return None
    sec = {k: r.flops[k] * full.stages_s[k] / full.flops[k] if full.flops[k] else r.stages_s[k] for k in STAGES}
    sec["total"] = sum(sec[k] for k in STAGES)
    full_t = sum(full.stages_s[k] for k in STAGES)
    own_t = sum(r.stages_s[k] for k in STAGES)
    return {"seconds": sec, "flops_ratio": full.flops["total"] / r.flops["total"],
            "speedup": full_t / sec["total"], "stage_efficiency": sec["total"] / own_t}


def _label(r: BenchResult) -> str:
    return r.method if r.ratio is None else f"{r.method} {r.ratio}"


def _n(x: float) -> str:
    """3 significant digits, thousands separated (65.6, 0.00791, 6,418)."""
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.3g}"


def markdown(results: list[BenchResult], reference: dict | None = None) -> str:
    """The paper-style table; `reference` (bench_torch.measure's dict) adds its line."""
    full = find_full(results)
    rows = ["| method | ratio | frames left | visual tokens | GFLOPs (exact) | GFLOPs (XLA) | LLM GFLOPs (paper form) | TTFT mean s | median s | vs full | compile s | vision / tokens / LLM s | decode tok/s | peak MB |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        vs = f"{full.ttft_mean / r.ttft_mean:.2f}x" if full else "-"
        st = " / ".join(_n(r.stages_s[k]) for k in STAGES) if r.stages_s else "-"
        vis = f"{r.visual_tokens}" + (f" → {r.llm_tokens_after_merge}" if r.llm_tokens_after_merge is not None else "")
        xla = _n(r.flops_xla["total"] / 1e9) if r.flops_xla else "-"
        dec = _n(r.decode_tokens_per_s) if r.decode else "-"
        mem = f"{r.peak_memory['bytes'] / 2**20:,.0f}" if r.peak_memory else "-"
        rows.append(
            f"| {r.method} | {r.ratio if r.ratio is not None else '-'} | {r.frames} | {vis} | "
            f"{_n(r.flops['total'] / 1e9)} | {xla} | {_n(r.flops['paper_llm'] / 1e9)} | {_n(r.ttft_mean)} | "
            f"{_n(r.ttft_median)} | {vs} | {r.compile_s:.1f} | {st} | {dec} | {mem} |"
        )
    if reference:
        vs = f"{full.ttft_mean / reference['ttft_mean_s']:.2f}x" if full else "-"
        dec = _n(reference["decode"]["tokens_per_s"]) if reference.get("decode") else "-"
        mem = f"{reference['peak_memory']['bytes'] / 2**20:,.0f}" if reference.get("peak_memory") else "-"
        rows.append(
            f"| {reference['label']} | - | {reference['frames']} | {reference['visual_tokens']} | - | - | - | "
            f"{_n(reference['ttft_mean_s'])} | {_n(reference['ttft_median_s'])} | {vs} | - | - | {dec} | {mem} |"
        )
        if full:
            rows.append("")
            rows.append(f"JAX full / PyTorch full TTFT (mean): {full.ttft_mean / reference['ttft_mean_s']:.2f}")
    paired = [r for r in results if r.paired]
    if paired:
        rows.append("")
        rows.append("TTFT speed-up per round (full's i-th run over the method's i-th; see bench.paired_speedups):")
        for r in paired:
            p = r.paired
            rows.append(f"- {r.method} {r.ratio if r.ratio is not None else ''}: median {p['median']:.2f}x "
                        f"(rounds {p['min']:.2f}-{p['max']:.2f}x)")
    busy = [f"{_label(r)} {r.host_cores_busy:.2f}" for r in results if r.host_cores_busy is not None]
    if reference and "host_cores_busy" in reference:
        busy.append(f"PyTorch full {reference['host_cores_busy']:.2f}")
    if busy:
        rows.append("")
        rows.append(f"Host CPU cores busy during the timed TTFT runs (process CPU time / wall time, "
                    f"{os.cpu_count()} logical cores here): " + ", ".join(busy))
    checks = [(r, r.at_full_rates) for r in results if r.at_full_rates]
    if checks:
        rows.append("")
        rows.append("Speed-up against the FLOPs ratio, by stage rates (staged runs; see bench.at_full_stage_rates):")
        for r, a in checks:
            speedup = full.ttft_mean / r.ttft_mean
            rows.append(
                f"- {r.method} {r.ratio if r.ratio is not None else ''}: TTFT speed-up {speedup:.2f}x "
                f"= {speedup / a['flops_ratio']:.2f} of the FLOPs ratio {a['flops_ratio']:.2f}x; "
                f"at full's FLOP rate per stage its FLOPs would give {a['speedup']:.2f}x "
                f"({a['speedup'] / a['flops_ratio']:.2f} of it); its stages ran at {a['stage_efficiency']:.2f} of those rates"
            )
    return "\n".join(rows)
