"""Quantized checkpoints (GPTQ, compressed-tensors FP8 / int4, block FP8) against transformers
run on their dequantized weights, at TP 1-4; how far they are from the unquantized model; what
they keep resident per device."""
import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy as stn

import tpmax
from tpmax import quant
from tpmax.comm import communicator
from tpmax.config import ModelConfig
from tpmax.loader import Model
from tpmax.sharding import shard_pieces
from tpmax.weights import DictSource, shard_weights

FIX = Path(__file__).parent / "fixtures" / "hf"
CASES = ["llama_gptq", "llama_gptq_act", "llama_gptq8", "llama_fp8", "llama_fp8_tensor", "llama_fp8_block",
         "llama_int4"]
LINEARS = {"self_attn.q_proj": "q_proj", "self_attn.k_proj": "k_proj", "self_attn.v_proj": "v_proj",
           "self_attn.o_proj": "o_proj", "mlp.gate_proj": "gate_proj", "mlp.up_proj": "up_proj",
           "mlp.down_proj": "down_proj"}
PLAIN = {"model.embed_tokens.weight": "embed", "model.norm.weight": "norm", "lm_head.weight": "lm_head"}
PLAIN_LAYER = {"input_layernorm.weight": "attn_norm", "post_attention_layernorm.weight": "mlp_norm"}


def spec(tp):
    return "cpu:" + ",".join(map(str, range(tp)))


def open_case(case):
    d = FIX / case
    config = json.loads((d / "config.json").read_text())
    qc = quant.quant_config_from_hf(config, source=str(d / "config.json"))
    cfg = ModelConfig.from_hf_config(config, source=str(d / "config.json"))
    return cfg, qc, quant.SafetensorsFile(d / "model.safetensors")


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
    for key in st.keys():
        if key in PLAIN:
            full[PLAIN[key]] = st.get_slice(key)[:].astype(np.float32)
        elif key.endswith(tuple(PLAIN_LAYER)):
            i, rest = key.split(".")[2], key.split(".", 3)[3]
            full[f"layers.{i}.{PLAIN_LAYER[rest]}"] = st.get_slice(key)[:].astype(np.float32)
    for prefix, name, _ in linears(cfg):
        full[name] = quant.read_quantized(linear_reader(st, prefix), qc, (slice(None),), name=prefix).dequantize()
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


@pytest.mark.parametrize("case", CASES)
def test_quantized_vs_unquantized(case):
    """The quantized fixture's reference against the float llama it was made from: a figure
    (meta.json), bounded loosely. Weight errors are ~9 % (int4 group 16), ~0.6 % (int8), ~2.5 %
    (e4m3) rms; this tiny random model amplifies them about 4x in its logits."""
    pairs = list(zip(reference(case), reference("llama")))
    diff = max(np.abs(a[1] - b[1]).max() for a, b in pairs)
    meta = json.loads((FIX / case / "meta.json").read_text())
    assert diff == pytest.approx(meta["max_abs_logit_diff_vs_unquantized_llama"], rel=1e-5)
    rel = np.sqrt(sum(((a[1] - b[1]) ** 2).sum() for a, b in pairs) / sum((b[1] ** 2).sum() for _, b in pairs))
    assert 0 < rel < (0.5 if ("gptq" in case or "int4" in case) and "gptq8" not in case else 0.2)


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
            got = quant.concat_out([quant.read_quantized(linear_reader(st, prefix), qc, idx, name=prefix)
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
            shape = quant.quantized_shape(linear_reader(st, prefix), qc, name=prefix)
            for idx in shard_pieces(table, shape, lay):
                w = quant.read_quantized(linear_reader(st, prefix), qc, idx, name=prefix)
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
