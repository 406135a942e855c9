"""HuggingFace checkpoint layouts → the model's parameter tree (see `LlavaOneVision`, whose
state it is; which tensor feeds which parameter is `checkpoint.table`).

Source names are first reduced to a canonical form (`vision.encoder.layers.3.mlp.fc1.weight`,
`text.layers.0.self_attn.q_proj.bias`, `projector.1.weight`, `newline`, `lm_head.weight`)
whatever the layout: llava-hf (transformers 4), transformers 5 `save_pretrained`, or the
lmms-lab originals (LLaVA-Video's checkpoints are laid out as LLaVA-OneVision's); for Qwen2.5-VL `vision.blocks.0.attn.qkv.weight`, `vision.merger.ln_q.weight`
and the same LLM names, from Qwen's release (`visual.`, `model.`) or transformers 5
(`model.visual.`, `model.language_model.`).
"""

from __future__ import annotations

import numpy as np

from earlytom_jax.checkpoint.table import Row, rows
from earlytom_jax.config import ModelConfig
from earlytom_jax.errors import CheckpointError

# Longest first: the first matching prefix wins.
_PREFIXES = (
    ("model.vision_tower.vision_tower.vision_model.", "vision."),
    ("model.vision_tower.vision_model.", "vision."),
    ("vision_tower.vision_model.", "vision."),
    ("model.vision_tower.", "vision."),
    ("model.visual.", "vision."),
    ("visual.", "vision."),
    ("vision_tower.", "vision."),
    ("model.multi_modal_projector.linear_1.", "projector.1."),
    ("model.multi_modal_projector.linear_2.", "projector.2."),
    ("multi_modal_projector.linear_1.", "projector.1."),
    ("multi_modal_projector.linear_2.", "projector.2."),
    ("model.mm_projector.0.", "projector.1."),
    ("model.mm_projector.2.", "projector.2."),
    ("model.image_newline", "newline"),
    ("image_newline", "newline"),
    ("language_model.lm_head.", "lm_head."),
    ("lm_head.", "lm_head."),
    ("model.language_model.", "text."),
    ("language_model.model.", "text."),
    ("language_model.", "text."),
    ("model.", "text."),
)


def canonical_name(name: str) -> str | None:
    for prefix, repl in _PREFIXES:
        if name.startswith(prefix):
            return repl + name[len(prefix) :]
    return None


def _ignored(canon: str, cfg: ModelConfig) -> bool:
    """Stored tensors we knowingly skip: blocks past the feature depth, post-LN, SigLIP head."""
    if canon.startswith("vision.post_layernorm.") or canon.startswith("vision.head."):
        return True
    if canon.startswith("vision.encoder.layers.") and cfg.family in ("llava_onevision", "llava_video"):
        return int(canon.split(".")[3]) >= cfg.vision.num_layers
    if canon == "lm_head.weight" and cfg.text.tie_word_embeddings:
        return True
    if canon.endswith("rotary_emb.inv_freq"):
        return True
    return False


def _fmt(names, limit=6) -> str:
    names = sorted(names)
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def mismatch(missing, unexpected, wrong, wrong_label: str = "mis-shaped") -> list[str]:
    """The parts of a one-line "does not match" message, each list of names cut to a few."""
    parts = []
    if missing:
        parts.append(f"missing {len(missing)}: {_fmt(missing)}")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)}: {_fmt(unexpected)}")
    if wrong:
        parts.append(f"{wrong_label} {len(wrong)}: {_fmt(wrong, 3)}")
    return parts


def map_tensors(files: dict, cfg: ModelConfig) -> tuple[dict[str, tuple[object, str]], list[Row]]:
    """Check every tensor against the config. Returns ({canonical: (file, source name)}, the
    table's rows for `cfg`).

    Raises one CheckpointError listing missing, unexpected and mis-shaped tensors together.
    """
    canon: dict[str, tuple[object, str]] = {}
    unexpected = []
    for name, f in files.items():
        c = canonical_name(name)
        if c is None:
            unexpected.append(name)
        elif not _ignored(c, cfg):
            canon[c] = (f, name)
    table = rows(cfg)
    needed: dict[str, tuple[int, ...]] = {}
    for row in table:
        for n in row.sources():
            needed[n] = row.source_shape
    missing = [n for n in needed if n not in canon]
    unexpected += [canon[c][1] for c in canon if c not in needed]
    wrong = [
        f"{canon[n][1]} {tuple(canon[n][0].shape(canon[n][1]))} != {shape}"
        for n, shape in needed.items()
        if n in canon and tuple(canon[n][0].shape(canon[n][1])) != shape
    ]
    problems = mismatch(missing, unexpected, wrong)
    if problems:
        raise CheckpointError("checkpoint does not match its config.json: " + "; ".join(problems))
    return canon, table


def iter_params(files: dict, cfg: ModelConfig, dtype):
    """Yield (path, array) for every parameter of our tree, one tensor (or layer stack) at a time.

    Sources are memory-mapped; only the yielded tensor is materialised, already in `dtype`.
    """
    canon, table = map_tensors(files, cfg)
    for row in table:
        if row.layers:
            out = np.empty((row.layers,) + row.shape, dtype=dtype)
            for i, name in enumerate(row.sources()):  # each source read once: a reader may release what it gave
                f, n = canon[name]
                out[i] = row.to_ours(np.asarray(f.get(n))).astype(dtype)
        else:
            f, n = canon[row.source]
            out = np.ascontiguousarray(row.to_ours(f.get(n)).astype(dtype))
        yield row.path, out
