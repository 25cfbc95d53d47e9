"""The decode-step kernels: every `.cu` source compiles with NVRTC for sm_80 and sm_90 without
spills (registers printed); every NumPy twin equals the unfused tpmax layers or a float64
reference; the decode step built from the twins equals `tpmax.distributed_transformer`; the
sampling twin draws from exactly tpmax.generation.sampling.sample's distribution.

Tolerances: float32 twins vs float32 tpmax layers rtol = atol = 1e-5 (scaled by the output's
magnitude; only the summation order differs); bfloat16 twins vs a float64 reference 3e-2 of
the output's magnitude (bf16 has 8 significant bits, inputs and outputs are rounded)."""
import configparser
import fnmatch
import importlib
import json
import math
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import tpmax
from tpmax import bfloat16
from tpmax.nn.attention import AttentionWeights, qkv_rope
from tpmax.generation.sampling import SamplingParams, sample
from tpmax.kernels import compile as nvrtc, twins
from tpmax.kernels.step import fused_decode_sample, fused_decode_step
from tpmax.nn.kv_cache import gather_kv, write_kv
from tpmax.nn.layers import RopeTables, linear, mlp_local, rms_norm
from tpmax.checkpoint.loader import load
from tpmax.nn.quant import FP8Weight, GPTQWeight, pack_int32
from tpmax.core.sharding import head_shard
from conftest import requires_gpu
from test_transformer import build, model_cases, new_cache
import reference as ref

def close(out, want, tol=1e-5):
    want = np.asarray(want, np.float64)
    np.testing.assert_allclose(np.asarray(out, np.float64), want, rtol=tol, atol=tol * max(1.0, np.abs(want).max()))


def bf16_close(out, want):
    """bf16 twin output vs a float64 reference computed from the same bf16-rounded inputs."""
    close(out, want, 3e-2)


# ------------------------------------------------------------------------------------------
# NVRTC: every kernel compiles for sm_80 and sm_90, no spills.

needs_nvrtc = pytest.mark.skipif(not nvrtc.nvrtc_available(),
                                 reason="NVRTC missing: pip install nvidia-cuda-nvrtc-cu12 nvidia-cuda-runtime-cu12")


@needs_nvrtc
@pytest.mark.parametrize("arch", nvrtc.ARCHS)
@pytest.mark.parametrize("name", nvrtc.SOURCES)
def test_kernel_compiles_without_spills(name, arch):
    cubin, log = nvrtc.compile_cubin(name, arch)
    res = nvrtc.kernel_resources(cubin, log)
    assert set(res) == set(nvrtc.KERNELS[name])
    for r in res.values():
        print(f"{arch} {name}:{r.name}: {r.registers} registers, {r.spill_stores} B spill stores, "
              f"{r.spill_loads} B spill loads, {r.stack_frame} B stack")
        assert r.spill_stores == r.spill_loads == r.stack_frame == 0, f"{r.name} uses local memory on {arch}"
        assert 0 < r.registers <= 255


@needs_nvrtc
def test_compile_error_is_reported(tmp_path, monkeypatch):
    (tmp_path / "gemv.cu").write_text('extern "C" __global__ void k() { undeclared(); }\n')
    monkeypatch.setattr(nvrtc, "KERNEL_DIR", tmp_path)
    with pytest.raises(nvrtc.CompileError, match="undeclared"):
        nvrtc.compile_cubin("gemv.cu", "sm_90")
    with pytest.raises(ValueError, match="sm_70"):
        nvrtc.options("sm_70")


# ------------------------------------------------------------------------------------------
# gemv.cu twins vs tpmax.layers.


@settings(max_examples=40, derandomize=True)
@given(st.integers(1, 8), st.integers(1, 12).map(lambda k: 8 * k), st.integers(1, 17), st.integers(0, 10**6),
       st.sampled_from(["silu", "gelu_tanh"]))
def test_gemv_twins_equal_tpmax_layers(B, K, N, seed, act):
    rng = np.random.default_rng(seed)
    x, w, nw = rng.standard_normal((B, K), np.float32), rng.standard_normal((N, K), np.float32), \
        (1 + 0.1 * rng.standard_normal(K)).astype(np.float32)
    res = rng.standard_normal((B, N), np.float32)
    close(twins.gemv(x, w), linear(x, w))
    close(twins.gemv(x, w, residual=res, out_scale=0.5), res + 0.5 * linear(x, w))
    normed = rms_norm(x, nw, eps=1e-5)
    close(twins.rms_norm_rows(x, nw, eps=1e-5), normed)
    close(twins.gemv(x, w, norm_w=nw, eps=1e-5, out_scale=0.25, out_dtype=np.float32), linear(normed, w) / 4)
    w13, w2 = rng.standard_normal((2 * N, K), np.float32), np.eye(N, dtype=np.float32)
    want = mlp_local(normed, w13, w2, act=act)  # down = identity: act(gate) * up
    close(twins.gemv(x, w13, norm_w=nw, eps=1e-5, glu=act), want)
    close(twins.glu(linear(normed, w13), act=act), want)
    close(twins.residual_add(x[:, :1], res[:, :1], scale=0.5), x[:, :1] + 0.5 * res[:, :1])


