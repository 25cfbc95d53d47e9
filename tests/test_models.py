"""Real checkpoints end to end: tiny HF models of every supported architecture against
logits from transformers (fixtures), GGUF files of every supported tensor type against the
reference, the real SmolLM2 GGUF against transformers' greedy answer and perplexity, and every
malformed-input case."""
import dataclasses
import json
import math
import os
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import safetensors.numpy as stn

import tpmax
from tpmax.generation.api import encode_prompt
from tpmax.checkpoint.loader import load
import reference as ref

FIX = Path(__file__).parent / "fixtures"
HF_CASES = ["llama", "llama_tied", "mistral", "qwen2", "qwen3", "granite", "llama_sharded", "llama_linear"]


def spec(tp):
    return "cpu:" + ",".join(map(str, range(tp)))


def hf_reference(case):
    r = stn.load_file(str(FIX / "hf" / case / "reference.safetensors"))
    return [(r[f"input_ids_{i}"], r[f"logits_{i}"]) for i in range(3)]


@pytest.mark.parametrize("tp", [1, 2, 3, 4])
@pytest.mark.parametrize("case", HF_CASES)
def test_hf_checkpoints_match_transformers(case, tp):
    model = load(FIX / "hf" / case, devices=spec(tp), progress=False)
    pairs = hf_reference(case)
    out = tpmax.logits(model, [ids for ids, _ in pairs])  # one ragged batch
    for got, (_, want) in zip(out, pairs):
        assert got.dtype == np.float32 and got.shape == want.shape
        assert np.abs(got - want).max() <= 1e-4


def test_linear_rope_scaling_is_what_transformers_applies():
    """The llama_linear fixture's logits need its linear scaling: without it they differ."""
    model = load(FIX / "hf" / "llama_linear", devices="cpu:0,1", progress=False)
    assert model.cfg.rope_scaling == tpmax.LinearScaling(4.0)
    unscaled = dataclasses.replace(model, cfg=dataclasses.replace(model.cfg, rope_scaling=None))
    (ids, want), = hf_reference("llama_linear")[2:]
    assert np.abs(tpmax.logits(unscaled, [ids])[0] - want).max() > 0.05


def test_transformers_4x_config_spelling(tmp_path):
    d = tmp_path / "llama4x"
    shutil.copytree(FIX / "hf" / "llama", d)
    c = json.loads((d / "config.json").read_text())
    p = c.pop("rope_parameters")
    c["rope_theta"] = p.pop("rope_theta")
    c["rope_scaling"] = p
    (d / "config.json").write_text(json.dumps(c))
    new = load(d, devices="cpu:0,1", progress=False).cfg
    assert new == load(FIX / "hf" / "llama", devices="cpu", progress=False).cfg
    assert new.rope_scaling is not None and new.rope_theta == 500000.0


# ------------------------------------------------------------------------------------------
# GGUF files written here, one per tensor type.


def permute_for_gguf(w, n_head):
    """llama.cpp's q/k row order: each head's two halves interleaved."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {"attn_norm": "attn_norm", "q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v",
              "o_proj": "attn_output", "mlp_norm": "ffn_norm", "gate_proj": "ffn_gate", "up_proj": "ffn_up",
              "down_proj": "ffn_down"}


def write_gguf(path, cfg, full, qtype, *, tied=False, skip=(), meta=None):
    """Write `full` (table names, HF layout) as a llama GGUF, `meta(writer)` adding metadata;
    returns the dequantized weights."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.n_layers)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.ffn_size)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_context_length(cfg.max_seq_len)
    w.add_vocab_size(cfg.vocab_size)
    if meta is not None:
        meta(w)
    deq = {}
    qt = gguf.GGMLQuantizationType[qtype]
    for name, a in full.items():
        if name in skip or (tied and name == "lm_head"):
            continue
        if name.startswith("layers."):
            _, i, base = name.split(".")
            gname = f"blk.{i}.{GGUF_NAMES[base]}.weight"
            if base == "q_proj":
                a = permute_for_gguf(a, cfg.n_heads)
            if base == "k_proj":
                a = permute_for_gguf(a, cfg.n_kv_heads)
        else:
            gname = {"embed": "token_embd.weight", "norm": "output_norm.weight", "lm_head": "output.weight"}[name]
        t = qt if a.ndim == 2 else gguf.GGMLQuantizationType.F32
        q = gguf.quants.quantize(a, t)
        w.add_tensor(gname, q, raw_dtype=t)
        d = gguf.quants.dequantize(q, t).reshape(a.shape)
        if name.endswith("q_proj"):
            d = permute_back(d, cfg.n_heads)
        if name.endswith("k_proj"):
            d = permute_back(d, cfg.n_kv_heads)
        deq[name] = d
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return deq


