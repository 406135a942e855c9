"""Every attention kernel equals plain float64 attention: bidirectional with key validity
anywhere and per-key bias, causal with invalid slots in the middle, grouped-query heads,
block-diagonal segments after a permutation, bf16; and the probability paths.

"fused" runs `jax.nn.dot_product_attention`'s XLA implementation here (the cuDNN kernel it
selects on NVIDIA GPUs is checked by benchmarks/gpu_check.py on a lent GPU); "splash" runs
Pallas' TPU kernel in interpret mode.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from earlytom_jax.models import attention as attn
from earlytom_jax.models.attention import Segments, cpu, dense

IMPLS = ["dense", "cpu", "fused", "splash"]


def _reference(q, k, v, mask=None, bias=None):
    """Plain float64 attention. mask bool [B, Lq, Lk] or None, bias [B, Lk] or None
    → (out [B, Lq, Hq, D], probabilities [B, Hq, Lq, Lk])."""
    b, lq, hq, d = q.shape
    g = hq // k.shape[2]
    kk, vv = (np.repeat(np.asarray(a, np.float64), g, axis=2) for a in (k, v))
    s = np.einsum("bqhd,bkhd->bhqk", np.asarray(q, np.float64), kk) / np.sqrt(d)
    if bias is not None:
        s = s + np.asarray(bias, np.float64)[:, None, None, :]
    if mask is not None:
        s = np.where(mask[:, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, vv), p


def _qkv(rng, b, lq, lk, hq, hk, d, dtype=np.float32):
    q = rng.normal(size=(b, lq, hq, d))
    k, v = (rng.normal(size=(b, lk, hk, d)) for _ in range(2))
    return tuple(jnp.asarray(a, dtype) for a in (q, k, v))


def _key_valid(rng, b, lk):
    """Random validity with invalid runs in the middle and at both ends, one valid key at least."""
    valid = rng.uniform(size=(b, lk)) > 0.3
    valid[:, lk // 3: lk // 3 + 7] = False
    valid[:, lk // 2] = True
    return valid


def _close(out, ref, rows=None):
    out = np.asarray(out, np.float64)
    assert np.isfinite(out).all()
    if rows is not None:
        out, ref = out[rows], ref[rows]
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("b,lq,lk,hq,hk", [(2, 150, 170, 4, 2), (1, 9, 200, 2, 2)], ids=["gqa", "decode-like"])
def test_bidirectional_with_invalid_keys(impl, b, lq, lk, hq, hk):
    rng = np.random.default_rng(lq)
    q, k, v = _qkv(rng, b, lq, lk, hq, hk, 32)
    valid = _key_valid(rng, b, lk)
    ref, _ = _reference(q, k, v, np.broadcast_to(valid[:, None], (b, lq, lk)))
    _close(jax.jit(attn.attention, static_argnames="impl")(q, k, v, jnp.asarray(valid), impl=impl), ref)
    full, _ = _reference(q, k, v)
    _close(jax.jit(attn.attention, static_argnames="impl")(q, k, v, impl=impl), full)


@pytest.mark.parametrize("impl", ["dense", "cpu", "fused"])
def test_per_key_bias(impl):
    """ToMe's log token sizes as a bias on every query's scores, with invalid keys."""
    rng = np.random.default_rng(7)
    b, lq, lk = 2, 140, 150
    q, k, v = _qkv(rng, b, lq, lk, 4, 4, 16)
    bias = np.log(rng.integers(1, 5, size=(b, lk))).astype(np.float32)
    valid = _key_valid(rng, b, lk)
    ref, _ = _reference(q, k, v, np.broadcast_to(valid[:, None], (b, lq, lk)), bias)
    _close(attn.attention(q, k, v, jnp.asarray(valid), bias=jnp.asarray(bias), impl=impl), ref)


def test_splash_refuses_bias_and_unknown_impls():
    q = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(ValueError, match="no per-key bias"):
        attn.attention(q, q, q, bias=jnp.zeros((1, 4)), impl="splash")
    with pytest.raises(ValueError, match="impl must be one of"):
        attn.attention(q, q, q, impl="flash")
    with pytest.raises(ValueError, match="materialised"):
        attn.attention_colmean(q, q, q, impl="fused")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("L,hq,hk,block", [(200, 4, 2, 32), (131, 7, 1, None), (60, 2, 2, None)],
                         ids=["gqa-blocks", "mqa-by-length", "one-block"])
def test_causal_with_invalid_slots(impl, L, hq, hk, block):
    """Valid queries attend the valid keys at or before them; invalid slots (the visual
    buffer's padding) anywhere, the first slot included. Invalid queries' rows are free but finite."""
    rng = np.random.default_rng(L)
    b = 2
    q, k, v = _qkv(rng, b, L, L, hq, hk, 16)
    valid = _key_valid(rng, b, L)
    valid[1, 0] = False
    i = np.arange(L)
    ref, _ = _reference(q, k, v, (i[:, None] >= i[None, :])[None] & valid[:, None, :] | (~valid[:, :, None]))
    run = jax.jit(attn.causal_attention, static_argnames=("block", "impl"))
    _close(run(q, k, v, jnp.asarray(valid), block=block, impl=impl), ref, rows=valid)


def test_causal_block_grows_with_length():
    assert cpu.causal_block(3200) == 128 and cpu.causal_block(6400) == 256


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16(impl):
    """bf16 inputs: within bf16 rounding of exact attention of the same bf16 values."""
    rng = np.random.default_rng(2026)
    b, L, hq, hk = 2, 150, 4, 2
    q, k, v = _qkv(rng, b, L, L, hq, hk, 16, jnp.bfloat16)
    valid = _key_valid(rng, b, L)
    i = np.arange(L)
    causal = (i[:, None] >= i[None, :])[None] & valid[:, None, :] | ~valid[:, :, None]
    for out, mask in ((attn.attention(q, k, v, jnp.asarray(valid), impl=impl), valid[:, None, :]),
                      (attn.causal_attention(q, k, v, jnp.asarray(valid), impl=impl), causal)):
        assert out.dtype == jnp.bfloat16
        ref, _ = _reference(q, k, v, np.broadcast_to(mask, (b, L, L)))
        err = np.abs(np.asarray(out, np.float64) - ref)[valid]
        assert err.max() < 2e-2 and err.mean() < 2e-3, (impl, err.max(), err.mean())


def _qwen_like_segments():
    """Windows of unequal lengths over a permuted sequence, as Qwen2.5-VL's window order and
    `cu_window_seqlens` give them: a 6 x 10 grid in 4 x 4 windows (edge windows smaller)."""
    h, w, win = 6, 10, 4
    pos = np.arange(h * w).reshape(h, w)
    order, lengths = [], []
    for r in range(0, h, win):
        for c in range(0, w, win):
            cell = pos[r:r + win, c:c + win].ravel()
            order.extend(cell.tolist())
            lengths.append(cell.size)
    return Segments.from_lengths(lengths, order), np.asarray(order), np.asarray(lengths)


def test_segments_layout_against_window_ids():
    seg, order, lengths = _qwen_like_segments()
    window_of = np.empty(order.size, np.int64)
    window_of[order] = np.repeat(np.arange(lengths.size), lengths)
    np.testing.assert_array_equal(seg.mask(), window_of[:, None] == window_of[None, :])
    assert seg.shape == (lengths.size, lengths.max())
    flat = seg.index.ravel()
    np.testing.assert_array_equal(flat[seg.back], np.arange(order.size))
    with pytest.raises(ValueError, match="positive counts"):
        Segments.from_lengths([3, 0])
    with pytest.raises(ValueError, match="permutation"):
        Segments.from_lengths([2, 2], [0, 1, 1, 3])


@pytest.mark.parametrize("impl", IMPLS)
def test_segment_attention(impl):
    seg, _, _ = _qwen_like_segments()
    rng = np.random.default_rng(3)
    L = seg.back.size
    q, k, v = _qkv(rng, 2, L, L, 4, 4, 16)
    mask = np.broadcast_to(seg.mask()[None], (2, L, L))
    ref, _ = _reference(q, k, v, mask)
    _close(jax.jit(attn.segment_attention, static_argnames=("segments", "impl"))(q, k, v, seg, impl=impl), ref)
    equal = Segments.from_lengths([L // 2, L // 2])  # all slots valid: no key mask at all
    ref, _ = _reference(q, k, v, np.broadcast_to(equal.mask()[None], (2, L, L)))
    _close(attn.segment_attention(q, k, v, equal, impl=impl), ref)


def test_choose_on_cpu():
    q = jnp.zeros((1, 300, 4, 64), jnp.bfloat16)
    assert jax.default_backend() == "cpu" and attn.choose(q, q) == "cpu"


@pytest.mark.parametrize("backend,q,k,bias,expect", [
    ("gpu", (1, 2000, 28, 128), (1, 2000, 4, 128), None, "fused"),  # the 7B prefill in bf16
    ("gpu", (1, 1, 28, 128), (1, 20000, 4, 128), None, "dense"),  # a decode step, however long the cache
    ("gpu", (1, 2000, 14, 64), (1, 2000, 2, 64), "fp32", "dense"),  # cuDNN's flash kernel: bf16 / fp16 only
    ("gpu", (1, 729, 16, 72), (1, 729, 16, 72), None, "fused"),  # SigLIP-so400m: head dim 72
    ("gpu", (1, 2000, 16, 100), (1, 2000, 16, 100), None, "dense"),  # head dim not a multiple of 8
    ("gpu", (8, 100, 16, 72), (8, 100, 16, 72), None, "dense"),  # product under 128 x 128
    ("tpu", (1, 2000, 28, 128), (1, 2000, 4, 128), None, "splash"),
    ("tpu", (1, 729, 16, 72), (1, 729, 16, 72), "bias", "dense"),  # ToMe's per-key bias: splash takes none
])
def test_choose_per_platform(monkeypatch, backend, q, k, bias, expect):
    """The decision table, for shapes traced on each backend (only shapes are read)."""
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    monkeypatch.setattr(attn, "_nvidia", lambda: True)
    dtype = jnp.float32 if bias == "fp32" else jnp.bfloat16
    qs, ks = jax.ShapeDtypeStruct(q, dtype), jax.ShapeDtypeStruct(k, dtype)
    assert attn.choose(qs, ks, jnp.zeros(()) if bias == "bias" else None) == expect


def test_last_row_probs():
    rng = np.random.default_rng(11)
    b, L = 2, 90
    q, k, v = _qkv(rng, b, L, L, 6, 2, 16)
    valid = _key_valid(rng, b, L)
    _, p = _reference(q, k, v, np.broadcast_to(valid[:, None], (b, L, L)))
    got = attn.last_row_probs(q, k, jnp.asarray(valid))
    np.testing.assert_allclose(np.asarray(got), p[:, :, -1].mean(1), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("with_mesh", [False, True], ids=["per-row", "mesh"])
@pytest.mark.parametrize("b,lq,lk,hq,hk,masked", [(2, 160, 160, 4, 4, False), (3, 130, 150, 6, 2, True)])
def test_cpu_by_head_equals_plain_attention(b, lq, lk, hq, hk, masked, with_mesh):
    """Score matrices this large take the CPU loop over heads (and rows without a mesh), with
    any [B, Lq, Lk] mask; the column mean of the probabilities too."""
    assert lq * lk >= cpu.BY_HEAD_MIN_SCORES
    rng = np.random.default_rng(lq)
    q, k, v = _qkv(rng, b, lq, lk, hq, hk, 8)
    mask = rng.uniform(size=(b, lq, lk)) > 0.3 if masked else None
    ref, p = _reference(q, k, v, mask)
    mesh = jax.make_mesh((1,), ("data",)) if with_mesh else None
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        m = None if mask is None else jnp.asarray(mask)
        out, _ = jax.jit(lambda *a: cpu.by_head(*a, q.shape[-1] ** -0.5))(q, k, v, m)
        _close(out, ref)
        if not masked:
            o, col = jax.jit(attn.attention_colmean)(q, k, v)
            _close(o, ref)
            np.testing.assert_allclose(np.asarray(col), p.mean(axis=(1, 2)), atol=1e-8, rtol=1e-5)


@pytest.mark.parametrize("impl", ["cpu", "dense"])
def test_colmean_bf16(impl):
    """bf16 through the probability path (on CPU the loop over heads passes q, k, v and the
    output as uint16 bits): within bf16 rounding of the exact values of the same bf16 inputs."""
    rng = np.random.default_rng(2027)
    q, k, v = _qkv(rng, 2, 140, 150, 6, 2, 16, jnp.bfloat16)
    ref, p = _reference(q, k, v)
    o, col = jax.jit(attn.attention_colmean, static_argnames="impl")(q, k, v, impl=impl)
    assert o.dtype == jnp.bfloat16
    assert np.abs(np.asarray(o, np.float64) - ref).max() < 1e-2
    np.testing.assert_allclose(np.asarray(col), p.mean(axis=(1, 2)), atol=1e-6, rtol=1e-2)


def test_dense_causal_mask_offsets_queries():
    """Queries as the last lq of lk positions (a chunk after a cache)."""
    valid = jnp.asarray([[True, False, True, True, True]])
    m = np.asarray(dense.causal_mask(2, 5, valid))[0]
    np.testing.assert_array_equal(m, [[1, 0, 1, 1, 0], [1, 0, 1, 1, 1]])
