"""The whole sharded transformer equals the unsharded float64 reference (tests/reference.py):
every TP degree 1-4, uneven splits, GQA ratios, masks, biases, qk-norm, rope layouts, ragged
batches, prefill + decode through the paged cache, and the cache's error paths."""
import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import tpmax
from tpmax import MHAMaskVariant, ReturnHiddenStates, ReturnLogits
from tpmax.nn.attention import attention_inputs
from tpmax.nn.layers import Llama3Scaling
from conftest import cpu_group
import reference as ref


@st.composite
def model_cases(draw):
    tp = draw(st.sampled_from([1, 2, 3, 4]))  # first, about evenly: then heads that can be split over it
    n_kv = draw(st.integers(1, 3))
    least = -(-tp // n_kv)  # kv groups of `least` q heads give at least tp q heads
    n_heads = n_kv * draw(st.integers(least, max(3, least)))
    hd = draw(st.sampled_from([2, 4, 8]))
    cfg = tpmax.ModelConfig(
        arch="llama", vocab_size=draw(st.integers(11, 41)), hidden_size=draw(st.integers(4, 20)),
        n_layers=draw(st.integers(1, 2)), n_heads=n_heads, n_kv_heads=n_kv, head_dim=hd,
        ffn_size=draw(st.integers(4, 19)), norm_eps=1e-5, rope_theta=draw(st.sampled_from([100.0, 10000.0])),
        rope_scaling=draw(st.sampled_from([None, Llama3Scaling(4.0, 1.0, 4.0, 8)])),
        rope_interleaved=draw(st.booleans()), activation=draw(st.sampled_from(["silu", "gelu_tanh"])),
        qkv_bias=draw(st.booleans()), qk_norm=draw(st.booleans()),
        sliding_window=draw(st.sampled_from([None, None, 1, 3])),
        attention_scale=draw(st.sampled_from([None, 0.3])),
        embedding_multiplier=draw(st.sampled_from([1.0, 2.0])), residual_multiplier=draw(st.sampled_from([1.0, 0.5])),
        logits_scaling=draw(st.sampled_from([1.0, 4.0])), tie_embeddings=draw(st.booleans()))
    seed = draw(st.integers(0, 10**6))
    return cfg, tp, seed


def build(cfg, tp, seed, *, stacked=False, page_size=3, num_pages=64):
    full = tpmax.random_weights(cfg, seed=seed, std=0.4)
    src = dict(full)
    if stacked:  # checkpoints with fused qkv_proj / gate_up_proj load to the same weights
        for i in range(cfg.n_layers):
            p = f"layers.{i}."
            src[p + "qkv_proj"] = np.concatenate([src.pop(p + n) for n in ("q_proj", "k_proj", "v_proj")])
            src[p + "gate_up_proj"] = np.concatenate([src.pop(p + n) for n in ("gate_proj", "up_proj")])
    devs = cpu_group(tp)
    weights = tpmax.shard_weights(tpmax.DictSource(src), cfg, devs)
    cache = new_cache(cfg, devs, page_size, num_pages)
    return full, weights, cache, tpmax.communicator(devs)


def new_cache(cfg, devs, page_size=3, num_pages=64):
    params = tpmax.KVCacheParams("float32", cfg.n_kv_heads, cfg.head_dim, page_size, cfg.n_layers, tuple(devs),
                                 n_heads=cfg.n_heads)
    return tpmax.PagedKVCache(params, num_pages)


def close(out, want):
    want = np.asarray(want)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(want).max()))


def run(weights, cfg, cache, comm, seqs, ids, **kw):
    """Reserve, forward, commit: what a caller of the forward pass does."""
    for s in ids:
        if s not in cache:
            cache.add(s)
    n_new = [len(s) for s in seqs]
    offs = np.cumsum([0] + n_new)
    slots = cache.reserve(ids, n_new)
    out = tpmax.distributed_transformer(weights, cfg, np.concatenate(seqs), offs, cache.pages, slots, comm, **kw)
    cache.commit(ids, n_new)
    return out