@settings(max_examples=20, derandomize=True)
@given(st.integers(1, 8), st.integers(1, 8).map(lambda k: 8 * k), st.integers(1, 9), st.integers(0, 10**6))
def test_gemv_twins_bf16(B, K, N, seed):
    rng = np.random.default_rng(seed)
    x, w = rng.standard_normal((B, K)).astype(bfloat16), rng.standard_normal((2 * N, K)).astype(bfloat16)
    nw = (1 + 0.1 * rng.standard_normal(K)).astype(bfloat16)
    x64, w64, n64 = (a.astype(np.float64) for a in (x, w, nw))
    y = twins.gemv(x, w, norm_w=nw, eps=1e-5)
    assert y.dtype == bfloat16
    bf16_close(y, ref.rms(x64, n64, 1e-5) @ w64.T)
    g = ref.rms(x64, n64, 1e-5) @ w64.T
    bf16_close(twins.gemv(x, w, norm_w=nw, eps=1e-5, glu="silu"), ref.act("silu", g[:, :N]) * g[:, N:])


def test_gemv_rejects_too_many_rows():
    with pytest.raises(ValueError, match="1 <= B <= 8"):
        twins.gemv(np.zeros((9, 8), np.float32), np.zeros((2, 8), np.float32))
    with pytest.raises(ValueError, match="relu"):
        twins.gemv(np.zeros((1, 8), np.float32), np.zeros((2, 8), np.float32), glu="relu")


# ------------------------------------------------------------------------------------------
# qkv_rope.cu twin vs tpmax.nn.attention.qkv_rope + write_kv.


@settings(max_examples=40, derandomize=True)
@given(st.integers(1, 8), st.integers(1, 3), st.integers(1, 3), st.sampled_from([2, 4, 8]), st.booleans(),
       st.booleans(), st.booleans(), st.integers(0, 10**6))
