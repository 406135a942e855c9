"""Timing the transformers model with the paper's protocol (warm-ups, then timed calls producing
one token; optional greedy decodes), on the same pixels and prompt ids as the JAX run."""

from __future__ import annotations

import statistics

import numpy as np

from earlytom_jax import bench
from earlytom_jax.bench_torch.models import require
from earlytom_jax.config import LlavaOVConfig, ModelConfig, Qwen25VLConfig
from earlytom_jax.models import family

def _greedy_steps(model, cache, first: int, length: int, steps: int, device,
                  rope_start: int | None = None) -> list[int]:
    """`steps` greedy tokens after a prefill of `length` positions whose cache is `cache` and
    whose token was `first`: one forward per token with the model's cache, as `generate` runs
    them (cache slot and mask by the cache's length), tokens kept on the device until the end.
    rope_start: Qwen2.5-VL's first new token's position (the prompt's largest + 1), given on
    all three axes and counted up per step (None: the position is the cache slot)."""
    torch, _ = require()
    tok = torch.tensor([[first]], dtype=torch.long, device=device)
    mask = torch.ones((1, length + steps), dtype=torch.long, device=device)
    out = []
    for i in range(steps):
        pos = length + i
        rope = {} if rope_start is None else {
            "position_ids": torch.full((3, 1, 1), rope_start + i, dtype=torch.long, device=device)}
        logits = model(input_ids=tok, past_key_values=cache, attention_mask=mask[:, :pos + 1], use_cache=True,
                       cache_position=torch.tensor([pos], device=device), logits_to_keep=1, **rope).logits
        tok = logits[:, -1].argmax(-1, keepdim=True)
        out.append(tok)
    return [int(t) for t in torch.cat(out, 1)[0]] if out else []


def qwen_positions(prefix_len: int, grid: tuple[int, int, int], suffix_len: int, second_per_grid_t: float,
                   tokens_per_second: float, merge: int):
    """Qwen2.5-VL's 3-D positions of prefix + video + suffix as the model was trained (transformers
    4.x `get_rope_index`): int64 [3, L]; text 0..P-1; the merged token at temporal patch t, row r,
    column c at (P + floor(t · interval), P + r, P + c), interval = second_per_grid_t ·
    tokens_per_second in fp32; the text after the video from the largest position + 1.
    transformers 5 places that text otherwise, so the reference is handed these explicitly."""
    torch, _ = require()
    gt, gh, gw = grid
    mh, mw = gh // merge, gw // merge
    interval = torch.tensor(second_per_grid_t, dtype=torch.float32) * tokens_per_second
    t = (torch.arange(gt).view(-1, 1).expand(-1, mh * mw) * interval).long().flatten()
    h = torch.arange(mh).view(1, -1, 1).expand(gt, -1, mw).flatten()
    w = torch.arange(mw).view(1, 1, -1).expand(gt, mh, -1).flatten()
    video = torch.stack([t, h, w]) + prefix_len
    start = int(video.max()) + 1
    return torch.cat([torch.arange(prefix_len).expand(3, -1), video,
                      torch.arange(start, start + suffix_len).expand(3, -1)], 1)


def _llava_inputs(pixels: np.ndarray, prefix_ids, suffix_ids, cfg: LlavaOVConfig, dtype, device):
    """(ids, model kwargs, None): prefix + <video> x `cfg.visual_slots(T)` (T·S' + 1; LLaVA-Video
    T·g'·(g' + 1)) + suffix and pixels [1, T, 3, S, S]."""
    torch, _ = require()
    ids = list(prefix_ids) + [cfg.video_token_id] * cfg.visual_slots(pixels.shape[0]) + list(suffix_ids)
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    pix = torch.from_numpy(np.asarray(pixels, np.float32)).to(device=device, dtype=dtype)[None]
    # an explicit mask: without one, generate masks every id equal to pad_token_id
    return ids, dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values_videos=pix), None


