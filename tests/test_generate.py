"""Sampling, continuous batching (admission, preemption, isolation of faults), stop
conditions, streaming, and the CLI."""
import dataclasses
import json
import math
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import tpmax
from tpmax.generation.api import encode_prompt
from tpmax.generation.sampling import SamplingParams, sample
from tpmax.checkpoint.loader import load
from conftest import FIX, make_chat_model_dir


@pytest.fixture(scope="module")
def tiny():
    return load(FIX / "hf" / "llama", devices="cpu:0,1", progress=False)


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    return load(make_chat_model_dir(tmp_path_factory.mktemp("tinychat")), devices="cpu:0,1", progress=False)


def greedy_ref(model, prompt, n):
    """n greedy tokens by re-running the whole sequence each step (no cache reuse)."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(tpmax.logits(model, [seq])[0][-1].argmax()))
    return seq[len(prompt):]


def alone(model, prompt, params, **kw):
    """The completion of one request run by itself."""
    engine = tpmax.Engine(model, max_batch=1, cache_tokens=256, **kw)
    engine.submit(prompt, params)
    (c,) = engine.run()
    return c


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


def rewrite_json(path, fn):
    c = json.loads(path.read_text())
    fn(c)
    path.write_text(json.dumps(c))


@pytest.mark.parametrize("where", ["generation_config", "config", "chat"])
def test_default_params_stop_at_the_models_eos(tmp_path, where):
    """No stop_token_ids given: generation ends at the EOS id the model directory names
    (generation_config.json's list, config.json's id when that is absent, or through
    `tpmax.generate` with a tokenizer), finish reason "stop", the EOS its last token."""
    d = tmp_path / "m"
    if where == "chat":
        make_chat_model_dir(d)
    else:
        shutil.copytree(FIX / "hf" / "llama", d)
    model = load(d, devices="cpu:0,1", progress=False)
    prompt = encode_prompt(model, "hi") if where == "chat" else [1, 2, 3]
    greedy = greedy_ref(model, prompt, 4)
    eos, other = greedy[2], 7
    assert {eos, other, 2}.isdisjoint(greedy[:2])  # the EOS comes third, no other stop id before
    if where == "config":
        (d / "generation_config.json").unlink()
        rewrite_json(d / "config.json", lambda c: c.update(eos_token_id=eos))
    else:  # config.json keeps its eos_token_id 2
        rewrite_json(d / "generation_config.json", lambda c: c.update(eos_token_id=[other, eos]))
    model = load(d, devices="cpu:0,1", progress=False)
    if where == "chat":
        (c,) = tpmax.generate(model, ["hi"])
    else:
        engine = tpmax.Engine(model, cache_tokens=128)  # room for the default max_new_tokens
        engine.submit(prompt)
        (c,) = engine.run()
    assert (c.tokens, c.finish_reason) == (greedy[:3], "stop")


def mixed_requests(model, n, seed):
    """n chat requests of mixed prompt lengths, max tokens, greedy and seeded sampling."""
    rng = np.random.default_rng(seed)
    reqs = []
    for i in range(n):
        prompt = model.tokenizer.encode("".join(chr(97 + c) for c in rng.integers(0, 26, rng.integers(1, 14))))
        params = SamplingParams(max_new_tokens=int(rng.integers(1, 16)), stop_token_ids=(),
                                temperature=0.0 if i % 3 == 0 else 1.0, top_k=int(rng.integers(0, 3)) * 20,
                                seed=int(rng.integers(0, 2**64, dtype=np.uint64)))
        reqs.append((prompt, params))
    return reqs


def check_batched_equals_alone(model, reqs, *, max_batch, cache_tokens, page_size):
    engine = tpmax.Engine(model, max_batch=max_batch, cache_tokens=cache_tokens, page_size=page_size)
    for p, params in reqs:
        engine.submit(p, params)
    outs = engine.run()
    assert [c.id for c in outs] == list(range(len(reqs)))
    for c, (p, params) in zip(outs, reqs):
        ref = alone(model, p, params)
        assert c.finish_reason == "length" and len(c.tokens) == params.max_new_tokens, c
        assert (c.tokens, c.text) == (ref.tokens, ref.text)
    assert engine.cache.free_pages == engine.cache.num_pages and not engine.busy
    return engine


def test_small_cache_admits_by_free_pages_and_preempts_never_drops(chat):
    # 48 requests of up to 13 + 15 tokens on 24 pages of 4: the cache holds a few at a time.
    engine = check_batched_equals_alone(chat, mixed_requests(chat, 48, seed=1), max_batch=16, cache_tokens=96,
                                        page_size=4)
    assert engine.stats.preemptions > 0  # the case that needs preemption was exercised


@settings(max_examples=8, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(2, 24), st.integers(0, 2**32 - 1), st.integers(1, 8), st.sampled_from([2, 4, 8]))
def test_request_mixes_batched_equal_alone(chat, n, seed, max_batch, page_size):
    pages = -(-(14 + 15) // page_size)  # the largest request fits; usually a few at a time
    check_batched_equals_alone(chat, mixed_requests(chat, n, seed), max_batch=max_batch,
                               cache_tokens=pages * page_size * 2, page_size=page_size)


def test_request_that_can_never_fit_is_refused_at_submit(tiny):
    engine = tpmax.Engine(tiny, max_batch=2, cache_tokens=12, page_size=4)  # 3 pages
    with pytest.raises(ValueError, match="does not fit the KV cache.*max_new_tokens"):
        engine.submit([1, 2, 3], SamplingParams(max_new_tokens=30))
    engine.submit([1, 2, 3], SamplingParams(max_new_tokens=10, stop_token_ids=()))  # 12 tokens: fits
    (c,) = engine.run()
    assert c.finish_reason == "length" and c.tokens == greedy_ref(tiny, [1, 2, 3], 10)


def test_max_new_tokens_is_capped_at_the_context(chat):
    (c,) = tpmax.generate(chat, ["hi"], SamplingParams(max_new_tokens=10**12, stop_token_ids=()))
    assert c.finish_reason == "length" and c.prompt_tokens + len(c.tokens) == chat.cfg.max_seq_len


def test_seed_is_the_requests_own_not_its_position(chat):
    params = SamplingParams(max_new_tokens=12, temperature=1.5, seed=7, stop_token_ids=())
    other = SamplingParams(max_new_tokens=5, temperature=1.0, seed=99, stop_token_ids=())
    p = chat.tokenizer.encode("seeded")
    ref = alone(chat, p, params)
    engine = tpmax.Engine(chat, max_batch=4, cache_tokens=256)
    ids = [engine.submit(chat.tokenizer.encode("x" * k), other) for k in range(3)]
    ids += [engine.submit(p, params), engine.submit(p, params)]
    outs = {c.id: c for c in engine.run()}
    assert outs[ids[3]].text == outs[ids[4]].text == ref.text and outs[ids[3]].tokens == ref.tokens


class PaddedVocabTokenizer:
    """A tokenizer that knows only the first `n` ids of the model's vocabulary."""

    def __init__(self, tok, n):
        self.tok, self.vocab_size = tok, n

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def stream(self):
        return tpmax.StreamDecoder(self)

    def decode(self, ids, skip_special_tokens=False):
        ids = list(ids)
        if any(i >= self.vocab_size for i in ids):
            raise ValueError(f"token ids {ids} out of range for vocabulary size {self.vocab_size}")
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


