"""Analytic FLOP counts (multiply and add counted as 2) of every prefill stage, and the
paper's LLM-only closed form.

Exact counts here count what the model computes for the *valid* tokens: causal attention
counts the lower triangle (i + 1 keys for query i), vision attention the full square.
Padding slots of our static buffers are not counted (see `padded=True` figures in the
benchmark for what the hardware actually executes).

Qwen2.5-VL (`qwen_*`): its encoder attends within windows of one temporal patch (the full
square of each window; the `fullatt_block_indexes` blocks over the whole temporal patch), so
its count needs the grid (temporal patches, patch rows, patch columns: `qwen_grid`); its LLM
is counted as LLaVA-OneVision's.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from earlytom_jax.config import LlavaOVConfig, Qwen25VLConfig, QwenVisionConfig
from earlytom_jax.models.attention.cpu import causal_block


def siglip_block(cfg: LlavaOVConfig, frames: int) -> int:
    v = cfg.vision
    n, c, f = v.num_patches, v.hidden_size, v.intermediate_size
    return frames * (8 * n * c * c + 4 * n * c * f + 4 * n * n * c)


def vision(cfg: LlavaOVConfig, frames_per_block: list[int]) -> int:
    """Patch embedding on T0 frames plus each block on the frames it ran on."""
    v = cfg.vision
    embed = frames_per_block[0] * 2 * v.num_patches * 3 * v.patch_size**2 * v.hidden_size
    return embed + sum(siglip_block(cfg, t) for t in frames_per_block)


def tome_vision(cfg: LlavaOVConfig, frames: int, counts: list[tuple[int, int]]) -> int:
    """Patch embedding plus ToMe blocks: per block (n tokens in, r merged) attention on n
    tokens, the bipartite similarity of ceil(n/2) x floor(n/2) head-averaged keys, the MLP on
    n - r tokens."""
    v = cfg.vision
    c, f, d = v.hidden_size, v.intermediate_size, v.head_dim
    total = 2 * v.num_patches * 3 * v.patch_size**2 * c
    for n, r in counts:
        total += 8 * n * c * c + 4 * n * n * c + (2 * (-(-n // 2)) * (n // 2) * d if r else 0) + 4 * (n - r) * c * f
    return frames * total


def projector(cfg: LlavaOVConfig, tokens: int) -> int:
    """The projector alone (a method without the 2x2 pooling) on `tokens` tokens."""
    c, h = cfg.vision.hidden_size, cfg.text.hidden_size
    return tokens * (2 * c * h + 2 * h * h)


def _tokens_and_vision(cfg: LlavaOVConfig, t_in: int, method):
    """(vision, projector) counts of a method that runs the encoder blocks itself (ToMe)."""
    counts = method.token_counts(cfg)
    last_n, last_r = counts[-1]
    return tome_vision(cfg, t_in, counts), projector(cfg, t_in * (last_n - last_r))


def projector_and_pool(cfg: LlavaOVConfig, frames: int) -> int:
    v, h = cfg.vision, cfg.text.hidden_size
    n, g, pg = v.num_patches, v.grid, cfg.pooled_grid
    proj = 2 * n * v.hidden_size * h + 2 * n * h * h
    pool = 2 * (pg * g * g + pg * pg * g) * h
    return frames * (proj + pool)


def llm_layer(cfg: LlavaOVConfig, n: int) -> int:
    t = cfg.text
    d, m = t.hidden_size, t.intermediate_size
    qo = 2 * 2 * n * d * t.num_heads * t.head_dim
    kv = 2 * 2 * n * d * t.num_kv_heads * t.head_dim
    mlp = 3 * 2 * n * d * m
    attn = 2 * 2 * t.num_heads * t.head_dim * (n * (n + 1) // 2)
    return qo + kv + mlp + attn


def llm_prefill(cfg: LlavaOVConfig, n_full: int, n_after: int | None = None, merge_layer: int | None = None) -> int:
    """Prefill of all layers: `n_full` tokens before `merge_layer`, `n_after` from it on;
    plus the head for the last token."""
    t = cfg.text
    total = 0
    for i in range(t.num_layers):
        n = n_after if merge_layer is not None and i >= merge_layer else n_full
        total += llm_layer(cfg, n)
    return total + 2 * t.hidden_size * t.vocab_size


def paper_llm(cfg: LlavaOVConfig, n_full: int, n_after: int | None = None, merge_layer: int | None = None) -> int:
    """The official code's closed form, per layer `4·n·d² + 2·n²·d + 2·n·d·m`."""
    t = cfg.text
    d, m = t.hidden_size, t.intermediate_size
    total = 0
    for i in range(t.num_layers):
        n = n_after if merge_layer is not None and i >= merge_layer else n_full
        total += 4 * n * d * d + 2 * n * n * d + 2 * n * d * m
    return total


