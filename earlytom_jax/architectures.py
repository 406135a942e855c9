"""Named architectures with random weights, for benchmarks and the demo (speed does not
depend on weight values). Shapes are those of the released checkpoints."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from earlytom_jax.config import LlavaOVConfig, Qwen2Config, SiglipConfig
from earlytom_jax.errors import ConfigError
from earlytom_jax.models import params as model_params
from earlytom_jax.models.llava_onevision import LlavaOneVision

ARCHITECTURES = {
    "tiny": LlavaOVConfig(
        vision=SiglipConfig(hidden_size=64, intermediate_size=128, num_layers=8, num_heads=4,
                            image_size=112, patch_size=14),
        text=Qwen2Config(hidden_size=128, intermediate_size=256, num_layers=6, num_heads=4,
                         num_kv_heads=2, head_dim=32, vocab_size=512, tie_word_embeddings=True),
        video_token_id=509, image_token_id=508,
    ),
    "llava-ov-0.5b": LlavaOVConfig(
        vision=SiglipConfig(),
        text=Qwen2Config(hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
                         num_kv_heads=2, head_dim=64, vocab_size=152000, tie_word_embeddings=True),
    ),
    "llava-ov-7b": LlavaOVConfig(
        vision=SiglipConfig(),
        text=Qwen2Config(hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
                         num_kv_heads=4, head_dim=128, vocab_size=152128, tie_word_embeddings=False),
    ),
}


def architecture(name: str) -> LlavaOVConfig:
    if name not in ARCHITECTURES:
        raise ConfigError(f"unknown architecture {name!r}; choose one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def param_shapes(cfg: LlavaOVConfig) -> dict:
    """The parameter tree of `cfg` as fp32 ShapeDtypeStructs (the module's state, as nested dicts)."""
    shapes = model_params.shapes(LlavaOneVision, cfg)
    return model_params.tree({p: jax.ShapeDtypeStruct(s, jnp.float32) for p, s in shapes.items()})


def random_params(cfg: LlavaOVConfig, dtype=jnp.float32, seed: int = 0) -> dict:
    """Random weights as each parameter's declaration says (`models.params.param`): N(0, 0.02),
    or ones for norm scales; numpy's PCG64 in fp32, several times faster than threefry on CPU
    for the 7B shape. Stacked leaves are drawn one layer at a time straight into `dtype`, so the
    7B shape in bf16 (15 GB) never holds a whole stacked leaf in fp32 beside it; the values do
    not depend on `dtype` beyond rounding."""
    rng = np.random.default_rng(seed)
    inits = model_params.metadata(LlavaOneVision, cfg, "init")
    leaves, treedef = jax.tree.flatten_with_path(param_shapes(cfg))
    np_dtype = np.dtype(jnp.dtype(dtype))
    out = []
    for path, sd in leaves:
        if inits[tuple(str(k.key) for k in path)] == "ones":
            out.append(jnp.ones(sd.shape, dtype))
            continue
        a = np.empty(sd.shape, np_dtype)
        for i in range(sd.shape[0] if len(sd.shape) > 1 else 1):
            part = rng.standard_normal(sd.shape[1:] if len(sd.shape) > 1 else sd.shape, dtype=np.float32)
            part *= 0.02
            if len(sd.shape) > 1:
                a[i] = part
            else:
                a[...] = part
        out.append(jnp.asarray(a))
        del a
    return jax.tree.unflatten(treedef, out)