def permute_back(w, n_head):
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_CFG = tpmax.ModelConfig(arch="llama", vocab_size=67, hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=2,
                             head_dim=16, ffn_size=96, norm_eps=1e-5, rope_theta=10000.0, max_seq_len=64)


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0"])
def test_gguf_types_match_reference(tmp_path, qtype):
    full = tpmax.random_weights(GGUF_CFG, seed=3, std=0.2)
    deq = write_gguf(tmp_path / "m.gguf", GGUF_CFG, full, qtype)
    seq = np.random.default_rng(0).integers(0, GGUF_CFG.vocab_size, 9)
    want, _ = ref.forward(deq, GGUF_CFG, seq)  # HF layout, half-split RoPE
    for tp in (1, 2, 3, 4):
        model = load(tmp_path / "m.gguf", devices=spec(tp), progress=False)
        assert model.cfg.rope_interleaved and model.tokenizer is None
        (got,) = tpmax.logits(model, [seq])
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_gguf_tied_output(tmp_path):
    full = tpmax.random_weights(GGUF_CFG, seed=4, std=0.2)
    deq = write_gguf(tmp_path / "t.gguf", GGUF_CFG, full, "F32", tied=True)
    model = load(tmp_path / "t.gguf", devices="cpu:0,1", progress=False)
    assert model.cfg.tie_embeddings
    seq = np.arange(5)
    np.testing.assert_allclose(tpmax.logits(model, [seq])[0],
                               ref.forward(deq, dataclasses.replace(GGUF_CFG, tie_embeddings=True), seq)[0],
                               rtol=1e-4, atol=1e-4)


def byte_tokenizer(eos, eot=None):
    """GGUF metadata of a byte-level tokenizer of 260 tokens (<unk> <s> </s>, the bytes, "ab")."""
    from tokenizers import pre_tokenizers

    def meta(w):
        tokens = ["<unk>", "<s>", "</s>"] + sorted(pre_tokenizers.ByteLevel.alphabet()) + ["ab"]
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt2")
        w.add_token_list(tokens)
        w.add_token_merges(["a b"])
        w.add_token_types([3] * 3 + [1] * (len(tokens) - 3))
        w.add_bos_token_id(1)
        w.add_eos_token_id(eos)
        if eot is not None:
            w.add_eot_token_id(eot)
    return meta


@pytest.mark.parametrize("key", ["eos", "eot"])
def test_gguf_eos_stops_generation_by_default(tmp_path, key):
    """No stop_token_ids given: generation ends at the GGUF's tokenizer.ggml.eos_token_id (or
    its end-of-turn id), finish reason "stop"."""
    cfg = dataclasses.replace(GGUF_CFG, vocab_size=260)
    full = tpmax.random_weights(cfg, seed=6, std=0.2)
    path, prompt = tmp_path / "m.gguf", [1, 40, 41]
    write_gguf(path, cfg, full, "F32", meta=byte_tokenizer(eos=2))
    model = load(path, devices="cpu:0,1", progress=False)
    greedy = []
    for _ in range(4):
        greedy.append(int(tpmax.logits(model, [prompt + greedy])[0][-1].argmax()))
    assert {greedy[2], 2}.isdisjoint(greedy[:2])  # the stop id comes third
    eos = dict(eos=greedy[2]) if key == "eos" else dict(eos=2, eot=greedy[2])
    write_gguf(path, cfg, full, "F32", meta=byte_tokenizer(**eos))
    engine = tpmax.Engine(load(path, devices="cpu:0,1", progress=False), cache_tokens=64)
    engine.submit(prompt)  # default sampling parameters
    (c,) = engine.run()
    assert (c.tokens, c.finish_reason) == (greedy[:3], "stop")