def _qwen_inputs(pixels: np.ndarray, prefix_ids, suffix_ids, cfg: Qwen25VLConfig, video_time: float, dtype, device):
    """(ids, model kwargs, first decode position): prefix + <|video_pad|> x (t·h·w / unit) +
    suffix, pixels [T', 3, H, W] flattened as transformers' processor does
    (`video_qwen.flatten_patches`), the grid, `video_time` as second_per_grid_ts and the
    explicit positions [3, 1, L] (`qwen_positions`)."""
    from earlytom_jax.flops import qwen_grid
    from earlytom_jax.video_qwen import flatten_patches

    torch, _ = require()
    v = cfg.vision
    grid = qwen_grid(v, pixels.shape)
    flat = flatten_patches(np.asarray(pixels, np.float32), v.temporal_patch_size, v.patch_size, v.spatial_merge_size)
    ids = list(prefix_ids) + [cfg.video_token_id] * (grid[0] * grid[1] * grid[2] // v.merge_unit) + list(suffix_ids)
    pos = qwen_positions(len(prefix_ids), grid, len(suffix_ids), video_time, v.tokens_per_second, v.spatial_merge_size)
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    inputs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                  pixel_values_videos=torch.from_numpy(flat).to(device=device, dtype=dtype),
                  video_grid_thw=torch.tensor([grid], device=device),
                  second_per_grid_ts=torch.tensor([video_time], device=device),
                  position_ids=pos[:, None].to(device))
    return ids, inputs, int(pos.max()) + 1


