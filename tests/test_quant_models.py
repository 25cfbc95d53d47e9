"""Quantized checkpoints (GPTQ, compressed-tensors FP8 / int4, block FP8) against transformers
run on their dequantized weights, at TP 1-4; how far tpmax's weights and logits are from the
float model they were made from; what they keep resident per device; what each device reads."""
import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy as stn

import tpmax
from tpmax.nn import quant
from tpmax.checkpoint import quant_read
from tpmax.checkpoint.quant_config import quant_config_from_hf
from tpmax.checkpoint.safetensors_file import SafetensorsFile
from tpmax.core.comm import communicator
from tpmax.nn.config import ModelConfig
from tpmax.checkpoint.loader import HF_LAYER, HF_LAYER_NAMES, HF_NAMES, Model, _table_name
from tpmax.core.sharding import shard_pieces
from tpmax.nn.weights import DictSource, shard_weights

FIX = Path(__file__).parent / "fixtures" / "hf"
CASES = ["llama_gptq", "llama_gptq_ct", "llama_gptq_act", "llama_gptq8", "llama_fp8", "llama_fp8_tensor",
         "llama_fp8_block", "llama_int4", "qwen2_gptq"]
LINEARS = {"self_attn.q_proj": "q_proj", "self_attn.k_proj": "k_proj", "self_attn.v_proj": "v_proj",
           "self_attn.o_proj": "o_proj", "mlp.gate_proj": "gate_proj", "mlp.up_proj": "up_proj",
           "mlp.down_proj": "down_proj"}



def spec(tp):
    return "cpu:" + ",".join(map(str, range(tp)))


def open_case(case):
    d = FIX / case
    config = json.loads((d / "config.json").read_text())
    qc = quant_config_from_hf(config, source=str(d / "config.json"))
    cfg = ModelConfig.from_hf_config(config, source=str(d / "config.json"))
    return cfg, qc, SafetensorsFile(d / "model.safetensors")


def linear_reader(st, prefix):
    keys = set(st.keys())
    return lambda suffix: st.get_slice(f"{prefix}.{suffix}") if f"{prefix}.{suffix}" in keys else None


def linears(cfg):
    for i in range(cfg.n_layers):
        for hf, table in LINEARS.items():
            yield f"model.layers.{i}.{hf}", f"layers.{i}.{table}", table


def dequantized_source(cfg, qc, st) -> DictSource:
    """Every tensor of a quantized fixture as float32, linears dequantized by tpmax's readers."""
    full = {}
    quantized = {prefix for prefix, _, _ in linears(cfg)}
    for key in st.keys():
        if key.rsplit(".", 1)[0] not in quantized or key.endswith(".bias"):
            name = _table_name(key, HF_NAMES, HF_LAYER, HF_LAYER_NAMES, "fixture")
            full[name] = st.get_slice(key)[:].astype(np.float32)
    for prefix, name, _ in linears(cfg):
        full[name] = quant_read.read_quantized(linear_reader(st, prefix), qc, (slice(None),), name=prefix).dequantize()
    return DictSource(full, name=str(st.path))


def reference(case):
    r = stn.load_file(str(FIX / case / "reference.safetensors"))
    return [(r[f"input_ids_{i}"], r[f"logits_{i}"]) for i in range(3)]


@pytest.mark.parametrize("tp", [1, 2, 3, 4])
@pytest.mark.parametrize("case", CASES)
def test_dequantized_fixture_matches_transformers(case, tp):
    """tpmax's readers dequantize every fixture to the weights transformers ran (<= 1e-4 logits)."""
    cfg, qc, st = open_case(case)
    devs = tpmax.devices(spec(tp))
    model = Model(cfg, shard_weights(dequantized_source(cfg, qc, st), cfg, devs), tuple(devs),
                  communicator(devs), None, (), "float32", str(FIX / case))
    pairs = reference(case)
    for got, (_, want) in zip(tpmax.logits(model, [ids for ids, _ in pairs]), pairs):
        assert got.dtype == np.float32 and np.abs(got - want).max() <= 1e-4


