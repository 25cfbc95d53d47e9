"""Quantized linears: the public GPTQ / FP8 linears and every reader piece equal
dequantize-then-matmul from the formats' definitions (float64), sharded at TP 1-4; malformed
checkpoints and quantization configs give one clear error."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import tpmax
from tpmax.nn import quant
from tpmax.checkpoint import quant_config
from tpmax.checkpoint import quant_read
from tpmax.core.devices import float8_e4m3fn
from conftest import cpu_group


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(1, 5), st.sampled_from([2, 4, 8]), st.sampled_from([8, 16, 32, -1]),
       st.booleans(), st.booleans(), st.booleans(), st.integers(0, 999))
def test_gptq_linear_tp_equals_dequantized_matmul(tp, T, bits, group, desc_act, sym, v1, seed):
    """`gptq_linear` on HF-layout tensors packed element by element (`make_gptq`) equals x @ W.T
    of the definition's float64 W; column-parallel pieces (whole qzeros words) all-gather to it."""
    rng = np.random.default_rng(seed)
    pf = 32 // bits
    n_in, n_out = 32 * int(rng.integers(1, 4)), pf * int(rng.integers(1, 5))
    tensors, qc, W = make_gptq(rng, n_out, n_in, bits, group, desc_act and group != -1, sym, v1)
    x = rng.standard_normal((T, n_in)).astype(np.float32)
    bias = rng.standard_normal(n_out).astype(np.float32)
    want = x.astype(np.float64) @ W.T + bias
    bound = 1e-6 * (np.abs(x) @ np.abs(W).T + np.abs(bias)) + 1e-6  # float32 rounding of each product

    def check(got):
        assert got.dtype == np.float32 and np.all(np.abs(got - want) <= bound)
    layout = dict(qzeros=None if sym else tensors["qzeros"], bits=bits, zero_offset=qc.zero_offset)
    if sym:  # the stored zeros of a symmetric checkpoint are 2^(bits-1) anyway
        np.testing.assert_allclose(quant.gptq_dequantize(tensors["qweight"], tensors["scales"], tensors["g_idx"],
                                                         qzeros=tensors["qzeros"], bits=bits,
                                                         zero_offset=qc.zero_offset), W, rtol=1e-6, atol=1e-6)
    check(quant.gptq_linear(x, tensors["qweight"], tensors["scales"], tensors["g_idx"], bias, **layout))
    if not desc_act:  # ordered groups: g_idx may be left out
        check(quant.gptq_linear(x, tensors["qweight"], tensors["scales"], None, bias, group_size=group, **layout))
    words = tpmax.split_bounds(n_out // pf, tp)
    ys = [quant.gptq_linear(x, tensors["qweight"][:, a * pf:b * pf], tensors["scales"][:, a * pf:b * pf],
                            tensors["g_idx"], bias[a * pf:b * pf],
                            **dict(layout, qzeros=None if sym else tensors["qzeros"][:, a:b])) for a, b in words]
    for y in tpmax.communicator(cpu_group(tp)).allgather(ys, axis=-1):
        check(y)


def test_gptq_errors():
    qw, sc = np.zeros((1, 8), np.int32), np.ones((1, 8), np.float16)
    for args, kw, match in [
        ((qw, sc), {}, "g_idx or group_size"),
        ((qw, sc, np.zeros(3, int)), {}, "3 entries for 8"),
        ((qw, sc, np.full(8, 1)), {}, r"groups outside \[0, 1\)"),
        ((qw, sc), dict(group_size=8, bits=3), "bits=3 unsupported"),
        ((qw.astype(np.int64), sc), dict(group_size=8), "qweight must be 2-D int32"),
        ((qw, sc[:, :4]), dict(group_size=8), r"scales has shape \(1, 4\), expected \[groups, 8\]"),
        ((qw, sc), dict(group_size=8, qzeros=np.zeros((1, 2), np.int32)), r"qzeros has int32 \(1, 2\), expected"),
    ]:
        with pytest.raises(ValueError, match=match):
            quant.gptq_dequantize(*args, **kw)


def fp8_quantize(w: np.ndarray, *, rowwise: bool) -> tuple[np.ndarray, np.ndarray]:
    """e4m3 weight and scale (per row or per tensor) such that `w ~= q * scale`."""
    amax = np.abs(w).max(axis=1, keepdims=True) if rowwise else np.abs(w).max()
    scale = (np.maximum(amax, 1e-12) / 448.0).astype(np.float32)  # 448 = e4m3 max
    return (w / scale).astype(float8_e4m3fn), scale.reshape(-1) if rowwise else scale.reshape(())


@settings(max_examples=60)
@given(st.integers(1, 4), st.integers(1, 5), st.integers(1, 12), st.integers(4, 13), st.booleans(), st.integers(0, 999))
def test_fp8_tp_equals_dequantized_matmul(tp, T, n_in, n_out, rowwise, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n_out, n_in)).astype(np.float32)
    wq, scale = fp8_quantize(w, rowwise=rowwise)
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