@settings(max_examples=120)
@given(model_cases(), st.lists(st.integers(1, 9), min_size=1, max_size=3), st.booleans(), st.data())
def test_ragged_prefill_equals_reference(case, lengths, stacked, data):
    cfg, tp, seed = case
    full, weights, cache, comm = build(cfg, tp, seed, stacked=stacked, page_size=data.draw(st.integers(1, 4)))
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(0, cfg.vocab_size, n) for n in lengths]
    last, logits, offs = run(weights, cfg, cache, comm, seqs, list(range(len(seqs))), return_logits=ReturnLogits.ALL)
    assert logits.dtype == np.float32 and logits.shape == (sum(lengths), cfg.vocab_size)
    for b, s in enumerate(seqs):
        want, _ = ref.forward(full, cfg, s)
        close(logits[offs[b]:offs[b + 1]], want)
        close(last[b], want[-1])


@settings(max_examples=60)
@given(model_cases(), st.integers(1, 6), st.integers(1, 5), st.data())
def test_prefill_then_decode_equals_full_forward(case, prompt_len, steps, data):
    cfg, tp, seed = case
    full, weights, cache, comm = build(cfg, tp, seed, page_size=data.draw(st.integers(1, 4)))
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, cfg.vocab_size, prompt_len + steps), rng.integers(0, cfg.vocab_size, 2 + steps)
    # Prefill both, then decode both one token per step in one ragged batch.
    run(weights, cfg, cache, comm, [a[:prompt_len], b[:2]], ["a", "b"])
    for t in range(steps):
        (last,) = run(weights, cfg, cache, comm, [a[prompt_len + t:prompt_len + t + 1], b[2 + t:3 + t]], ["a", "b"])
    close(last[0], ref.forward(full, cfg, a)[0][-1])
    close(last[1], ref.forward(full, cfg, b)[0][-1])
    assert cache.length("a") == prompt_len + steps and cache.length("b") == 2 + steps


@settings(max_examples=40)
@given(model_cases(), st.lists(st.integers(1, 7), min_size=2, max_size=4))
def test_ragged_batch_equals_each_sequence_alone(case, lengths):
    cfg, tp, seed = case
    _, weights, cache, comm = build(cfg, tp, seed)
    rng = np.random.default_rng(seed + 1)
    seqs = [rng.integers(0, cfg.vocab_size, n) for n in lengths]
    (together,) = run(weights, cfg, cache, comm, seqs, list(range(len(seqs))))
    for b, s in enumerate(seqs):
        (alone,) = run(weights, cfg, cache, comm, [s], [f"alone{b}"])
        close(together[b], alone[0])


@settings(max_examples=40)
@given(model_cases(), st.sampled_from(list(MHAMaskVariant)), st.integers(1, 8), st.integers(1, 4))
def test_attention_masks_equal_reference(case, mask, T, window):
    cfg, tp, seed = case
    cfg = dataclasses.replace(cfg, n_layers=1, sliding_window=None)
    full, weights, cache, comm = build(cfg, tp, seed)
    acfg = dataclasses.replace(cfg.attention(), mask=mask, sliding_window=window)
    x = np.random.default_rng(seed).standard_normal((T, cfg.hidden_size)).astype(np.float32)
    cache.add(0)
    inputs = attention_inputs(acfg, cfg.rope(), cache.reserve([0], [T]), comm.devices)
    out = tpmax.tensor_parallel_attention_with_rope([x] * tp, weights.layers[0].attn, acfg, inputs, cache.pages, 0,
                                                    comm)
    kind = {"causal": "causal", "sliding_window_causal": "sliding_window", "null": "null"}[mask.value]
    want = ref.attention(x.astype(np.float64), {k: v.astype(np.float64) for k, v in full.items()}, 0, cfg,
                         ref.make_mask(T, kind, window))
    for o in out:
        close(o, want)


@settings(max_examples=30)
@given(model_cases(), st.integers(1, 6))
def test_materialize_kv_from_hidden_writes_what_attention_writes(case, T):
    cfg, tp, seed = case
    _, weights, cache_a, comm = build(cfg, tp, seed)
    cache_b = new_cache(cfg, comm.devices)
    x = np.random.default_rng(seed).standard_normal((T, cfg.hidden_size)).astype(np.float32)
    acfg = cfg.attention()
    for cache in (cache_a, cache_b):
        cache.add(0)
    slots = cache_a.reserve([0], [T])
    cache_b.reserve([0], [T])  # same page ids as cache_a: both caches start empty
    inputs = attention_inputs(acfg, cfg.rope(), slots, comm.devices)
    tpmax.tensor_parallel_attention_with_rope([x] * tp, weights.layers[0].attn, acfg, inputs, cache_a.pages, 0, comm)
    tpmax.materialize_kv_from_hidden(0, [x] * tp, weights.layers[0].attn, acfg, cache_b.pages, inputs, comm)
    for pa, pb in zip(cache_a.pages, cache_b.pages):
        np.testing.assert_array_equal(pa, pb)
        assert np.abs(pb).sum() > 0