@dataclasses.dataclass(frozen=True)
class PrefillFlops:
    vision: int
    tokens: int
    llm: int
    paper_llm: int

    @property
    def total(self) -> int:
        return self.vision + self.tokens + self.llm


def _frames_per_block(depth: int, t_in: int, method, stats: dict, bucket=lambda n: n) -> list[int]:
    """Frames each encoder block ran on: t_in, then after each merge layer the frames left
    (`bucket(n)`: the frame bucket the pipeline ran them on, for executed counts)."""
    frames = [t_in] * depth
    layers = sorted(i + depth if i < 0 else i for i in getattr(method, "encoder_layers", ()))
    for li, n in zip(layers, stats.get("frames_after_layer", [])):
        frames[li + 1 :] = [bucket(int(n))] * (depth - li - 1)
    return frames


def _input_frames(method, t0: int) -> int:
    picked = method.input_frames(t0) if hasattr(method, "input_frames") else None
    return t0 if picked is None else len(picked)


def _stages(method) -> tuple[int, ...]:
    """The method's hook-3 stage layers (compression/base.py `llm_layers`; a method that only
    names `llm_layer` has one stage)."""
    stages = getattr(method, "llm_layers", None)
    if stages is None:
        k = getattr(method, "llm_layer", None)
        stages = () if k is None else (k,)
    return tuple(stages)


def _query_rows(method, stats: dict, key: str = "llm_query_rows") -> int:
    """Query rows of hook 3's signal: 1 (the last slot), or the suffix rows the pipeline reported."""
    return int(stats.get(key, 1)) if getattr(method, "llm_query", "last_row") == "suffix_rows" else 1


def _probe(cfg, n: int, rows: int) -> int:
    """A stage signal read at layer K itself (`llm_signal_layer` "at"): K's key projection over the
    n slots, its query projection over the query rows and those rows' scores."""
    t = cfg.text
    return 2 * n * t.hidden_size * t.head_dim * t.num_kv_heads + 2 * rows * t.hidden_size * t.head_dim * t.num_heads \
        + 2 * t.num_heads * t.head_dim * n * rows


def _llm_exact(cfg, text_tokens: int, stats: dict, method) -> tuple[int, int]:
    """(our count, the paper's closed form) of the LLM prefill over the text and the visual
    tokens the pipeline reported, shortened at each of the method's stage layers (`llm_layers`)
    to the tokens that stage kept (`llm_kept`, or `llm_kept_stages` with several stages); a
    signal read at the stage layer itself adds its probe (`_probe`) to our count."""
    n_full = text_tokens + int(stats["visual_tokens"])
    stages = _stages(method)
    kept = list(np.ravel(stats["llm_kept_stages"])) if len(stages) > 1 else [stats.get("llm_kept")] * len(stages)
    ns = [n_full] + [n_full - int(stats["visual_tokens"]) + int(k) for k in kept]
    per_layer = [ns[sum(1 for k in stages if k <= i)] for i in range(cfg.text.num_layers)]
    t = cfg.text
    d, m = t.hidden_size, t.intermediate_size
    ours = sum(llm_layer(cfg, n) for n in per_layer) + 2 * t.hidden_size * t.vocab_size
    if getattr(method, "llm_signal_layer", "before") == "at":
        ours += sum(_probe(cfg, n, _query_rows(method, stats)) for n in ns[:-1])
    paper = sum(4 * n * d * d + 2 * n * n * d + 2 * n * d * m for n in per_layer)
    return ours, paper