# ------------------------------------------------------------------------------------------
# Readers: every piece of every sharding strategy, from checkpoints packed element by element
# from the format descriptions (no tpmax packing code), equals the same piece of the reference.

from tpmax.core.errors import ConfigError, LoadError  # noqa: E402
from tpmax.core.sharding import Layout, STRATEGIES, head_shard  # noqa: E402


class Slice:
    """What safetensors' `get_slice` returns, over an in-memory array; counts elements read."""

    def __init__(self, a, log):
        self.a, self.log = a, log

    def get_shape(self):
        return list(self.a.shape)

    def __getitem__(self, idx):
        out = np.array(self.a[idx])
        self.log.append(out.size)
        return out


def reader_of(tensors, log=None):
    log = [] if log is None else log
    return lambda suffix: Slice(tensors[suffix], log) if suffix in tensors else None


def pack_words(vals, bits, axis):
    """Reference packer: value k along `axis` goes to word k // (32/bits), bits (k % pf) * bits."""
    pf = 32 // bits
    vals = np.asarray(vals, np.int64)
    if axis == 1:
        return pack_words(vals.T, bits, 0).T.copy()
    n, m = vals.shape
    out = np.zeros((-(-n // pf), m), np.uint64)
    for k in range(n):
        for j in range(m):
            out[k // pf, j] |= np.uint64((int(vals[k, j]) & ((1 << bits) - 1)) << ((k % pf) * bits))
    return out.astype(np.uint32).view(np.int32)


def make_gptq(rng, n_out, n_in, bits, group, desc_act, sym, v1=True):
    """A GPTQ checkpoint (qweight, qzeros, scales, g_idx) and its float64 weight `[out, in]`."""
    groups = 1 if group == -1 else -(-n_in // group)
    q = rng.integers(0, 1 << bits, (n_in, n_out))
    zeros = np.full((groups, n_out), 1 << (bits - 1)) if sym else rng.integers(1, 1 << bits, (groups, n_out))
    scales = (rng.random((groups, n_out)) * 0.1 + 0.01).astype(np.float16)
    g_idx = np.arange(n_in) // group if group != -1 else np.zeros(n_in, int)
    if desc_act:
        g_idx = rng.permutation(g_idx)
    W = np.empty((n_out, n_in))
    for i in range(n_in):
        for o in range(n_out):
            W[o, i] = (q[i, o] - zeros[g_idx[i], o]) * float(scales[g_idx[i], o])
    tensors = {"qweight": pack_words(q, bits, 0), "qzeros": pack_words(zeros - (1 if v1 else 0), bits, 1),
               "scales": scales, "g_idx": g_idx.astype(np.int32)}
    qc = quant_config.QuantConfig("gptq", "gptq", bits, group, sym, desc_act, 1 if v1 else 0)
    return tensors, qc, W


def make_ct_int(rng, n_out, n_in, bits, group, sym):
    """compressed-tensors pack-quantized: signed values stored +2^(bits-1), zero points packed on out."""
    half = 1 << (bits - 1)
    groups = 1 if group == -1 else -(-n_in // group)
    q = rng.integers(-half, half, (n_out, n_in))
    zp = np.zeros((n_out, groups), int) if sym else rng.integers(-half, half, (n_out, groups))
    scales = (rng.random((n_out, groups)) * 0.1 + 0.01).astype(np.float32)
    g = np.arange(n_in) // group if group != -1 else np.zeros(n_in, int)
    W = np.empty((n_out, n_in))
    for o in range(n_out):
        for i in range(n_in):
            W[o, i] = (q[o, i] - zp[o, g[i]]) * scales[o, g[i]]
    tensors = {"weight_packed": pack_words(q + half, bits, 1), "weight_scale": scales,
               "weight_shape": np.array([n_out, n_in], np.int64)}
    if not sym:
        tensors["weight_zero_point"] = pack_words(zp + half, bits, 0)
    qc = quant_config.QuantConfig("compressed-tensors", "pack-quantized", bits, group, sym, False, 0,
                           "group" if group != -1 else "channel")
    return tensors, qc, W


E4M3 = np.arange(256, dtype=np.uint8).view(float8_e4m3fn)


def make_fp8(rng, n_out, n_in, strategy, block=(16, 16)):
    """FP8 e4m3 bits and scales (tensor / channel / block); W[o, i] = e4m3(bits) * scale."""
    bits = rng.integers(0, 256, (n_out, n_in)).astype(np.uint8)
    bits[(bits & 0x7F) == 0x7F] = 0x38  # no NaN patterns
    vals = np.array([[float(E4M3[b]) for b in row] for row in bits])
    if strategy == "tensor":
        scale = np.float32(rng.random() + 0.5)
        W, tensors = vals * float(scale), {"weight": bits.view(float8_e4m3fn), "weight_scale": np.array(scale)}
    elif strategy == "channel":
        scale = (rng.random((n_out, 1)) + 0.5).astype(np.float32)
        W, tensors = vals * scale, {"weight": bits.view(float8_e4m3fn), "weight_scale": scale}
    else:
        bo, bi = block
        scale = (rng.random((-(-n_out // bo), -(-n_in // bi))) + 0.5).astype(np.float32)
        W = np.array([[vals[o, i] * scale[o // bo, i // bi] for i in range(n_in)] for o in range(n_out)])
        tensors = {"weight": bits.view(float8_e4m3fn), "weight_scale_inv": scale}
    fmt = "fp8-block" if strategy == "block" else "float-quantized"
    qc = quant_config.QuantConfig("fp8" if strategy == "block" else "compressed-tensors", fmt, 8, -1, True, False, 0,
                           strategy, tuple(block) if strategy == "block" else None)
    return tensors, qc, W


HEADS = (6, 2, 8)  # n_heads, n_kv_heads, head_dim


def shape_for(strategy, rng):
    """A stored `[out, in]` for `strategy` (dims multiples of 8, as packed formats need)."""
    hq, hkv, hd = HEADS
    n = lambda: 8 * int(rng.integers(2, 8))  # noqa: E731
    return {"q_heads": (hq * hd, n()), "kv_heads": (hkv * hd, n()), "stacked_qkv": ((hq + 2 * hkv) * hd, n()),
            "head_aware_columnwise": (n(), hq * hd), "gate_up": (2 * n(), n())}.get(strategy, (n(), n()))


def check_pieces(tensors, qc, W, strategy, tp, block_bytes):
    hq, hkv, hd = HEADS
    x = np.random.default_rng(0).standard_normal((3, W.shape[1])).astype(np.float32)
    for rank in range(tp):
        lay = Layout(tp, rank, head_shard(hq, hkv, tp, rank), hd)
        pieces = STRATEGIES[strategy](W.shape, lay)
        parts = []
        for idx in pieces:
            log = []
            got = quant_read.read_quantized(reader_of(tensors, log), qc, idx, name="layers.0.q_proj")
            want = W[idx]
            assert got.shape == want.shape
            np.testing.assert_allclose(got.dequantize(), want, rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(got.matmul_t(x[:, idx[1]] if len(idx) > 1 else x, block_bytes=block_bytes),
                                       (x[:, idx[1]] if len(idx) > 1 else x) @ want.T, rtol=1e-4, atol=1e-4)
            parts.append(got)
        fused = quant.concat_out(parts)
        want = np.concatenate([W[idx] for idx in pieces], axis=0)
        np.testing.assert_allclose(fused.dequantize(), want, rtol=1e-6, atol=1e-6)
        if len(pieces[0]) < 2:
            np.testing.assert_allclose(fused.matmul_t(x, block_bytes=block_bytes), x @ want.T, rtol=1e-4, atol=1e-4)


@settings(max_examples=40)
@given(st.sampled_from(sorted(STRATEGIES)), st.integers(1, 4), st.sampled_from([4, 8]),
       st.sampled_from([8, 16, 24, -1]),
       st.booleans(), st.booleans(), st.booleans(), st.integers(0, 999))
def test_gptq_reader_every_piece(strategy, tp, bits, group, desc_act, sym, v1, seed):
    rng = np.random.default_rng(seed)
    n_out, n_in = shape_for(strategy, rng)
    tensors, qc, W = make_gptq(rng, n_out, n_in, bits, group, desc_act and group != -1, sym, v1)
    check_pieces(tensors, qc, W, strategy, tp, block_bytes=int(rng.choice([64, 1 << 20])))


@settings(max_examples=30)
@given(st.sampled_from(sorted(STRATEGIES)), st.integers(1, 4), st.sampled_from([4, 8]), st.sampled_from([8, 16, -1]),
       st.booleans(), st.integers(0, 999))
def test_compressed_tensors_int_reader_every_piece(strategy, tp, bits, group, sym, seed):
    rng = np.random.default_rng(seed)
    n_out, n_in = shape_for(strategy, rng)
    tensors, qc, W = make_ct_int(rng, n_out, n_in, bits, group, sym)
    check_pieces(tensors, qc, W, strategy, tp, block_bytes=64)


@settings(max_examples=30)
@given(st.sampled_from(sorted(STRATEGIES)), st.integers(1, 4), st.sampled_from(["tensor", "channel", "block"]),
       st.sampled_from([(16, 16), (8, 24), (128, 128)]), st.integers(0, 999))
def test_fp8_reader_every_piece(strategy, tp, kind, block, seed):
    rng = np.random.default_rng(seed)
    n_out, n_in = shape_for(strategy, rng)
    tensors, qc, W = make_fp8(rng, n_out, n_in, kind, block)
    check_pieces(tensors, qc, W, strategy, tp, block_bytes=64)


def test_readers_read_only_their_piece():
    """An output-row piece reads its qweight columns and zero words; an input piece its rows."""
    rng = np.random.default_rng(1)
    tensors, qc, W = make_gptq(rng, 64, 96, 4, 16, False, False)
    log = []
    quant_read.read_quantized(reader_of(tensors, log), qc, (slice(16, 40),), name="w")
    # qweight 12 words x 24 cols, scales 6 x 24, qzeros 6 groups x 3..4 words, g_idx 96
    assert sum(log) <= 12 * 24 + 6 * 24 + 6 * 4 + 96
    log = []
    quant_read.read_quantized(reader_of(tensors, log), qc, (slice(None), slice(36, 61)), name="w")
    # words 4..7 (4 x 64), groups 2..3 of scales and zeros (2 x 64, 2 x 8), g_idx 25
    assert sum(log) <= 4 * 64 + 2 * 64 + 2 * 8 + 25


def test_desc_act_parts_with_different_g_idx_stay_composite():
    rng = np.random.default_rng(2)
    parts, want = [], []
    x = rng.standard_normal((2, 32)).astype(np.float32)
    for n_out in (16, 8):
        tensors, qc, W = make_gptq(rng, n_out, 32, 4, 8, True, True)
        parts.append(quant_read.read_quantized(reader_of(tensors), qc, (slice(None),), name="w"))
        want.append(W)
    fused = quant.concat_out(parts)
    assert isinstance(fused, quant.ConcatOut) and fused.shape == (24, 32)
    np.testing.assert_allclose(fused.matmul_t(x), x @ np.concatenate(want).T, rtol=1e-5, atol=1e-5)
    assert fused.nbytes == sum(p.nbytes for p in parts)


def test_resident_bytes():
    rng = np.random.default_rng(3)
    tensors, qc, _ = make_gptq(rng, 64, 128, 4, 32, False, True)
    w = quant_read.read_quantized(reader_of(tensors), qc, (slice(None),), name="w")
    # qweight 16x64 int32 + scales 4x64 f16 + zeros 4x64 u8 + g_idx 128 int16 vs 64*128*4 float32
    assert w.nbytes == 16 * 64 * 4 + 4 * 64 * 2 + 4 * 64 + 128 * 2
    assert w.nbytes < 64 * 128 * 4 / 5
    tensors, qc, _ = make_fp8(rng, 64, 128, "channel")
    f = quant_read.read_quantized(reader_of(tensors), qc, (slice(None),), name="w")
    assert f.w.dtype == np.uint8 and f.nbytes == 64 * 128 + 64 * 4


def test_matmul_keeps_activation_dtype():
    rng = np.random.default_rng(4)
    tensors, qc, W = make_gptq(rng, 16, 32, 4, 8, False, True)
    w = quant_read.read_quantized(reader_of(tensors), qc, (slice(None),), name="w")
    assert w.matmul_t(np.ones((2, 32), np.float32)).dtype == np.float32
    assert w.dequantize().dtype == np.float32


# ------------------------------------------------------------------------------------------
# Malformed checkpoints and configs: LoadError / ConfigError naming the tensor or file.


def test_reader_errors_name_the_tensor():
    rng = np.random.default_rng(5)
    tensors, qc, _ = make_gptq(rng, 16, 32, 4, 8, False, True)
    name = "model.layers.0.self_attn.q_proj"
    for drop in ("scales", "qzeros", "qweight"):
        bad = {k: v for k, v in tensors.items() if k != drop}
        with pytest.raises(LoadError, match=f"{name}.{drop} is missing"):
            quant_read.read_quantized(reader_of(bad), qc, (slice(None),), name=name)
    bad = dict(tensors, scales=tensors["scales"][:, :8])
    with pytest.raises(LoadError, match=rf"{name}.scales has shape \(4, 8\), expected \(4, 16\)"):
        quant_read.read_quantized(reader_of(bad), qc, (slice(None),), name=name)
    bad = dict(tensors, qzeros=tensors["qzeros"][:, :1])
    with pytest.raises(LoadError, match=f"{name}.qzeros has shape"):
        quant_read.read_quantized(reader_of(bad), qc, (slice(None),), name=name)
    bad = dict(tensors, scales=tensors["scales"].astype(np.int32))
    with pytest.raises(LoadError, match=f"{name}.scales has dtype int32"):
        quant_read.read_quantized(reader_of(bad), qc, (slice(None),), name=name)
    bad = dict(tensors, g_idx=tensors["g_idx"][:5])
    with pytest.raises(LoadError, match=f"{name}.qweight has shape .* but {name}.g_idx has 5 entries"):
        quant_read.read_quantized(reader_of(bad), qc, (slice(None),), name=name)
    with pytest.raises(LoadError, match=f"{name}.qweight input split at 12 cuts"):
        quant_read.read_quantized(reader_of(tensors), qc, (slice(None), slice(12, 32)), name=name, repack=False)
    quant_read.read_quantized(reader_of(tensors), qc, (slice(None), slice(16, 32)), name=name, repack=False)
    tensors, qc, _ = make_fp8(rng, 16, 32, "block")
    bad = dict(tensors, weight_scale_inv=np.ones((2, 3), np.float32))
    with pytest.raises(LoadError, match=f"{name}.weight_scale_inv has shape"):
        quant_read.read_quantized(reader_of(bad), qc, (slice(None),), name=name)
    bad = dict(tensors, weight=np.full((16, 32), 0x7F, np.uint8))
    with pytest.raises(LoadError, match=f"{name}.weight contains NaN"):
        quant_read.read_quantized(reader_of(bad), qc, (slice(None),), name=name)
    tensors, qc, _ = make_ct_int(rng, 16, 32, 4, 8, False)
    bad = {k: v for k, v in tensors.items() if k != "weight_zero_point"}
    with pytest.raises(LoadError, match=f"{name}.weight_zero_point is missing"):
        quant_read.read_quantized(reader_of(bad), qc, (slice(None),), name=name)


GPTQ_HF = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True,
           "checkpoint_format": "gptq", "damp_percent": 0.1, "true_sequential": True}


def test_quant_config_from_hf():
    assert quant_config.quant_config_from_hf({}, source="c.json") is None
    q = quant_config.quant_config_from_hf({"quantization_config": GPTQ_HF}, source="c.json")
    assert (q.format, q.bits, q.group_size, q.sym, q.desc_act, q.zero_offset) == ("gptq", 4, 128, True, False, 1)
    assert q.suffixes == ("qweight", "qzeros", "scales") and not q.quantizes("lm_head")
    assert q.quantizes("model.layers.0.self_attn.q_proj")
    q = quant_config.quant_config_from_hf({"quantization_config": dict(GPTQ_HF, checkpoint_format="gptq_v2")},
                                          source="c")
    assert q.zero_offset == 0
    fp8 = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": [128, 128]}
    q = quant_config.quant_config_from_hf({"quantization_config": fp8}, source="c")
    assert (q.format, q.block, q.suffixes) == ("fp8-block", (128, 128), ("weight", "weight_scale_inv"))
    ct = {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
          "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
              "type": "float", "num_bits": 8, "strategy": "channel", "symmetric": True, "dynamic": False}}}}
    q = quant_config.quant_config_from_hf({"quantization_config": ct}, source="c")
    assert (q.format, q.strategy) == ("float-quantized", "channel") and not q.quantizes("lm_head")


@pytest.mark.parametrize("qc, match", [
    ({"quant_method": "awq", "bits": 4}, "unsupported quant_method 'awq'"),
    (dict(GPTQ_HF, bits=3), "GPTQ bits=3 unsupported"),
    (dict(GPTQ_HF, group_size=0), "group_size=0"),
    (dict(GPTQ_HF, checkpoint_format="marlin"), "checkpoint_format 'marlin'"),
    ({"quant_method": "fp8", "weight_block_size": None}, "weight_block_size"),
    ({"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized", "config_groups": {"g": {
        "targets": ["Linear"], "weights": {"type": "float", "num_bits": 4}}}}, "format 'nvfp4-pack-quantized'"),
    ({"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {"g": {
        "targets": ["Linear"], "weights": {"type": "float", "num_bits": 8, "strategy": "tensor"},
        "input_activations": {"type": "float", "num_bits": 8}}}}, "activation quantization"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"g": {
        "targets": ["Linear"], "weights": {"type": "int", "num_bits": 2, "strategy": "group", "group_size": 8}}}},
     "num_bits=2 unsupported"),
])
def test_quant_config_errors(qc, match):
    with pytest.raises(ConfigError, match=match) as e:
        quant_config.quant_config_from_hf({"quantization_config": qc}, source="dir/config.json")
    assert "dir/config.json" in str(e.value)


CT_FP8 = {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
          "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
              "type": "float", "num_bits": 8, "strategy": "block", "block_structure": [16, 16],
              "symmetric": True}}}}
CT_INT = {"quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head"],
          "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
              "type": "int", "num_bits": 4, "strategy": "group", "group_size": 16, "symmetric": False,
              "actorder": None}}}}
