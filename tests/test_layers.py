"""Each layer, sharded at TP 1-4 with uneven splits, equals its plain NumPy reference."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import tpmax
from tpmax.nn import layers as L
from tpmax.core.sharding import split_bounds
from conftest import cpu_group
import reference as ref

TP = st.integers(1, 4)


def rnd(seed, *shape, scale=1.0):
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def rows(w, tp, axis=0):
    return [np.ascontiguousarray(np.take(w, range(a, b), axis=axis)) for a, b in split_bounds(w.shape[axis], tp)]


@settings(max_examples=60)
@given(TP, st.integers(1, 6), st.integers(1, 9), st.integers(4, 23), st.booleans(), st.integers(0, 99))
def test_column_parallel_linear(tp, T, din, dout, bias, seed):
    x, w, b = rnd(seed, T, din), rnd(seed + 1, dout, din), rnd(seed + 2, dout)
    devs = cpu_group(tp)
    out = L.column_parallel_linear([x] * tp, rows(w, tp), rows(b, tp) if bias else None, tpmax.communicator(devs))
    want = x.astype(np.float64) @ w.T + (b if bias else 0)
    for o in out:
        assert o.dtype == np.float32 and o.shape == (T, dout)
        np.testing.assert_allclose(o, want, rtol=1e-5, atol=1e-5)


@settings(max_examples=60)
@given(TP, st.integers(1, 6), st.integers(4, 23), st.integers(1, 9), st.booleans(), st.integers(0, 99))
def test_row_parallel_linear_bias_once(tp, T, din, dout, bias, seed):
    x, w, b = rnd(seed, T, din), rnd(seed + 1, dout, din), rnd(seed + 2, dout)
    out = L.row_parallel_linear(rows(x, tp, 1), rows(w, tp, 1), b if bias else None,
                                tpmax.communicator(cpu_group(tp)))
    want = x.astype(np.float64) @ w.T + (b if bias else 0)
    for o in out:
        np.testing.assert_allclose(o, want, rtol=1e-5, atol=1e-5)


@settings(max_examples=80)
@given(TP, st.integers(1, 7), st.integers(2, 12), st.integers(4, 21), st.sampled_from(sorted(L.ACTIVATIONS)),
       st.booleans(), st.integers(0, 99))
def test_mlp(tp, T, D, F, act, fused, seed):
    x, g, u, d = rnd(seed, T, D), rnd(seed + 1, F, D), rnd(seed + 2, F, D), rnd(seed + 3, D, F)
    w13 = [np.concatenate([a, b]) for a, b in zip(rows(g, tp), rows(u, tp))]
    cfg = L.DistributedGemmConfig(enable_matmul_allreduce=True, chunks=3) if fused else None
    out = L.mlp([x] * tp, w13, rows(d, tp, 1), tpmax.communicator(cpu_group(tp)), act=act, gemm_config=cfg)
    x64 = x.astype(np.float64)
    want = (ref.act(act, x64 @ g.T) * (x64 @ u.T)) @ d.T
    for o in out:
        assert o.dtype == np.float32
        np.testing.assert_allclose(o, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@settings(max_examples=60)
@given(TP, st.integers(4, 40), st.integers(1, 6), st.lists(st.integers(0, 39), min_size=1, max_size=12))
def test_vocab_parallel_embedding(tp, V, D, ids):
    ids = [i % V for i in ids]
    table = rnd(V, V, D)
    out = tpmax.vocab_parallel_embedding(np.array(ids), rows(table, tp), tpmax.communicator(cpu_group(tp)))
    for o in out:
        np.testing.assert_array_equal(o, table[ids])


@pytest.mark.parametrize("bad", [-1, 10])
def test_embedding_rejects_out_of_range_ids(bad):
    with pytest.raises(ValueError, match=f"token id {bad} outside the vocabulary"):
        tpmax.vocab_parallel_embedding(np.array([0, bad]), rows(rnd(0, 10, 2), 2), tpmax.communicator(cpu_group(2)))
    with pytest.raises(ValueError, match="1-D integer"):
        tpmax.vocab_parallel_embedding(np.array([0.5]), rows(rnd(0, 10, 2), 2), tpmax.communicator(cpu_group(2)))


@given(st.integers(1, 5), st.integers(1, 16), st.floats(1e-6, 1e-2), st.sampled_from(["float32", "float16", "bfloat16"]))
def test_rms_norm_dtype_and_value(T, D, eps, dtype):
    x, w = rnd(T, T, D), rnd(D, D)
    out = tpmax.rms_norm(x.astype(tpmax.as_dtype(dtype)), w, eps=eps)
    assert out.dtype == tpmax.as_dtype(dtype)
    tol = 1e-5 if dtype == "float32" else 2e-2
    np.testing.assert_allclose(out.astype(np.float64), ref.rms(x.astype(np.float64), w, eps), rtol=tol, atol=tol)


def test_linear_clip_weight():
    x, w = rnd(0, 3, 4), rnd(1, 5, 4, scale=3)
    np.testing.assert_allclose(tpmax.linear(x, w, clip_weight=1.0), x @ np.clip(w, -1, 1).T, rtol=1e-6)


@settings(max_examples=60)
@given(st.integers(1, 9), st.integers(1, 4), st.sampled_from([2, 4, 8, 16]), st.booleans(),
       st.sampled_from([None, "llama3", "linear"]), st.integers(0, 500))
def test_rope_matches_reference(T, H, hd, interleaved, scaling, start):
    scale = {None: None, "llama3": L.Llama3Scaling(8.0, 1.0, 4.0, 16), "linear": L.LinearScaling(4.0)}[scaling]
    rope = L.RotaryEmbedding(dim=H * hd, n_heads=H, theta=10000.0, max_seq_len=1024, head_dim=hd,
                             interleaved=interleaved, scaling=scale)
    x = rnd(T, T, H, hd)
    pos = np.arange(start, start + T)
    cos, sin = rope.cos_sin(pos)
    assert cos.dtype == np.float32
    out = L.apply_rope(x, cos, sin, interleaved=interleaved)
    cfg = tpmax.ModelConfig(arch="llama", vocab_size=2, hidden_size=H * hd, n_layers=1, n_heads=H, n_kv_heads=H,
                            head_dim=hd, ffn_size=1, rope_theta=10000.0, rope_scaling=scale, rope_interleaved=interleaved)
    np.testing.assert_allclose(out, ref.rope(x.astype(np.float64), pos.astype(np.float64), cfg), rtol=1e-5, atol=1e-5)


def test_rope_inv_freq_is_float64_and_no_promotion():
    rope = L.RotaryEmbedding(dim=64, n_heads=4, theta=500000.0, max_seq_len=8)
    assert rope.inv_freq().dtype == np.float64 and rope.rot_dim == 16
    x = rnd(0, 3, 4, 16)
    for name, fn in L.ACTIVATIONS.items():
        assert fn(x).dtype == np.float32, name


def test_unknown_activation():
    with pytest.raises(ValueError, match="unknown activation"):
        L.activation("swishy")
