"""TTFT measured the paper's way (spec: frame preprocessing excluded; vision encoding, token
selection, LLM prefill and the first token included; warm-ups, then mean and median), with
compile time apart, a per-stage breakdown and FLOP counts."""

from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp

from earlytom_jax import flops, pipeline


@dataclasses.dataclass
class BenchResult:
    method: str
    ratio: float | None
    compile_s: float
    ttft_s: list[float]
    stages_s: dict
    frames: int
    visual_tokens: int
    llm_tokens_after_merge: int | None
    flops: dict

    @property
    def ttft_mean(self) -> float:
        return statistics.mean(self.ttft_s)

    @property
    def ttft_median(self) -> float:
        return statistics.median(self.ttft_s)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(ttft_mean_s=self.ttft_mean, ttft_median_s=self.ttft_median)
        return d


def measure(params, cfg, pixels, prefix_ids, suffix_ids, method, name: str, ratio=None,
            warmup: int = 2, runs: int = 5, staged: bool = True) -> BenchResult:
    """Compile (timed apart), `warmup` untimed calls, then `runs` timed TTFT calls of the one
    fused prefill program (first token fetched to the host); then one staged run for the
    breakdown."""
    pre = jnp.asarray(prefix_ids, jnp.int32)
    suf = jnp.asarray(suffix_ids, jnp.int32)
    t = time.perf_counter()
    compiled = pipeline.compile_prefill(params, pixels.shape[0], pre.shape[0], suf.shape[0], cfg, method, 16)
    compile_s = time.perf_counter() - t
    for _ in range(warmup):
        jax.block_until_ready(compiled(params, pixels, pre, suf))
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        logits, _, _, stats = compiled(params, pixels, pre, suf)
        int(jnp.argmax(logits))
        times.append(time.perf_counter() - t)
    stats = {k: jax.device_get(v).tolist() for k, v in stats.items() if k in ("frames", "visual_tokens", "llm_kept", "frames_after_layer")}
    stages = {}
    if staged:
        pipeline.staged_prefill(params, pixels, pre, suf, cfg, method, 16)  # compile the stages
        _, stages = pipeline.staged_prefill(params, pixels, pre, suf, cfg, method, 16)
    f = flops.prefill_flops(cfg, pixels.shape[0], pre.shape[0] + suf.shape[0], stats, method)
    return BenchResult(
        method=name, ratio=ratio, compile_s=compile_s, ttft_s=times, stages_s=stages,
        frames=int(stats["frames"]), visual_tokens=int(stats["visual_tokens"]),
        llm_tokens_after_merge=stats.get("llm_kept"),
        flops=dict(vision=f.vision, tokens=f.tokens, llm=f.llm, total=f.total, paper_llm=f.paper_llm),
    )


def markdown(results: list[BenchResult]) -> str:
    full = next((r for r in results if r.method == "full"), None)
    rows = ["| method | ratio | frames left | visual tokens | GFLOPs (exact) | LLM GFLOPs (paper form) | TTFT mean s | median s | vs full | compile s | vision / tokens / LLM s |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        vs = f"{full.ttft_mean / r.ttft_mean:.2f}x" if full else "-"
        st = " / ".join(f"{r.stages_s.get(k, float('nan')):.2f}" for k in ("vision", "tokens", "llm"))
        vis = f"{r.visual_tokens}" + (f" → {r.llm_tokens_after_merge}" if r.llm_tokens_after_merge is not None else "")
        rows.append(
            f"| {r.method} | {r.ratio if r.ratio is not None else '-'} | {r.frames} | {vis} | "
            f"{r.flops['total'] / 1e9:,.1f} | {r.flops['paper_llm'] / 1e9:,.1f} | {r.ttft_mean:.2f} | "
            f"{r.ttft_median:.2f} | {vs} | {r.compile_s:.1f} | {st} |"
        )
    return "\n".join(rows)