# ------------------------------------------------------------------------------------------
# Malformed inputs: every one a tpmax LoadError that names the file and the problem.


def hf_copy(tmp_path, case="llama"):
    d = tmp_path / case
    shutil.copytree(FIX / "hf" / case, d)
    return d


def edit_tensors(d, fn):
    p = d / "model.safetensors"
    t = stn.load_file(str(p))
    fn(t)
    stn.save_file(t, str(p))


def edit_config(d, fn):
    c = json.loads((d / "config.json").read_text())
    fn(c)
    (d / "config.json").write_text(json.dumps(c))


BAD_HF = {
    "missing tensor": (lambda d: edit_tensors(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight")),
                       "missing tensor.*layers.1.up_proj"),
    "extra tensor": (lambda d: edit_tensors(d, lambda t: t.update({"model.layers.0.mlp.extra.weight": np.ones(2, np.float32)})),
                     "unexpected tensor"),
    "extra layer": (lambda d: edit_tensors(d, lambda t: t.update({"model.layers.7.mlp.up_proj.weight": np.ones((100, 48), np.float32)})),
                    "the config has 2 layers, the checkpoint holds 8"),
    "wrong shape": (lambda d: edit_tensors(d, lambda t: t.update({"model.norm.weight": np.ones(47, np.float32)})),
                    r"norm has shape \(47,\), expected \(48,\)"),
    "nan weights": (lambda d: edit_tensors(d, lambda t: t["model.layers.0.self_attn.k_proj.weight"].__setitem__((0, 0), np.nan)),
                    "k_proj contains NaN"),
    "truncated file": (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:5000]),
                       "not a valid safetensors file"),
    "bad json": (lambda d: (d / "config.json").write_text("{not json"), "config.json: invalid JSON"),
    "unsupported arch": (lambda d: edit_config(d, lambda c: c.update(model_type="gpt2")), "unsupported model_type 'gpt2'"),
    "missing key": (lambda d: edit_config(d, lambda c: c.pop("hidden_size")), "missing required key 'hidden_size'"),
    "unsupported rope": (lambda d: edit_config(d, lambda c: c["rope_parameters"].update(rope_type="yarn")),
                         "unsupported rope scaling type 'yarn'"),
    "no weights": (lambda d: (d / "model.safetensors").unlink(), "no model\\*.safetensors weights"),
    "pickle only": (lambda d: (d / "model.safetensors").rename(d / "pytorch_model.bin"),
                    r"no model\*.safetensors weights \(pickled .bin checkpoints are not loaded\)"),
    "no config": (lambda d: (d / "config.json").unlink(), "no config.json"),
}


@pytest.mark.parametrize("case", sorted(BAD_HF))
def test_malformed_hf_checkpoints(tmp_path, case):
    d = hf_copy(tmp_path)
    damage, match = BAD_HF[case]
    damage(d)
    with pytest.raises(tpmax.LoadError, match=match) as e:
        load(d, devices="cpu:0,1", progress=False)
    assert str(d) in str(e.value)


