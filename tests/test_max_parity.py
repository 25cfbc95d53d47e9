"""MAX's documented API (docs/max_parity.md): every tpmax name the table gives exists, and the
parameters MAX documents behave as MAX says — `DistributedGemmConfig.generate`, `clip_qkv`,
`use_subgraphs` / `subgraph_layer_groups` and `logits_scaling` of the transformer."""
import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest

import tpmax
from tpmax.nn.attention import attention_inputs
from test_transformer import build, new_cache, run

DOC = Path(__file__).parent.parent / "docs" / "max_parity.md"


def test_every_name_in_the_parity_table_exists():
    names = set(re.findall(r"`(tpmax(?:\.\w+)+)`", DOC.read_text()))
    assert len(names) > 20
    for name in sorted(names):
        obj = tpmax
        for part in name.split(".")[1:]:
            obj = getattr(obj, part, None)
            assert obj is not None, f"docs/max_parity.md names {name}, which does not exist"


@pytest.mark.parametrize("env, enabled", [({}, True), ({"LLAMA_ENABLE_DIST_GEMM_KERNELS": "1"}, True),
                                          ({"LLAMA_ENABLE_DIST_GEMM_KERNELS": "yes"}, True),
                                          ({"LLAMA_ENABLE_DIST_GEMM_KERNELS": ""}, False),
                                          ({"LLAMA_ENABLE_DIST_GEMM_KERNELS": "0"}, False),
                                          ({"LLAMA_ENABLE_DIST_GEMM_KERNELS": "False"}, False)])
def test_distributed_gemm_config_generate(env, enabled, monkeypatch):
    assert tpmax.DistributedGemmConfig.generate(env) == tpmax.DistributedGemmConfig(enabled)
    monkeypatch.delenv("LLAMA_ENABLE_DIST_GEMM_KERNELS", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert tpmax.DistributedGemmConfig.generate().enable_matmul_allreduce is enabled


CFG = tpmax.ModelConfig(arch="llama", vocab_size=29, hidden_size=12, n_layers=2, n_heads=3, n_kv_heads=1,
                        head_dim=4, ffn_size=10)
SEQS = [np.array([1, 2, 3, 4, 5]), np.array([7, 8])]


@pytest.mark.parametrize("tp", [1, 2, 3])
def test_clip_qkv_clamps_the_qkv_weights(tp):
    """clip_qkv=c gives what the unclipped layer gives on weights clamped to [-c, c] (and
    differs from the unclipped layer), at every TP degree."""
    _, weights, _, comm = build(CFG, tp, 3)
    c = float(np.quantile(np.abs(tpmax.to_numpy(weights.layers[0].attn[0].wqkv)), 0.5))
    att = dataclasses.replace(CFG.attention(), clip_qkv=c)
    x = np.random.default_rng(0).standard_normal((5, 12)).astype(np.float32)
    xs = [tpmax.asarray(x, d) for d in comm.devices]
    clipped_ws = [dataclasses.replace(w, wqkv=np.clip(w.wqkv, -c, c)) for w in weights.layers[0].attn]

    def attention(cfg, ws):
        cache = new_cache(CFG, comm.devices)
        cache.add(0)
        slots = cache.reserve([0], [5])
        inputs = attention_inputs(cfg, CFG.rope(), slots, comm.devices)
        return tpmax.to_numpy(tpmax.tensor_parallel_attention_with_rope(xs, ws, cfg, inputs, cache.pages, 0, comm)[0])

    got = attention(att, weights.layers[0].attn)
    want = attention(CFG.attention(), clipped_ws)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(got, attention(CFG.attention(), weights.layers[0].attn), atol=1e-4)
    with pytest.raises(ValueError, match="clip_qkv must be positive"):
        dataclasses.replace(att, clip_qkv=0.0)


def test_logits_scaling_divides_the_logits():
    _, weights, cache, comm = build(CFG, 2, 1)
    (a,) = run(weights, CFG, cache, comm, SEQS, [0, 1])
    (b,) = run(weights, CFG, new_cache(CFG, comm.devices), comm, SEQS, [0, 1], logits_scaling=4.0)
    np.testing.assert_allclose(b, a / 4.0, rtol=1e-6)
    g = dataclasses.replace(CFG, logits_scaling=2.0)  # None = the model's own scaling
    (c,) = run(weights, g, new_cache(g, comm.devices), comm, SEQS, [0, 1])
    np.testing.assert_allclose(c, a / 2.0, rtol=1e-6)


def test_use_subgraphs_has_no_numeric_effect():
    _, weights, cache, comm = build(CFG, 3, 2)
    (a,) = run(weights, CFG, cache, comm, SEQS, [0, 1])
    (b,) = run(weights, CFG, new_cache(CFG, comm.devices), comm, SEQS, [0, 1], use_subgraphs=True,
               subgraph_layer_groups=[[1, 0]])
    np.testing.assert_array_equal(a, b)