def test_logits_postprocess_modes():
    cfg = tpmax.ModelConfig(arch="llama", vocab_size=23, hidden_size=8, n_layers=1, n_heads=4, n_kv_heads=2,
                            head_dim=2, ffn_size=6, logits_scaling=2.0)
    full, weights, cache, comm = build(cfg, 3, 7)
    seqs = [np.array([1, 2, 3]), np.array([4, 5]), np.array([6, 7, 8, 9])]
    refs = [ref.forward(full, cfg, s) for s in seqs]
    last, var, var_offs, hid = run(weights, cfg, cache, comm, seqs, [0, 1, 2], return_logits=ReturnLogits.VARIABLE,
                                   return_n_logits=2, return_hidden_states=ReturnHiddenStates.LAST)
    close(last, np.stack([r[0][-1] for r in refs]))
    close(var, np.concatenate([r[0][-2:] for r in refs]))
    assert var_offs.tolist() == [0, 2, 4, 6]
    close(hid, np.stack([r[1][-1] for r in refs]))
    for mode, want in [(ReturnHiddenStates.ALL, np.concatenate([r[1] for r in refs])),
                       (ReturnHiddenStates.ALL_NORMALIZED,
                        np.concatenate([ref.rms(r[1], full["norm"].astype(np.float64), cfg.norm_eps) for r in refs]))]:
        out = run(weights, cfg, new_cache(cfg, comm.devices), comm, seqs, [0, 1, 2], return_hidden_states=mode)
        assert len(out) == 2
        close(out[1], want)
    with pytest.raises(ValueError, match="return_n_logits=3 but a sequence has only 2"):
        run(weights, cfg, new_cache(cfg, comm.devices), comm, seqs, [0, 1, 2],
            return_logits=ReturnLogits.VARIABLE, return_n_logits=3)


def test_subgraph_layer_groups_no_numeric_effect_and_checked():
    cfg = tpmax.ModelConfig(arch="llama", vocab_size=13, hidden_size=8, n_layers=3, n_heads=2, n_kv_heads=1,
                            head_dim=4, ffn_size=6)
    _, weights, cache, comm = build(cfg, 2, 1)
    (a,) = run(weights, cfg, cache, comm, [np.array([1, 2, 3])], ["x"])
    # MAX's grouping: any layers may share a group (layers still run in order); some in none.
    for groups in ([[0], [1, 2]], [[2, 0]], [[1]]):
        (b,) = run(weights, cfg, new_cache(cfg, comm.devices), comm, [np.array([1, 2, 3])], ["x"],
                   use_subgraphs=True, subgraph_layer_groups=groups)
        np.testing.assert_array_equal(a, b)
    for bad in ([[0], [0, 1]], [[]], [[3]], [[-1]], [[0, 0]]):
        with pytest.raises(ValueError, match="each layer in at most one group"):
            run(weights, cfg, new_cache(cfg, comm.devices), comm, [np.array([1])], ["x"], subgraph_layer_groups=bad)


def test_gemm_config_fused_matches_plain():
    cfg = tpmax.ModelConfig(arch="llama", vocab_size=31, hidden_size=16, n_layers=2, n_heads=4, n_kv_heads=2,
                            head_dim=4, ffn_size=13)
    _, weights, cache, comm = build(cfg, 3, 5)
    seqs = [np.arange(9) % 31, np.arange(4) + 3]
    plain = run(weights, cfg, cache, comm, seqs, [0, 1], return_logits=ReturnLogits.ALL)[1]
    fused = run(weights, cfg, new_cache(cfg, comm.devices), comm, seqs, [0, 1], return_logits=ReturnLogits.ALL,
                gemm_config=tpmax.DistributedGemmConfig(enable_matmul_allreduce=True, chunks=4))[1]
    close(fused, plain)  # the same up to float32 rounding: BLAS may block row chunks differently


# ------------------------------------------------------------------------------------------
# Bad input and the KV cache's error paths.


def small():
    cfg = tpmax.ModelConfig(arch="llama", vocab_size=17, hidden_size=8, n_layers=1, n_heads=2, n_kv_heads=1,
                            head_dim=4, ffn_size=6)
    return (cfg,) + build(cfg, 2, 3, page_size=2, num_pages=4)