def test_sharded_index_lists_missing_file(tmp_path):
    d = hf_copy(tmp_path, "llama_sharded")
    next(d.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(tpmax.LoadError, match="listed in the index but missing"):
        load(d, progress=False)


def test_shards_without_an_index_load(tmp_path):
    d = hf_copy(tmp_path, "llama_sharded")
    (d / "model.safetensors.index.json").unlink()  # the model*.safetensors files are read instead
    model = load(d, devices="cpu:0,1", progress=False)
    for got, (_, want) in zip(tpmax.logits(model, [ids for ids, _ in hf_reference("llama_sharded")]),
                              hf_reference("llama_sharded")):
        assert np.abs(got - want).max() <= 1e-4


def test_heads_that_cannot_be_split(tmp_path):
    with pytest.raises(tpmax.LoadError, match="cannot split 4 attention heads over 5 devices"):
        load(FIX / "hf" / "llama_tied", devices=spec(5), progress=False)


def test_empty_device_spec_is_an_error():
    with pytest.raises(ValueError, match="empty device spec"):
        load(FIX / "hf" / "llama", devices="", progress=False)


def test_bad_paths(tmp_path):
    with pytest.raises(tpmax.LoadError, match="no such file"):
        load(tmp_path / "nope", progress=False)
    (tmp_path / "x.bin").write_bytes(b"\0" * 10)
    with pytest.raises(tpmax.LoadError, match="expected a model directory or a .gguf file"):
        load(tmp_path / "x.bin", progress=False)


def test_malformed_gguf_files(tmp_path):
    full = tpmax.random_weights(GGUF_CFG, seed=1)
    good = tmp_path / "good.gguf"
    write_gguf(good, GGUF_CFG, full, "Q8_0")
    data = good.read_bytes()
    (tmp_path / "trunc.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(tpmax.LoadError, match="trunc.gguf: not a valid GGUF file"):
        load(tmp_path / "trunc.gguf", progress=False)
    (tmp_path / "junk.gguf").write_bytes(b"NOTGGUF" + bytes(100))
    with pytest.raises(tpmax.LoadError, match="junk.gguf: not a valid GGUF file"):
        load(tmp_path / "junk.gguf", progress=False)
    write_gguf(tmp_path / "missing.gguf", GGUF_CFG, full, "F16", skip={"layers.0.v_proj"})
    with pytest.raises(tpmax.LoadError, match="missing.gguf: missing tensor.*layers.0.v_proj"):
        load(tmp_path / "missing.gguf", progress=False)


def test_gguf_unsupported_type_and_arch(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 144), np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q4_K)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(tpmax.LoadError, match="token_embd.weight has unsupported type Q4_K"):
        load(tmp_path / "k.gguf", progress=False)
    w = gguf.GGUFWriter(str(tmp_path / "g.gguf"), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(tpmax.LoadError, match="unsupported GGUF architecture 'gpt2'"):
        load(tmp_path / "g.gguf", progress=False)


# ------------------------------------------------------------------------------------------
# The real SmolLM2 GGUF (fetched from its wheel as part of the test set-up).

SMOL = json.loads((FIX / "smollm2_reference.json").read_text())


@pytest.fixture(scope="module", params=[1, 2], ids=["tp1", "tp2"])
def smollm2(request):
    return load(None, devices=spec(request.param), progress=False)


@pytest.mark.slow
def test_smollm2_greedy_matches_transformers(smollm2):
    ids = encode_prompt(smollm2, SMOL["chat"]["messages"][0]["content"])
    assert ids == SMOL["chat"]["prompt_ids"]
    engine = tpmax.Engine(smollm2, cache_tokens=128)
    engine.submit(ids, tpmax.SamplingParams(max_new_tokens=16, stop_token_ids=()))  # 16 plain argmax steps
    (c,) = engine.run()
    assert c.tokens == SMOL["chat"]["greedy_ids"]


@pytest.mark.slow
def test_smollm2_perplexity_matches_transformers(smollm2):
    p = SMOL["perplexity"]
    ids = smollm2.tokenizer.encode((FIX / "perplexity.txt").read_text(encoding="utf-8"))
    assert ids == p["ids"]
    ppl, n = tpmax.perplexity(smollm2, ids, context_length=p["context_length"])
    assert n == p["scored_tokens"]
    assert abs(ppl - p["perplexity"]) <= 1e-3 * p["perplexity"]


@pytest.mark.parametrize("dtype, tol", [("bfloat16", 0.08), ("float16", 0.01)])
def test_half_precision_weights(dtype, tol):
    with pytest.warns(UserWarning, match=f"{dtype} on CPU runs slower than float32"):
        model = load(FIX / "hf" / "llama", devices="cpu:0,1", dtype=dtype, progress=False)
    assert model.weights.layers[0].w13[1].dtype == tpmax.as_dtype(dtype)
    assert model.executor.new_cache(16).pages[0].dtype == tpmax.as_dtype(dtype)
    for ids, want in hf_reference("llama"):
        (got,) = tpmax.logits(model, [ids])
        assert got.dtype == np.float32
        assert np.abs(got - want).max() <= tol * np.abs(want).max()


# ------------------------------------------------------------------------------------------
# Nothing read from outside the model directory, nothing unbounded, nothing silently wrong.


def index_dir(tmp_path, weight_map):
    """The sharded fixture with its index's weight_map replaced."""
    d = hf_copy(tmp_path, "llama_sharded")
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    idx["weight_map"] = weight_map(idx["weight_map"], d)
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    return d


def _first_to(target):
    def edit(wm, d):
        k = next(iter(wm))
        return {**wm, k: target(d, wm[k])}
    return edit


OUTSIDE = {
    "dotdot": (_first_to(lambda d, f: f"../outside/{f}"), "outside the model directory"),
    "absolute": (_first_to(lambda d, f: str((d.parent / "outside" / f).resolve())), "outside the model directory"),
    "not a mapping": (lambda wm, d: list(wm.items()), "weight_map must be a non-empty mapping"),
    "non-string file": (_first_to(lambda d, f: 3), "must be a file name"),
    "empty": (lambda wm, d: {}, "weight_map must be a non-empty mapping"),
}


@pytest.mark.parametrize("case", sorted(OUTSIDE))
def test_index_never_reads_outside_the_directory(tmp_path, case):
    edit, match = OUTSIDE[case]
    outside = tmp_path / "outside"
    shutil.copytree(FIX / "hf" / "llama_sharded", outside)  # a loadable copy the index could point at
    d = index_dir(tmp_path, edit)
    with pytest.raises(tpmax.LoadError, match=match):
        load(d, progress=False)


def test_symlinks_out_and_fifos_are_refused(tmp_path):
    d = hf_copy(tmp_path)
    elsewhere = tmp_path / "elsewhere.safetensors"
    (d / "model.safetensors").rename(elsewhere)
    (d / "model.safetensors").symlink_to(elsewhere)
    with pytest.raises(tpmax.LoadError, match="outside the model directory"):
        load(d, progress=False)
    (d / "model.safetensors").unlink()
    os.mkfifo(d / "model.safetensors")  # opening it would block forever
    with pytest.raises(tpmax.LoadError, match="not a regular file"):
        load(d, progress=False)
    os.unlink(d / "config.json")
    os.mkfifo(d / "config.json")
    with pytest.raises(tpmax.LoadError, match="config.json: not a regular file"):
        load(d, progress=False)


def test_hub_cache_layout_symlinks_into_blobs_load(tmp_path):
    snap = tmp_path / "models--org--tiny" / "snapshots" / "abc123"
    blobs = tmp_path / "models--org--tiny" / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in (FIX / "hf" / "llama").iterdir():
        shutil.copy(f, blobs / f.name)
        (snap / f.name).symlink_to(Path("../../blobs") / f.name)
    want = load(FIX / "hf" / "llama", progress=False)
    got = load(snap, progress=False)
    ids = [np.arange(5)]
    np.testing.assert_array_equal(tpmax.logits(got, ids)[0], tpmax.logits(want, ids)[0])


def test_tensor_in_two_shards_is_an_error(tmp_path):
    d = hf_copy(tmp_path, "llama_sharded")
    files = sorted(d.glob("model-0000*.safetensors"))
    a, b = stn.load_file(str(files[0])), stn.load_file(str(files[1]))
    key = next(iter(a))
    b[key] = a[key]
    stn.save_file(b, str(files[1]))
    with pytest.raises(tpmax.LoadError, match="is also in"):
        load(d, progress=False)


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.bool_])
def test_integer_and_bool_weights_are_refused(tmp_path, dtype):
    d = hf_copy(tmp_path)
    key = "model.layers.0.mlp.down_proj.weight"
    edit_tensors(d, lambda t: t.update({key: (t[key] * 10).astype(dtype)}))
    with pytest.raises(tpmax.LoadError, match=f"layers.0.down_proj has dtype {np.dtype(dtype)}"):
        load(d, progress=False)