FP8_BLOCK = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": [128, 128],
             "modules_to_not_convert": ["lm_head"]}
W = ("config_groups", "group_0", "weights")


def edited(qc, path, value):
    """A deep copy of `qc` with the value at key `path` replaced."""
    import copy

    out = copy.deepcopy(qc)
    node = out
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    return out


@pytest.mark.parametrize("base, path, value, match", [
    (GPTQ_HF, ("bits",), 4.0, "quantization_config.bits must be an integer, got 4.0"),
    (GPTQ_HF, ("bits",), True, "quantization_config.bits must be an integer, got True"),
    (GPTQ_HF, ("group_size",), "128", "quantization_config.group_size must be an integer"),
    (GPTQ_HF, ("sym",), "false", "quantization_config.sym must be true or false, got 'false'"),
    (GPTQ_HF, ("desc_act",), 1, "quantization_config.desc_act must be true or false"),
    (GPTQ_HF, ("modules_to_not_convert",), "lm_head", "modules_to_not_convert must be a list of strings"),
    (GPTQ_HF, ("checkpoint_format",), ["gptq"], "quantization_config.checkpoint_format must be a string"),
    (GPTQ_HF, ("quant_method",), 5, "quantization_config.quant_method must be a string, got 5"),
    (CT_INT, W + ("num_bits",), 4.0, "config_groups.group_0.weights.num_bits must be an integer, got 4.0"),
    (CT_INT, W + ("group_size",), 16.0, "weights.group_size must be an integer"),
    (CT_INT, W + ("symmetric",), "no", "weights.symmetric must be true or false"),
    (CT_INT, W + ("actorder",), [1], "weights.actorder must be null, true, false or a string"),
    (CT_INT, ("config_groups",), [{"targets": ["Linear"]}], "quantization_config.config_groups must be an object"),
    (CT_INT, ("config_groups", "group_0"), "w4a16", "quantization_config.config_groups.group_0 must be an object"),
    (CT_INT, ("config_groups", "group_0", "weights"), [4], "group_0.weights must be an object"),
    (CT_INT, ("config_groups", "group_0", "targets"), "Linear", "group_0.targets must be a list of strings"),
    (CT_INT, ("ignore",), [1], "quantization_config.ignore must be a list of strings"),
    (CT_FP8, W + ("block_structure",), [0, 16], r"weights.block_structure must be \[rows, cols\] of two positive"),
    (CT_FP8, W + ("block_structure",), ["a", 16], r"weights.block_structure must be \[rows, cols\]"),
    (CT_FP8, W + ("block_structure",), [16, 16, 16], r"weights.block_structure must be \[rows, cols\]"),
    (CT_FP8, W + ("block_structure",), 16, r"weights.block_structure must be \[rows, cols\]"),
    (CT_FP8, W + ("type",), 8, "weights.type must be a string"),
    (FP8_BLOCK, ("weight_block_size",), [True, 128], r"weight_block_size must be \[rows, cols\]"),
    (FP8_BLOCK, ("weight_block_size",), [128.0, 128], r"weight_block_size must be \[rows, cols\]"),
    (FP8_BLOCK, ("fmt",), None, None),  # null is the default
    (FP8_BLOCK, ("activation_scheme",), {"a": 1}, "activation_scheme must be a string"),
])
def test_quant_config_wrong_types(base, path, value, match):
    """A value of the wrong type is a ConfigError naming the file and the key, never a traceback."""
    qc = edited(base, path, value)
    if match is None:
        assert quant_config.quant_config_from_hf({"quantization_config": qc}, source="dir/config.json")
        return
    with pytest.raises(ConfigError, match=match) as e:
        quant_config.quant_config_from_hf({"quantization_config": qc}, source="dir/config.json")
    assert str(e.value).startswith("dir/config.json: ") and "\n" not in str(e.value)