def bits_of(case):
    """(weight rms error bound, logit rms error bound) of a case's format, relative."""
    qc = open_case(case)[1]
    if qc.format in ("float-quantized", "fp8-block"):
        return 0.04, 0.25  # e4m3 keeps 3 mantissa bits: <= 2^-4 relative per weight
    return (0.12, 0.5) if qc.bits == 4 else (0.01, 0.06)


@pytest.mark.parametrize("case", CASES)
def test_quantized_against_the_float_model(case):
    """tpmax on each quantized checkpoint against the float model it was made from (its base
    fixture's float32 weights, and transformers' logits on them): every linear tpmax
    dequantizes is within the format's rounding error of the float weight (the MLP padding
    reads back as exact zeros), and tpmax's logits are close to, not equal to, the float
    model's. Relative rms errors: ~7-9 % (int4 group 16), ~0.6 % (int8), ~2.6 % (e4m3)."""
    w_bound, logit_bound = bits_of(case)
    base = FIX / Path(json.loads((FIX / case / "meta.json").read_text())["base"]).name
    floats = stn.load_file(str(base / "model.safetensors"))
    cfg, qc, st = open_case(case)
    for prefix, _, _ in linears(cfg):
        W = floats[prefix + ".weight"].astype(np.float64)  # [out, in], unpadded
        deq = quant_read.read_quantized(linear_reader(st, prefix), qc, (slice(None),), name=prefix).dequantize()
        assert not deq[W.shape[0]:].any() and not deq[:, W.shape[1]:].any()
        err = deq[:W.shape[0], :W.shape[1]] - W
        assert 0 < np.sqrt((err ** 2).mean() / (W ** 2).mean()) < w_bound, prefix
    model = tpmax.load(FIX / case, devices="cpu:0,1", progress=False)
    pairs = reference(base.name)
    got = tpmax.logits(model, [ids for ids, _ in pairs])
    rel = np.sqrt(sum(((g - w) ** 2).sum() for g, (_, w) in zip(got, pairs)) / sum((w ** 2).sum() for _, w in pairs))
    assert 0 < rel < logit_bound


@pytest.mark.parametrize("tp", [1, 3])
@pytest.mark.parametrize("case", CASES)
def test_sharded_quantized_linears(case, tp):
    """Every device's quantized piece of every linear (table strategies, fused like the model)
    equals the same rows/columns of the dequantized weight, and `matmul_t` agrees."""
    cfg, qc, st = open_case(case)
    src = dequantized_source(cfg, qc, st)
    x = np.random.default_rng(0).standard_normal((2, cfg.ffn_size)).astype(np.float32)
    for r in range(tp):
        lay = cfg.layout(tp, r)
        for prefix, name, table in linears(cfg):
            full = src.tensors[name]
            pieces = shard_pieces(table, full.shape, lay)
            got = quant.concat_out([quant_read.read_quantized(linear_reader(st, prefix), qc, idx, name=prefix)
                                    for idx in pieces])
            want = np.concatenate([full[idx] for idx in pieces], axis=0)
            np.testing.assert_array_equal(got.dequantize(), want)
            xi = x[:, :want.shape[1]]
            np.testing.assert_allclose(got.matmul_t(xi, block_bytes=256), xi @ want.T, rtol=1e-5, atol=1e-5)


def resident_bytes(case, tp):
    """Per device: bytes of its quantized linears, and of the same pieces as float32."""
    cfg, qc, st = open_case(case)
    out = []
    for r in range(tp):
        lay = cfg.layout(tp, r)
        q = f = 0
        for prefix, name, table in linears(cfg):
            shape = quant_read.quantized_shape(linear_reader(st, prefix), qc, name=prefix)
            for idx in shard_pieces(table, shape, lay):
                w = quant_read.read_quantized(linear_reader(st, prefix), qc, idx, name=prefix)
                q += w.nbytes
                f += 4 * w.shape[0] * w.shape[1]
        out.append((q, f))
    return out


@pytest.mark.parametrize("case", CASES)
def test_resident_bytes(case):
    for tp in (1, 2, 4):
        per_dev = resident_bytes(case, tp)
        q, f = map(sum, zip(*per_dev))
        # 8-bit ~ 1/4 of float32 + scales; 4-bit ~ 1/8 + group-16 scales/zeros + g_idx (tiny dims)
        limit = 0.34 if ("8" in case) else 0.3
        assert q < limit * f, (case, tp, per_dev)


