"""The original SigLIP's post-LayerNorm and attention-pooling head (`models.siglip_head`), read
from a second checkpoint: FastVID's official signals (docs/baselines/fastvid.md).

LLaVA-OneVision checkpoints do not carry the head (LLaVA-NeXT sets it to `nn.Identity`);
FastVID's official code loads it from google/siglip-so400m-patch14-384 beside the tower. Here
`load_siglip_head` reads it from such a directory in the HF layout (safetensors only): a full
`SiglipModel` (`vision_model.head.*`, `vision_model.post_layernorm.*`), a `SiglipVisionModel`
saved by transformers 5 (`head.*`, `post_layernorm.*`), or any layout `hf.canonical_name` knows
(a LLaVA checkpoint that does carry the tensors: `carries_head`). Rows: `table.HEAD_TABLE`.
Every problem is one ConfigError line.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from earlytom_jax.checkpoint.hf import canonical_name, mismatch
from earlytom_jax.checkpoint.placement import resolve_dtype
from earlytom_jax.checkpoint.safetensors_io import open_checkpoint_files
from earlytom_jax.checkpoint.table import head_rows
from earlytom_jax.config import SiglipConfig
from earlytom_jax.errors import CheckpointError, ConfigError
from earlytom_jax.io_utils import read_json
from earlytom_jax.models.params import set_path
from earlytom_jax.models.siglip_head import KEY, SiglipHead

__all__ = ["KEY", "carries_head", "load_siglip_head", "model_head", "random_head", "with_head"]

FLAG = "--siglip-head"


def _canonical(name: str) -> str | None:
    if name.startswith("vision_model."):  # SiglipModel / transformers 4 SiglipVisionModel
        return "vision." + name[len("vision_model."):]
    if name.startswith(("head.", "post_layernorm.")):  # transformers 5 SiglipVisionModel
        return "vision." + name
    return canonical_name(name)


def _head_tensors(files: dict) -> dict[str, tuple[object, str]]:
    """{canonical name: (file, stored name)} of the head's and post-LayerNorm's tensors."""
    out = {}
    for name, f in files.items():
        c = _canonical(name)
        if c is not None and c.startswith(("vision.head.", "vision.post_layernorm.")):
            out[c] = (f, name)
    return out


def _check_config(directory: str, vcfg: SiglipConfig) -> None:
    """The directory's config.json (when it has one) against the tower: the head splits its
    attention into the tower's heads and normalises with the tower's epsilon."""
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        return
    d = read_json(path)
    if not isinstance(d, dict):
        return
    v = d if d.get("model_type") == "siglip_vision_model" else d.get("vision_config") or {}
    theirs = {"num_attention_heads": v.get("num_attention_heads"), "hidden_size": v.get("hidden_size"),
              "layer_norm_eps": v.get("layer_norm_eps")}
    ours = {"num_attention_heads": vcfg.num_heads, "hidden_size": vcfg.hidden_size, "layer_norm_eps": vcfg.layer_norm_eps}
    wrong = [f"{k} {theirs[k]} != {ours[k]}" for k in ours if theirs[k] is not None and theirs[k] != ours[k]]
    if wrong:
        raise ConfigError(f"{FLAG} {directory}: its SigLIP does not match the model's tower ({', '.join(wrong)}); "
                          "give the SigLIP the model was built on (google/siglip-so400m-patch14-384)")


def _open(directory: str) -> dict:
    if not os.path.isdir(directory):
        raise ConfigError(f"{FLAG} {directory}: no such directory; give a SigLIP checkpoint directory in the HF "
                          "layout (google/siglip-so400m-patch14-384)")
    try:
        return open_checkpoint_files(directory)
    except CheckpointError as e:
        raise ConfigError(f"{FLAG} {e}") from None


def carries_head(directory: str) -> bool:
    """Whether a checkpoint directory holds every tensor of the head (e.g. a LLaVA checkpoint
    saved with its SigLIP head rather than `nn.Identity`). Reads headers only."""
    try:
        files = open_checkpoint_files(directory)
    except (CheckpointError, OSError):
        return False
    found = _head_tensors(files)
    return all(n in found for row in head_rows(SiglipConfig()) for n in row.sources())


def load_siglip_head(directory: str, vcfg: SiglipConfig, dtype="float32") -> dict:
    """The head's parameter tree (`params["siglip_head"]`: {"post_s": [C], ..., "fc2_b": [C]})
    for a tower `vcfg`, from the safetensors of `directory` in `dtype`. ConfigError (one line)
    for a missing directory, no safetensors, a config or tensors that do not fit the tower."""
    files = _open(directory)
    _check_config(directory, vcfg)
    found = _head_tensors(files)
    rows = head_rows(vcfg)
    missing = [r.source for r in rows if r.source not in found]
    wrong = [f"{found[r.source][1]} {tuple(found[r.source][0].shape(found[r.source][1]))} != {r.source_shape}"
             for r in rows if r.source in found and tuple(found[r.source][0].shape(found[r.source][1])) != r.source_shape]
    problems = mismatch(missing, [], wrong)
    if problems:
        raise ConfigError(f"{FLAG} {directory}: not the SigLIP head of this model's tower ({'; '.join(problems)})")
    dt = resolve_dtype(dtype)
    tree: dict = {}
    for r in rows:
        f, name = found[r.source]
        set_path(tree, r.path, jax.device_put(np.ascontiguousarray(r.to_ours(np.asarray(f.get(name))).astype(dt))))
    return tree


def random_head(vcfg: SiglipConfig, dtype=jnp.float32, seed: int = 0) -> dict:
    """Random head weights as the module declares them (N(0, 0.02), ones for norm scales), for
    the named architectures of `bench` (speed does not depend on the values)."""
    state = nnx.to_pure_dict(nnx.state(SiglipHead(vcfg, rngs=nnx.Rngs(seed)), nnx.Param))
    return jax.tree.map(lambda a: a.astype(dtype), state)


def model_head(cfg, model_dir: str | None, head_dir: str | None, dtype="float32", mesh=None) -> dict | None:
    """The head's tree for a model `cfg` (LLaVA-OneVision/LLaVA-Video): from `head_dir`; else
    from the model's checkpoint `model_dir` when it carries the head; else random when there is
    no checkpoint (model_dir None: a named architecture's random weights, `bench`); else None.
    Replicated over `mesh` when given. Other families: None, and ConfigError (one line) for a
    head_dir."""
    from earlytom_jax.config import FAMILIES
    from earlytom_jax.models import family

    if not family.is_llava(cfg):
        if head_dir:
            raise ConfigError(f"{FLAG} is for LLaVA-OneVision and LLaVA-Video (FastVID's SigLIP signals), not "
                              f"{FAMILIES[cfg.family]}: leave it out")
        return None
    if head_dir:
        head = load_siglip_head(head_dir, cfg.vision, dtype)
    elif model_dir is None:
        head = random_head(cfg.vision, resolve_dtype(dtype))
    elif carries_head(model_dir):
        head = load_siglip_head(model_dir, cfg.vision, dtype)
    else:
        return None
    if mesh is not None:
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        head = jax.tree.map(lambda a: jax.device_put(a, replicated), head)
    return head


def with_head(params: dict, head: dict | None) -> dict:
    """`params` with the head's tree under `KEY` (unchanged when head is None)."""
    return params if head is None else {**params, KEY: head}