JSON = st.recursive(st.none() | st.booleans() | st.integers(-3, 300) | st.floats(allow_nan=True) | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                    max_leaves=6)


def key_paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from key_paths(v, prefix + (k,))


@settings(max_examples=300, derandomize=True)
@given(st.sampled_from([GPTQ_HF, CT_FP8, CT_INT, FP8_BLOCK]), st.data())
def test_any_quant_config_value_parses_or_is_a_config_error(base, data):
    path = data.draw(st.sampled_from([p for p in key_paths(base) if p]))
    qc = edited(base, path, data.draw(JSON))
    try:
        got = quant_config.quant_config_from_hf({"quantization_config": qc}, source="dir/config.json")
    except ConfigError as e:
        assert str(e).startswith("dir/config.json: ")
        return
    assert isinstance(got.bits, int) and isinstance(got.group_size, int) and isinstance(got.sym, bool)
    assert got.block is None or all(isinstance(b, int) and b > 0 for b in got.block)
    assert all(isinstance(n, str) for n in got.ignore)


def test_group_quantized():
    q = quant_config.quant_config_from_hf({"quantization_config": GPTQ_HF}, source="c")
    keys = ["model.layers.0.self_attn.q_proj.qweight", "model.layers.0.self_attn.q_proj.qzeros",
            "model.layers.0.self_attn.q_proj.scales", "model.layers.0.self_attn.q_proj.g_idx",
            "model.norm.weight", "lm_head.weight"]
    assert quant_read.group_quantized(keys, q, source="d") == {"model.layers.0.self_attn.q_proj": {
        "qweight": keys[0], "qzeros": keys[1], "scales": keys[2], "g_idx": keys[3]}}
    with pytest.raises(LoadError, match="d: tensor model.layers.0.self_attn.q_proj.qzeros is missing"):
        quant_read.group_quantized([k for k in keys if "qzeros" not in k], q, source="d")
    with pytest.raises(LoadError, match="q_proj.qweight is missing"):
        quant_read.group_quantized([k for k in keys if "qweight" not in k], q, source="d")
    fp8 = quant_config.QuantConfig("compressed-tensors", "float-quantized", 8, strategy="channel")
    with pytest.raises(LoadError, match="q_proj.weight_scale is missing"):
        quant_read.group_quantized(["m.q_proj.weight", "m.norm.weight"], fp8, source="d",
                              is_fp8=lambda k: "q_proj" in k)


