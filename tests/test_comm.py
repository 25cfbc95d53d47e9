"""Every collective equals the obvious NumPy computation, on 1-8 virtual devices."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import tpmax
from conftest import cpu_group, requires_gpu

DTYPES = ["float32", "float16", "bfloat16", "int32", "int64"]
EXAMPLES = settings(max_examples=200)


@st.composite
def per_device_arrays(draw, *, vary_axis=False):
    """n arrays (one per device) of small integers, exact in every dtype; returns (xs, axis)."""
    n = draw(st.integers(1, 8))
    ndim = draw(st.integers(1, 3))
    shape = draw(st.lists(st.integers(0 if vary_axis else 1, 5), min_size=ndim, max_size=ndim))
    axis = draw(st.integers(-ndim, ndim - 1))
    dtype = tpmax.as_dtype(draw(st.sampled_from(DTYPES)))
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    xs = []
    for _ in range(n):
        s = list(shape)
        if vary_axis:
            s[axis] = draw(st.integers(0, 4))
        xs.append(rng.integers(-16, 17, size=s).astype(dtype))
    return xs, axis


@EXAMPLES
@given(per_device_arrays())
def test_allreduce_sum(case):
    xs, _ = case
    comm = tpmax.communicator(cpu_group(len(xs)))
    want = np.sum([x.astype(np.float64) for x in xs], axis=0)
    out = comm.allreduce_sum(xs)
    assert len(out) == len(xs)
    for o in out:
        assert o.dtype == xs[0].dtype and o.shape == xs[0].shape
        np.testing.assert_array_equal(o.astype(np.float64), want)
    if len(out) > 1:  # private buffers: writing one device's result leaves the others alone
        out[0][...] = 0
        np.testing.assert_array_equal(out[1].astype(np.float64), want)


@EXAMPLES
@given(per_device_arrays(vary_axis=True))
def test_allgather_uneven(case):
    xs, axis = case
    comm = tpmax.communicator(cpu_group(len(xs)))
    want = np.concatenate(xs, axis=axis)
    for o in comm.allgather(xs, axis=axis):
        assert o.dtype == xs[0].dtype
        np.testing.assert_array_equal(o, want)


@EXAMPLES
@given(per_device_arrays(), st.data())
def test_broadcast(case, data):
    xs, _ = case
    root = data.draw(st.integers(0, len(xs) - 1))
    comm = tpmax.communicator(cpu_group(len(xs)))
    out = comm.broadcast(xs[root], root=root)
    assert len(out) == len(xs)
    for o in out:
        np.testing.assert_array_equal(o, xs[root])


@EXAMPLES
@given(per_device_arrays())
def test_reduce_scatter_uneven(case):
    xs, axis = case
    n = len(xs)
    comm = tpmax.communicator(cpu_group(n))
    total = np.sum([x.astype(np.float64) for x in xs], axis=0)
    out = comm.reduce_scatter(xs, axis=axis)
    sizes = tpmax.split_sizes(total.shape[axis], n)
    assert [o.shape[axis] for o in out] == sizes
    np.testing.assert_array_equal(np.concatenate([o.astype(np.float64) for o in out], axis=axis), total)


@given(st.integers(0, 10**6), st.integers(1, 64))
def test_split_sizes(n, k):
    sizes = tpmax.split_sizes(n, k)
    assert sum(sizes) == n and len(sizes) == k
    assert sorted(sizes, reverse=True) == sizes and sizes[0] - sizes[-1] <= 1


def test_split_example_from_spec():
    assert tpmax.split_sizes(151674, 4) == [37919, 37919, 37918, 37918]


def test_errors_are_clear():
    comm = tpmax.communicator(cpu_group(2))
    a = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match="got 1 arrays for 2 devices"):
        comm.allreduce_sum([a])
    with pytest.raises(ValueError, match="shapes differ"):
        comm.allreduce_sum([a, np.zeros((3, 3), np.float32)])
    with pytest.raises(ValueError, match="dtypes differ"):
        comm.allreduce_sum([a, a.astype(np.float16)])
    with pytest.raises(ValueError, match="off the gather axis"):
        comm.allgather([a, np.zeros((3, 3), np.float32)], axis=1)
    with pytest.raises(ValueError, match="axis 5 invalid"):
        comm.allgather([a, a], axis=5)
    with pytest.raises(ValueError, match="not on device"):
        comm.allreduce_sum([a, [[0.0] * 3] * 2])
    with pytest.raises(ValueError, match="at least one device"):
        tpmax.communicator([])


@requires_gpu
def test_nccl_one_rank_and_logical_devices():
    import cupy as cp
    one = tpmax.devices("gpu:0")
    comm = tpmax.communicator(one)
    assert isinstance(comm, tpmax.InProcessCommunicator)  # one device: no collective (test_gpu_paths agrees)
    for dtype in ["float32", "bfloat16", "float16"]:
        x = tpmax.asarray(np.arange(6, dtype=np.float32).reshape(2, 3), one[0], dtype=dtype)
        np.testing.assert_array_equal(tpmax.to_numpy(comm.allreduce_sum([x])[0]).astype(np.float32),
                                      np.arange(6).reshape(2, 3))
        np.testing.assert_array_equal(tpmax.to_numpy(comm.allgather([x], axis=1)[0]), tpmax.to_numpy(x))
        np.testing.assert_array_equal(tpmax.to_numpy(comm.broadcast(x)[0]), tpmax.to_numpy(x))
        np.testing.assert_array_equal(tpmax.to_numpy(comm.reduce_scatter([x], axis=1)[0]), tpmax.to_numpy(x))
    two = tpmax.devices("gpu:0,0")
    comm2 = tpmax.communicator(two)
    assert isinstance(comm2, tpmax.InProcessCommunicator)
    xs = [cp.full((3,), i + 1, cp.float32) for i in range(2)]
    assert all(o.tolist() == [3, 3, 3] for o in comm2.allreduce_sum(xs))
    assert comm2.allgather(xs, axis=0)[1].tolist() == [1, 1, 1, 2, 2, 2]
