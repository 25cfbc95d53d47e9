"""The model across MPI ranks: every rank runs the same program (the Python API or the
`tpmax` command under mpirun) and gets what one process gets — logits of every HF fixture,
the default model's greedy answer, perplexity and seeded samples — with rank 0 refusing bad
input before anything is broadcast and a killed rank ending the whole job."""
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy as stn

import tpmax
from tpmax.parallel import mpi

HERE = Path(__file__).parent
FIX = HERE / "fixtures"
WORKER = HERE / "mpi" / "model_worker.py"
MPIRUN = shutil.which("mpirun", path=str(Path(sys.executable).parent)) or shutil.which("mpirun")
pytestmark = pytest.mark.skipif(MPIRUN is None or importlib.util.find_spec("mpi4py") is None,
                                reason="needs mpi4py and mpirun: pip install 'tpmax[mpi]'")
HF_CASES = ["llama", "llama_tied", "mistral", "qwen2", "qwen3", "granite", "llama_sharded"]


def spec(n):
    return "cpu:" + ",".join(map(str, range(n)))


def end_job(proc, grace=15):
    """End an mpirun job: SIGTERM to mpirun, which ends every rank it started (they are not in
    its process group), then SIGKILL to mpirun's group if it is still there."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.communicate(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.communicate()


def run_mpi(n, argv, *, timeout=240, env=None, apps=None):
    """`mpirun -n n argv...` with a time limit; the whole job is killed if it runs over.
    `apps`: one argv per rank instead (MPMD: `mpirun -n 1 a : -n 1 b`); `env`: added."""
    env = {**{k: v for k, v in os.environ.items() if k not in mpi.LAUNCHER_ENV}, **(env or {})}
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1",
               OPENBLAS_NUM_THREADS="1")
    if apps is None:
        apps = [["-n", str(n), *map(str, argv)]]
    else:
        apps = [["-n", "1", *map(str, a)] for a in apps]
    cmd = [MPIRUN, "--oversubscribe", "--bind-to", "none", *[w for i, a in enumerate(apps) for w in [":"] * (i > 0) + a]]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        end_job(proc)
        raise
    return proc.returncode, out, err


def worker(tmp_path, n, mode, devices=None):
    """Every rank's JSON result, in rank order."""
    out = tmp_path / f"{mode}-{n}.json"
    rc, _, err = run_mpi(n, [sys.executable, WORKER, mode, devices or spec(n), out])
    assert rc == 0, err[-3000:]
    return [json.loads((out.with_suffix(f".rank{r}.json") if r else out).read_text()) for r in range(n)]


QUANT_CASES = ["llama_gptq", "qwen2_gptq", "llama_fp8", "llama_fp8_block"]


@pytest.mark.slow
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_fixture_logits_over_ranks_equal_one_process(tmp_path, n):
    ranks = worker(tmp_path, n, "fixtures")
    got = ranks[0]
    for r, theirs in enumerate(ranks[1:], 1):  # every rank returns rank 0's result
        for case in HF_CASES + ["after_bad"]:
            assert theirs[case] == got[case], (r, case)
        assert theirs["bad"] == f"LeaderError: rank 0 failed: {got['bad']}", theirs["bad"]
    # Each rank read about its share of the checkpoint, plain and quantized alike: together
    # about one copy, plus what several ranks need (norms and biases on every rank, kv heads
    # replicated when TP > kv heads, quantization groups a split cuts through) — a large
    # part of these tiny fixtures, hence the slack; a rank reading it all would be >= 2x over.
    for case in HF_CASES + QUANT_CASES:
        whole = tpmax.load(FIX / "hf" / case, devices="cpu", progress=False).bytes_read
        parts = [rk["read"][case] for rk in ranks]
        assert sum(parts) <= 1.3 * whole, (case, parts, whole)
        assert max(parts) <= 1.5 * whole / n, (case, parts, whole)
    for case in HF_CASES:
        model = tpmax.load(FIX / "hf" / case, devices=spec(n), progress=False)
        r = stn.load_file(str(FIX / "hf" / case / "reference.safetensors"))
        want = tpmax.logits(model, [r[f"input_ids_{i}"] for i in range(3)])
        for g, w in zip(got[case], want):
            np.testing.assert_allclose(np.array(g, np.float32), w, rtol=1e-5, atol=1e-5, err_msg=case)
    # The bad request was refused on rank 0 (before any broadcast) and the next one served.
    assert "outside the vocabulary" in got["bad"]
    assert np.isfinite(np.array(got["after_bad"])).all()


