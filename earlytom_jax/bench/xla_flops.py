"""FLOPs as XLA counts them, made loop-aware.

`flops_xla` (BenchResult): XLA's cost analysis of the compiled stages. XLA charges a `while`
loop (every `lax.scan`: the layer stacks, the blockwise attention) its body *once*, whatever
the trip count, and a `lax.cond`/`lax.switch` its largest branch. `xla_stage_flops` makes
the loops count: it walks the stage's jaxpr and adds (trips - 1) x XLA's count of each scan
body (compiled on its own), nested loops multiplied through; conditionals keep XLA's largest
branch. So this figure counts every key block of the blockwise causal attention (the program
skips those above the diagonal) and the largest frame bucket; compare it with
`flops_executed` computed with conditionals="largest" (`flops_xla["analytic"]`). What is
left is elementwise work (norms, softmax, GELU, RoPE), which XLA counts and the analytic
form does not: < 1% of a stage at the real widths, 2-17% at the `tiny` arch's 64/128.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from earlytom_jax import pipeline
from earlytom_jax.models import family


def _cost_flops(stage) -> float:
    ca = stage.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    return float((ca or {}).get("flops", 0.0))


class _LoopAwareCount:
    """XLA's count of a function made loop-aware (see this module's docstring)."""

    def __init__(self, compile_parts: bool = False):
        self.compile_parts = compile_parts
        self._cache: dict = {}
        self.while_loops = 0  # loops of unknown trip count, charged once as XLA does

    def part_flops(self, closed) -> float:
        key = id(closed)
        if key not in self._cache:
            from jax._src import core

            avals = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in closed.in_avals]
            lowered = jax.jit(core.jaxpr_as_fun(closed)).lower(*avals)
            self._cache[key] = (closed, _cost_flops(lowered.compile() if self.compile_parts else lowered))
        return self._cache[key][1]

    def _has_loop(self, jaxpr) -> bool:
        from jax._src import core

        jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
        return any(
            e.primitive.name in ("scan", "while") or any(self._has_loop(j) for j in core.jaxprs_in_params(e.params))
            for e in jaxpr.eqns
        )

    def extra(self, jaxpr) -> float:
        """FLOPs XLA's single count of `jaxpr` leaves out of its loops' other iterations."""
        from jax._src import core

        jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
        total = 0.0
        for e in jaxpr.eqns:
            name = e.primitive.name
            if name == "scan":
                body, trips = e.params["jaxpr"], int(e.params["length"])
                total += (trips - 1) * self.part_flops(body) + trips * self.extra(body)
            elif name == "cond":
                branches = e.params["branches"]
                if any(self._has_loop(b) for b in branches):
                    own = [self.part_flops(b) for b in branches]
                    total += max(c + self.extra(b) for c, b in zip(own, branches)) - max(own)
            else:
                if name == "while":
                    self.while_loops += 1
                for sub in core.jaxprs_in_params(e.params):
                    total += self.extra(sub)
        return total


def _abstract(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def xla_stage_flops(params, cfg, t0: int, prefix_len: int, suffix_len: int, method, max_new: int = 16,
                    compile_parts: bool = False, pixel_shape: tuple | None = None) -> dict:
    """XLA's cost analysis of the three compiled prefill stages of `method` (the very jitted
    functions `pipeline.staged_prefill` times; for one device, from abstract shapes, so after
    a staged run without a mesh the compiled programs come from JAX's cache), made loop-aware.
    Loop bodies and branches are costed from their lowered HLO (`compile_parts=True`: compiled
    too; slower, same figures within 0.5%). Call it outside any `jax.set_mesh`: the count is
    of the model, not of one partition. pixel_shape: the pixels' shape (default [t0, 3, S, S];
    Qwen2.5-VL's [T', 3, H, W] must be given, and its encoder then takes a traced fp32
    `video_time`).
    → {"vision", "tokens", "llm", "total", "as_reported": {...}, "while_loops_counted_once"}."""
    count = _LoopAwareCount(compile_parts)
    if pixel_shape is None:
        pixel_shape = (t0, 3, cfg.vision.image_size, cfg.vision.image_size)
    P = _abstract(params)
    pix = jax.ShapeDtypeStruct(tuple(pixel_shape), params["vision"]["patch_w"].dtype)
    timing = {"video_time": jax.ShapeDtypeStruct((), jnp.float32)} if family.is_qwen(cfg) else {}
    pre = jax.ShapeDtypeStruct((prefix_len,), jnp.int32)
    suf = jax.ShapeDtypeStruct((suffix_len,), jnp.int32)
    feats, n, state = jax.eval_shape(pipeline.stage_vision, P, pix, cfg, method, **timing)
    h, valid, positions, _, info = jax.eval_shape(pipeline.stage_tokens, P, feats, n, state, pre, suf, cfg, method)
    span = (prefix_len, h.shape[1] - suffix_len)
    span_info = jax.eval_shape(lambda i: pipeline.llm_span_info(i, method, span[1] - span[0], cfg), info)
    stages = (
        ("vision", pipeline.stage_vision, (P, pix), (cfg, method), timing),
        ("tokens", pipeline.stage_tokens, (P, feats, n, state, pre, suf), (cfg, method), {}),
        ("llm", pipeline.stage_llm, (P, h, valid, positions), (span, cfg, method, max_new),
         {} if span_info is None else {"span_info": span_info}),
    )
    out, raw = {}, {}
    for name, stage, args, static, kw in stages:
        raw[name] = _cost_flops(stage.lower(*args, *static, **kw).compile())
        jaxpr = jax.make_jaxpr(lambda *a, stage=stage, static=static, **k: stage(*a, *static, **k))(*args, **kw)
        out[name] = raw[name] + count.extra(jaxpr)
    out["total"] = out["vision"] + out["tokens"] + out["llm"]
    raw["total"] = raw["vision"] + raw["tokens"] + raw["llm"]
    out["as_reported"] = raw
    out["while_loops_counted_once"] = count.while_loops
    return out
