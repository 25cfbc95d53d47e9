"""GPTQ and FP8 linears equal dequantize-then-matmul, sharded column-parallel at TP 1-4."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import tpmax
from tpmax import quant
from tpmax.devices import float8_e4m3fn
from conftest import cpu_group


@settings(max_examples=60)
@given(st.integers(1, 4), st.integers(1, 5), st.sampled_from([8, 16, 32]), st.integers(4, 13),
       st.sampled_from([8, 16]), st.booleans(), st.integers(0, 999))
def test_gptq_tp_equals_dequantized_matmul(tp, T, n_in, n_out, group, desc_act, seed):
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 16, (n_in, n_out))
    n_groups = -(-n_in // group)
    scales = (rng.random((n_groups, n_out)) * 0.1 + 0.01).astype(np.float16)
    g_idx = np.arange(n_in) // group
    if desc_act:
        g_idx = rng.permutation(g_idx)
    x = rng.standard_normal((T, n_in)).astype(np.float32)
    # Plain reference, element by element from the format's definition.
    W = np.empty((n_out, n_in))
    for i in range(n_in):
        for o in range(n_out):
            W[o, i] = (q[i, o] - 8) * float(scales[g_idx[i], o])
    want = x.astype(np.float64) @ W.T
    qweight = quant.gptq_pack(q)
    np.testing.assert_allclose(quant.gptq_linear(x, qweight, scales, g_idx), want, rtol=1e-5, atol=1e-5)
    shards = [quant.gptq_shard_rowwise(qweight, scales, tp, r) for r in range(tp)]
    ys = [quant.gptq_linear(x, qw, sc, g_idx) for qw, sc in shards]
    for y in tpmax.communicator(cpu_group(tp)).allgather(ys, axis=-1):
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


def test_gptq_errors():
    with pytest.raises(ValueError, match="divisible by 8"):
        quant.gptq_pack(np.zeros((12, 2), int))
    with pytest.raises(ValueError, match="g_idx or group_size"):
        quant.gptq_dequantize(np.zeros((1, 2), np.int32), np.ones((1, 2), np.float16))
    with pytest.raises(ValueError, match="3 entries for 8"):
        quant.gptq_dequantize(np.zeros((1, 2), np.int32), np.ones((1, 2), np.float16), np.zeros(3, int))


@settings(max_examples=60)
@given(st.integers(1, 4), st.integers(1, 5), st.integers(1, 12), st.integers(4, 13), st.booleans(), st.integers(0, 999))
def test_fp8_tp_equals_dequantized_matmul(tp, T, n_in, n_out, rowwise, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n_out, n_in)).astype(np.float32)
    wq, scale = quant.fp8_quantize(w, rowwise=rowwise)
    assert wq.dtype == float8_e4m3fn
    deq = wq.astype(np.float64) * (scale.reshape(-1, 1) if rowwise else scale)
    assert np.abs(deq - w).max() <= 0.07 * np.abs(w).max()  # e4m3 keeps 3 mantissa bits
    x = rng.standard_normal((T, n_in)).astype(np.float32)
    want = x.astype(np.float64) @ deq.T
    np.testing.assert_allclose(quant.fp8_linear(x, wq, scale), want, rtol=1e-5, atol=1e-5)
    bounds = tpmax.split_bounds(n_out, tp)
    ys = [quant.fp8_linear(x, wq[a:b], scale[a:b] if rowwise else scale) for a, b in bounds]
    for y in tpmax.communicator(cpu_group(tp)).allgather(ys, axis=-1):
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


def test_fp8_errors():
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        quant.fp8_dequantize(np.zeros((2, 2), np.float32), np.ones(()))
    with pytest.raises(ValueError, match="3 rows for a weight of 2"):
        quant.fp8_dequantize(np.zeros((2, 2), float8_e4m3fn), np.ones(3, np.float32))