# ------------------------------------------------------------------------------------------
# tpmax.load: quantized checkpoints load sharded and stay quantized on the devices.


@pytest.mark.parametrize("tp", [1, 2, 3, 4])
@pytest.mark.parametrize("case", CASES)
def test_load_quantized_matches_transformers(case, tp):
    model = tpmax.load(FIX / case, devices=spec(tp), progress=False)
    assert model.quant is not None and model.quant.describe() in repr(model)
    for layer in model.weights.layers:
        for w in (layer.w13 + layer.w2 + tuple(a.wqkv for a in layer.attn) + tuple(a.wo for a in layer.attn)):
            assert quant.is_quantized(w)
    pairs = reference(case)
    for got, (_, want) in zip(tpmax.logits(model, [ids for ids, _ in pairs]), pairs):
        assert got.dtype == np.float32 and got.shape == want.shape
        assert np.abs(got - want).max() <= 1e-4


@pytest.mark.parametrize("case", CASES)
def test_load_resident_bytes(case):
    """What each device holds, against the float32 model of the same shapes: only the
    linears shrink (embeddings, norms and lm_head stay float)."""
    for tp in (1, 3):
        per_dev = quant.resident_bytes(tpmax.load(FIX / case, devices=spec(tp), progress=False).weights)
        assert len(per_dev) == tp
        for held, as_f32 in per_dev:
            assert held < 0.6 * as_f32
        linears_f32 = sum(f for _, f in resident_bytes(case, tp))
        linears_q = sum(q for q, _ in resident_bytes(case, tp))
        held_linears = sum(h for h, _ in per_dev) - (sum(f for _, f in per_dev) - linears_f32)
        # fusing q/k/v and gate/up shares g_idx (GPTQ) or turns tensor scales into row scales (FP8)
        assert 0.9 * linears_q <= held_linears <= 1.1 * linears_q  # (4 bytes a row: 4/in of a real model)


# ------------------------------------------------------------------------------------------
# Malformed quantized checkpoints: LoadError naming the tensor; bad configs: ConfigError.


def rewrite(tmp_path, case, *, drop=(), replace=None, config=None):
    """A copy of fixture `case` with tensors dropped/replaced (raw bytes, any dtype) or config edited."""
    d = tmp_path / case
    d.mkdir()
    for f in (FIX / case).iterdir():
        if f.name != "model.safetensors":
            (d / f.name).write_bytes(f.read_bytes())
    st = SafetensorsFile(FIX / case / "model.safetensors")
    header = json.loads((FIX / case / "model.safetensors").read_bytes()[8:8 + int.from_bytes(
        (FIX / case / "model.safetensors").read_bytes()[:8], "little")])
    tensors = {}
    for k in st.keys():
        if k in drop:
            continue
        a = st.get_slice(k)[...]
        tensors[k] = (header[k]["dtype"], a)
    for k, v in (replace or {}).items():
        tensors[k] = v
    write_safetensors(d / "model.safetensors", tensors)
    if config:
        c = json.loads((d / "config.json").read_text())
        config(c)
        (d / "config.json").write_text(json.dumps(c))
    return d


def write_safetensors(path, tensors):
    """`{key: (safetensors dtype code, array)}` -> file (F8_E4M3 from its uint8 bits)."""
    header, blobs, at = {}, [], 0
    for k, (code, a) in sorted(tensors.items()):
        raw = np.ascontiguousarray(a).tobytes()
        header[k] = {"dtype": code, "shape": list(a.shape), "data_offsets": [at, at + len(raw)]}
        blobs.append(raw)
        at += len(raw)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(len(h).to_bytes(8, "little") + h + b"".join(blobs))


Q = "model.layers.1.self_attn.q_proj"