@pytest.mark.slow
def test_default_model_over_two_ranks(tmp_path):
    ref = json.loads((FIX / "smollm2_reference.json").read_text())
    ranks = worker(tmp_path, 2, "smollm2")
    assert [rk.pop("rank_devices") for rk in ranks] == [["cpu:0"], ["cpu:1"]]  # each rank drives its own block
    got = ranks[0]
    assert ranks[1] == got  # every rank returns rank 0's result
    assert got["prompt_ids"] == ref["chat"]["prompt_ids"]
    assert got["tokens"] == ref["chat"]["greedy_ids"]
    model = tpmax.load(None, devices="cpu:0,1", progress=False)
    ids = model.tokenizer.encode((FIX / "perplexity.txt").read_text(encoding="utf-8"))
    ppl, n = tpmax.perplexity(model, ids, context_length=ref["perplexity"]["context_length"])
    assert got["scored"] == n and abs(got["perplexity"] - ppl) <= 1e-6 * ppl
    seeded = tpmax.generate(model, ["Name a color.", "Count to three."],
                            tpmax.SamplingParams(max_new_tokens=12, temperature=0.8, seed=7))
    assert got["seeded"] == [c.text for c in seeded]


def tpmax_cmd(*args):
    return [sys.executable, "-m", "tpmax.cli", *args]


@pytest.mark.slow
def test_cli_generate_under_mpirun_prints_once_and_equals_one_process():
    args = ["generate", "--devices", "cpu:0,1", "--max-new-tokens", "12", "What is the capital of France?"]
    rc, out, err = run_mpi(2, tpmax_cmd(*args))
    assert rc == 0, err[-3000:]
    one = subprocess.run(tpmax_cmd(*args), capture_output=True, text=True, timeout=240)
    assert one.returncode == 0, one.stderr
    assert out == one.stdout and "Paris" in out  # only rank 0 printed, the same answer


@pytest.mark.slow
def test_cli_perplexity_under_mpirun():
    args = ["perplexity", "--devices", "cpu:0,1", "--file", str(FIX / "perplexity.txt"), "--context-length", "128",
            "--json", "--quiet"]
    rc, out, err = run_mpi(2, tpmax_cmd(*args))
    assert rc == 0, err[-3000:]
    one = subprocess.run(tpmax_cmd(*args), capture_output=True, text=True, timeout=240)
    a, b = json.loads(out), json.loads(one.stdout)
    assert a["tokens"] == b["tokens"] and abs(a["perplexity"] - b["perplexity"]) <= 1e-6 * b["perplexity"]


def test_device_count_that_does_not_divide_is_refused_once():
    rc, out, err = run_mpi(2, tpmax_cmd("generate", "--model", FIX / "hf" / "llama", "--devices", "cpu:0,1,2",
                                        "--max-new-tokens", "2", "hi"), timeout=120)
    assert rc == 2 and out == ""
    assert err.count("3 devices for 2 MPI ranks") == 1, err
    assert "MPI_ABORT" not in err, err  # refused alike on every rank: a clean exit


@pytest.mark.parametrize("bad, says", [
    (["--prompt", "hi", "--prompt", ""], "must not be empty"),  # refused while parsing, on every rank
    (["--prompt", "hi", "--prompt", "w " * 9000], "context"),  # refused by rank 0 inside generate
])
def test_cli_bad_input_is_reported_once_and_every_rank_exits(bad, says):
    t0 = time.monotonic()
    rc, out, err = run_mpi(2, tpmax_cmd("generate", "--devices", "cpu:0,1", "--max-new-tokens", "2", "--no-chat",
                                        "--quiet", *bad), timeout=120)
    assert rc != 0 and time.monotonic() - t0 < 60
    assert err.count("tpmax: error:") == 1 and says in err, err


def test_a_killed_rank_ends_the_job(tmp_path):
    t0 = time.monotonic()
    rc, _, err = run_mpi(2, [sys.executable, WORKER, "kill", "cpu:0,1", tmp_path / "x.json"], timeout=120)
    assert rc != 0 and time.monotonic() - t0 < 60
    assert "signal 9" in err and "Traceback" not in err, err[-3000:]


