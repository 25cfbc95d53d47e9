"""Sampling, continuous batching, stop conditions, streaming, and the CLI."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import tpmax
from tpmax.generate import SamplingParams, sample
from tpmax.loader import load

FIX = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def tiny():
    return load(FIX / "hf" / "llama", devices="cpu:0,1", progress=False)


def greedy_ref(model, prompt, n):
    """n greedy tokens by re-running the whole sequence each step (no cache reuse)."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(tpmax.logits(model, [seq])[0][-1].argmax()))
    return seq[len(prompt):]


def test_continuous_batching_equals_each_prompt_alone(tiny):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, tiny.cfg.vocab_size, n).tolist() for n in (3, 9, 5, 1, 12)]
    lengths = [4, 7, 2, 6, 3]
    engine = tpmax.Engine(tiny, max_batch=2, cache_tokens=64, page_size=4)  # prompts must wait and join later
    for p, n in zip(prompts, lengths):
        engine.submit(p, SamplingParams(max_new_tokens=n, stop_token_ids=()))
    outs = engine.run()
    assert [c.id for c in outs] == list(range(5))
    for c, p, n in zip(outs, prompts, lengths):
        assert c.finish_reason == "length" and c.tokens == greedy_ref(tiny, p, n)
    assert engine.cache.free_pages == engine.cache.num_pages  # every page returned
    s = engine.stats.as_dict()
    assert s["prefill_tokens"] == sum(map(len, prompts)) and s["decode_tokens"] == sum(lengths) - len(prompts)


def test_stop_token_and_eos(tiny):
    prompt = [1, 2, 3]
    first = greedy_ref(tiny, prompt, 3)
    engine = tpmax.Engine(tiny, cache_tokens=32)
    engine.submit(prompt, SamplingParams(max_new_tokens=10, stop_token_ids=(first[2],)))
    (c,) = engine.run()
    assert c.tokens == first and c.finish_reason == "stop"


def test_kv_cache_full_ends_only_that_request(tiny):
    engine = tpmax.Engine(tiny, max_batch=2, cache_tokens=12, page_size=4)  # 3 pages
    engine.submit([1, 2, 3], SamplingParams(max_new_tokens=30, stop_token_ids=()))
    engine.submit([4], SamplingParams(max_new_tokens=2, stop_token_ids=()))
    a, b = engine.run()
    assert b.finish_reason == "length" and b.tokens == greedy_ref(tiny, [4], 2)
    assert a.finish_reason == "kv_cache_full" and a.tokens == greedy_ref(tiny, [1, 2, 3], len(a.tokens))


@pytest.mark.parametrize("bad, match", [([], "empty prompt"), ([10**6], "outside the vocabulary"),
                                        (list(range(200)), "context|does not fit")])
def test_submit_rejects_bad_prompts(tiny, bad, match):
    engine = tpmax.Engine(tiny, cache_tokens=64)
    with pytest.raises(ValueError, match=match):
        engine.submit(bad)
    assert not engine.busy


@pytest.mark.parametrize("kw, match", [({"max_new_tokens": 0}, "max_new_tokens"), ({"temperature": -1}, "temperature"),
                                       ({"top_p": 0}, "top_p"), ({"top_k": -2}, "top_k")])
def test_bad_sampling_params(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kw)


@settings(max_examples=100)
@given(st.lists(st.floats(-20, 20), min_size=2, max_size=30), st.integers(0, 2**32 - 1),
       st.floats(0.1, 2.0), st.integers(0, 5), st.floats(0.05, 1.0))
def test_sampling_respects_top_k_top_p(lg, seed, temp, top_k, top_p):
    lg = np.array(lg, np.float32)
    p = SamplingParams(temperature=temp, top_k=top_k, top_p=top_p)
    tok = sample(lg, p, np.random.default_rng(seed))
    assert tok == sample(lg, p, np.random.default_rng(seed))  # seeded: reproducible
    if top_k:
        assert lg[tok] >= np.sort(lg)[-min(top_k, len(lg))]
    z = lg.astype(np.float64)  # the sampler's arithmetic: float64 (float32 here would round 0.5 + 1e-9 to 0.5)
    probs = np.exp((z - z.max()) / temp)
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    cum_before = np.cumsum(probs[order]) - probs[order]
    if not top_k:  # the token lies in the nucleus: the mass strictly before it is < top_p
        assert cum_before[list(order).index(tok)] < top_p + 1e-9


def test_greedy_limits():
    lg = np.array([0.1, 3.0, 2.9], np.float32)
    assert sample(lg, SamplingParams(), np.random.default_rng(0)) == 1
    assert sample(lg, SamplingParams(temperature=5.0, top_k=1), np.random.default_rng(0)) == 1
    assert sample(lg, SamplingParams(temperature=5.0, top_p=0.01), np.random.default_rng(0)) == 1


class FakeStream:
    """Decodes token t to the character chr(97 + t % 26) (enough to test stop strings)."""

    def push(self, t):
        return chr(97 + t % 26)

    def flush(self):
        return ""


@pytest.mark.parametrize("stop", [("c",), ("bc",), ("xyz", "cd")])
def test_stop_strings_are_cut_and_held_back(tiny, stop):
    engine = tpmax.Engine(tiny, cache_tokens=64)
    engine.submit([1], SamplingParams(max_new_tokens=8, stop=stop))
    req = engine.waiting[0]
    req.stream = FakeStream()
    pieces = []
    for tok in [0, 1, 2, 3, 4]:  # "abcde"
        if req.finish_reason:
            break
        pieces.append(engine._emit(req, new=req.stream.push(tok)))
    text = "".join(pieces)
    cut = min(("abcde".find(s) for s in stop if s in "abcde"))
    assert text == "abcde"[:cut] and req.finish_reason == "stop"


# ------------------------------------------------------------------------------------------
# The real default model through the CLI.


def cli(*args):
    return subprocess.run([sys.executable, "-m", "tpmax.cli", *args], capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_cli_generate_streams_the_answer_with_stats():
    r = cli("generate", "--devices", "cpu:0,1", "--max-new-tokens", "16", "--stats", "What is the capital of France?")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    stats = json.loads(r.stderr.strip().splitlines()[-1])
    assert set(stats) >= {"prefill_tokens", "prefill_s", "decode_tokens", "decode_s", "decode_tok_per_s"}
    assert stats["prefill_tokens"] > 0 and stats["decode_tokens"] > 0


@pytest.mark.slow
def test_cli_perplexity_json():
    ref = json.loads((FIX / "smollm2_reference.json").read_text())["perplexity"]
    r = cli("perplexity", "--devices", "cpu:0,1", "--file", str(FIX / "perplexity.txt"), "--context-length", "128", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["tokens"] == ref["scored_tokens"] and abs(out["perplexity"] - ref["perplexity"]) < 1e-3 * ref["perplexity"]


def test_cli_errors_are_one_line():
    r = cli("generate", "--model", "/definitely/not/here", "hi")
    assert r.returncode == 2 and r.stderr.startswith("tpmax: error:") and "Traceback" not in r.stderr
    r = cli("generate", "--devices", "gpu:7", "--model", str(FIX / "hf" / "llama"), "hi")
    assert r.returncode == 2 and "GPU" in r.stderr
    r = cli("info")
    assert r.returncode == 0 and "nccl" in r.stdout
