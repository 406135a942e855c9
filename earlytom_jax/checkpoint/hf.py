"""HuggingFace checkpoint layouts → our parameter tree.

Our tree (einsum layouts, per-layer tensors stacked on a leading layer axis):

    vision:    patch_w [3*p*p, C], patch_b [C], pos [N, C],
               blocks: ln1_s, ln1_b [C], q_w/k_w/v_w [C, H, D], q_b/k_b/v_b [H, D],
                       o_w [H, D, C], o_b [C], ln2_s, ln2_b [C], fc1_w [C, F], fc1_b [F],
                       fc2_w [F, C], fc2_b [C]                        (each with a leading [Lv])
    projector: w1 [C, Ht], b1 [Ht], w2 [Ht, Ht], b2 [Ht]
    newline:   [Ht]
    text:      embed [V, Ht], norm [Ht], lm_head [V, Ht] (absent when tied),
               layers: ln1, ln2 [Ht], q_w [Ht, Hq, D], q_b [Hq, D], k_w/v_w [Ht, Hk, D],
                       k_b/v_b [Hk, D], o_w [Hq, D, Ht], gate_w/up_w [Ht, F], down_w [F, Ht]

Source names are first reduced to a canonical form (`vision.encoder.layers.3.mlp.fc1.weight`,
`text.layers.0.self_attn.q_proj.bias`, `projector.1.weight`, `newline`, `lm_head.weight`)
whatever the layout: llava-hf (transformers 4), transformers 5 `save_pretrained`, or the
lmms-lab originals.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from earlytom_jax.config import LlavaOVConfig
from earlytom_jax.errors import CheckpointError

# Longest first: the first matching prefix wins.
_PREFIXES = (
    ("model.vision_tower.vision_tower.vision_model.", "vision."),
    ("model.vision_tower.vision_model.", "vision."),
    ("vision_tower.vision_model.", "vision."),
    ("model.vision_tower.", "vision."),
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


def _t(x):  # torch Linear [out, in] → [in, out]
    return x.T


@dataclasses.dataclass(frozen=True)
class _Spec:
    """One tensor of our tree: canonical source name(s), expected source shape, transform."""

    path: tuple[str, ...]
    source: str  # may contain {i} for per-layer tensors
    shape: tuple[int, ...]
    fn: Callable[[np.ndarray], np.ndarray]
    layers: int = 0  # > 0: stacked over this many layers


def _specs(cfg: LlavaOVConfig) -> list[_Spec]:
    v, t = cfg.vision, cfg.text
    C, F, H, D, p = v.hidden_size, v.intermediate_size, v.num_heads, v.head_dim, v.patch_size
    Ht, Hq, Hk, Dt, Ft = t.hidden_size, t.num_heads, t.num_kv_heads, t.head_dim, t.intermediate_size
    Lv, Lt = v.num_layers, t.num_layers
    vb = "vision.encoder.layers.{i}."
    tb = "text.layers.{i}."
    heads = lambda h, d: (lambda x: x.T.reshape(x.shape[1], h, d))  # noqa: E731
    specs = [
        _Spec(("vision", "patch_w"), "vision.embeddings.patch_embedding.weight", (C, 3, p, p),
              lambda x: x.reshape(x.shape[0], -1).T),
        _Spec(("vision", "patch_b"), "vision.embeddings.patch_embedding.bias", (C,), lambda x: x),
        _Spec(("vision", "pos"), "vision.embeddings.position_embedding.weight", (v.num_patches, C), lambda x: x),
        _Spec(("projector", "w1"), "projector.1.weight", (Ht, C), _t),
        _Spec(("projector", "b1"), "projector.1.bias", (Ht,), lambda x: x),
        _Spec(("projector", "w2"), "projector.2.weight", (Ht, Ht), _t),
        _Spec(("projector", "b2"), "projector.2.bias", (Ht,), lambda x: x),
        _Spec(("newline",), "newline", (Ht,), lambda x: x),
        _Spec(("text", "embed"), "text.embed_tokens.weight", (t.vocab_size, Ht), lambda x: x),
        _Spec(("text", "norm"), "text.norm.weight", (Ht,), lambda x: x),
    ]
    if not t.tie_word_embeddings:
        specs.append(_Spec(("text", "lm_head"), "lm_head.weight", (t.vocab_size, Ht), lambda x: x))
    blocks = [
        ("ln1_s", "layer_norm1.weight", (C,), lambda x: x),
        ("ln1_b", "layer_norm1.bias", (C,), lambda x: x),
        ("ln2_s", "layer_norm2.weight", (C,), lambda x: x),
        ("ln2_b", "layer_norm2.bias", (C,), lambda x: x),
        ("q_w", "self_attn.q_proj.weight", (C, C), heads(H, D)),
        ("k_w", "self_attn.k_proj.weight", (C, C), heads(H, D)),
        ("v_w", "self_attn.v_proj.weight", (C, C), heads(H, D)),
        ("q_b", "self_attn.q_proj.bias", (C,), lambda x: x.reshape(H, D)),
        ("k_b", "self_attn.k_proj.bias", (C,), lambda x: x.reshape(H, D)),
        ("v_b", "self_attn.v_proj.bias", (C,), lambda x: x.reshape(H, D)),
        ("o_w", "self_attn.out_proj.weight", (C, C), lambda x: x.T.reshape(H, D, C)),
        ("o_b", "self_attn.out_proj.bias", (C,), lambda x: x),
        ("fc1_w", "mlp.fc1.weight", (F, C), _t),
        ("fc1_b", "mlp.fc1.bias", (F,), lambda x: x),
        ("fc2_w", "mlp.fc2.weight", (C, F), _t),
        ("fc2_b", "mlp.fc2.bias", (C,), lambda x: x),
    ]
    specs += [_Spec(("vision", "blocks", k), vb + s, shp, fn, Lv) for k, s, shp, fn in blocks]
    layers = [
        ("ln1", "input_layernorm.weight", (Ht,), lambda x: x),
        ("ln2", "post_attention_layernorm.weight", (Ht,), lambda x: x),
        ("q_w", "self_attn.q_proj.weight", (Hq * Dt, Ht), heads(Hq, Dt)),
        ("k_w", "self_attn.k_proj.weight", (Hk * Dt, Ht), heads(Hk, Dt)),
        ("v_w", "self_attn.v_proj.weight", (Hk * Dt, Ht), heads(Hk, Dt)),
        ("q_b", "self_attn.q_proj.bias", (Hq * Dt,), lambda x: x.reshape(Hq, Dt)),
        ("k_b", "self_attn.k_proj.bias", (Hk * Dt,), lambda x: x.reshape(Hk, Dt)),
        ("v_b", "self_attn.v_proj.bias", (Hk * Dt,), lambda x: x.reshape(Hk, Dt)),
        ("o_w", "self_attn.o_proj.weight", (Ht, Hq * Dt), lambda x: x.T.reshape(Hq, Dt, Ht)),
        ("gate_w", "mlp.gate_proj.weight", (Ft, Ht), _t),
        ("up_w", "mlp.up_proj.weight", (Ft, Ht), _t),
        ("down_w", "mlp.down_proj.weight", (Ht, Ft), _t),
    ]
    specs += [_Spec(("text", "layers", k), tb + s, shp, fn, Lt) for k, s, shp, fn in layers]
    return specs


def _ignored(canon: str, cfg: LlavaOVConfig) -> bool:
    """Stored tensors we knowingly skip: blocks past the feature depth, post-LN, SigLIP head."""
    if canon.startswith("vision.post_layernorm.") or canon.startswith("vision.head."):
        return True
    if canon.startswith("vision.encoder.layers."):
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


def map_tensors(files: dict, cfg: LlavaOVConfig):
    """Check every tensor against the config. Returns ({canonical: (file, source name)}, specs).

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
    specs = _specs(cfg)
    needed: dict[str, tuple[int, ...]] = {}
    for s in specs:
        names = [s.source.format(i=i) for i in range(s.layers)] if s.layers else [s.source]
        for n in names:
            needed[n] = s.shape
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
    return canon, specs


def iter_params(files: dict, cfg: LlavaOVConfig, dtype):
    """Yield (path, array) for every parameter of our tree, one tensor (or layer stack) at a time.

    Sources are memory-mapped; only the yielded tensor is materialised, already in `dtype`.
    """
    canon, specs = map_tensors(files, cfg)
    for s in specs:
        if s.layers:
            f, n = canon[s.source.format(i=0)]
            first = s.fn(np.asarray(f.get(n)))
            out = np.empty((s.layers,) + first.shape, dtype=dtype)
            out[0] = first.astype(dtype)
            for i in range(1, s.layers):  # each source read once: a reader may release what it gave
                f, n = canon[s.source.format(i=i)]
                out[i] = s.fn(f.get(n)).astype(dtype)
        else:
            f, n = canon[s.source]
            out = np.ascontiguousarray(s.fn(f.get(n)).astype(dtype))
        yield s.path, out


def set_path(tree: dict, path: tuple[str, ...], value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value