def test_padded_vocab_ids_are_never_sampled(chat):
    p = chat.tokenizer.encode("pad")
    favourite = max(alone(chat, p, SamplingParams(max_new_tokens=20, stop_token_ids=())).tokens)
    model = dataclasses.replace(chat, tokenizer=PaddedVocabTokenizer(chat.tokenizer, favourite))
    engine = tpmax.Engine(model, max_batch=4, cache_tokens=256)
    for seed in range(4):
        engine.submit(p, SamplingParams(max_new_tokens=20, stop_token_ids=(), temperature=0.0 if seed == 0 else 2.0,
                                        seed=seed))
    outs = engine.run()
    assert all(c.finish_reason == "length" and max(c.tokens) < favourite for c in outs), outs


class BrokenDetokenizer:
    def push(self, tok):
        raise RuntimeError("detokenizer exploded")

    def flush(self):
        return ""


def test_one_requests_fault_ends_only_that_request(chat):
    params = SamplingParams(max_new_tokens=6, stop_token_ids=())
    p = chat.tokenizer.encode("fault")
    engine = tpmax.Engine(chat, max_batch=4, cache_tokens=128)
    engine.submit(p, params)
    bad = engine.submit(p, params, detokenizer=BrokenDetokenizer())
    engine.submit(p, params)
    outs = engine.run()
    ref = alone(chat, p, params)
    assert outs[bad].finish_reason == "error" and "detokenizer exploded" in outs[bad].error
    assert [(c.tokens, c.text, c.finish_reason) for i, c in enumerate(outs) if i != bad] == [
        (ref.tokens, ref.text, "length")] * 2
    assert engine.cache.free_pages == engine.cache.num_pages