def test_huge_layer_count_fails_before_allocating(tmp_path):
    d = hf_copy(tmp_path)
    edit_config(d, lambda c: c.update(num_hidden_layers=10**9))
    with pytest.raises(tpmax.LoadError, match="n_layers must be a positive integer"):
        load(d, progress=False)
    edit_config(d, lambda c: c.update(num_hidden_layers=3))
    with pytest.raises(tpmax.LoadError, match="config has 3 layers, the checkpoint holds 2"):
        load(d, progress=False)


# Config values: every key a config may carry, and values of every type and range. The
# expected outcome is written from what each key means (Hugging Face's config semantics).
BASE_5X = json.loads((FIX / "hf" / "llama" / "config.json").read_text())  # rope_parameters
BASE_4X = {k: v for k, v in BASE_5X.items() if k != "rope_parameters"}  # rope_theta + rope_scaling
BASE_4X["rope_theta"] = BASE_5X["rope_parameters"]["rope_theta"]
BASE_4X["rope_scaling"] = {k: v for k, v in BASE_5X["rope_parameters"].items() if k != "rope_theta"}
INT_KEYS = {"vocab_size": "vocab_size", "hidden_size": "hidden_size", "num_hidden_layers": "n_layers",
            "num_attention_heads": "n_heads", "num_key_value_heads": "n_kv_heads", "head_dim": "head_dim",
            "intermediate_size": "ffn_size", "max_position_embeddings": "max_seq_len"}
