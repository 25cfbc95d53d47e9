"""The sharding table and strategies: pieces tile the weight exactly, heads stay whole."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tpmax.core.sharding import LAYER_SHARDING, MODEL_SHARDING, STRATEGIES, head_shard, shard, Layout


@st.composite
def heads_case(draw):
    n_kv = draw(st.integers(1, 6))
    n_heads = n_kv * draw(st.integers(1, 4))
    tp = draw(st.integers(1, min(4, n_heads)))
    return n_heads, n_kv, tp


@settings(max_examples=200)
@given(heads_case())
def test_heads_whole_and_covering(case):
    n_heads, n_kv, tp = case
    shards = [head_shard(n_heads, n_kv, tp, r) for r in range(tp)]
    assert [s.q0 for s in shards] == [0] + [s.q1 for s in shards[:-1]] and shards[-1].q1 == n_heads
    for s in shards:  # every local q head finds its kv head on the same device
        kv = np.arange(s.q0, s.q1) // (n_heads // n_kv)
        assert s.kv0 <= kv.min() and kv.max() < s.kv1
        assert (s.kv_of_q() >= 0).all() and (s.kv_of_q() < s.n_kv).all()
    if tp <= n_kv:  # no replication: kv heads partition exactly
        assert sum(s.n_kv for s in shards) == n_kv


def test_head_shard_errors():
    with pytest.raises(ValueError, match="multiple"):
        head_shard(6, 4, 2, 0)
    with pytest.raises(ValueError, match="over 8 devices"):
        head_shard(6, 2, 8, 0)


@settings(max_examples=100)
@given(heads_case(), st.integers(1, 5), st.integers(1, 9))
def test_stacked_qkv_equals_separate(case, hd, d):
    n_heads, n_kv, tp = case
    rng = np.random.default_rng(0)
    q = rng.standard_normal((n_heads * hd, d))
    k, v = rng.standard_normal((2, n_kv * hd, d))
    for r in range(tp):
        lay = Layout(tp, r, head_shard(n_heads, n_kv, tp, r), hd)
        sep = np.concatenate([shard("q_proj", q, lay), shard("k_proj", k, lay), shard("v_proj", v, lay)])
        np.testing.assert_array_equal(shard("qkv_proj", np.concatenate([q, k, v]), lay), sep)


@settings(max_examples=100)
@given(st.integers(1, 40), st.integers(1, 7), st.integers(1, 4))
def test_rowwise_columnwise_gate_up_tile(rows, cols, tp):
    w = np.arange(rows * cols * 2).reshape(2 * rows, cols)
    lays = [Layout(tp, r, head_shard(4, 4, min(tp, 4), min(r, 3)), 1) for r in range(tp)]
    np.testing.assert_array_equal(np.concatenate([shard("gate_proj", w, l) for l in lays]), w)
    np.testing.assert_array_equal(np.concatenate([shard("down_proj", w, l) for l in lays], axis=1), w)
    gu = [shard("gate_up_proj", w, l) for l in lays]  # each device: [gate_r; up_r]
    halves = [np.split(g, 2) for g in gu]
    np.testing.assert_array_equal(np.concatenate([h[0] for h in halves] + [h[1] for h in halves]), w)


def test_table_names_known_strategies():
    for table in (LAYER_SHARDING, MODEL_SHARDING):
        for name, (shape, strategy, fused) in table.items():
            assert strategy in STRATEGIES, name