@pytest.mark.parametrize("case, drop, replace, match", [
    ("llama_gptq", [f"{Q}.scales"], None, f"{Q}.scales is missing"),
    ("llama_gptq", [f"{Q}.qzeros"], None, f"{Q}.qzeros is missing"),
    ("llama_gptq", [], {f"{Q}.qweight": ("I32", np.zeros((5, 48), np.int32))}, f"{Q}.qweight has shape"),
    ("llama_gptq", [], {f"{Q}.qweight": ("I32", np.zeros((6, 40), np.int32))}, f"{Q}.scales has shape"),
    ("llama_gptq", [], {f"{Q}.qzeros": ("I32", np.zeros((3, 5), np.int32))}, f"{Q}.qzeros has shape"),
    ("llama_gptq", [], {f"{Q}.scales": ("I32", np.zeros((3, 48), np.int32))}, f"{Q}.scales has dtype int32"),
    ("llama_gptq_act", [f"{Q}.g_idx"], None, f"{Q}.g_idx is missing"),
    ("llama_fp8", [f"{Q}.weight_scale"], None, f"{Q}.weight_scale is missing"),
    ("llama_fp8", [], {f"{Q}.weight_scale": ("F32", np.ones((47, 1), np.float32))}, f"{Q}.weight_scale has shape"),
    ("llama_fp8_block", [], {f"{Q}.weight_scale_inv": ("F32", np.ones((3, 2), np.float32))},
     f"{Q}.weight_scale_inv has shape"),
    ("llama_int4", [f"{Q}.weight_zero_point"], None, f"{Q}.weight_zero_point is missing"),
    ("llama_int4", [], {f"{Q}.weight_packed": ("I32", np.zeros((48, 5), np.int32))}, f"{Q}.weight_packed has shape"),
])
def test_malformed_quantized_checkpoint(tmp_path, case, drop, replace, match):
    d = rewrite(tmp_path, case, drop=drop, replace=replace)
    with pytest.raises(tpmax.LoadError, match=match.replace(".", r"\.")) as e:
        tpmax.load(d, devices="cpu:0,1", progress=False)
    assert str(e.value).startswith(f"{d}: tensor {Q}.") or str(e.value).startswith(f"{d}: {Q}")


@pytest.mark.parametrize("edit, match", [
    (lambda c: c["quantization_config"].update(bits=3), "GPTQ bits=3 unsupported"),
    (lambda c: c["quantization_config"].update(quant_method="awq"), "unsupported quant_method 'awq'"),
    (lambda c: c["quantization_config"].update(checkpoint_format="marlin"), "checkpoint_format 'marlin'"),
])
def test_unsupported_quant_config(tmp_path, edit, match):
    d = rewrite(tmp_path, "llama_gptq", config=edit)
    with pytest.raises(tpmax.ConfigError, match=match) as e:
        tpmax.load(d, devices="cpu", progress=False)
    assert str(d / "config.json") in str(e.value)


def test_quantized_tensors_without_quantization_config(tmp_path):
    d = rewrite(tmp_path, "llama_gptq", config=lambda c: c.pop("quantization_config"))
    with pytest.raises(tpmax.LoadError, match="looks quantized but config.json has no quantization_config"):
        tpmax.load(d, devices="cpu", progress=False)


def test_cli_info_shows_quantization_and_bytes(capsys):
    from tpmax.cli import main

    assert main(["info", "--model", str(FIX / "llama_fp8_block"), "--devices", "cpu:0,1"]) == 0
    out = capsys.readouterr().out
    assert "quant   fp8 e4m3, block 16x16 scales" in out
    lines = [l for l in out.splitlines() if l.startswith(("cpu:0 ", "cpu:1 "))]
    assert len(lines) == 2 and all("MiB resident" in l and "of float32" in l for l in lines)


@pytest.mark.parametrize("case", CASES)
def test_each_device_reads_only_its_share(case):
    """Loading one device's piece (as one MPI rank would, `OneRankOf`) reads about 1/tp of what
    a TP 1 load reads: packed words, scales and zeros of its own rows or columns. What every
    device reads whole (norms, GPTQ g_idx, a scale group cut by a split) is a large part of
    this tiny model (hidden 48), hence the 25-30 % allowance; reading everything would be tp x."""
    from test_models import OneRankOf

    whole = tpmax.load(FIX / case, devices="cpu", progress=False).bytes_read
    for tp in (2, 3, 4):
        devs = tpmax.devices(spec(tp))
        parts = [tpmax.load(FIX / case, comm=OneRankOf(devs, [r]), progress=False).bytes_read for r in range(tp)]
        assert sum(parts) <= 1.25 * whole and max(parts) <= 1.3 * whole / tp, (tp, parts, whole)
