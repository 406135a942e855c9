"""The models' parameter declarations (Flax NNX modules, models/params.py): the state the
pipeline runs on, the logical axes sharding reads, the random-weight draw."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from earlytom_jax import pipeline, sharding
from earlytom_jax.architectures import architecture, param_shapes, random_params
from earlytom_jax.models import params as P
from earlytom_jax.models.llava_onevision import LlavaOneVision
from earlytom_jax.models.qwen2 import Qwen2Layer
from earlytom_jax.models.siglip import SiglipBlock


def test_module_state_is_the_parameter_tree_the_pipeline_runs_on():
    """A module built with real initialisers: its pure state has the declared tree, and the
    jitted prefill runs on it."""
    cfg = architecture("tiny")
    model = LlavaOneVision(cfg, rngs=nnx.Rngs(0))
    tree = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    shapes = jax.tree.map(lambda a: (a.shape, a.dtype), tree)
    assert shapes == jax.tree.map(lambda s: (s.shape, s.dtype), param_shapes(cfg))
    assert tree["vision"]["blocks"]["q_w"].shape[0] == cfg.vision.num_layers
    assert "lm_head" not in tree["text"]  # tied
    assert np.all(np.asarray(tree["text"]["layers"]["ln1"]) == 1.0)
    pixels = jax.random.normal(jax.random.key(1), (2, 3, cfg.vision.image_size, cfg.vision.image_size))
    logits = pipeline.prefill(tree, pixels, jnp.arange(3), jnp.arange(4), cfg)[0]
    assert logits.shape[-1] == cfg.text.vocab_size and bool(jnp.all(jnp.isfinite(logits)))


def test_stacked_layers_lead_with_a_layer_axis_named_none():
    cfg = architecture("llava-ov-7b")
    axes = P.logical_axes(LlavaOneVision, cfg)
    shapes = P.shapes(LlavaOneVision, cfg)
    assert axes[("text", "layers", "k_w")] == (None, None, "kv_heads", None)
    assert shapes[("text", "layers", "k_w")] == (28, 3584, 4, 128)
    assert axes[("vision", "blocks", "fc1_w")] == (None, None, "mlp")
    assert axes[("text", "lm_head")] == ("vocab", None)  # untied at 7B
    one = P.logical_axes(SiglipBlock, cfg.vision)
    assert one[("q_w",)] == (None, "heads", None)  # the block alone: no layer axis
    assert P.shapes(Qwen2Layer, cfg.text)[("down_w",)] == (18944, 3584)


def test_every_parameter_has_logical_axes_of_its_rank():
    cfg = architecture("llava-ov-7b")
    axes, shapes = P.logical_axes(LlavaOneVision, cfg), P.shapes(LlavaOneVision, cfg)
    assert set(axes) == set(shapes)
    for p in shapes:
        assert len(axes[p]) == len(shapes[p]), p
        assert all(a is None or a in sharding.LOGICAL_RULES for a in axes[p]), p


def test_sharding_reads_the_modules_axes():
    """plan_shardings takes each parameter's partition from its declaration."""
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    cfg = architecture("tiny")
    plan, fallbacks = sharding.plan_shardings(param_shapes(cfg), mesh)
    assert fallbacks == []
    assert plan["text"]["layers"]["q_w"].spec == jax.sharding.PartitionSpec(None, None, "model", None)
    assert plan["projector"]["b1"].spec == jax.sharding.PartitionSpec("model")
    assert plan["vision"]["pos"].spec == jax.sharding.PartitionSpec()
    assert set(sharding.logical_axes()) >= {("/".join(p), len(s)) for p, s in P.shapes(LlavaOneVision, cfg).items()}
    qwen = architecture("qwen2.5-vl-3b")
    plan, _ = sharding.plan_shardings(param_shapes(qwen), mesh)
    assert plan["vision"]["blocks"]["qkv_w"].spec == jax.sharding.PartitionSpec(None, None, None, "model", None)
    assert plan["vision"]["merger"]["w1"].spec == jax.sharding.PartitionSpec(None, "model")
    assert plan["vision"]["patch_w"].spec == jax.sharding.PartitionSpec()


def test_random_params_follow_the_declared_inits():
    cfg = architecture("tiny")
    params = random_params(cfg, seed=3)
    inits = P.metadata(LlavaOneVision, cfg, "init")
    ones = {p for p, i in inits.items() if i == "ones"}
    assert ones == {("vision", "blocks", "ln1_s"), ("vision", "blocks", "ln2_s"), ("text", "layers", "ln1"),
                    ("text", "layers", "ln2"), ("text", "norm")}
    flat = {tuple(str(k.key) for k in p): a for p, a in jax.tree_util.tree_leaves_with_path(params)}
    for p, a in flat.items():
        a = np.asarray(a)
        if p in ones:
            assert np.all(a == 1.0), p
        else:
            assert 0.015 < a.std() < 0.025 or a.size < 200, p


def test_param_rejects_axes_of_the_wrong_rank():
    with pytest.raises(ValueError, match="2 axis names for a shape of 3"):
        P.param(nnx.Rngs(0), (2, 3, 4), (None, "heads"))
