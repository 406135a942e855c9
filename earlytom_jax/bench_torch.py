"""The PyTorch original on the same footing (`earlytom bench --reference torch`): transformers'
full-token `LlavaOnevisionForConditionalGeneration` or `Qwen2_5_VLForConditionalGeneration`,
on CPU with the same weights, pixels, prompt ids and dtype as the JAX run, timed with the
paper's protocol (warm-ups, then mean and median of timed calls producing one token, under
`torch.no_grad`: `generate` calls for LLaVA-OneVision, prefill forwards for Qwen2.5-VL, whose
3-D positions are handed over explicitly); on a GPU (benchmarks/gpu_check.py) built there with
its own random weights, timing prefill forwards.

Same weights: for a named architecture the random transformers model is built first (from a
config written from ours) and our parameter tree is read from its state dict in memory with
the checkpoint loader's own mapping (`checkpoint.hf.iter_params`); for a checkpoint directory
both sides load the same files. torch and transformers are imported only here, lazily.
"""

from __future__ import annotations

import os
import statistics

import numpy as np

from earlytom_jax import bench
from earlytom_jax.config import LlavaOVConfig, ModelConfig, Qwen25VLConfig
from earlytom_jax.errors import CheckpointError, ConfigError
from earlytom_jax.io_utils import read_json
from earlytom_jax.models import family

HF_CLASSES = {"llava_onevision": "LlavaOnevisionForConditionalGeneration",
              "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}
HF_CONFIGS = {"llava_onevision": "LlavaOnevisionConfig", "qwen2_5_vl": "Qwen2_5_VLConfig"}


def require():
    """(torch, transformers); ConfigError (one line) when either is not installed."""
    try:
        import torch
        import transformers
    except ImportError as e:
        raise ConfigError(
            f"--reference torch needs torch and transformers ({e.name} is not installed): pip install '.[test]'"
        ) from None
    return torch, transformers


def _torch_dtype(dtype: str):
    torch, _ = require()
    if dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"dtype {dtype!r}: choose float32 or bfloat16")
    return getattr(torch, dtype)


def hf_config_dict(cfg: ModelConfig) -> dict:
    """transformers config kwargs of our config (`HF_CONFIGS[cfg.family]`). LLaVA-OneVision's
    laid out as the llava-hf checkpoints are (SigLIP truncated at the feature depth,
    `vision_feature_layer` -1, full select strategy); Qwen2.5-VL's see `qwen_config_dict`."""
    if family.is_qwen(cfg):
        return qwen_config_dict(cfg)
    v, t = cfg.vision, cfg.text
    return dict(
        vision_config=dict(
            model_type="siglip_vision_model", hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
            num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads, image_size=v.image_size,
            patch_size=v.patch_size, hidden_act="gelu_pytorch_tanh", layer_norm_eps=v.layer_norm_eps,
            vision_use_head=False,
        ),
        text_config=dict(
            model_type="qwen2", hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
            num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
            head_dim=t.head_dim, vocab_size=t.vocab_size, max_position_embeddings=t.max_position_embeddings,
            rope_theta=t.rope_theta, rms_norm_eps=t.rms_norm_eps, tie_word_embeddings=t.tie_word_embeddings,
            hidden_act="silu",
        ),
        image_token_index=cfg.image_token_id,
        video_token_index=cfg.video_token_id,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        tie_word_embeddings=t.tie_word_embeddings,
    )