class FailingComm:
    """The model's communicator, failing its all-reduce while `fail` is set."""

    def __init__(self, comm):
        self.comm, self.fail = comm, False

    def __getattr__(self, name):
        return getattr(self.comm, name)

    def allreduce_sum(self, xs):
        if self.fail:
            raise RuntimeError("NCCL went away")
        return self.comm.allreduce_sum(xs)


def test_forward_failure_ends_that_batch_and_rolls_the_cache_back(tiny):
    comm = FailingComm(tiny.comm)
    model = dataclasses.replace(tiny, comm=comm)
    engine = tpmax.Engine(model, max_batch=4, cache_tokens=64, page_size=4)
    for n in (3, 5, 7):
        engine.submit(list(range(1, n + 1)), SamplingParams(max_new_tokens=8, stop_token_ids=()))
    engine.step()
    engine.step()
    comm.fail = True
    events = engine.step()
    ends = [e.completion for e in events if e.completion]
    assert len(ends) == 3 and all(c.finish_reason == "error" and "NCCL went away" in c.error for c in ends)
    assert all(len(c.tokens) == 2 for c in ends)
    assert engine.cache.free_pages == engine.cache.num_pages and not engine.running and not engine.busy
    comm.fail = False  # the engine goes on serving
    engine.submit([1, 2, 3], SamplingParams(max_new_tokens=4, stop_token_ids=()))
    (c,) = engine.run()
    assert c.tokens == greedy_ref(tiny, [1, 2, 3], 4)


def test_non_finite_logits_end_the_request_naming_the_model(chat):
    w = chat.weights
    nan = dataclasses.replace(chat, weights=dataclasses.replace(w, norm=tuple(x * np.float32("nan") for x in w.norm)))
    engine = tpmax.Engine(nan, cache_tokens=64)
    engine.submit([1, 2, 3], SamplingParams(max_new_tokens=4))
    (c,) = engine.run()
    assert c.finish_reason == "error" and chat.path in c.error and "non-finite" in c.error and c.text == ""


def test_max_batch_must_be_positive(tiny):
    for bad in (0, -1):
        with pytest.raises(ValueError, match="max_batch"):
            tpmax.Engine(tiny, max_batch=bad, cache_tokens=32)


def test_finished_requests_are_handed_back_once(tiny):
    engine = tpmax.Engine(tiny, cache_tokens=64)
    engine.submit([1, 2], SamplingParams(max_new_tokens=3, stop_token_ids=()))
    engine.submit([3], SamplingParams(max_new_tokens=1, stop_token_ids=()))
    events = engine.step()  # prefill: the second request ends at once
    done = [e.completion for e in events if e.completion]
    assert [(c.id, c.finish_reason, len(c.tokens)) for c in done] == [(1, "length", 1)]
    assert [c.id for c in engine.run()] == [0]  # what run returns is what ended during it
    assert engine.run() == [] and not engine.busy and not hasattr(engine, "finished")


