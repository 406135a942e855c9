"""Named architectures with random weights, for benchmarks and the demo (speed does not
depend on weight values). Shapes are those of the released checkpoints."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from earlytom_jax.config import LlavaOVConfig, LlavaVideoConfig, ModelConfig, Qwen2Config, Qwen25VLConfig, QwenVisionConfig, SiglipConfig
from earlytom_jax.errors import ConfigError
from earlytom_jax.models import params as model_params
from earlytom_jax.models import stack
from earlytom_jax.models import family

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
    # LLaVA-Video (lmms-lab/LLaVA-Video-7B-Qwen2): SigLIP so400m (26 of 27 blocks) + Qwen2-7B,
    # average pooling 27 → 13, a newline per pooled row (docs/llava-video.md); the vocabulary
    # is Qwen2-7B's 152064 (not read from the checkpoint here; it only sizes the head)
    "llava-video-7b": LlavaVideoConfig(
        vision=SiglipConfig(),
        text=Qwen2Config(hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
                         num_kv_heads=4, head_dim=128, vocab_size=152064, tie_word_embeddings=False),
    ),
    # LLaVA-Video's video path at the `tiny` arch's widths, on an odd 9 x 9 patch grid (126 px):
    # average pooling drops the last row and column (4 x 4 a frame, 4 x 5 slots with newlines)
    "llava-video-tiny": LlavaVideoConfig(
        vision=SiglipConfig(hidden_size=64, intermediate_size=128, num_layers=8, num_heads=4,
                            image_size=126, patch_size=14),
        text=Qwen2Config(hidden_size=128, intermediate_size=256, num_layers=6, num_heads=4,
                         num_kv_heads=2, head_dim=32, vocab_size=512, tie_word_embeddings=True),
        video_token_id=509, image_token_id=508,
    ),
    # Qwen2.5-VL's layout at the `tiny` arch's widths: 56-pixel windows (2 x 2 merged tokens),
    # blocks 1 and 3 attending over a whole temporal patch, 16 rotary frequencies in 4 / 6 / 6
    "qwen-tiny": Qwen25VLConfig(
        vision=QwenVisionConfig(hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4, window_size=56,
                                fullatt_block_indexes=(1, 3), out_hidden_size=128),
        text=Qwen2Config(hidden_size=128, intermediate_size=256, num_layers=4, num_heads=4, num_kv_heads=2,
                         head_dim=32, vocab_size=512, tie_word_embeddings=True, mrope_section=(4, 6, 6)),
        video_token_id=509, image_token_id=508, vision_start_token_id=505, vision_end_token_id=506,
    ),
    # Qwen/Qwen2.5-VL-{3B,7B}-Instruct's config.json
    "qwen2.5-vl-3b": Qwen25VLConfig(
        vision=QwenVisionConfig(out_hidden_size=2048),
        text=Qwen2Config(hidden_size=2048, intermediate_size=11008, num_layers=36, num_heads=16, num_kv_heads=2,
                         head_dim=128, vocab_size=151936, tie_word_embeddings=True,
                         max_position_embeddings=128000, mrope_section=(16, 24, 24)),
    ),
    "qwen2.5-vl-7b": Qwen25VLConfig(
        vision=QwenVisionConfig(out_hidden_size=3584),
        text=Qwen2Config(hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28, num_kv_heads=4,
                         head_dim=128, vocab_size=152064, tie_word_embeddings=False,
                         max_position_embeddings=128000, mrope_section=(16, 24, 24)),
    ),
}


def architecture(name: str) -> ModelConfig:
    if name not in ARCHITECTURES:
        raise ConfigError(f"unknown architecture {name!r}; choose one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[name]


def param_shapes(cfg: ModelConfig) -> dict:
    """The parameter tree of `cfg` as fp32 ShapeDtypeStructs (the module's state, as nested dicts)."""
    shapes = model_params.shapes(family.module(cfg), cfg)
    return model_params.tree({p: jax.ShapeDtypeStruct(s, jnp.float32) for p, s in shapes.items()})


def random_params(cfg: ModelConfig, dtype=jnp.float32, seed: int = 0, on_device: bool = False) -> dict:
    """Random weights as each parameter's declaration says (`models.params.param`): N(0, 0.02),
    or ones for norm scales; numpy's PCG64 in fp32, several times faster than threefry on CPU
    for the 7B shape. Stacked leaves are drawn one layer at a time straight into `dtype`, so the
    7B shape in bf16 (15 GB) never holds a whole stacked leaf in fp32 beside it; the values do
    not depend on `dtype` beyond rounding.

    on_device: draw every leaf with jax.random on the default device instead (`_device_normal`;
    other values, the same tree, shapes, dtypes and init rules): on an accelerator the host
    draw of the 7B shape (8B numpy draws, then the copy over) takes minutes, this seconds."""
    inits = model_params.metadata(family.module(cfg), cfg, "init")
    leaves, treedef = jax.tree.flatten_with_path(param_shapes(cfg))
    if on_device:
        key = jax.random.key(seed)
        out = [jnp.ones(sd.shape, dtype) if inits[model_params.key_path(path)] == "ones"
               else _device_normal(jax.random.fold_in(key, i), sd.shape, jnp.dtype(dtype), _stacked(path))
               for i, (path, sd) in enumerate(leaves)]
        return jax.tree.unflatten(treedef, out)
    rng = np.random.default_rng(seed)
    np_dtype = np.dtype(jnp.dtype(dtype))
    out = []
    for path, sd in leaves:
        if inits[model_params.key_path(path)] == "ones":
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


def _stacked(keys) -> bool:
    """Whether the leaf at `keys` leads with a layer axis (under "blocks" or "layers")."""
    return any(name in stack.STACKS for name in model_params.key_path(keys))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _device_normal(key, shape: tuple[int, ...], dtype, stacked: bool):
    """N(0, 0.02) of `shape` in `dtype`, drawn in fp32 and rounded inside one program. A
    `stacked` leaf ([L, ...]) is drawn one layer at a time (`lax.map`): the draw's temporaries
    (threefry's counters, up to 16 bytes an element where XLA does not fuse them) then cover one
    layer, not the stack (the 7B shape's gate_w: 1 GB rather than 30 GB)."""

    def draw(k, s):
        return (0.02 * jax.random.normal(k, s, jnp.float32)).astype(dtype)

    if not stacked:
        return draw(key, shape)
    return jax.lax.map(lambda k: draw(k, shape[1:]), jax.random.split(key, shape[0]))
