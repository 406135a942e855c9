"""Peak memory of `convert/convert.py` on a checkpoint of a real model's shape.

    python convert/memory_benchmark.py [--arch llava-ov-0.5b|llava-ov-7b] [--workdir DIR]
                                       [--shard-gb 2] [--dtype bfloat16] [--load] [--keep]

1. Writes a random-weight HF checkpoint in the llava-hf (transformers 4) naming: bf16
   safetensors shards of about --shard-gb each with a model.safetensors.index.json, a matching
   config.json, a character-level tokenizer.json and a preprocessor_config.json. The shards are
   streamed tensor by tensor in small chunks, so this generator needs little memory itself.
   An existing complete checkpoint of the same shape in the work directory is reused.
2. Runs the conversion in a subprocess, sampling its RSS (psutil) and reading its own peak
   (VmHWM) from the summary; the baseline is a subprocess that only imports what the conversion
   imports and starts jax.
3. Prints peak RSS above the baseline, the largest tensor, checkpoint sizes, conversion time and
   whether peak <= 3 x largest tensor + 1 GB. With --load, also times loading the result
   (load_converted) against load_hf of the source, both in bf16, in fresh subprocesses.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from earlytom_jax.checkpoint.export import hf_name  # noqa: E402

GB = 1e9

# canonical (our loader's) prefixes → llava-hf / transformers 4 names
_TO_HF = (
    ("vision.", "vision_tower.vision_model."),
    ("projector.1.", "multi_modal_projector.linear_1."),
    ("projector.2.", "multi_modal_projector.linear_2."),
    ("newline", "image_newline"),
    ("text.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
)


def _hf_name(canon: str) -> str:
    return hf_name(canon, _TO_HF)


def hf_tensors(cfg) -> list[tuple[str, tuple[int, ...]]]:
    """(llava-hf name, shape) of every stored tensor of the released checkpoint of `cfg`."""
    from earlytom_jax.checkpoint import table
    from earlytom_jax.checkpoint.hf import canonical_name

    out = []
    for row in table.rows(cfg):
        out += [(n, row.source_shape) for n in row.sources()]
    C = cfg.vision.hidden_size
    out += [("vision.post_layernorm.weight", (C,)), ("vision.post_layernorm.bias", (C,))]  # stored, unused
    hf = [(_hf_name(n), shape) for n, shape in out]
    assert all(canonical_name(h) == n for (h, _), (n, _) in zip(hf, out))
    return hf


def hf_config(cfg) -> dict:
    v, t = cfg.vision, cfg.text
    return {
        "architectures": ["LlavaOnevisionForConditionalGeneration"],
        "model_type": "llava_onevision",
        "image_token_index": cfg.image_token_id,
        "video_token_index": cfg.video_token_id,
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "full",
        "tie_word_embeddings": t.tie_word_embeddings,
        "torch_dtype": "bfloat16",
        "vision_config": {
            "model_type": "siglip_vision_model", "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size, "num_hidden_layers": v.num_layers,
            "num_attention_heads": v.num_heads, "image_size": v.image_size, "patch_size": v.patch_size,
            "layer_norm_eps": v.layer_norm_eps, "hidden_act": "gelu_pytorch_tanh", "vision_use_head": False,
        },
        "text_config": {
            "model_type": "qwen2", "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_layers, "num_attention_heads": t.num_heads,
            "num_key_value_heads": t.num_kv_heads, "vocab_size": t.vocab_size, "rope_theta": t.rope_theta,
            "rms_norm_eps": t.rms_norm_eps, "max_position_embeddings": t.max_position_embeddings,
            "tie_word_embeddings": t.tie_word_embeddings, "hidden_act": "silu",
        },
    }


def _write_shard(path: str, tensors, rng, chunk: int = 1 << 24) -> None:
    """One bf16 safetensors file, each tensor streamed in chunks of random N(0, 0.02) values."""
    header, offset = {}, 0
    for name, shape in tensors:
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    import ml_dtypes

    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, shape in tensors:
            left = int(np.prod(shape))
            while left:
                k = min(left, chunk)
                x = rng.standard_normal(k, dtype=np.float32)
                x *= 0.02
                f.write(x.astype(ml_dtypes.bfloat16).view(np.uint16))
                left -= k


def write_checkpoint(arch: str, directory: str, shard_bytes: float) -> dict:
    from earlytom_jax.architectures import architecture
    from earlytom_jax.synthetic import char_tokenizer

    cfg = architecture(arch)
    marker = os.path.join(directory, ".membench.json")
    want = {"arch": arch, "shard_bytes": shard_bytes}
    if os.path.isfile(marker) and json.load(open(marker)) == want:
        print(f"reusing {directory}", file=sys.stderr)
        return want
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory)
    tensors = hf_tensors(cfg)
    shards, cur, size = [], [], 0
    for name, shape in tensors:
        n = int(np.prod(shape)) * 2
        if cur and size + n > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += n
    shards.append(cur)
    rng = np.random.default_rng(0)
    weight_map, total = {}, 0
    t0 = time.perf_counter()
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_shard(os.path.join(directory, fname), shard, rng)
        for name, shape in shard:
            weight_map[name] = fname
            total += int(np.prod(shape)) * 2
        print(f"\rwriting {arch} checkpoint: shard {i + 1}/{len(shards)}", end="", file=sys.stderr, flush=True)
    print(f" ({total / GB:.2f} GB in {time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config(cfg), f, indent=1)
    char_tokenizer(cfg.image_token_id).save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, f)
    with open(os.path.join(directory, "preprocessor_config.json"), "w") as f:
        json.dump({"image_mean": [0.5] * 3, "image_std": [0.5] * 3, "resample": 3, "rescale_factor": 1 / 255,
                   "size": {"height": cfg.vision.image_size, "width": cfg.vision.image_size}}, f)
    with open(marker, "w") as f:
        json.dump(want, f)
    return want


def _run_sampled(cmd: list[str]) -> tuple[subprocess.CompletedProcess, int, int, float]:
    """Run `cmd`, sampling its RSS every 10 ms → (completed process, max sampled RSS, max sampled
    anonymous RSS (RSS less file-backed and shared pages), seconds)."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    ps = psutil.Process(proc.pid)
    peak = peak_anon = 0
    while proc.poll() is None:
        try:
            m = ps.memory_info()
        except psutil.Error:
            break
        peak, peak_anon = max(peak, m.rss), max(peak_anon, m.rss - m.shared)
        time.sleep(0.01)
    out, _ = proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, None), peak, peak_anon, time.perf_counter() - t0