def test_cancel_frees_pages_at_once(tiny):
    engine = tpmax.Engine(tiny, max_batch=1, cache_tokens=64, page_size=4)
    a = engine.submit(list(range(1, 10)), SamplingParams(max_new_tokens=20, stop_token_ids=()))
    b = engine.submit([1, 2], SamplingParams(max_new_tokens=20, stop_token_ids=()))
    engine.step()
    engine.step()
    assert engine.pages_in_use == 3
    c = engine.cancel(a)
    assert c.finish_reason == "cancelled" and len(c.tokens) == 2 and engine.pages_in_use == 0
    assert engine.cancel(b).finish_reason == "cancelled"  # still waiting
    assert engine.cancel(a) is None and not engine.busy and engine.step() == []


def test_context_checks(tiny):
    too_long = list(range(1, 130))  # the fixture's context is 128
    with pytest.raises(ValueError, match="longer than the model's context"):
        tpmax.logits(tiny, [[1, 2], too_long])
    with pytest.raises(ValueError, match="context_length 256 is longer than the model's context"):
        tpmax.perplexity(tiny, too_long, context_length=256)
    seen = []
    ppl, n = tpmax.perplexity(tiny, too_long, context_length=50, on_progress=lambda *a: seen.append(a))
    assert [s[:2] for s in seen] == [(49, 126), (98, 126), (126, 126)] and n == 126
    assert seen[-1][2] == pytest.approx(ppl)


@pytest.mark.parametrize("bad, match", [([], "empty prompt"), ([10**6], "outside the vocabulary"),
                                        (list(range(200)), "context|does not fit")])
def test_submit_rejects_bad_prompts(tiny, bad, match):
    engine = tpmax.Engine(tiny, cache_tokens=64)
    with pytest.raises(ValueError, match=match):
        engine.submit(bad)
    assert not engine.busy


@pytest.mark.parametrize("kw, match", [
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"max_new_tokens": 2.5}, "max_new_tokens"),
    ({"max_new_tokens": "8"}, "max_new_tokens"), ({"temperature": -1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"), ({"temperature": float("inf")}, "temperature"),
    ({"top_p": 0}, "top_p"), ({"top_p": float("nan")}, "top_p"), ({"top_p": float("inf")}, "top_p"),
    ({"top_k": -2}, "top_k"), ({"seed": -1}, "seed"), ({"seed": 2**64}, "seed"), ({"seed": 1.5}, "seed"),
    ({"stop": ("",)}, "stop"), ({"stop": ""}, "stop")])
def test_bad_sampling_params(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kw)


def test_sampling_params_accept_the_edges():
    assert SamplingParams(seed=2**64 - 1, stop="x").stop == ("x",)
    assert SamplingParams(seed=0, max_new_tokens=np.int64(3)).seed == 0


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


# ------------------------------------------------------------------------------------------
# Sampling against its definition: token frequencies over many seeded draws (deterministic:
# fixed seeds) against the distribution written here in float64, and a Pearson chi-square
# test that rejects at p < 1e-4.


def sampling_distribution(lg, temperature, top_k=0, top_p=1.0):
    """The definition: softmax(l / T) over the k largest logits (all when k = 0); then the
    fewest most likely tokens whose mass reaches top_p; renormalised. float64."""
    z = np.asarray(lg, np.float64) / temperature
    allowed = np.argsort(-z)[:top_k or len(z)]
    p = np.zeros(len(z))
    p[allowed] = np.exp(z[allowed] - z[allowed].max())
    p /= p.sum()
    kept, mass = [], 0.0
    for i in np.argsort(-p):
        if mass >= top_p:
            break
        kept.append(i)
        mass += p[i]
    out = np.zeros(len(z))
    out[kept] = p[kept] / p[kept].sum()
    return out