def test_kv_cache_full_raises_for_the_requester_and_keeps_others():
    cfg, full, weights, cache, comm = small()
    a = np.array([1, 2, 3])
    run(weights, cfg, cache, comm, [a], ["a"])  # 2 pages
    snapshot = [p.copy() for p in cache.pages]
    cache.add("b")
    with pytest.raises(tpmax.KVCacheFullError, match="sequence 'b' needs 3 more page"):
        run(weights, cfg, cache, comm, [np.array([4, 5, 6, 7, 8])], ["b"])
    assert cache.free_pages == 2 and cache.length("b") == 0
    for p, s in zip(cache.pages, snapshot):
        np.testing.assert_array_equal(p, s)
    # A batch where the second sequence does not fit gives nothing to the first either.
    with pytest.raises(tpmax.KVCacheFullError, match="'b'"):
        run(weights, cfg, cache, comm, [np.array([9]), np.array([1, 2, 3, 4, 5])], ["a", "b"])
    assert cache.free_pages == 2 and cache.length("a") == 3
    (last,) = run(weights, cfg, cache, comm, [np.array([9])], ["a"])  # "a" carries on untouched
    close(last[0], ref.forward(full, cfg, np.array([1, 2, 3, 9]))[0][-1])
    cache.release("a")
    assert cache.free_pages == 4


@pytest.mark.parametrize("tokens, offsets, match", [
    ([1, 2, 3], [0, 3, 3], "rise strictly"),
    ([1, 2, 3], [0, 2], "rise strictly"),
    ([1, 2, 3], [1, 3], "rise strictly"),
    ([1, 99], [0, 2], "token id 99 outside"),
    ([1, -1], [0, 2], "token id -1 outside"),
    ([[1, 2]], [0, 2], "1-D integer array"),
    ([1.5, 2.0], [0, 2], "1-D integer array"),
])
def test_bad_ragged_batches(tokens, offsets, match):
    cfg, _, weights, cache, comm = small()
    for s in ("a", "b"):
        cache.add(s)
    free = cache.free_pages
    slots = cache.reserve(["a"], [1])
    with pytest.raises(ValueError, match=match):
        tpmax.distributed_transformer(weights, cfg, np.array(tokens), np.array(offsets), cache.pages, slots, comm)
    cache.rollback(["a"])
    assert cache.free_pages == free and cache.length("a") == 0


def test_cache_bookkeeping_errors():
    cfg, _, weights, cache, comm = small()
    with pytest.raises(KeyError, match="not in the KV cache"):
        cache.reserve(["nope"], [1])
    cache.add("a")
    with pytest.raises(ValueError, match="already in the KV cache"):
        cache.add("a")
    with pytest.raises(ValueError, match="twice"):
        cache.reserve(["a", "a"], [1, 1])
    slots = cache.reserve(["a"], [2])
    with pytest.raises(ValueError, match="reserved for a batch with offsets"):
        tpmax.distributed_transformer(weights, cfg, np.array([1]), np.array([0, 1]), cache.pages, slots, comm)
    cache.rollback(["a"])
    assert cache.free_pages == cache.num_pages
    with pytest.raises(ValueError, match="page_size must be positive"):
        tpmax.KVCacheParams("float32", 1, 4, 0, 1, tuple(comm.devices))


def test_kv_heads_per_device_with_replication():
    params = tpmax.KVCacheParams("float32", 2, 4, 8, 1, tuple(cpu_group(4)), n_heads=6)
    assert params.n_kv_heads_per_device == [1, 2, 1, 1]  # q heads 0-1|2-3|4|5 -> kv 0|0-1|1|1


@settings(max_examples=15)
@given(model_cases(), st.integers(1, 12))
def test_device_threads_and_query_blocks_change_nothing(case, T):
    cfg, tp, seed = case
    full, weights, cache, comm = build(cfg, tp, seed)
    seq = np.random.default_rng(seed).integers(0, cfg.vocab_size, T)
    # Blocks of 3 queries: several per sequence, each with its own key range.
    (_, blocked, _) = run(weights, cfg, cache, comm, [seq], ["s"], return_logits=ReturnLogits.ALL, threads=True,
                          attention_block=3)
    close(blocked, ref.forward(full, cfg, seq)[0])
