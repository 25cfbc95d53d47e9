import numpy as np
import pytest
from hypothesis import given, strategies as st

import tpmax
from conftest import cpu_group


@given(st.lists(st.integers(), max_size=20), st.integers(0, 25))
def test_take(items, n):
    it = iter(items)
    assert tpmax.take(it, n) == items[:n]
    assert list(it) == items[n:]


def test_distribute_value_copies_per_device():
    devs = cpu_group(3)
    v = np.arange(6.0)
    out = tpmax.distribute_value(v, devs)
    assert len(out) == 3 and all(o is not v for o in out)
    out[0][0] = 99
    assert out[1][0] == 0 and v[0] == 0


def test_forward_sharded_layers():
    layers = [lambda x, k=k: x * k for k in range(3)]
    assert tpmax.forward_sharded_layers(layers, [1, 2, 3]) == [0, 2, 6]
    with pytest.raises(AssertionError, match="2 layers for 3 inputs"):
        tpmax.forward_sharded_layers(layers[:2], [1, 2, 3])


@pytest.mark.parametrize("threads", [True, False])
def test_per_device(threads):
    out = tpmax.per_device(lambda a, b: a + b, [1, 2, 3], [10, 20, 30], threads=threads)
    assert out == [11, 22, 33]
    with pytest.raises(ValueError, match="differ in length"):
        tpmax.per_device(lambda a, b: a, [1], [1, 2])


def test_shardable_callable_is_a_protocol():
    class Lin:
        sharding_strategy = "rowwise"
        def shard(self, devices): return [self] * len(devices)
        def __call__(self, x): return x
    assert isinstance(Lin(), tpmax.ShardableCallable)
    assert not isinstance(object(), tpmax.ShardableCallable)