def qwen_config_dict(cfg: Qwen25VLConfig) -> dict:
    """`Qwen2_5_VLConfig` kwargs of our config, as transformers 5 saves a Qwen2.5-VL checkpoint
    (`text_config` with `rope_parameters` holding the multimodal RoPE sections)."""
    v, t = cfg.vision, cfg.text
    if t.head_dim * t.num_heads != t.hidden_size:
        raise ConfigError(f"head_dim {t.head_dim} x {t.num_heads} heads is not the hidden size {t.hidden_size}: "
                          "transformers' Qwen2.5-VL cannot express this shape")
    if v.rope_theta != 10000.0:
        raise ConfigError(f"vision rope_theta {v.rope_theta}: transformers' Qwen2.5-VL encoder uses 10000 only")
    if v.tokens_per_second != int(v.tokens_per_second):
        raise ConfigError(f"tokens_per_second {v.tokens_per_second}: transformers' Qwen2.5-VL config takes "
                          "whole numbers")
    return dict(
        vision_config=dict(
            depth=v.num_layers, hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
            num_heads=v.num_heads, in_channels=3, patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size,
            spatial_merge_size=v.spatial_merge_size, window_size=v.window_size,
            fullatt_block_indexes=list(v.fullatt_block_indexes), out_hidden_size=v.out_hidden_size,
            tokens_per_second=int(v.tokens_per_second), hidden_act=v.hidden_act,
        ),
        text_config=dict(
            hidden_size=t.hidden_size, intermediate_size=t.intermediate_size, num_hidden_layers=t.num_layers,
            num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads, vocab_size=t.vocab_size,
            max_position_embeddings=t.max_position_embeddings, rms_norm_eps=t.rms_norm_eps, hidden_act="silu",
            rope_parameters={"rope_type": "default", "mrope_section": list(t.mrope_section),
                             "rope_theta": t.rope_theta},
            tie_word_embeddings=t.tie_word_embeddings, bos_token_id=None, eos_token_id=None,
        ),
        video_token_id=cfg.video_token_id,
        image_token_id=cfg.image_token_id,
        vision_start_token_id=cfg.vision_start_token_id,
        vision_end_token_id=cfg.vision_end_token_id,
        tie_word_embeddings=t.tie_word_embeddings,
    )


def build_random(cfg: ModelConfig, dtype: str = "float32", seed: int = 0, device: str | None = None,
                 attn_implementation: str | None = None):
    """A random transformers model of our architecture (either family), in eval mode and
    `dtype`, built and its weights drawn on `device` (default the CPU; "cuda": the 7B shape's
    15 GB never pass through the host). attn_implementation: transformers' (e.g. "sdpa");
    default its own choice."""
    torch, transformers = require()
    torch.manual_seed(seed)
    hf_cfg = getattr(transformers, HF_CONFIGS[cfg.family])(**hf_config_dict(cfg))
    kw = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    # built straight in `dtype`: the 7B shape in bf16 (15 GB) never exists in fp32 (30 GB); under
    # the device context every parameter and buffer is allocated, and initialised, on `device`
    with torch.device(device or "cpu"):
        model = getattr(transformers, HF_CLASSES[cfg.family])._from_config(hf_cfg, dtype=_torch_dtype(dtype), **kw)
    return model.eval()


def hf_class_name(directory: str) -> str:
    """The transformers class that loads a checkpoint directory, by its config.json's
    `model_type` (`qwen2_5_vl`: Qwen2.5-VL; anything else: LLaVA-OneVision, llava-hf layout)."""
    path = os.path.join(directory, "config.json")
    d = read_json(path) if os.path.isfile(path) else None
    if not isinstance(d, dict):
        raise CheckpointError(f"--reference torch: {path} is missing or not a JSON object; point --model at a "
                              "transformers checkpoint directory")
    return HF_CLASSES["qwen2_5_vl" if d.get("model_type") == "qwen2_5_vl" else "llava_onevision"]


def load_pretrained(directory: str, dtype: str = "float32"):
    """transformers' own loading of a checkpoint directory (llava-hf or Qwen2.5-VL layout,
    `hf_class_name`)."""
    torch, transformers = require()
    cls = getattr(transformers, hf_class_name(directory))
    try:
        model = cls.from_pretrained(directory, dtype=_torch_dtype(dtype))
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"--reference torch: transformers cannot load {directory} ({e.__class__.__name__}: {e})") from None
    return model.eval()


