"""The step executor: a step is validated once and carries every option of the forward pass;
an executor reserves, runs and commits (rolls back on failure); across MPI ranks every option
reaches every rank, so each rank runs the very same pass."""
import dataclasses
import importlib.util
import inspect
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tpmax
from tpmax.parallel.executor import PassOptions, Step, token_ids

HERE = Path(__file__).parent
FIXTURE = HERE / "fixtures" / "hf" / "llama"
SEQS = [[1, 5, 9, 2, 7], [3, 4, 8]]
# One forward step per case; each sets options away from their defaults.
OPTION_CASES = [
    {},
    {"gemm_config": {"enable_matmul_allreduce": True, "chunks": 4}},
    {"gemm_config": {"enable_matmul_allreduce": True, "chunks": 2}, "threads": True},
    {"return_logits": "variable", "return_n_logits": 2, "return_hidden_states": "all_normalized"},
    {"return_logits": "all", "return_hidden_states": "last"},
    {"use_subgraphs": True, "subgraph_layer_groups": [[1], [0]], "logits_scaling": 2.0},
    {"attention_block": 2, "return_hidden_states": "all"},
]


def options_of(case: dict) -> dict:
    gemm = case.get("gemm_config")
    return {**case, "gemm_config": None if gemm is None else tpmax.DistributedGemmConfig(**gemm)}


# ------------------------------------------------------------------------------------------
# The step value.


def test_pass_options_are_every_option_of_the_forward_pass():
    params = inspect.signature(tpmax.distributed_transformer).parameters.values()
    keyword = {p.name: p.default for p in params if p.kind == p.KEYWORD_ONLY}
    fields = {f.name: f.default for f in dataclasses.fields(PassOptions)}
    assert fields == keyword


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.fixed_dictionaries({
    "return_logits": st.sampled_from(list(tpmax.ReturnLogits)),
    "return_n_logits": st.integers(1, 9),
    "return_hidden_states": st.sampled_from(list(tpmax.ReturnHiddenStates)),
    "use_subgraphs": st.booleans(),
    "subgraph_layer_groups": st.none() | st.lists(st.lists(st.integers(0, 40), min_size=1, max_size=4), max_size=3),
    "logits_scaling": st.none() | st.floats(0.01, 100.0),
    "gemm_config": st.none() | st.builds(tpmax.DistributedGemmConfig, st.booleans(), st.integers(1, 8)),
    "threads": st.booleans(),
    "attention_block": st.integers(1, 4096),
}))
def test_pass_options_survive_the_wire(kw):
    opts = PassOptions(**kw)
    wire = json.loads(json.dumps(opts.to_json()))
    assert PassOptions.from_json(wire) == opts


@pytest.mark.parametrize("chunks, match", [
    ([[1, 2], []], "empty sequence 1"),
    ([[1, 2.5]], "must be integers"),
    ([[True, False]], "must be integers"),
    ([[10**30]], "must be integers"),
    ([[1, 10**6]], "token id 1000000 outside the vocabulary"),
    ([[-1]], "token id -1 outside"),
    ([[[1, 2]]], "1-d list"),
])
def test_a_step_refuses_bad_tokens(chunks, match):
    with pytest.raises(ValueError, match=match):
        Step.make(list(range(len(chunks))), chunks, 100)


def test_a_step_needs_a_chunk_per_sequence():
    with pytest.raises(ValueError, match="one chunk of new tokens per sequence"):
        Step.make([0, 1], [[1]], 100)
    s = Step.make(["a", "b"], [[1, 2, 3], np.array([4])], 100, return_n_logits=1)
    assert s.tokens.dtype == np.int64 and s.tokens.tolist() == [1, 2, 3, 4] and s.offsets.tolist() == [0, 3, 4]
    assert s.n_new == [3, 1]


def test_token_ids_accepts_every_integer_type():
    for a in ([1, 2], np.array([1, 2], np.uint8), np.array([1, 2], np.int32), (1, 2)):
        assert token_ids(a, 5).tolist() == [1, 2]


# ------------------------------------------------------------------------------------------
# The transaction.


@pytest.fixture(scope="module")
def model():
    return tpmax.load(FIXTURE, devices="cpu:0,1", progress=False)


def test_run_commits_and_rolls_back(model):
    ex = model.executor
    cache = ex.new_cache(32, page_size=4)
    cache.add(0)
    ex.run(cache, ex.step([0], [[1, 2, 3]]))
    assert cache.length(0) == 3
    free = cache.free_pages
    with pytest.raises(ValueError, match="return_n_logits=7"):  # the pass fails after the reservation
        ex.run(cache, ex.step([0], [[4, 5, 6, 7, 8, 9]], return_logits=tpmax.ReturnLogits.VARIABLE,
                              return_n_logits=7))
    assert cache.length(0) == 3 and cache.free_pages == free  # nothing reserved stays