OPTIONAL_INTS = {"num_key_value_heads": 6, "head_dim": 8, "max_position_embeddings": 4096}  # defaults here
CONFIG_KEYS = list(INT_KEYS) + ["rms_norm_eps", "tie_word_embeddings", "attention_bias", "mlp_bias", "hidden_act",
                                "rope_theta", "rope_parameters", "rope_scaling"]
LINEAR2 = {"rope_type": "linear", "factor": 2.0}
VALUES = ["false", "true", "12", "gelu_pytorch_tanh", 0, -1, 4, 0.0, -1e-5, 2.5, 1e30, 10**12,
                          float("nan"), float("inf"), None, [], {}, [1, 2], {"rope_type": "llama3", "factor": -2.0},
                          {"rope_type": "linear", "factor": 0}, {"rope_type": "llama3"}, LINEAR2, True, False, 3.5]


def expected_fields(key, value):
    """The ModelConfig fields `{key: value}` must change in the base config, or None when
    the value must be refused."""
    is_int = isinstance(value, int) and not isinstance(value, bool)
    is_num = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if key in INT_KEYS:
        if value is None:
            value = OPTIONAL_INTS.get(key)
        elif not (is_int and 0 < value <= (4096 if key == "num_hidden_layers" else 2**32)):
            return None
        if value is None:  # a required key
            return None
        heads = {"n_heads": 6, "n_kv_heads": 2, INT_KEYS[key]: value}
        return {INT_KEYS[key]: value} if heads["n_heads"] % heads["n_kv_heads"] == 0 else None
    if key in ("rms_norm_eps", "rope_theta"):
        field, default = {"rms_norm_eps": ("norm_eps", 1e-6), "rope_theta": ("rope_theta", 10000.0)}[key]
        return {field: default} if value is None else {field: float(value)} if is_num and value > 0 else None
    if key in ("tie_word_embeddings", "attention_bias", "mlp_bias"):
        if value is not None and not isinstance(value, bool):
            return None
        if key == "tie_word_embeddings":
            return {"tie_embeddings": bool(value)}
        return None if value else {}  # llama has no o_proj / MLP bias
    if key == "hidden_act":
        return {"activation": {None: "silu", "gelu_pytorch_tanh": "gelu_tanh"}[value]} if value in (
            None, "gelu_pytorch_tanh") else None
    # rope_parameters (5.x: theta inside, 10000 when absent) or rope_scaling (4.x: theta beside it)
    theta = {} if key == "rope_scaling" else {"rope_theta": 10000.0}
    if value is None or value == {}:
        return {**theta, "rope_scaling": None}
    return {**theta, "rope_scaling": tpmax.LinearScaling(2.0)} if value == LINEAR2 else None