def measure(model, pixels: np.ndarray, prefix_ids, suffix_ids, cfg: ModelConfig, warmup: int = 2, runs: int = 5,
            forward: bool = False, decode_tokens: int = 0, video_time: float | None = None) -> dict:
    """TTFT of transformers' full-token model on pixels [T, 3, S, S] and prefix + <video> x
    (T·S' + 1) + suffix, in the model's dtype and on its device (inputs placed there first; on
    CUDA every timed call lies between two torch.cuda.synchronize): `generate` of one new token
    (greedy), or with `forward` one forward pass (the prefill: KV cache built, the last
    position's logits only) and its argmax read on the host, without generate's per-call setup
    (milliseconds: next to a GPU's prefill, not negligible).

    Qwen2.5-VL (`cfg` a Qwen25VLConfig): pixels [T', 3, H, W] and prefix + <|video_pad|> x
    (t·h·w / 4) + suffix, always forward passes, with `video_time` (seconds per temporal patch;
    None: 1, as `pipeline.prefill` takes it) as second_per_grid_ts and the explicit positions
    of `qwen_positions` (generate would place the text after the video by transformers 5's
    rule, not the model's); decode steps at the largest position + 1 + step.

    decode_tokens > 1: then `runs` timed greedy decodes of decode_tokens - 1 steps (the first
    token came from the prefill) from a copy of the last timed call's cache, one forward per
    token as generate runs them (`_greedy_steps`; EOS ignored, as in JAX's decode): tokens/s =
    steps / wall time.

    → {"ttft_s": [...], "ttft_mean_s", "ttft_median_s", "first_token", "decode" (or None),
    "frames" (Qwen2.5-VL: temporal patches), "visual_tokens",
    "peak_memory" ({"kind", "scope", "bytes"}: on CUDA torch.cuda.max_memory_allocated, elsewhere
    the process's peak resident set, over the warm-ups, timed calls and decodes, weights
    included), "peak_memory_bytes" (its bytes), ...}."""
    import copy

    torch, transformers = require()
    param = next(model.parameters())
    dtype, device = param.dtype, param.device
    cuda = device.type == "cuda"
    qwen = family.is_qwen(cfg)
    if qwen:
        video_time = 1.0 if video_time is None else float(video_time)
        ids, inputs, rope_start = _qwen_inputs(pixels, prefix_ids, suffix_ids, cfg, video_time, dtype, device)
        frames = int(inputs["video_grid_thw"][0, 0])
        forward = True
    else:
        ids, inputs, rope_start = _llava_inputs(pixels, prefix_ids, suffix_ids, cfg, dtype, device)
        frames = pixels.shape[0]
    visual = len(ids) - len(prefix_ids) - len(suffix_ids)
    kept = None

    def step(keep: bool) -> int:
        nonlocal kept
        if forward:
            out = model(**inputs, use_cache=True, logits_to_keep=1)
            tok = int(out.logits[0, -1].argmax())
        else:
            out = model.generate(**inputs, max_new_tokens=1, min_new_tokens=1, do_sample=False, pad_token_id=0,
                                 return_dict_in_generate=True)
            tok = int(out.sequences[0, -1])
        kept = out.past_key_values if keep else None
        return tok

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    def one(keep: bool = False) -> int:
        with torch.no_grad():
            tok = step(keep)
        sync()
        return tok

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        window = {"kind": "torch_cuda_max_memory_allocated", "scope": "the warm-ups, timed calls and decodes"}
    else:
        window = bench.host_peak_start("the warm-ups, timed calls and decodes")
    for _ in range(warmup):
        one()
    times, cpu = [], []
    for i in range(runs):
        sync()
        tok, wall, cpu_s = bench.timed(lambda keep=(i == runs - 1 and decode_tokens > 1): one(keep))
        times.append(wall)
        cpu.append(cpu_s)
    decode = None
    if decode_tokens > 1:
        steps, dec_times = decode_tokens - 1, []
        for _ in range(max(1, runs)):
            cache = copy.deepcopy(kept)
            sync()
            with torch.no_grad():
                toks, wall, _ = bench.timed(lambda c=cache: _greedy_steps(model, c, tok, len(ids), steps, device,
                                                                          rope_start))
            dec_times.append(wall)
            del cache
        decode = {"new_tokens": decode_tokens, "decode_steps": steps, "tokens": [tok] + toks, "seconds": dec_times,
                  "tokens_per_s": steps / statistics.mean(dec_times),
                  "tokens_per_s_median": steps / statistics.median(dec_times),
                  "note": "greedy, one forward per token with the model's cache (as generate), EOS ignored; "
                          "tokens/s = decode steps / wall time"}
    kept = None
    if cuda:
        peak = dict(window, bytes=int(torch.cuda.max_memory_allocated(device)))
    else:
        peak = bench.peak_memory_read(window)
    call = "forward passes (prefill, logits_to_keep=1)" if forward else "generate(max_new_tokens=1) calls"
    if qwen:
        call += " with explicit 3-D positions (Qwen2.5-VL's rule: text after the video from the largest position + 1)"
    if getattr(model, "llava_video_reference", False):
        from earlytom_jax.llava_video_torch import LABEL as label
    else:
        label = "transformers full (PyTorch)"
    return {
        "label": label,
        "library": f"torch {torch.__version__}, transformers {transformers.__version__}",
        "torch_threads": torch.get_num_threads(),
        "dtype": str(dtype).replace("torch.", ""),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else None,
        "attn_implementation": model.config._attn_implementation,
        "protocol": f"{warmup} warm-ups, then {runs} timed {call} under torch.no_grad"
                    + (", torch.cuda.synchronize before and after each" if cuda else ""),
        "frames": frames,
        "visual_tokens": visual,
        "video_grid_thw": inputs["video_grid_thw"][0].tolist() if qwen else None,
        "second_per_grid_t": video_time if qwen else None,
        "ttft_s": times,
        "ttft_mean_s": statistics.mean(times),
        "ttft_median_s": statistics.median(times),
        "first_token": tok,
        "decode": decode,
        "peak_memory": peak,
        "peak_memory_bytes": peak["bytes"],
        "host_cpu_s": cpu,
        "host_cores_busy": bench.cores_busy(cpu, times),
    }
