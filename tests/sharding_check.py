"""Run in a subprocess with 8 host devices (XLA_FLAGS set by the test): logits of the sharded
model on several meshes against one device. Prints one JSON line."""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from earlytom_jax import pipeline, sharding
from earlytom_jax.checkpoint.load import load_hf
from earlytom_jax.compression.earlytom import EarlyTom
from tests.helpers import random_pixels


def main(directory: str, meshes: list[str]) -> None:
    cfg, params = load_hf(directory)
    pre, suf = jnp.asarray([1, 2, 3], jnp.int32), jnp.asarray([4, 5, 6, 7], jnp.int32)
    if cfg.family == "qwen2_5_vl":  # 8 frames (4 temporal patches) of 112 x 140; full tokens only for now
        pix = np.random.default_rng(3).normal(size=(8, 3, 112, 140)).astype(np.float32)
        methods, video_time = {"full": pipeline.FULL}, jnp.float32(1.0)
    else:
        pix = random_pixels(8, cfg.vision.image_size, seed=3)
        methods = {"full": pipeline.FULL, "earlytom": EarlyTom(ratio=0.5, tau=0.5, layers=(1, 2), llm_layer=2, buckets=2)}
        video_time = None

    def run(p, x, m):
        logits, caches, pos, _ = pipeline.prefill_jit(p, x, pre, suf, cfg, m, 6, None, video_time)
        toks, _ = pipeline.decode_loop(p, logits, pos, caches, cfg, 6, jnp.asarray([-1], jnp.int32))
        return np.asarray(logits), np.asarray(toks).tolist()

    base = {k: run(params, pix, m) for k, m in methods.items()}
    out = {"devices": len(jax.devices())}
    for spec in meshes:
        mesh = sharding.parse_mesh(spec)
        sp, fallbacks = sharding.shard_params(params, mesh)
        spix = jax.device_put(pix, sharding.frames_sharding(mesh, pix.shape[0]))
        diffs, same_tokens = {}, {}
        for k, m in methods.items():
            with jax.set_mesh(mesh):  # activations pinned by their logical axes too
                logits, toks = run(sp, spix, m)
            diffs[k] = float(np.abs(logits - base[k][0]).max())
            same_tokens[k] = toks == base[k][1]
        sharded = sum(1 for x in jax.tree.leaves(sp) if not x.sharding.is_fully_replicated)
        out[spec] = {"max_abs": diffs, "same_tokens": same_tokens, "fallbacks": len(fallbacks), "sharded_leaves": sharded}
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