@pytest.mark.parametrize("key", CONFIG_KEYS)
def test_config_values_are_type_and_range_checked(key):
    base = BASE_4X if key in ("rope_theta", "rope_scaling") else BASE_5X
    base_cfg = tpmax.ModelConfig.from_hf_config(base)
    for value in VALUES:
        want = expected_fields(key, value)
        try:
            cfg = tpmax.ModelConfig.from_hf_config({**base, key: value}, source="cfg.json")
        except tpmax.ConfigError as e:
            assert want is None, (value, e)
            assert str(e).startswith("cfg.json: ")  # names the file
            continue
        assert want is not None, (value, cfg)
        assert cfg == dataclasses.replace(base_cfg, **want), value  # that field, as given; nothing else changed


def test_config_property_covers_both_rope_spellings():
    """The base configs differ where the property needs them to: 5.x reads only
    rope_parameters, 4.x only rope_theta + rope_scaling, and both say the same."""
    new, old = (tpmax.ModelConfig.from_hf_config(c) for c in (BASE_5X, BASE_4X))
    assert new == old and new.rope_scaling is not None
    assert "rope_theta" not in BASE_5X and "rope_parameters" not in BASE_4X


def test_string_false_is_not_true(tmp_path):
    d = hf_copy(tmp_path)
    edit_config(d, lambda c: c.update(tie_word_embeddings="false"))
    with pytest.raises(tpmax.ConfigError, match="tie_word_embeddings must be true or false, got 'false'"):
        load(d, progress=False)


def test_non_utf8_config(tmp_path):
    d = hf_copy(tmp_path)
    (d / "config.json").write_bytes(b'{"model_type": "llama\xff"}')
    with pytest.raises(tpmax.LoadError, match="config.json: not UTF-8"):
        load(d, progress=False)


def test_gguf_zero_heads_is_a_config_error(tmp_path):
    cfg0 = dataclasses.replace(GGUF_CFG)
    full = tpmax.random_weights(cfg0, seed=1)
    w = gguf.GGUFWriter(str(tmp_path / "z.gguf"), "llama")
    w.add_block_count(cfg0.n_layers)
    w.add_embedding_length(cfg0.hidden_size)
    w.add_feed_forward_length(cfg0.ffn_size)
    w.add_head_count(0)
    w.add_vocab_size(cfg0.vocab_size)
    w.add_tensor("token_embd.weight", full["embed"])
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(tpmax.ConfigError, match="llama.attention.head_count must be positive"):
        load(tmp_path / "z.gguf", progress=False)


def test_model_repr_is_one_line():
    model = load(FIX / "hf" / "llama", devices="cpu:0,1", progress=False)
    r = repr(model)
    assert "\n" not in r and len(r) < 300 and "llama" in r and "cpu:0,cpu:1" in r and "float32" in r