@pytest.mark.slow
def test_serve_under_mpirun_answers_like_one_process(tmp_path):
    """`mpirun -n 2 tpmax serve`: rank 0 serves over HTTP, rank 1 runs every step with it."""
    import socket

    import httpx2 as httpx  # the HTTP client the openai package ships with
    import openai
    from conftest import make_chat_model_dir

    model_dir = make_chat_model_dir(tmp_path / "chat")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in mpi.LAUNCHER_ENV}
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    proc = subprocess.Popen([MPIRUN, "-n", "2", "--oversubscribe", "--bind-to", "none", *tpmax_cmd(
        "serve", "--model", model_dir, "--devices", "cpu:0,1", "--port", str(port), "--quiet")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            pytest.fail("the server did not come up in 90 s")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=60)
        answers = [client.completions.create(model=client.models.list().data[0].id, prompt=p, max_tokens=8,
                                             temperature=0.7, seed=3).choices[0].text for p in ("hello", "abc")]
    finally:
        end_job(proc)
    one = tpmax.load(model_dir, devices="cpu:0,1", progress=False)
    want = [c.text for c in tpmax.generate(one, ["hello", "abc"], tpmax.SamplingParams(
        max_new_tokens=8, temperature=0.7, seed=3), chat=False)]
    assert answers == want


# ------------------------------------------------------------------------------------------
# Ranks that disagree stop with one message; a rank that stops answering ends the job.


@pytest.fixture(scope="module")
def chat_dirs(tmp_path_factory):
    """The chat model, and copies of it with other weights (same shapes) and another config."""
    from conftest import make_chat_model_dir

    tmp = tmp_path_factory.mktemp("models")
    base = make_chat_model_dir(tmp / "base")
    other = make_chat_model_dir(tmp / "weights")
    w = stn.load_file(str(other / "model.safetensors"))
    name = sorted(w)[0]
    w[name] = (w[name] * 1.5).astype(w[name].dtype)
    stn.save_file(w, str(other / "model.safetensors"))
    arch = make_chat_model_dir(tmp / "config")
    cfg = json.loads((arch / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-3
    (arch / "config.json").write_text(json.dumps(cfg))
    return {"base": base, "weights": other, "config": arch}


def generate_cmd(model, *extra, devices="cpu:0,1"):
    return tpmax_cmd("generate", "--model", model, "--devices", devices, "--max-new-tokens", "2", "--no-chat",
                     "--quiet", *extra, "hi")


@pytest.mark.parametrize("change, differs", [
    ("weights", "checkpoint"), ("config", "checkpoint, config"), ("dtype", "dtype"), ("devices", "devices"),
])
def test_ranks_that_disagree_stop_with_one_message(chat_dirs, change, differs):
    base = generate_cmd(chat_dirs["base"])
    other = {"weights": generate_cmd(chat_dirs["weights"]), "config": generate_cmd(chat_dirs["config"]),
             "dtype": generate_cmd(chat_dirs["base"], "--dtype", "float16"),
             "devices": generate_cmd(chat_dirs["base"], devices="cpu:0,1,2,3")}[change]
    rc, out, err = run_mpi(2, None, apps=[base, other], timeout=120)
    assert rc == 2 and out == "", err[-3000:]
    assert err.count("tpmax: error:") == 1 and err.count("disagree with rank 0") == 1, err[-3000:]
    assert f"(rank 1: {differs})" in err, err[-3000:]
    assert "MPI_ABORT" not in err, err[-3000:]  # a clean exit on every rank


def test_ranks_that_disagree_in_the_python_api_stop_cleanly(tmp_path):
    """Uncaught in a program of one's own: the abort handler lets rank 0 alone print it and
    every rank exit (no MPI_ABORT: every rank raised the same error at the same point)."""
    rc, _, err = run_mpi(2, [sys.executable, WORKER, "disagree", "cpu:0,1", tmp_path / "x.json"], timeout=120)
    assert rc == 1, err[-3000:]
    assert err.count("RanksDisagree: the MPI ranks' models disagree with rank 0 (rank 1: dtype)") == 1, err[-3000:]
    assert "MPI_ABORT" not in err, err[-3000:]


def test_a_rank_running_another_command_ends_the_job(chat_dirs):
    """`generate` on rank 0, `info` on rank 1: rank 0 waits for a partner that never comes and
    ends the job after TPMAX_MPI_TIMEOUT seconds (it used to hang)."""
    rc, _, err = run_mpi(2, None, apps=[generate_cmd(chat_dirs["base"]), tpmax_cmd("info")],
                         env={"TPMAX_MPI_TIMEOUT": "3"}, timeout=120)
    assert rc != 0
    assert err.count("no answer from the other ranks for 3 s") == 1, err[-3000:]


def test_a_stopped_rank_ends_the_job(tmp_path):
    """Rank 1 SIGSTOPs itself while rank 0 generates: rank 0 ends the job after the timeout."""
    rc, _, err = run_mpi(2, [sys.executable, WORKER, "stop", "cpu:0,1", tmp_path / "x.json"],
                         env={"TPMAX_MPI_TIMEOUT": "3"}, timeout=120)
    assert rc != 0
    assert err.count("tpmax (rank 0): no answer from the other ranks for 3 s in ") == 1, err[-3000:]