def test_qkv_rope_twin_equals_tpmax(B, n_kv, g, hd, interleaved, bias, qk_norm, seed):
    rng = np.random.default_rng(seed)
    n_q, D, num_layers, num_pages, ps = n_kv * g, 8, 2, 6, 3
    heads = head_shard(n_q, n_kv, 1, 0)
    cfg = tpmax.AttentionConfig(n_q, n_kv, hd, qk_norm_eps=1e-5 if qk_norm else None)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    w = AttentionWeights(f((n_q + 2 * n_kv) * hd, D), f(D, n_q * hd), f((n_q + 2 * n_kv) * hd) if bias else None,
                         1 + 0.1 * f(hd) if qk_norm else None, 1 + 0.1 * f(hd) if qk_norm else None)
    x = f(B, D)
    positions = rng.choice(num_pages * ps, B, replace=False)
    page, slot = rng.permutation(num_pages)[positions // ps], positions % ps
    rope = tpmax.RotaryEmbedding(D, n_q, 10000.0, 64, head_dim=hd, interleaved=interleaved)
    cos, sin = rope.cos_sin(positions)
    want_pages, pages = np.zeros((num_layers, 2, num_pages, ps, n_kv, hd), np.float32), np.zeros(
        (num_layers, 2, num_pages, ps, n_kv, hd), np.float32)
    q_want, k, v = qkv_rope(x, w, heads, cfg, RopeTables.build(cos, sin, interleaved=interleaved))
    write_kv(want_pages, 1, k, v, page, slot)
    cos_tab, sin_tab = rope.cos_sin(np.arange(num_pages * ps))
    q = twins.qkv_rope_kv_write(linear(x, w.wqkv), w.bqkv, w.q_norm, w.k_norm, 1e-5, cos_tab, sin_tab, positions,
                                page, slot, pages, 1, n_q=n_q, n_kv=n_kv, head_dim=hd, interleaved=interleaved)
    close(q, q_want)
    close(pages, want_pages)


# ------------------------------------------------------------------------------------------
# flash_decode.cu twin vs a float64 softmax over the gathered cache.


@settings(max_examples=40, derandomize=True)
@given(st.integers(1, 5), st.integers(1, 3), st.integers(1, 3), st.sampled_from([2, 8]), st.integers(1, 4),
       st.sampled_from([0, 1, 3, 7]), st.integers(1, 5), st.integers(0, 10**6), st.booleans())
def test_flash_decode_twin_equals_reference(B, n_kv, g, hd, ps, window, chunk, seed, in_bf16):
    rng = np.random.default_rng(seed)
    n_q, num_pages = n_kv * g, 24
    dt = bfloat16 if in_bf16 else np.float32
    pages = rng.standard_normal((2, 2, num_pages, ps, n_kv, hd)).astype(dt)
    lengths = rng.integers(1, 4 * ps + 1, B)
    owned = rng.permutation(num_pages)
    tables = np.stack([owned[b * 4:(b + 1) * 4] for b in range(B)])  # [B, 4] pages, at most 4*ps tokens
    q = rng.standard_normal((B, n_q, hd)).astype(dt)
    kv_of_q = np.arange(n_q) // g
    out = twins.flash_decode(q, pages, 1, tables, lengths, kv_of_q, scale=0.7, window=window, chunk=chunk)
    for b in range(B):
        k, v = (a.astype(np.float64) for a in gather_kv(pages, 1, tables[b], int(lengths[b])))  # [L, n_kv, hd]
        lo = max(0, lengths[b] - window) if window else 0
        for h in range(n_q):
            s = k[lo:, kv_of_q[h]] @ q[b, h].astype(np.float64) * 0.7
            p = np.exp(s - s.max())
            want = p @ v[lo:, kv_of_q[h]] / p.sum()
            (bf16_close if in_bf16 else close)(out[b, h], want)


def test_flash_decode_irregular_head_map():
    """kv heads replicated unevenly (TP > n_kv): each q head reads the kv head its map names."""
    rng = np.random.default_rng(0)
    pages = rng.standard_normal((1, 2, 4, 2, 2, 4)).astype(np.float32)
    q = rng.standard_normal((1, 3, 4)).astype(np.float32)
    kv_of_q = np.array([0, 1, 1])
    out = twins.flash_decode(q, pages, 0, np.array([[2, 0]]), np.array([3]), kv_of_q, scale=1.0, chunk=2)
    for h in range(3):
        one = twins.flash_decode(q[:, h:h + 1], pages[..., kv_of_q[h]:kv_of_q[h] + 1, :], 0, np.array([[2, 0]]),
                                 np.array([3]), np.array([0]), scale=1.0, chunk=8)
        close(out[:, h], one[:, 0])


# ------------------------------------------------------------------------------------------
# sample.cu twin: tpmax.generation.sampling.sample's distribution.


class _Capture:
    """A stand-in rng: records the probabilities tpmax.generation.sampling.sample draws from."""

    def choice(self, n, p):
        self.p = np.asarray(p)
        return 0


def host_probs(logits, temperature, top_k, top_p):
    """The exact distribution of tpmax.generation.sampling.sample (`[V]` float64)."""
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    if temperature == 0:
        return np.eye(len(logits))[sample(logits, params, None)]
    cap = _Capture()
    sample(logits, params, cap)
    return cap.p


@settings(max_examples=200, derandomize=True)
@given(st.integers(2, 60), st.sampled_from([0.0, 0.3, 1.0, 2.5]), st.integers(0, 70),
       st.sampled_from([1.0, 0.05, 0.5, 0.83, 0.999]), st.integers(0, 10**6), st.booleans())
def test_kept_probs_equal_host_sampling(V, T, k, p, seed, ties):
    rng = np.random.default_rng(seed)
    lg = (rng.integers(-3, 3, V) if ties else 3 * rng.standard_normal(V)).astype(np.float32)
    np.testing.assert_allclose(twins.kept_probs(lg, T, k, p), host_probs(lg, T, k, p), rtol=1e-5, atol=1e-12)


def test_ties_at_the_top_p_boundary_follow_index_order():
    lg = np.zeros(4, np.float32)  # p = 1/4 each: top_p 0.5 keeps the first two
    np.testing.assert_array_equal(twins.kept_probs(lg, 1.0, 0, 0.5), host_probs(lg, 1.0, 0, 0.5))
    assert twins.kept_probs(lg, 1.0, 0, 0.5).tolist() == [0.5, 0.5, 0, 0]


def chi2_critical(df, z=3.719):
    """Wilson-Hilferty: the chi-square quantile at the standard normal quantile z (3.719 = 1e-4)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("T, k, p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (1.0, 6, 0.9)])
def test_sample_tokens_chi_square(T, k, p):
    rng = np.random.default_rng(7)
    lg = rng.standard_normal(12).astype(np.float32)
    n = 6000
    want = host_probs(lg, T, k, p)
    B = np.ones(n)
    ids = twins.sample_tokens(np.repeat(lg[None], n, 0), T * B, (k * B).astype(int), p * B,
                              np.full(n, 1234), np.arange(n))
    counts = np.bincount(ids, minlength=len(lg))
    assert not counts[want == 0].any()
    expected = n * want[want > 0]
    stat = ((counts[want > 0] - expected) ** 2 / expected).sum()
    assert stat < chi2_critical(len(expected) - 1), (stat, counts, expected)


def test_sample_tokens_greedy_and_deterministic():
    lg = np.array([[0.1, 3.0, 3.0, -1], [5, 0, 0, 0]], np.float32)
    one = np.ones(2)
    assert twins.sample_tokens(lg, 0 * one, 0 * one, one, one, one).tolist() == [1, 0]
    a = twins.sample_tokens(lg, one, 0 * one, one, np.array([9, 9]), np.array([4, 5]))
    assert (a == twins.sample_tokens(lg, one, 0 * one, one, np.array([9, 9]), np.array([4, 5]))).all()


# ------------------------------------------------------------------------------------------
# dequant_gemv.cu twins vs tpmax.quant.


@settings(max_examples=30, derandomize=True)
@given(st.integers(1, 8), st.integers(1, 6), st.sampled_from([8, 16, 32]), st.integers(1, 9).map(lambda n: 4 * n),
       st.booleans(), st.integers(0, 10**6))
def test_gptq_twin_equals_dequantized_matmul(B, groups, gs, N, desc_act, seed):
    rng = np.random.default_rng(seed)
    K = groups * gs
    q = rng.integers(0, 16, (K, N))
    scales = (0.01 + 0.1 * rng.random((groups, N))).astype(np.float16)
    zeros = rng.integers(0, 16, (groups, N)).astype(np.uint8)
    g_idx = rng.permutation(np.arange(K) // gs) if desc_act else np.arange(K) // gs
    wq = GPTQWeight(pack_int32(q, 4, axis=0), scales, zeros, g_idx.astype(np.int16), 4, K, 0 if desc_act else gs)
    x = rng.standard_normal((B, K)).astype(np.float32)
    y = twins.gptq_int4_gemv(x, wq.qweight, scales, zeros, g_idx if desc_act else None, group_size=gs, in_features=K)
    close(y, x @ wq.dequantize().T)
    close(y, wq.matmul_t(x))


@settings(max_examples=30, derandomize=True)
@given(st.integers(1, 8), st.integers(1, 4).map(lambda k: 16 * k), st.integers(1, 9), st.booleans(),
       st.integers(0, 10**6))
def test_fp8_twin_equals_dequantized_matmul(B, K, N, rowwise, seed):
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 256, (N, K)).astype(np.uint8)
    bits[(bits & 0x7F) == 0x7F] = 0  # no NaN patterns
    scale = (0.5 + rng.random(N if rowwise else ())).astype(np.float32)
    wq = FP8Weight(bits, scale)
    x = rng.standard_normal((B, K)).astype(np.float32)
    y = twins.fp8_e4m3_gemv(x, bits, scale)
    close(y, x @ wq.dequantize().T)


# ------------------------------------------------------------------------------------------
# The decode step from twins == tpmax.distributed_transformer.


def _model(cfg, tp, seed):
    _, weights, _, comm = build(cfg, tp, seed)
    return weights, comm, comm.devices


@settings(max_examples=40, derandomize=True)
@given(model_cases(), st.lists(st.integers(1, 9), min_size=1, max_size=10), st.sampled_from([1, 2, 256]))
def test_fused_decode_step_equals_distributed_transformer(case, lengths, chunk):
    """Up to 10 sequences (two GEMV row blocks), splits of 1, 2 or 256 keys."""
    cfg, tp, seed = case
    weights, comm, devs = _model(cfg, tp, seed)
    rng = np.random.default_rng(seed)
    ref_cache, fused_cache = new_cache(cfg, devs), new_cache(cfg, devs)
    ids = list(range(len(lengths)))
    seqs = [rng.integers(0, cfg.vocab_size, n) for n in lengths]
    for cache in (ref_cache, fused_cache):  # the same prefill into both caches
        for s in ids:
            cache.add(s)
        slots = cache.reserve(ids, lengths)
        last = tpmax.distributed_transformer(weights, cfg, np.concatenate(seqs), np.cumsum([0] + lengths),
                                             cache.pages, slots, comm)[0]
        cache.commit(ids, lengths)
    one = [1] * len(ids)
    for _ in range(3):
        tokens = np.argmax(last, axis=-1)
        slots = ref_cache.reserve(ids, one)
        last = tpmax.distributed_transformer(weights, cfg, tokens, np.arange(len(ids) + 1), ref_cache.pages, slots,
                                             comm)[0]
        ref_cache.commit(ids, one)
        slots = fused_cache.reserve(ids, one)
        fused = fused_decode_step(weights, cfg, tokens, fused_cache.pages, slots, comm, chunk=chunk)
        fused_cache.commit(ids, one)
        close(fused, last, 1e-4)  # float32 through 2 layers and 3 steps, summed in another order
        for a, b in zip(fused_cache.pages, ref_cache.pages):
            close(a, b, 1e-4)


def test_fused_decode_sample_greedy_and_errors():
    cfg = tpmax.ModelConfig(arch="llama", vocab_size=19, hidden_size=8, n_layers=1, n_heads=2, n_kv_heads=1,
                            head_dim=4, ffn_size=6, norm_eps=1e-5)
    weights, comm, devs = _model(cfg, 2, 3)
    cache = new_cache(cfg, devs)
    cache.add(0)
    slots = cache.reserve([0], [2])
    with pytest.raises(ValueError, match="one new token per sequence"):
        fused_decode_step(weights, cfg, np.array([1, 2]), cache.pages, slots, comm)
    cache.rollback([0])
    slots = cache.reserve([0], [1])
    logits = tpmax.distributed_transformer(weights, cfg, np.array([5]), np.array([0, 1]), cache.pages, slots, comm)[0]
    cache.rollback([0])
    slots = cache.reserve([0], [1])
    ids = fused_decode_sample(weights, cfg, np.array([5]), cache.pages, slots, comm, temperature=[0.0], top_k=[0],
                              top_p=[1.0], seed=[0])
    assert ids.tolist() == [int(np.argmax(logits[0]))]


HF_FIXTURES = sorted(p.name for p in (Path(__file__).parent / "fixtures" / "hf").iterdir() if p.is_dir())


@pytest.mark.filterwarnings("ignore:dtype bfloat16 on CPU")
@pytest.mark.parametrize("tp, dtype", [(1, "float32"), (3, "float32"), (2, "bfloat16")])
@pytest.mark.parametrize("case", HF_FIXTURES)
def test_fused_decode_step_on_hf_fixtures(case, tp, dtype):
    """Every HF fixture, quantized ones included: prefill, then 3 decode steps of 2 sequences;
    float32 within 1e-4, bfloat16 (weights, activations, cache) within 3e-2 of the logits' range."""
    model = load(Path(__file__).parent / "fixtures" / "hf" / case, devices="cpu:" + ",".join(map(str, range(tp))),
                 dtype=dtype, progress=False)
    ref_cache, fused_cache = (model.executor.new_cache(64, page_size=4) for _ in range(2))
    ids, prompts = [0, 1], [[3, 5, 7, 9, 11], [2, 4]]
    for cache in (ref_cache, fused_cache):
        for s in ids:
            cache.add(s)
        last = model.executor.run(cache, model.executor.step(ids, prompts))[0]
    for _ in range(3):
        tokens = np.argmax(last, axis=-1)
        last = model.executor.run(ref_cache, model.executor.step(ids, [[t] for t in tokens]))[0]
        slots = fused_cache.reserve(ids, [1, 1])
        fused = fused_decode_step(model.weights, model.cfg, tokens, fused_cache.pages, slots, model.comm)
        fused_cache.commit(ids, [1, 1])
        close(fused, last, 1e-4 if dtype == "float32" else 3e-2)


# ------------------------------------------------------------------------------------------
# On a GPU: every kernel against its twin (bf16 tolerances). Skipped without a device.

def _gpu_ops():
    import cupy as cp
    return cp, importlib.import_module("tpmax.kernels.gpu_ops")


def _bf(rng, *shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(bfloat16)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("B, N, K", [(1, 4096, 4096), (8, 1000, 256), (3, 7, 8), (2, 33, 100)])
def test_gpu_gemv_family_equals_twins(B, N, K):
    cp, ops = _gpu_ops()
    rng = np.random.default_rng(0)
    x, w, w13, nw, res = _bf(rng, B, K), _bf(rng, N, K, scale=0.05), _bf(rng, 2 * N, K, scale=0.05), \
        (1 + 0.1 * rng.standard_normal(K)).astype(bfloat16), _bf(rng, B, N)
    d = cp.asarray
    bf16_close(cp.asnumpy(ops.gemv(d(x), d(w))), twins.gemv(x, w))
    bf16_close(cp.asnumpy(ops.gemv(d(x), d(w), residual=d(res), out_scale=0.5)), twins.gemv(x, w, residual=res,
                                                                                             out_scale=0.5))
    bf16_close(cp.asnumpy(ops.gemv(d(x), d(w), norm_w=d(nw), eps=1e-5)), twins.gemv(x, w, norm_w=nw, eps=1e-5))
    bf16_close(cp.asnumpy(ops.gemv(d(x), d(w), norm_w=d(nw), eps=1e-5, out_dtype=np.float32, out_scale=0.25)),
               twins.gemv(x, w, norm_w=nw, eps=1e-5, out_dtype=np.float32, out_scale=0.25))
    for act in twins.ACTS:
        bf16_close(cp.asnumpy(ops.gemv(d(x), d(w13), norm_w=d(nw), eps=1e-5, glu=act)),
                   twins.gemv(x, w13, norm_w=nw, eps=1e-5, glu=act))
        gu = _bf(rng, B, 2 * N)
        bf16_close(cp.asnumpy(ops.glu(d(gu), act=act)), twins.glu(gu, act=act))
    bf16_close(cp.asnumpy(ops.rms_norm_rows(d(x), d(nw), eps=1e-5)), twins.rms_norm_rows(x, nw, eps=1e-5))
    bf16_close(cp.asnumpy(ops.residual_add(d(res), d(res), scale=0.5)), twins.residual_add(res, res, scale=0.5))


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("n_q, n_kv, hd, qk_norm", [(32, 8, 128, False), (6, 2, 64, True), (4, 2, 80, True)])
def test_gpu_qkv_rope_and_flash_decode_equal_twins(n_q, n_kv, hd, qk_norm, interleaved):
    cp, ops = _gpu_ops()
    rng = np.random.default_rng(1)
    B, ps, num_pages, window = 4, 16, 64, 0
    pages = _bf(rng, 2, 2, num_pages, ps, n_kv, hd)
    qkv, bias = _bf(rng, B, (n_q + 2 * n_kv) * hd), _bf(rng, (n_q + 2 * n_kv) * hd)
    qn, kn = ((1 + 0.1 * rng.standard_normal(hd)).astype(bfloat16) for _ in range(2)) if qk_norm else (None, None)
    tables = rng.permutation(num_pages)[:B * 16].reshape(B, 16).astype(np.int32)
    lengths = np.array([1, 17, 200, 256], np.int32)
    pos = lengths - 1
    page, slot = tables[np.arange(B), pos // ps], (pos % ps).astype(np.int32)
    rope = tpmax.RotaryEmbedding(n_q * hd, n_q, 10000.0, 256, head_dim=hd, interleaved=interleaved)
    cos, sin = rope.cos_sin(np.arange(256))
    d = lambda a: None if a is None else cp.asarray(a)  # noqa: E731
    gpages = d(pages)
    q = ops.qkv_rope_kv_write(d(qkv), d(bias), d(qn), d(kn), 1e-5, d(cos), d(sin), d(pos), d(page), d(slot), gpages, 1,
                              n_q=n_q, n_kv=n_kv, head_dim=hd, interleaved=interleaved)
    q_twin = twins.qkv_rope_kv_write(qkv, bias, qn, kn, 1e-5, cos, sin, pos, page, slot, pages, 1, n_q=n_q, n_kv=n_kv,
                                     head_dim=hd, interleaved=interleaved)
    bf16_close(cp.asnumpy(q), q_twin)
    bf16_close(cp.asnumpy(gpages).astype(np.float32), pages.astype(np.float32))
    kv_of_q = np.arange(n_q) // (n_q // n_kv)
    for window, chunk in [(0, 256), (0, 64), (100, 32)]:
        out = ops.flash_decode(q, gpages, 1, d(tables), d(lengths), kv_of_q, scale=0.1, window=window, chunk=chunk)
        bf16_close(cp.asnumpy(out), twins.flash_decode(q_twin, pages, 1, tables, lengths, kv_of_q, scale=0.1,
                                                      window=window, chunk=chunk))


@pytest.mark.gpu
@requires_gpu
def test_gpu_sample_tokens_distribution():
    cp, ops = _gpu_ops()
    rng = np.random.default_rng(2)
    lg = rng.standard_normal(12).astype(np.float32)
    n = 6000
    for T, k, p in [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (1.0, 6, 0.9)]:
        ones = cp.ones(n)
        ids = cp.asnumpy(ops.sample_tokens(cp.asarray(np.repeat(lg[None], n, 0)), T * ones, k * ones, p * ones,
                                           cp.full(n, 1234), cp.arange(n)))
        want = host_probs(lg, T, k, p)
        counts = np.bincount(ids, minlength=len(lg))
        assert not counts[want == 0].any()
        if T > 0:
            expected = n * want[want > 0]
            assert ((counts[want > 0] - expected) ** 2 / expected).sum() < chi2_critical(len(expected) - 1)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("desc_act, K, N", [(False, 512, 384), (True, 512, 384), (False, 96, 30)])
def test_gpu_dequant_gemv_equal_twins(desc_act, K, N):
    cp, ops = _gpu_ops()
    rng = np.random.default_rng(3)
    B, gs = 4, 32
    q = rng.integers(0, 16, (K, N))
    scales = (0.01 + 0.01 * rng.random((K // gs, N))).astype(np.float16)
    zeros = rng.integers(0, 16, (K // gs, N)).astype(np.uint8)
    g_idx = rng.permutation(np.arange(K) // gs).astype(np.int32) if desc_act else None
    qw, x = pack_int32(q, 4, axis=0), _bf(rng, B, K)
    d = lambda a: None if a is None else cp.asarray(a)  # noqa: E731
    bf16_close(cp.asnumpy(ops.gptq_int4_gemv(d(x), d(qw), d(scales), d(zeros), d(g_idx), group_size=gs,
                                             in_features=K)),
               twins.gptq_int4_gemv(x, qw, scales, zeros, g_idx, group_size=gs, in_features=K))
    bits = rng.integers(0, 256, (N, K)).astype(np.uint8)
    bits[(bits & 0x7F) >= 0x70] = 0x38  # no NaN, moderate magnitudes
    for scale in (np.float32(0.01), (0.01 * (1 + rng.random(N))).astype(np.float32)):
        bf16_close(cp.asnumpy(ops.fp8_e4m3_gemv(d(x), d(bits), d(np.asarray(scale)))),
                   twins.fp8_e4m3_gemv(x, bits, scale))


# ------------------------------------------------------------------------------------------
# On the CPU: the CuPy launchers pass every kernel the arguments its C signature declares.

_C_TYPES = {"__nv_bfloat16": bfloat16, "float": np.float32, "int": np.int32, "unsigned char": np.uint8,
            "__half": np.float16, "long long": np.int64, "u64": np.uint64}
_SIGNATURE = re.compile(r'extern "C" __global__ void (?:__launch_bounds__\([^)]*\)\s*)?(\w+)\(([^)]*)\)', re.S)


def kernel_signatures():
    """kernel -> [(C type, is pointer)] for every kernel of every source."""
    sigs = {}
    for name in nvrtc.SOURCES:
        for kernel, params in _SIGNATURE.findall(nvrtc.source(name)):
            args = [re.sub(r"\bconst\b", "", p).strip() for p in params.split(",")]
            sigs[kernel] = [(re.sub(r"\s*\*?\s*\w+$", "", a).strip(), "*" in a) for a in args]
    return sigs


class _FakeCupy(types.ModuleType):
    """Enough of CuPy for the launchers to run on NumPy arrays; launches are recorded."""

    def __init__(self):
        super().__init__("cupy")
        self.launches = []
        fake = self

        class RawModule:
            def __init__(self, code, options):
                self.code = code

            def get_function(self, kernel):
                return lambda grid, block, args: fake.launches.append((kernel, grid, block, args))

        class Device:
            def __init__(self, i=0):
                self.id = i

            def __enter__(self):
                return self

            def __exit__(self, *a):
                return False

        self.RawModule = RawModule
        self.cuda = types.SimpleNamespace(Device=Device, runtime=types.SimpleNamespace(runtimeGetVersion=lambda: 12090))
        for f in ("empty", "empty_like", "asarray", "ones", "full", "arange"):
            setattr(self, f, getattr(np, f))
        self.asnumpy = np.asarray


def test_launchers_match_kernel_signatures(monkeypatch):
    fake = _FakeCupy()
    monkeypatch.setitem(sys.modules, "cupy", fake)
    real = sys.modules.pop("tpmax.kernels.gpu_ops", None)
    try:
        ops = importlib.import_module("tpmax.kernels.gpu_ops")
        _launch_every_kernel(ops)
    finally:  # the module bound to the fake CuPy must not outlive this test
        sys.modules.pop("tpmax.kernels.gpu_ops", None)
        if real is not None:
            sys.modules["tpmax.kernels.gpu_ops"] = real
    sigs = kernel_signatures()
    assert {k for k, *_ in fake.launches} == set(sigs)  # every kernel launched
    for kernel, grid, block, args in fake.launches:
        assert len(args) == len(sigs[kernel]), kernel
        assert np.prod(block) <= 1024 and all(g >= 1 for g in grid), (kernel, grid, block)
        for (ctype, is_ptr), a in zip(sigs[kernel], args):
            if is_ptr and isinstance(a, np.ndarray) and a.ndim:  # an array (a uint64 0 is a null pointer)
                assert a.dtype == _C_TYPES[ctype] and a.flags.c_contiguous, (kernel, ctype, a.dtype)
            else:
                assert (a.dtype == np.uint64 and a == 0) if is_ptr else a.dtype == _C_TYPES[ctype], (kernel, ctype, a)


def _launch_every_kernel(ops):
    rng = np.random.default_rng(0)
    B, K, N, hd, n_q, n_kv = 2, 32, 8, 8, 4, 2
    x, w, nw = _bf(rng, B, K), _bf(rng, N, K), _bf(rng, K)
    ops.gemv(x, w)
    ops.gemv(x, w, residual=_bf(rng, B, N))
    ops.gemv(x, w, norm_w=nw, eps=1e-5)
    ops.gemv(x, w, norm_w=nw, eps=1e-5, out_dtype=np.float32)
    ops.gemv(x, _bf(rng, 2 * N, K), norm_w=nw, eps=1e-5, glu="silu")
    ops.rms_norm_rows(x, nw, eps=1e-5)
    ops.glu(_bf(rng, B, 2 * N), act="gelu_tanh")
    ops.residual_add(x, x)
    pages = _bf(rng, 2, 2, 4, 4, n_kv, hd)
    i32 = lambda *a: np.array(a, np.int32)  # noqa: E731
    cos = np.ones((8, hd // 2), np.float32)
    q = ops.qkv_rope_kv_write(_bf(rng, B, (n_q + 2 * n_kv) * hd), None, nw[:hd], nw[:hd], 1e-5, cos, cos, i32(1, 2),
                              i32(0, 1), i32(1, 2), pages, 1, n_q=n_q, n_kv=n_kv, head_dim=hd, interleaved=True)
    ops.flash_decode(q, pages, 1, i32(0, 1, 2, 3).reshape(2, 2), i32(2, 3), np.arange(n_q) // 2, scale=0.5, chunk=2)
    ops.sample_tokens(np.zeros((B, 5), np.float32), np.ones(B), np.zeros(B), np.ones(B), np.zeros(B), np.arange(B))
    ops.gptq_int4_gemv(x, np.zeros((K // 8, N), np.int32), np.ones((2, N), np.float16), np.zeros((2, N), np.uint8),
                       np.zeros(K, np.int16), group_size=16, in_features=K)
    ops.fp8_e4m3_gemv(x, np.zeros((N, K), np.uint8), np.float32(1.0))


# ------------------------------------------------------------------------------------------
# bench/device_check.sh: the extra comes from the driver's CUDA version.

DEVICE_CHECK = Path(__file__).parent.parent / "bench" / "device_check.sh"


def _fake_smi(tmp_path, text):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\necho '{text}'\n")
    smi.chmod(0o755)
    return bin_dir


@pytest.mark.parametrize("smi, rc, says", [
    ("| NVIDIA-SMI 535.1  Driver Version: 535.1  CUDA Version: 11.8 |", 2, "CUDA '11'"),
    ("nvidia-smi: command failed", 2, "CUDA ''"),
])
def test_device_check_refuses_unsupported_drivers(tmp_path, smi, rc, says):
    env = {"PATH": f"{_fake_smi(tmp_path, smi)}:/usr/bin:/bin", "OUT": str(tmp_path / "out"), "VENV": str(tmp_path / "v")}
    r = subprocess.run(["bash", str(DEVICE_CHECK)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == rc and says in r.stdout, r.stdout + r.stderr
    assert (tmp_path / "out" / "nvidia-smi.txt").read_text().strip() == smi
    assert not (tmp_path / "v").exists()  # nothing installed


def test_device_check_extras_and_time_limits():
    text = DEVICE_CHECK.read_text()
    cfg = configparser.ConfigParser()
    cfg.read(DEVICE_CHECK.parent.parent / "setup.cfg")
    extras = set(cfg["options.extras_require"])
    assert set(re.findall(r"EXTRA=(\w+)", text)) <= extras  # the extras the script installs exist
    limits = [int(n) for n in re.findall(r"^\[?.*step \w+ (\d+) ", text, re.M)]
    assert len(limits) == 5 and sum(limits) + 5 * len(limits) <= 8 * 60  # every step's limit, within 8 minutes


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("spec", ["gpu:0", "gpu:0,0"])
@pytest.mark.parametrize("case", ["llama", "llama_tied", "qwen2", "qwen3", "llama_gptq", "llama_gptq_act", "llama_fp8",
                                  "llama_fp8_tensor"])
def test_gpu_fused_decode_step_on_hf_fixtures(case, spec):
    """The kernels' step on a GPU equals tpmax's unfused GPU forward pass (bf16 tolerance):
    dense, tied, bias, qk-norm, GPTQ (ordered and act-order groups), FP8 row and tensor scales."""
    model = load(Path(__file__).parent / "fixtures" / "hf" / case, devices=spec, dtype="bfloat16", progress=False)
    ref_cache, fused_cache = (model.executor.new_cache(64, page_size=4) for _ in range(2))
    ids, prompts = [0, 1], [[3, 5, 7, 9, 11], [2, 4]]
    for cache in (ref_cache, fused_cache):
        for s in ids:
            cache.add(s)
        last = tpmax.to_numpy(model.executor.run(cache, model.executor.step(ids, prompts))[0])
    for _ in range(3):
        tokens = np.argmax(last, axis=-1)
        last = tpmax.to_numpy(model.executor.run(ref_cache, model.executor.step(ids, [[t] for t in tokens]))[0])
        slots = fused_cache.reserve(ids, [1, 1])
        fused = fused_decode_step(model.weights, model.cfg, tokens, fused_cache.pages, slots, model.comm)
        fused_cache.commit(ids, [1, 1])
        bf16_close(fused, last)


def test_docs_list_every_kernel():
    text = (Path(__file__).parent.parent / "docs" / "kernels.md").read_text()
    table = set(re.findall(r"^\| `(\w+)` \| (\w+\.cu) \|", text, re.M))
    assert table == {(k, src) for src, ks in nvrtc.KERNELS.items() for k in ks}


class _Counting:
    """A kernel module that counts launches (flash_decode is two kernels: split, combine)."""

    def __init__(self, module, counts):
        self.module, self.counts = module, counts

    def __getattr__(self, name):
        fn = getattr(self.module, name)

        def launch(*a, **kw):
            self.counts[name] = self.counts.get(name, 0) + (2 if name == "flash_decode" else 1)
            return fn(*a, **kw)
        return launch


@pytest.mark.parametrize("tp, per_layer", [(1, 7), (2, 9), (3, 9)])
def test_launches_per_layer(monkeypatch, tp, per_layer):
    """7 kernels a layer at TP 1 (residual fused), 9 plus two all-reduces at TP > 1; then the
    lm head and the sampler: what docs/kernels.md promises (target: <= 10 a layer)."""
    from tpmax.kernels import step
    cfg = tpmax.ModelConfig(arch="llama", vocab_size=19, hidden_size=8, n_layers=3, n_heads=6, n_kv_heads=3,
                            head_dim=4, ffn_size=6, norm_eps=1e-5)
    weights, comm, devs = _model(cfg, tp, 0)
    counts = [{} for _ in devs]
    proxies = {d: _Counting(twins, c) for d, c in zip(devs, counts)}
    monkeypatch.setattr(step, "kernels_for", lambda d: proxies[d])
    cache = new_cache(cfg, devs)
    for s in (0, 1):
        cache.add(s)
    slots = cache.reserve([0, 1], [1, 1])
    fused_decode_sample(weights, cfg, np.array([1, 2]), cache.pages, slots, comm, temperature=[0, 0], top_k=[0, 0],
                        top_p=[1, 1], seed=[0, 0])
    for c in counts:
        assert sum(c.values()) - c.get("sample_tokens", 0) == cfg.n_layers * per_layer + 1  # + the lm head
    assert counts[0]["sample_tokens"] == 1


def test_kernel_sources_ship_in_the_package():
    """A wheel (not only an editable install) carries the .cu files gpu_ops compiles."""
    cfg = configparser.ConfigParser()
    cfg.read(Path(__file__).parent.parent / "setup.cfg")
    patterns = cfg["options.package_data"]["tpmax.kernels"].split()
    assert all(any(fnmatch.fnmatch(src, p) for p in patterns) for src in nvrtc.SOURCES)


def test_kernel_bench_smoke(tmp_path):
    """bench/kernel_bench.py in its CPU mode (the twins, tiny shapes): every kernel family timed."""
    bench = Path(__file__).parent.parent / "bench"
    out = tmp_path / "kb.json"
    r = subprocess.run([sys.executable, str(bench / "kernel_bench.py"), "--device", "cpu", "--small", "--out", str(out)],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    families = {row["kernel"].split()[0] for row in doc["figures"]}
    assert families == {"gemv", "flash_decode", "sample_tokens", "gptq_int4", "fp8_e4m3"}
    assert doc["kernels_ran"] == "twins (NumPy)" and all(row["gbps"] > 0 for row in doc["figures"])