def test_gguf_in_the_model_cache_loads_from_its_shard_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TPMAX_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    full = tpmax.random_weights(GGUF_CFG, seed=5, std=0.2)
    write_gguf(tmp_path / "cache" / "m.gguf", GGUF_CFG, full, "Q8_0")
    seq = [np.arange(7)]
    first = load(tmp_path / "cache" / "m.gguf", devices="cpu:0,1")
    assert "from the shard cache" not in capsys.readouterr().err
    second = load(tmp_path / "cache" / "m.gguf", devices="cpu:0,1")
    assert "from the shard cache" in capsys.readouterr().err
    assert second.cfg == first.cfg
    np.testing.assert_array_equal(tpmax.logits(second, seq)[0], tpmax.logits(first, seq)[0])
    other_split = load(tmp_path / "cache" / "m.gguf", devices="cpu:0,1,2")  # another key: dequantized again
    assert "from the shard cache" not in capsys.readouterr().err
    np.testing.assert_allclose(tpmax.logits(other_split, seq)[0], tpmax.logits(first, seq)[0], rtol=1e-5, atol=1e-5)
    # A model outside the cache is never cached.
    write_gguf(tmp_path / "elsewhere.gguf", GGUF_CFG, full, "Q8_0")
    load(tmp_path / "elsewhere.gguf", progress=False)
    assert len(list((tmp_path / "cache" / "shards").iterdir())) == 2


class OneRankOf:
    """The communicator view of one MPI rank (its devices and their group indices), for
    loading as that rank would; no collective is ever called."""

    def __init__(self, all_devices, ranks):
        self.all_devices, self.ranks, self.tp = list(all_devices), list(ranks), len(all_devices)
        self.devices = [self.all_devices[r] for r in ranks]


@pytest.mark.parametrize("qtype", ["F32", "Q4_1", "Q8_0"])
@pytest.mark.parametrize("tp", [2, 3, 4])
def test_each_rank_reads_only_its_share_of_a_gguf(tmp_path, qtype, tp):
    from tpmax.core.sharding import shard_pieces

    cfg = dataclasses.replace(GGUF_CFG, n_heads=4, n_kv_heads=4, hidden_size=128, head_dim=32, ffn_size=256)
    full = tpmax.random_weights(cfg, seed=2, std=0.2)
    write_gguf(tmp_path / "m.gguf", cfg, full, qtype)
    devs = tpmax.devices(spec(tp))
    whole = load(tmp_path / "m.gguf", devices="cpu", progress=False).bytes_read
    parts = [load(tmp_path / "m.gguf", comm=OneRankOf(devs, [r]), progress=False).bytes_read for r in range(tp)]
    if qtype == "F32":  # exactly the elements the split rule gives each rank
        for r, got in enumerate(parts):
            lay = cfg.layout(tp, r)
            want = sum(np.zeros(a.shape)[idx].size for name, a in full.items()
                       for idx in shard_pieces(name, a.shape, lay))
            assert got == 4 * want
    replicated = 4 * cfg.hidden_size * (2 * cfg.n_layers + 1)  # the norms, on every rank
    # Together about one copy: column splits that cut a quantization block read that block twice.
    assert sum(parts) <= 1.06 * whole + (tp - 1) * replicated, (parts, whole)


@pytest.mark.parametrize("case", ["llama", "llama_sharded", "qwen2"])
@pytest.mark.parametrize("tp", [2, 3, 4])
def test_each_rank_reads_only_its_share_of_safetensors(case, tp):
    """A rank reads exactly the float32 elements the split rule gives its device (norms whole,
    kv heads replicated past TP = n_kv_heads), from one file or several shards."""
    from tpmax.core.sharding import shard_pieces

    whole = load(FIX / "hf" / case, devices="cpu", progress=False)
    full = tpmax.random_weights(whole.cfg, seed=0)  # the checkpoint's tensors by table name, for their shapes
    assert whole.bytes_read == 4 * sum(a.size for a in full.values())
    devs = tpmax.devices(spec(tp))
    for r in range(tp):
        lay = whole.cfg.layout(tp, r)
        want = sum(np.zeros(a.shape)[idx].size for name, a in full.items() for idx in shard_pieces(name, a.shape, lay))
        assert load(FIX / "hf" / case, comm=OneRankOf(devs, [r]), progress=False).bytes_read == 4 * want