def test_a_step_writes_only_its_kv_slots(model):
    """The forward pass is pure but for `write_kv`: weights, tokens and offsets are unchanged,
    and the cache changes only in the slots the step reserved."""
    import copy

    ex = model.executor
    cache = ex.new_cache(64, page_size=4)
    for s in (0, 1):
        cache.add(s)
    ex.run(cache, ex.step([0, 1], [[1, 2, 3, 4, 5], [6, 7]]))
    weights, pages = copy.deepcopy(model.weights), [p.copy() for p in cache.pages]
    step = ex.step([0, 1], [[8], [9, 10, 11]])
    tokens, offsets = step.tokens.copy(), step.offsets.copy()
    slots = cache.reserve(step.seq_ids, step.n_new)
    cache.rollback(step.seq_ids)
    ex.run(cache, step)
    assert len(_arrays(weights)) > 10
    assert all(np.array_equal(a, b) for a, b in zip(_arrays(weights), _arrays(model.weights)))
    assert np.array_equal(step.tokens, tokens) and np.array_equal(step.offsets, offsets)
    for before, after in zip(pages, cache.pages):  # [layers, 2, pages, page_size, kv heads, hd]
        changed = np.argwhere((before != after).any(axis=(0, 1, 4, 5)))  # (page, slot) pairs
        assert sorted(map(tuple, changed)) == sorted(zip(slots.page.tolist(), slots.slot.tolist()))


def _arrays(obj):
    """Every array in a tree of dataclasses / tuples / lists."""
    if isinstance(obj, np.ndarray):
        return [obj]
    if dataclasses.is_dataclass(obj):
        return [a for f in dataclasses.fields(obj) for a in _arrays(getattr(obj, f.name))]
    if isinstance(obj, (tuple, list)):
        return [a for x in obj for a in _arrays(x)]
    return []


def test_logits_and_generate_refuse_what_numpy_would_change(model):
    for bad, match in (([[1.7]], "must be integers"), ([[10**30]], "must be integers"), ("hello", "list of token"),
                       ([[1, 2], [1, 10**9]], "outside the vocabulary")):
        with pytest.raises(ValueError, match=match):
            tpmax.logits(model, bad)


def test_generate_takes_one_prompt_or_many_and_token_ids(model):
    p = tpmax.SamplingParams(max_new_tokens=3, stop_token_ids=())
    one = tpmax.generate(model, [5, 6, 7], p)  # token ids: one prompt
    assert len(one) == 1 and one[0].prompt_tokens == 3
    many = tpmax.generate(model, [[5, 6, 7], np.array([8, 9])], p)
    assert [c.prompt_tokens for c in many] == [3, 2] and many[0].tokens == one[0].tokens
    lg = tpmax.logits(model, [[5, 6, 7]])[0]
    assert one[0].tokens[0] == int(np.argmax(lg[-1]))  # greedy from the same logits


# ------------------------------------------------------------------------------------------
# Every option reaches every MPI rank.

MPIRUN = shutil.which("mpirun", path=str(Path(sys.executable).parent)) or shutil.which("mpirun")


def _in_process(case):
    model = tpmax.load(FIXTURE, devices="cpu:0,1", progress=False)
    ex = model.executor
    cache = ex.new_cache(64)
    for i in range(len(SEQS)):
        cache.add(i)
    return [np.asarray(tpmax.to_numpy(o)) for o in ex.run(cache, ex.step([0, 1], SEQS, **options_of(case)))]


@pytest.mark.slow
@pytest.mark.skipif(MPIRUN is None or importlib.util.find_spec("mpi4py") is None, reason="needs mpi4py and mpirun")
def test_every_pass_option_reaches_every_rank(tmp_path):
    from test_mpi_model import run_mpi

    out = tmp_path / "steps"
    rc, _, err = run_mpi(2, [sys.executable, HERE / "mpi" / "executor_worker.py", "cpu:0,1", out])
    assert rc == 0, err[-3000:]
    ranks = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(2)]
    for i, case in enumerate(OPTION_CASES):
        want = _in_process(case)
        for r, got in enumerate(ranks):
            assert len(got[i]) == len(want), (case, r)
            for g, w in zip(got[i], want):
                np.testing.assert_allclose(np.asarray(g), w, rtol=1e-5, atol=1e-5, err_msg=f"{case} rank {r}")