def _select_flops(method, cfg, t0: int, stats: dict) -> int:
    """Hook 2's work beyond projector and pooling (`select_flops`), given the run's stats when
    the method's count depends on what ran (`select_flops_stats`: FastVID's SigLIP head)."""
    if not hasattr(method, "select_flops"):
        return 0
    if getattr(method, "select_flops_stats", False):
        return method.select_flops(cfg, t0, stats=stats)
    return method.select_flops(cfg, t0)


def prefill_flops(cfg: LlavaOVConfig, t0: int, text_tokens: int, stats: dict, method) -> PrefillFlops:
    """Counts for one prefill, from the statistics the pipeline returned (Python values).

    A method that encodes only some input frames (`input_frames`) is counted on those; its
    hook-2 work beyond projector and pooling (`select_flops`) goes into `tokens`."""
    t_in = _input_frames(method, t0)
    frames = _frames_per_block(cfg.vision.num_layers, t_in, method, stats)
    t_final = stats.get("frames", t_in)
    extra = _select_flops(method, cfg, t0, stats)
    if getattr(method, "token_merging", False):
        vis, tok = _tokens_and_vision(cfg, t_in, method)
    else:
        vis, tok = vision(cfg, frames), projector_and_pool(cfg, t_final)
    llm, paper = _llm_exact(cfg, text_tokens, stats, method)
    return PrefillFlops(vision=vis, tokens=tok + extra, llm=llm, paper_llm=paper)


# ----------------------------------------------------------------------------- as executed