_HWM = "int([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]) * 1024"

_BASELINE = f"""
import json, jax
import earlytom_jax.checkpoint.orbax_io, orbax.checkpoint.experimental.v1
jax.devices()
print(json.dumps({{"hwm": {_HWM}}}))
"""

_LOAD = f"""
import json, sys, time, jax
from earlytom_jax.checkpoint.load import load_hf
from earlytom_jax.checkpoint.orbax_io import load_converted
import orbax.checkpoint.experimental.v1
jax.devices()
base = {_HWM}
t = time.perf_counter()
cfg, p = load_converted(sys.argv[2]) if sys.argv[1] == "converted" else load_hf(sys.argv[2], "bfloat16")
jax.block_until_ready(p)
print(json.dumps({{"seconds": time.perf_counter() - t, "base": base, "hwm": {_HWM},
                   "bytes": sum(x.nbytes for x in jax.tree.leaves(p))}}))
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="llava-ov-0.5b", choices=("llava-ov-0.5b", "llava-ov-7b"))
    ap.add_argument("--workdir", default="/tmp/earlytom_membench")
    ap.add_argument("--shard-gb", type=float, default=2.0)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--load", action="store_true", help="also time load_converted vs load_hf (needs RAM for the model)")
    ap.add_argument("--keep", action="store_true", help="keep the generated source and the converted directory")
    args = ap.parse_args(argv)

    src = os.path.join(args.workdir, f"{args.arch}-hf")
    dst = os.path.join(args.workdir, f"{args.arch}-converted")
    os.makedirs(args.workdir, exist_ok=True)
    write_checkpoint(args.arch, src, args.shard_gb * GB)
    shutil.rmtree(dst, ignore_errors=True)

    from earlytom_jax.checkpoint.safetensors_io import open_checkpoint_files

    files = open_checkpoint_files(src)
    largest_src = max(f.nbytes(k) for k, f in files.items())
    src_bytes = sum(os.path.getsize(os.path.join(src, x)) for x in os.listdir(src) if x.endswith(".safetensors"))

    base = json.loads(subprocess.run([sys.executable, "-c", _BASELINE], cwd=ROOT, capture_output=True, text=True,
                                     check=True).stdout.strip().splitlines()[-1])["hwm"]
    cmd = [sys.executable, os.path.join(ROOT, "convert", "convert.py"), src, dst, "--dtype", args.dtype, "--json"]
    proc, sampled, sampled_anon, wall = _run_sampled(cmd)
    if proc.returncode != 0:
        print(f"conversion failed (exit {proc.returncode})", file=sys.stderr)
        return 1
    s = json.loads(proc.stdout.strip().splitlines()[-1])
    peak = max(s["peak_rss_bytes"] or 0, sampled)
    largest = s["largest_tensor_bytes"]
    budget = 3 * largest + GB
    delta = peak - base
    result = {
        "arch": args.arch,
        "dtype": args.dtype,
        "source_bytes": src_bytes,
        "source_shards": len({f.path for f in files.values()}),
        "converted_disk_bytes": s["disk_bytes"],
        "tensors": s["tensors"],
        "largest_source_tensor_bytes": largest_src,
        "largest_tensor_bytes": largest,
        "convert_seconds": s["seconds"],
        "convert_wall_seconds": round(wall, 2),
        "baseline_rss_bytes": base,
        "peak_rss_bytes": peak,
        "peak_sampled_rss_bytes": sampled,
        "peak_sampled_anon_rss_bytes": sampled_anon,
        "peak_above_baseline_bytes": delta,
        "budget_bytes": budget,
        "within_budget": delta <= budget,
    }
    print(f"arch {args.arch} -> {args.dtype}: {s['tensors']} tensors")
    print(f"  source checkpoint     {src_bytes / GB:.2f} GB in {result['source_shards']} shards")
    print(f"  converted on disk     {s['disk_bytes'] / GB:.2f} GB")
    print(f"  largest tensor        {largest / GB:.3f} GB (largest layer stack / leaf written; "
          f"largest single source tensor {largest_src / GB:.3f} GB)")
    print(f"  conversion time       {s['seconds']:.1f} s (wall incl. interpreter start {wall:.1f} s)")
    print(f"  baseline RSS          {base / GB:.2f} GB (interpreter + jax + orbax imports)")
    print(f"  peak RSS              {peak / GB:.2f} GB (VmHWM {s['peak_rss_bytes'] / GB:.2f}, sampled {sampled / GB:.2f}, "
          f"of which anonymous {sampled_anon / GB:.2f})")
    print(f"  peak above baseline   {delta / GB:.2f} GB; budget 3 x largest + 1 GB = {budget / GB:.2f} GB: "
          f"{'OK' if delta <= budget else 'EXCEEDED'}")
    if args.load:
        for kind, path in (("converted", dst), ("hf", src)):
            out = subprocess.run([sys.executable, "-c", _LOAD, kind, path], cwd=ROOT, capture_output=True, text=True)
            if out.returncode != 0:
                print(f"  load {kind} failed: {out.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            result[f"load_{kind}"] = r
            print(f"  load {kind:9s}        {r['seconds']:.1f} s, params {r['bytes'] / GB:.2f} GB, "
                  f"peak above start {(r['hwm'] - r['base']) / GB:.2f} GB")
    print(json.dumps(result))
    if not args.keep:
        shutil.rmtree(dst, ignore_errors=True)
        shutil.rmtree(src, ignore_errors=True)
    return 0 if result["within_budget"] else 2


if __name__ == "__main__":
    sys.exit(main())