def test_resident_bytes_of_weights():
    import dataclasses as dc

    @dc.dataclass(frozen=True)
    class W:
        embed: tuple
        layers: tuple
        lm_head: tuple

    @dc.dataclass(frozen=True)
    class L:
        w: tuple

    rng = np.random.default_rng(6)
    tensors, qc, _ = make_fp8(rng, 16, 32, "channel")
    f = quant_read.read_quantized(reader_of(tensors), qc, (slice(None),), name="w")
    e = np.zeros((10, 4), np.float16)
    got = quant.resident_bytes(W(embed=(e,), layers=(L(w=(f,)),), lm_head=(e,)))  # tied: e once
    assert got == [(80 + 16 * 32 + 16 * 4, 160 + 16 * 32 * 4)]


@pytest.mark.parametrize("T", [1, 8, 9, 40])
def test_gptq_matmul_paths_agree(T):
    """Whole ordered groups: decode-sized inputs apply scales after the per-group products,
    larger ones dequantize blocks; both equal the element-by-element reference (any lead dims)."""
    rng = np.random.default_rng(T)
    tensors, qc, W = make_gptq(rng, 24, 32, 4, 8, False, False)
    w = quant_read.read_quantized(reader_of(tensors), qc, (slice(None),), name="w")
    assert w.group_size == 8
    x = rng.standard_normal((T, 32)).astype(np.float32)
    np.testing.assert_allclose(w.matmul_t(x, block_bytes=64), x @ W.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(w.matmul_t(x.reshape(1, T, 32)), (x @ W.T)[None], rtol=1e-5, atol=1e-5)
    general = quant.GPTQWeight(w.qweight, w.scales, w.zeros, w.g_idx, 4, 32)  # group_size 0
    np.testing.assert_allclose(general.matmul_t(x), x @ W.T, rtol=1e-5, atol=1e-5)
    piece = quant_read.read_quantized(reader_of(tensors), qc, (slice(None), slice(4, 20)), name="w")
    assert piece.group_size == 0  # starts inside a group
    assert quant.uniform_group_size(np.arange(24) // 8) == 8 and quant.uniform_group_size(np.arange(20) // 8) == 0


def test_decode_e4m3_every_pattern():
    bits = np.arange(256, dtype=np.uint8)
    want = bits.view(float8_e4m3fn).astype(np.float32)
    for w in (bits.reshape(16, 16), bits.reshape(32, 8)[:, 1:6], bits.reshape(8, 32)[::2]):
        got = quant.decode_e4m3(w)
        np.testing.assert_array_equal(got, want.reshape(bits.reshape(-1).shape)[w.reshape(-1)].reshape(w.shape))
        assert got.dtype == np.float32


@pytest.mark.parametrize("fmt", ["gptq", "fp8"])
def test_quantized_matmul_never_holds_the_whole_float32_weight(fmt):
    """A quantized matmul dequantizes a block of output features at a time: its peak memory
    stays well under the float32 weight (32 MiB here, blocks of 4 MiB)."""
    import tracemalloc

    from tpmax.nn.quant import FP8Weight, gptq_weight

    n_in, n_out = 1024, 8192
    rng = np.random.default_rng(0)
    if fmt == "gptq":
        w = gptq_weight(rng.integers(-2**31, 2**31, (n_in // 8, n_out), dtype=np.int64).astype(np.int32),
                        rng.random((n_in // 128, n_out)).astype(np.float16), group_size=128)
    else:
        w = FP8Weight(rng.integers(0, 120, (n_out, n_in), dtype=np.uint8), np.float32(0.01))
    x = rng.standard_normal((1, n_in)).astype(np.float32)
    full = 4 * n_in * n_out
    tracemalloc.start()
    try:
        y = w.matmul_t(x)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert y.shape == (1, n_out) and np.isfinite(y).all()
    assert peak < full / 3, (peak, full)