def chi2_sf(x, df):
    """P(X >= x) for X chi-square with `df` (integer) degrees of freedom, in closed form."""
    h = x / 2
    if df % 2 == 0:  # exp(-h) * sum_{j < df/2} h^j / j!
        term = total = 1.0
        for j in range(1, df // 2):
            term *= h / j
            total += term
        return math.exp(-h) * total
    # erfc(sqrt(h)) + exp(-h) * sum_{j=1}^{(df-1)/2} h^(j-1/2) / Gamma(j+1/2)
    term, total = math.sqrt(h) / math.gamma(1.5), 0.0
    for j in range(1, (df + 1) // 2):
        total += term
        term *= h / (j + 0.5)
    return math.erfc(math.sqrt(h)) + math.exp(-h) * total


def chi2_pvalue(counts, p):
    """Pearson's chi-square test of `counts` against probabilities `p`. A token of probability
    0 that was drawn gives 0; tokens expected fewer than 5 times are pooled into one bin."""
    counts, p = np.asarray(counts), np.asarray(p, np.float64)
    if counts[p == 0].any():
        return 0.0
    expected = counts.sum() * p
    big = expected >= 5
    obs = np.append(counts[big], counts[~big & (p > 0)].sum())
    exp = np.append(expected[big], expected[~big & (p > 0)].sum())
    obs, exp = obs[exp > 0], exp[exp > 0]
    if len(exp) < 2:
        return 1.0
    return chi2_sf(float(((obs - exp) ** 2 / exp).sum()), len(exp) - 1)


def test_chi_square_against_tabulated_quantiles():
    for x, df, p in [(3.841, 1, 0.05), (5.991, 2, 0.05), (7.815, 3, 0.05), (13.277, 4, 0.01), (20.515, 5, 0.001),
                     (27.877, 9, 0.001)]:  # the chi-square table's critical values
        assert chi2_sf(x, df) == pytest.approx(p, rel=2e-3)
    assert chi2_pvalue([20, 0], [0.5, 0.5]) < 1e-4 and chi2_pvalue([5, 5], [0.5, 0.5]) == 1.0
    assert chi2_pvalue([1, 9], [0.0, 1.0]) == 0.0


LOGITS = np.array([2.0, 1.6, 1.1, 0.7, 0.2, -0.3, -0.9, -1.5], np.float32)
DRAWS = 20_000


def counts_of(tokens, n):
    return np.bincount(tokens, minlength=n)


def wrong_distributions(lg, t, k, p):
    """What a sampler gets wrong in the ways worth catching."""
    greedy = np.eye(len(lg))[int(np.argmax(lg))]
    return {"argmax": greedy, "temperature ignored": sampling_distribution(lg, 1.0, k, p),
            "top-p skipped": sampling_distribution(lg, t, k), "top-k skipped": sampling_distribution(lg, t, 0, p),
            "top-k keeps k+1": sampling_distribution(lg, t, k + 1 if k else 0, p),
            "least likely kept token dropped": _one_too_few(sampling_distribution(lg, t, k, p))}


def _one_too_few(q):
    q = q.copy()
    support = np.flatnonzero(q)
    if len(support) > 1:
        q[support[np.argmin(q[support])]] = 0.0
    return q / q.sum()


@pytest.mark.parametrize("t, k, p", [(0.6, 0, 1.0), (1.7, 3, 1.0), (0.8, 0, 0.75), (1.4, 5, 0.7), (2.5, 6, 0.85)])
def test_sample_draws_from_softmax_over_temperature_top_k_top_p(t, k, p):
    want = sampling_distribution(LOGITS, t, k, p)
    rng = np.random.default_rng(1234)
    params = SamplingParams(temperature=t, top_k=k, top_p=p)
    counts = counts_of([sample(LOGITS, params, rng) for _ in range(DRAWS)], len(LOGITS))
    assert chi2_pvalue(counts, want) > 1e-4, (counts / DRAWS, want)
    for name, wrong in wrong_distributions(LOGITS, t, k, p).items():  # the test tells each apart
        if np.abs(wrong - want).max() > 0.02:
            assert chi2_pvalue(counts, wrong) < 1e-4, name


def test_seeds_give_their_own_reproducible_streams():
    params = SamplingParams(temperature=1.3, top_k=6, top_p=0.95)
    streams = [tuple(sample(LOGITS, params, rng) for _ in range(40)) for rng in map(np.random.default_rng, range(8))]
    assert len(set(streams)) == 8  # different seeds, different streams
    assert streams == [tuple(sample(LOGITS, params, rng) for _ in range(40))
                       for rng in map(np.random.default_rng, range(8))]  # the same seed, the same stream


def test_engine_first_tokens_follow_the_models_softmax(tiny):
    """Sampling inside real engine steps: the first token of 2000 requests, seeds 0..1999,
    against the distribution of the model's own last logits (tpmax.logits)."""
    prompt, t, k, p = [1, 2, 3], 0.5, 4, 0.8
    lg = tpmax.logits(tiny, [prompt])[0][-1]
    want = sampling_distribution(lg, t, k, p)
    assert (want > 0).sum() == 3  # temperature, top-k and top-p all shape it
    n = 2000
    engine = tpmax.Engine(tiny, max_batch=n, cache_tokens=4 * n, page_size=4)
    for seed in range(n):
        engine.submit(prompt, SamplingParams(max_new_tokens=1, temperature=t, top_k=k, top_p=p, seed=seed))
    outs = engine.run()
    counts = counts_of([c.tokens[0] for c in outs], tiny.cfg.vocab_size)
    assert chi2_pvalue(counts, want) > 1e-4, (counts[want > 0], want[want > 0] * n)
    for name, wrong in wrong_distributions(lg, t, k, p).items():
        if np.abs(wrong - want).max() > 0.05:
            assert chi2_pvalue(counts, wrong) < 1e-4, name


def test_seeded_streams_through_the_engine(tiny):
    """Different seeds give different streams; a seed gives its stream alone and in a batch."""
    params = [SamplingParams(max_new_tokens=12, temperature=1.5, seed=s, stop_token_ids=()) for s in range(6)]
    engine = tpmax.Engine(tiny, max_batch=8, cache_tokens=512)
    for q in params:
        engine.submit([1, 2, 3], q)
    engine.submit([4, 5], SamplingParams(max_new_tokens=7, temperature=0.7, seed=99, stop_token_ids=()))
    outs = engine.run()[:6]
    assert len({tuple(c.tokens) for c in outs}) == 6
    assert [c.tokens for c in outs] == [alone(tiny, [1, 2, 3], q).tokens for q in params]


def test_greedy_limits():
    lg = np.array([0.1, 3.0, 2.9], np.float32)
    assert sample(lg, SamplingParams(), np.random.default_rng(0)) == 1
    assert sample(lg, SamplingParams(temperature=5.0, top_k=1), np.random.default_rng(0)) == 1
    assert sample(lg, SamplingParams(temperature=5.0, top_p=0.01), np.random.default_rng(0)) == 1


class Letters:
    """A detokenizer that decodes the n-th token it is given to the n-th letter, whatever the
    token: any model's text reads "abcde..." (enough to test stop strings)."""

    def __init__(self):
        self.n = 0

    def push(self, t):
        self.n += 1
        return chr(96 + self.n)

    def flush(self):
        return ""


@pytest.mark.parametrize("stop, pieces, reason", [
    (("c",), ["a", "b", ""], "stop"),  # the stop string itself is never shown
    (("bc",), ["a", "", ""], "stop"),  # "b" is held back: it could start "bc"
    (("xyz", "cd"), ["a", "b", "", ""], "stop"),
    (("bd",), ["a", "", "bc", "d", "e"], "length"),  # "b" held, then released with "c"
    (("ef",), ["a", "b", "c", "d", "e"], "length"),  # the held "e" is shown when the request ends
])
def test_stop_strings_are_cut_and_held_back(tiny, stop, pieces, reason):
    engine = tpmax.Engine(tiny, cache_tokens=64)
    rid = engine.submit([1], SamplingParams(max_new_tokens=5, stop=stop, stop_token_ids=()), detokenizer=Letters())
    events = []
    while engine.busy:
        events += engine.step()
    assert [ev.text for ev in events if ev.token is not None] == pieces  # one event per token, as streamed
    (done,) = [ev.completion for ev in events if ev.completion is not None]
    assert events[-1].completion is done and done.id == rid
    assert done.finish_reason == reason and done.text == "".join(pieces) and len(done.tokens) == len(pieces)


def test_stop_string_through_the_engine(chat):
    p = chat.tokenizer.encode("stop")
    full = alone(chat, p, SamplingParams(max_new_tokens=16, stop_token_ids=())).text
    stop = full[5:7]
    c = alone(chat, p, SamplingParams(max_new_tokens=16, stop_token_ids=(), stop=(stop,)))
    assert c.finish_reason == "stop" and c.text == full[:full.index(stop)]