class _StateDict:
    """The loader's file interface (`shape`, `get`) over a torch model's state dict. `get`
    gives a view of the tensor's storage (bf16 as JAX's numpy bfloat16: no fp32 copy), valid
    until the next `get` (the loader copies each into our dtype at once). With `release`, a
    tensor's storage is given back once every name sharing it has been read (tied weights share
    one), at the next `get` or `release_rest`, so the model shrinks while our tree grows."""

    def __init__(self, model, release: bool = False):
        self._model, self._sd, self._release = model, model.state_dict(), release
        self._unread: dict[int, int] = {}
        self._read: list[int] = []  # storages wholly read, given back at the next `get`
        for t in self._sd.values():
            self._unread[t.data_ptr()] = self._unread.get(t.data_ptr(), 0) + 1

    def names(self):
        return list(self._sd)

    def shape(self, name):
        return tuple(self._sd[name].shape)

    def get(self, name):
        import jax.numpy as jnp
        import torch

        self._give_back(self._read)
        t = self._sd[name].detach()
        out = t.view(torch.int16).numpy().view(jnp.bfloat16) if t.dtype == torch.bfloat16 else t.numpy()
        ptr = t.data_ptr()
        self._unread[ptr] -= 1
        if self._release and self._unread[ptr] == 0:
            self._read = [ptr]
        return out

    def release_rest(self) -> None:
        """Give back every storage still held (what our tree does not read, and the last read)."""
        self._give_back({t.data_ptr() for t in self._sd.values()})

    def _give_back(self, ptrs) -> None:
        for n, v in list(self._sd.items()):
            if v.data_ptr() in ptrs:
                _empty(self._model, n)
                del self._sd[n]
        self._read = []


def _empty(model, name: str) -> None:
    """Replace parameter or buffer `name` of `model` by an empty tensor (frees its storage)."""
    import torch

    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    current = getattr(module, leaf)
    current.data = torch.empty(0, dtype=current.dtype)


def params_from_torch(model, cfg: ModelConfig, dtype: str = "float32", shardings=None, release: bool = False,
                      held: bool = False) -> dict:
    """Our parameter tree with the weights of a transformers model (in memory, one tensor at a
    time, with the checkpoint loader's name mapping and checks); `shardings` as `load_hf`'s.
    `release` empties the model's tensors as they are read (peak: one model plus one stacked
    leaf instead of two models); the model cannot run afterwards. `held`: bf16 LLM stacks on
    one CPU device come already split per layer (`stack.split_layers`), so that `stack.pack`
    needs no stacked leaf's transient on top (the 7B shape: 3.8 GB)."""
    import jax
    import jax.numpy as jnp

    from earlytom_jax.checkpoint import table
    from earlytom_jax.checkpoint.hf import iter_params
    from earlytom_jax.checkpoint.placement import resolve_dtype, sharding_lookup
    from earlytom_jax.models import stack
    from earlytom_jax.models.params import set_path

    sd = _StateDict(model, release)
    files = {name: sd for name in sd.names()}
    lookup = sharding_lookup(shardings, table.shapes(cfg)) if shardings is not None else None
    params: dict = {}
    split = held and lookup is None and jax.default_backend() == "cpu"
    for path, arr in iter_params(files, cfg, resolve_dtype(dtype)):
        if split and path[:2] == ("text", "layers") and arr.dtype == jnp.bfloat16:
            leaf = stack.split_layers(path[-1], arr)
        else:
            leaf = jax.device_put(arr) if lookup is None else jax.device_put(arr, lookup(path))
        set_path(params, path, leaf)
        del arr  # before the next stack is read: one host copy of a stacked leaf at a time
        if release:
            _trim()
    if release:  # what our tree does not read (a tied head, SigLIP's unused post-norm) goes too
        sd.release_rest()
        _return_freed_memory()
    return params


def _return_freed_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc keeps the tensors' freed blocks
    below its mmap threshold; at the 7B shape that is gigabytes the JAX run then lacks)."""
    import gc

    gc.collect()
    _trim()


def _trim() -> None:
    """glibc's malloc_trim: free heap pages back to the OS (also between leaves while weights
    move, where the released tensors' pages would otherwise pile up under the growing tree)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


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
    """(ids, model kwargs, None): prefix + <video> x (T·S' + 1) + suffix and pixels [1, T, 3, S, S]."""
    torch, _ = require()
    ids = list(prefix_ids) + [cfg.video_token_id] * (pixels.shape[0] * cfg.tokens_per_frame + 1) + list(suffix_ids)
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
    return {
        "label": "transformers full (PyTorch)",
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
