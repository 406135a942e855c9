"""The PyTorch original on the same footing (`earlytom bench --reference torch`): transformers'
full-token `LlavaOnevisionForConditionalGeneration`, on CPU with the same weights, pixels,
prompt ids and dtype as the JAX run, timed with the paper's protocol (warm-ups, then mean and
median of timed `generate` calls producing one token, under `torch.no_grad`); on a GPU
(benchmarks/gpu_check.py) built there with its own random weights, timing prefill forwards.

Same weights: for a named architecture the random transformers model is built first (from a
config written from ours) and our parameter tree is read from its state dict in memory with
the checkpoint loader's own mapping (`checkpoint.hf.iter_params`); for a checkpoint directory
both sides load the same files. torch and transformers are imported only here, lazily.
"""

from __future__ import annotations

import statistics

import numpy as np

from earlytom_jax import bench
from earlytom_jax.config import LlavaOVConfig
from earlytom_jax.errors import ConfigError


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


def hf_config_dict(cfg: LlavaOVConfig) -> dict:
    """`LlavaOnevisionConfig` kwargs of our config, laid out as the llava-hf checkpoints are
    (SigLIP truncated at the feature depth, `vision_feature_layer` -1, full select strategy)."""
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


def build_random(cfg: LlavaOVConfig, dtype: str = "float32", seed: int = 0, device: str | None = None,
                 attn_implementation: str | None = None):
    """A random transformers model of our architecture, in eval mode and `dtype`, built and its
    weights drawn on `device` (default the CPU; "cuda": the 7B shape's 15 GB never pass through
    the host). attn_implementation: transformers' (e.g. "sdpa"); default its own choice."""
    torch, transformers = require()
    torch.manual_seed(seed)
    hf_cfg = transformers.LlavaOnevisionConfig(**hf_config_dict(cfg))
    kw = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    # built straight in `dtype`: the 7B shape in bf16 (15 GB) never exists in fp32 (30 GB); under
    # the device context every parameter and buffer is allocated, and initialised, on `device`
    with torch.device(device or "cpu"):
        model = transformers.LlavaOnevisionForConditionalGeneration._from_config(
            hf_cfg, dtype=_torch_dtype(dtype), **kw)
    return model.eval()


def load_pretrained(directory: str, dtype: str = "float32"):
    """transformers' own loading of a checkpoint directory (llava-hf layout)."""
    torch, transformers = require()
    try:
        model = transformers.LlavaOnevisionForConditionalGeneration.from_pretrained(directory, dtype=_torch_dtype(dtype))
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"--reference torch: transformers cannot load {directory} ({e.__class__.__name__}: {e})") from None
    return model.eval()


class _StateDict:
    """The loader's file interface (`shape`, `get`) over a torch model's state dict. With
    `release`, a tensor's storage is given back once every name sharing it has been read (tied
    weights share one), so the model shrinks while our tree grows."""

    def __init__(self, model, release: bool = False):
        self._model, self._sd, self._release = model, model.state_dict(), release
        self._unread: dict[int, int] = {}
        for t in self._sd.values():
            self._unread[t.data_ptr()] = self._unread.get(t.data_ptr(), 0) + 1

    def names(self):
        return list(self._sd)

    def shape(self, name):
        return tuple(self._sd[name].shape)

    def get(self, name):
        import torch

        t = self._sd[name].detach()
        out = (t.float() if t.dtype == torch.bfloat16 else t).numpy()  # numpy has no bf16
        ptr = t.data_ptr()
        self._unread[ptr] -= 1
        if self._release and self._unread[ptr] == 0:
            out = out.copy()  # .numpy() of an fp32 tensor shares its storage
            for n, v in list(self._sd.items()):
                if v.data_ptr() == ptr:
                    _empty(self._model, n)
                    del self._sd[n]
        return out


def _empty(model, name: str) -> None:
    """Replace parameter or buffer `name` of `model` by an empty tensor (frees its storage)."""
    import torch

    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    current = getattr(module, leaf)
    current.data = torch.empty(0, dtype=current.dtype)


def params_from_torch(model, cfg: LlavaOVConfig, dtype: str = "float32", shardings=None, release: bool = False,
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
    if release:  # what our tree does not read (a tied head, SigLIP's unused post-norm) goes too
        for name in sd.names():
            _empty(model, name)
        _return_freed_memory()
    return params


def _return_freed_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc keeps the tensors' freed blocks
    below its mmap threshold; at the 7B shape that is gigabytes the JAX run then lacks)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def _greedy_steps(model, cache, first: int, length: int, steps: int, device) -> list[int]:
    """`steps` greedy tokens after a prefill of `length` positions whose cache is `cache` and
    whose token was `first`: one forward per token with the model's cache, as `generate` runs
    them (position and mask by the cache's length), tokens kept on the device until the end."""
    torch, _ = require()
    tok = torch.tensor([[first]], dtype=torch.long, device=device)
    mask = torch.ones((1, length + steps), dtype=torch.long, device=device)
    out = []
    for i in range(steps):
        pos = length + i
        logits = model(input_ids=tok, past_key_values=cache, attention_mask=mask[:, :pos + 1], use_cache=True,
                       cache_position=torch.tensor([pos], device=device), logits_to_keep=1).logits
        tok = logits[:, -1].argmax(-1, keepdim=True)
        out.append(tok)
    return [int(t) for t in torch.cat(out, 1)[0]] if out else []


def measure(model, pixels: np.ndarray, prefix_ids, suffix_ids, cfg: LlavaOVConfig, warmup: int = 2, runs: int = 5,
            forward: bool = False, decode_tokens: int = 0) -> dict:
    """TTFT of transformers' full-token model on pixels [T, 3, S, S] and prefix + <video> x
    (T·S' + 1) + suffix, in the model's dtype and on its device (inputs placed there first; on
    CUDA every timed call lies between two torch.cuda.synchronize): `generate` of one new token
    (greedy), or with `forward` one forward pass (the prefill: KV cache built, the last
    position's logits only) and its argmax read on the host, without generate's per-call setup
    (milliseconds: next to a GPU's prefill, not negligible).

    decode_tokens > 1: then `runs` timed greedy decodes of decode_tokens - 1 steps (the first
    token came from the prefill) from a copy of the last timed call's cache, one forward per
    token as generate runs them (`_greedy_steps`; EOS ignored, as in JAX's decode): tokens/s =
    steps / wall time.

    → {"ttft_s": [...], "ttft_mean_s", "ttft_median_s", "first_token", "decode" (or None),
    "peak_memory" ({"kind", "scope", "bytes"}: on CUDA torch.cuda.max_memory_allocated, elsewhere
    the process's peak resident set, over the warm-ups, timed calls and decodes, weights
    included), "peak_memory_bytes" (its bytes), ...}."""
    import copy

    torch, transformers = require()
    param = next(model.parameters())
    dtype, device = param.dtype, param.device
    cuda = device.type == "cuda"
    t0 = pixels.shape[0]
    visual = t0 * cfg.tokens_per_frame + 1
    ids = list(prefix_ids) + [cfg.video_token_id] * visual + list(suffix_ids)
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    pix = torch.from_numpy(np.asarray(pixels, np.float32)).to(device=device, dtype=dtype)[None]
    # an explicit mask: without one, generate masks every id equal to pad_token_id
    inputs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values_videos=pix)
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
                toks, wall, _ = bench.timed(lambda c=cache: _greedy_steps(model, c, tok, len(ids), steps, device))
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
        "frames": t0,
        "visual_tokens": visual,
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