def attention_entries(L: int, causal: bool = True, conditionals: str = "executed") -> int:
    """Query-key score entries per query head that the attention kernel computes over `L`
    slots: the dense square up to one block (masked entries included), else the key blocks on
    and below the diagonal of the padded length ("executed"), or all of them ("largest": what
    XLA's cost analysis counts, as it charges a `lax.cond` its largest branch). The blocks are
    the CPU kernel's (`attention.cpu.causal_block`), where the bench measures."""
    block = causal_block(L)
    if not causal or L <= block:
        return L * L
    nb = -(-L // block)
    pairs = nb * (nb + 1) // 2 if conditionals == "executed" else nb * nb
    return pairs * block * block


def llm_layer_executed(cfg: LlavaOVConfig, L: int, entries: int) -> int:
    """One decoder layer over L static slots (padding included) with `entries` scores per head."""
    t = cfg.text
    d, m = t.hidden_size, t.intermediate_size
    proj = 2 * 2 * L * d * (t.num_heads + t.num_kv_heads) * t.head_dim + 3 * 2 * L * d * m
    return proj + 2 * 2 * t.num_heads * t.head_dim * entries


def _buckets(method, t_in: int, conditionals: str, frame_loop: bool = False):
    """The frame bucket a count of n frames ran on (every bucket at the largest for "largest");
    frame_loop: the encoder ran the n frames one at a time (`stack.frame_loop`), exactly n."""
    buckets = tuple(method.frame_buckets(t_in)) if hasattr(method, "frame_buckets") else (t_in,)

    def bucket(n: int) -> int:
        if conditionals == "largest":
            return max(buckets)
        if frame_loop:
            return n
        return min([b for b in buckets if b >= n] or [t_in])

    return bucket


def _llm_executed(cfg, text_tokens: int, span: int, method, conditionals: str, query_rows: int = 1) -> int:
    """The LLM over every slot of the static sequence (the text and a visual span of `span`
    slots), shortened at each stage layer K_i of the method (`llm_layers`) to that stage's
    capacity (`llm_stage_capacity`), plus each stage's signal (layer K_i - 1 run with its own
    causality and `query_rows` rows of scores, or K_i's probe, `_probe`), plus the head."""
    t = cfg.text
    L = text_tokens + span
    llm, start = 0, 0
    for i, k in enumerate(_stages(method)):
        full = llm_layer_executed(cfg, L, attention_entries(L, True, conditionals))
        if getattr(method, "llm_signal_layer", "before") == "at":
            llm += (k - start) * full + _probe(cfg, L, query_rows)
        else:
            causal = not getattr(method, "llm_noncausal", False)
            llm += (k - 1 - start) * full + llm_layer_executed(cfg, L, attention_entries(L, causal, conditionals))
            llm += 2 * t.num_heads * t.head_dim * L * query_rows  # the query rows' attention
        stage_cap = getattr(method, "llm_stage_capacity", None)
        L = text_tokens + (stage_cap(i, span) if stage_cap is not None else method.llm_capacity(span))
        start = k
    llm += (t.num_layers - start) * llm_layer_executed(cfg, L, attention_entries(L, True, conditionals))
    return llm + 2 * t.hidden_size * t.vocab_size


def _span_run(span: int, stats: dict, conditionals: str) -> int:
    """The visual span the LLM ran on: the span bucket the prefill chose (`llm_span_bucket`, for a
    method with `llm_span_buckets`), else the whole static span; "largest" counts the whole span."""
    if conditionals == "largest" or "llm_span_bucket" not in stats:
        return span
    return int(stats["llm_span_bucket"])


def executed_prefill_flops(cfg: LlavaOVConfig, t0: int, text_tokens: int, stats: dict, method,
                           conditionals: str = "executed", frame_loop: bool = False) -> dict:
    """Matmul FLOPs of what the compiled prefill executes, static shapes and all: encoder blocks,
    then projector and pooling, on the frame bucket they ran on (the whole frame buffer without
    frame merging), LLM layers over every slot of the static sequence (padding included),
    attention as the kernels compute it (masked squares, diagonal blocks; see
    `attention_entries`). conditionals "largest" counts each `lax.switch`/`lax.cond` at its
    largest branch (the largest frame bucket, every key block), as XLA's cost analysis does.
    frame_loop: the pipeline ran merged frames one at a time (`stack.frame_loop`: bf16 on CPU),
    on exactly the frames left rather than a bucket. Elementwise work (norms, softmax,
    activations, RoPE) is not counted here; XLA counts it (see bench.xla_stage_flops).

    → {"vision", "tokens", "llm", "total"} (Python ints)."""
    t_in = _input_frames(method, t0)
    bucket = _buckets(method, t_in, conditionals, frame_loop)
    frames = _frames_per_block(cfg.vision.num_layers, t_in, method, stats, bucket)
    if getattr(method, "token_merging", False):
        vis, tok = _tokens_and_vision(cfg, t_in, method)
    else:  # patch embedding on t_in frames, then every block
        merges = bool(getattr(method, "encoder_layers", ()))
        last = bucket(int(stats["frames"])) if merges and getattr(method, "pooled", True) else t_in
        vis, tok = vision(cfg, frames), projector_and_pool(cfg, last)
    tok += _select_flops(method, cfg, t0, stats)
    from earlytom_jax.pipeline import visual_span

    span = visual_span(cfg, method, t0, cfg.tokens_per_frame)  # newlines included (LLaVA-Video: per row)
    span = _span_run(span, stats, conditionals)
    llm = _llm_executed(cfg, text_tokens, span, method, conditionals, _query_rows(method, stats, "llm_query_slots"))
    return {"vision": vis, "tokens": tok, "llm": llm, "total": vis + tok + llm}


# ----------------------------------------------------------------------------- Qwen2.5-VL


def qwen_grid(vcfg: QwenVisionConfig, pixel_shape) -> tuple[int, int, int]:
    """(temporal patches, patch rows, patch columns) of Qwen2.5-VL pixels [T', 3, H, W]."""
    t, _, hh, ww = pixel_shape
    return t // vcfg.temporal_patch_size, hh // vcfg.patch_size, ww // vcfg.patch_size


def qwen_windows(vcfg: QwenVisionConfig, grid: tuple[int, int, int]) -> np.ndarray:
    """Patches in each attention window of one temporal patch: int [windows] (row-major,
    edge windows smaller), as `WindowLayout` lays them out."""
    from earlytom_jax.models.qwen_vision import WindowLayout

    _, gh, gw = grid
    seg = WindowLayout.of(gh, gw, vcfg.spatial_merge_size, vcfg.window_merged).segments
    return seg.valid.sum(1)


def qwen_vision(cfg: Qwen25VLConfig, grid: tuple[int, int, int], padded: bool = False,
                frames_per_block: list[int] | None = None) -> int:
    """Qwen2.5-VL's encoder on a grid (T, gh, gw): per temporal patch of N = gh·gw patches the
    patch embedding (3·tp·p² → C), each block's qkv, output projection and gated MLP on N
    rows, its attention (scores and values, 4·C per query-key pair) within each window for a
    window block, over all N patches for a `fullatt_block_indexes` block, and the merger's two
    linears on N / unit rows. frames_per_block: the temporal patches each block ran on (None:
    T everywhere; the embedding runs on the first block's, the merger on the last's).
    padded: every window as wide as the widest (what `Segments` computes). Elementwise work
    (norms, RoPE, activations, softmax) is not counted."""
    v = cfg.vision
    t, gh, gw = grid
    frames = [t] * v.num_layers if frames_per_block is None else list(frames_per_block)
    n, c, f, unit = gh * gw, v.hidden_size, v.intermediate_size, v.merge_unit
    windows = qwen_windows(v, grid)
    window_pairs = int(windows.size * windows.max() ** 2 if padded else (windows.astype(np.int64) ** 2).sum())
    embed = 2 * n * 3 * v.temporal_patch_size * v.patch_size**2 * c
    rows = 8 * n * c * c + 6 * n * c * f
    full = set(v.fullatt_block_indexes)
    blocks = sum(tb * (rows + 4 * c * (n * n if i in full else window_pairs)) for i, tb in enumerate(frames))
    merger = 2 * (n // unit) * (unit * c) * (unit * c + v.out_hidden_size)
    return frames[0] * embed + blocks + frames[-1] * merger


def qwen_prefill_flops(cfg: Qwen25VLConfig, grid: tuple[int, int, int], text_tokens: int, stats: dict,
                       method) -> PrefillFlops:
    """Counts for one Qwen2.5-VL prefill of a clip of `grid` (temporal patches, rows, columns):
    the encoder on the temporal patches the method encodes (`input_frames`), each block on the
    temporal patches left after the merges before it (`qwen_vision`), hook 2's own work
    (`select_flops`), the LLM on the text and the visual tokens the pipeline reported, shortened
    from the method's `llm_layer` on, and the paper's closed form of that LLM prefill."""
    t_in = _input_frames(method, grid[0])
    frames = _frames_per_block(cfg.vision.num_layers, t_in, method, stats)
    per_patch = grid[1] * grid[2] // cfg.vision.merge_unit
    extra = method.select_flops(cfg, grid[0], per_patch) if hasattr(method, "select_flops") else 0
    llm, paper = _llm_exact(cfg, text_tokens, stats, method)
    return PrefillFlops(vision=qwen_vision(cfg, grid, frames_per_block=frames), tokens=extra, llm=llm,
                        paper_llm=paper)


def qwen_executed_prefill_flops(cfg: Qwen25VLConfig, grid: tuple[int, int, int], text_tokens: int, stats: dict,
                                method, conditionals: str = "executed", frame_loop: bool = False) -> dict:
    """`executed_prefill_flops` for Qwen2.5-VL: the encoder with padded windows on the frame
    buckets it ran on (`qwen_vision(padded=True)`), the LLM over the static sequence (text,
    then the method's visual buffer for T temporal patches of gh·gw / unit tokens, no newline)
    with attention as the CPU kernel computes it (`attention_entries`).
    → {"vision", "tokens", "llm", "total"}."""
    t, gh, gw = grid
    t_in = _input_frames(method, t)
    frames = _frames_per_block(cfg.vision.num_layers, t_in, method, stats,
                               _buckets(method, t_in, conditionals, frame_loop))
    per_patch = gh * gw // cfg.vision.merge_unit
    span = method.capacity(t, per_patch) if hasattr(method, "capacity") else t * per_patch
    vis = qwen_vision(cfg, grid, padded=True, frames_per_block=frames)
    tok = method.select_flops(cfg, t, per_patch) if hasattr(method, "select_flops") else 0
    span = _span_run(span, stats, conditionals)
    llm = _llm_executed(cfg, text_tokens, span, method, conditionals, _query_rows(method, stats, "llm_query_slots"))
    return {"vision": vis, "tokens": tok, "llm": llm, "total": vis + tok + llm}
