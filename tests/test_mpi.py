"""tpmax.parallel.mpi: collectives across MPI ranks equal the in-process ones (bit for bit where the
order of a sum cannot matter, within rounding otherwise); ranks that disagree stop; a failing
or silent rank ends the job; a plain run never loads mpi4py.

The collectives run in ONE long-lived MPI job per rank count (module-scoped fixtures):
rank 0 talks to this process over a loopback socket (`tests/mpi/collectives_worker.py`),
so hypothesis can send hundreds of examples without paying mpirun's start-up each time.
"""
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import tpmax
from tpmax.parallel import mpi

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE / "mpi"))
import wire  # noqa: E402

MPIRUN = shutil.which("mpirun", path=str(Path(sys.executable).parent)) or shutil.which("mpirun")
HAVE_MPI = MPIRUN is not None and importlib.util.find_spec("mpi4py") is not None
requires_mpi = pytest.mark.skipif(not HAVE_MPI, reason="needs mpi4py and mpirun: pip install 'tpmax[mpi]'")

DTYPES = ["float32", "float16", "bfloat16", "int32", "int64"]
LAYOUTS = [(2, 1), (3, 1), (2, 2)]  # (MPI ranks, devices per rank)
EXAMPLES = settings(max_examples=200)


def mpi_env():
    env = {k: v for k, v in os.environ.items() if k not in mpi.LAUNCHER_ENV}
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return env


def mpirun(n, *args):
    return [MPIRUN, "-n", str(n), "--oversubscribe", "--bind-to", "none", sys.executable, *map(str, args)]


def kill_group(proc):
    """SIGKILL the job's whole process group (mpirun and its ranks) and reap mpirun."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


# ------------------------------------------------------------------------------------------
# Plain runs and the rank -> devices rule.


def test_plain_process_never_imports_mpi4py():
    code = ("import sys, tpmax, tpmax.parallel.mpi as m; w = m.world(); "
            "assert (w.rank, w.size, w.comm, m.install_abort_handler()) == (0, 1, None, False); "
            "c = m.mpi_communicator(tpmax.devices('cpu:0,1')); assert type(c).__name__ == 'InProcessCommunicator'; "
            "assert m.bcast_json({'a': (1, 2)}) == {'a': [1, 2]}; "
            "assert 'mpi4py' not in sys.modules, 'mpi4py was imported'")
    r = subprocess.run([sys.executable, "-c", code], env=mpi_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_launcher_without_mpi4py_says_what_to_install(monkeypatch):
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # makes `from mpi4py import MPI` fail
    mpi.world.cache_clear()
    try:
        assert mpi.launched_by_mpi()
        with pytest.raises(RuntimeError, match=r"OMPI_COMM_WORLD_SIZE=2.*pip install 'tpmax\[mpi\]'"):
            mpi.world()
    finally:
        mpi.world.cache_clear()


def test_local_devices_contiguous_blocks():
    devs = tpmax.devices("cpu:0,1,2,3,4,5")
    assert [mpi.local_devices(devs, r, 3) for r in range(3)] == [devs[0:2], devs[2:4], devs[4:6]]
    assert mpi.local_devices(devs, 5, 6) == [devs[5]]
    assert mpi.local_devices(devs, 0, 1) == devs


@pytest.mark.parametrize("n,size,rank,msg", [
    (3, 2, 0, "--devices lists 3 devices for 2 MPI ranks; the count must be a multiple of the ranks"),
    (2, 4, 0, "--devices lists 2 devices for 4 MPI ranks"),
    (4, 2, 2, "rank 2 is outside an MPI job of 2 ranks"),
])
def test_local_devices_errors(n, size, rank, msg):
    with pytest.raises(ValueError, match=msg):
        mpi.local_devices(tpmax.devices("cpu:" + ",".join(map(str, range(n)))), rank, size)


# ------------------------------------------------------------------------------------------
# BLAS threads: the ranks on a host share its cores.

THREADS_PROBE = ("import os, json, threadpoolctl, tpmax; from tpmax.core import distributed as d; "
                 "os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:1]) | {{0}}) if {pin} else None; "
                 "n = d.set_threads({n}); "
                 "print(json.dumps([n, d.default_threads(), sorted({{i['num_threads'] for i in "
                 "threadpoolctl.threadpool_info() if i['user_api'] == 'blas'}})]))")


def threads_probe(n="None", pin=False, **env):
    base = {k: v for k, v in mpi_env().items() if k not in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                            "MKL_NUM_THREADS", "BLIS_NUM_THREADS")}
    r = subprocess.run([sys.executable, "-c", THREADS_PROBE.format(n=n, pin=pin)], env={**base, **env},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_blas_threads_are_shared_among_the_ranks_of_a_host():
    cores = len(os.sched_getaffinity(0))
    # A plain run: every core this process may use.
    assert threads_probe() == [cores, cores, [cores]]
    # Two ranks on this host (what mpirun sets): half each, at least 1, without any MPI call.
    under = dict(OMPI_COMM_WORLD_SIZE="2", OMPI_COMM_WORLD_LOCAL_SIZE="2")
    assert threads_probe(**under) == [max(1, cores // 2), max(1, cores // 2), [max(1, cores // 2)]]
    # The affinity the launcher gave counts, not the machine's cores.
    assert threads_probe(pin=True)[1] == 1
    # An explicit count wins; the user's OPENBLAS_NUM_THREADS is left alone.
    assert threads_probe(n=1, **under)[2] == [1]
    assert threads_probe(OPENBLAS_NUM_THREADS="1", **under)[0] is None


def test_threads_option():
    from tpmax.cli import build_parser
    assert build_parser().parse_args(["generate", "--threads", "3", "hi"]).threads == 3
    for bad in ("0", "-1", "x"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["generate", "--threads", bad, "hi"])
    with pytest.raises(ValueError, match="positive integer"):
        tpmax.core.distributed.set_threads(0)


# ------------------------------------------------------------------------------------------
# The long-lived jobs.


class MpiJob:
    """An MPI job of `n` ranks serving collectives to this process over 127.0.0.1."""

    def __init__(self, n, tmp):
        self.n = n
        srv = socket.create_server(("127.0.0.1", 0))
        srv.settimeout(0.2)
        self.log = open(tmp / f"mpi-{n}.log", "w+")
        self.proc = subprocess.Popen(mpirun(n, HERE / "mpi" / "collectives_worker.py", srv.getsockname()[1]),
                                     env=mpi_env(), stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + 60
        try:
            while True:
                try:
                    self.sock = wire.no_delay(srv.accept()[0])
                    break
                except socket.timeout:
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        kill_group(self.proc)
                        pytest.fail(f"the {n}-rank MPI job did not start:\n{self.output()}")
        finally:
            srv.close()
        self.sock.settimeout(30)

    def output(self):
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-4000:]

    def call(self, op, xs, *, k, axis=0, root=0, **extra):
        """Run `op` on the per-device inputs `xs` (whole group) with `k` devices per rank."""
        assert not xs or len(xs) % (self.n * k) == 0
        try:
            wire.send(self.sock, {"op": op, "k": k, "axis": axis, "root": root, **extra}, xs)
            header, outs = wire.recv(self.sock, tpmax.as_dtype)
        except (OSError, ConnectionError) as e:
            kill_group(self.proc)
            pytest.fail(f"the {self.n}-rank MPI job stopped answering ({e}):\n{self.output()}")
        if header["error"]:
            raise RuntimeError(f"all_ranks={header['all_ranks']}: {header['error']}")
        return outs

    def close(self):
        if self.proc.poll() is None:
            try:
                wire.send(self.sock, {"op": "quit"})
                self.proc.wait(timeout=10)
            except Exception:
                kill_group(self.proc)
        self.sock.close()
        self.log.close()


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    if not HAVE_MPI:
        pytest.skip("needs mpi4py and mpirun: pip install 'tpmax[mpi]'")
    tmp = tmp_path_factory.mktemp("mpi")
    started = {}
    try:
        for n in sorted({n for n, _ in LAYOUTS}):
            started[n] = MpiJob(n, tmp)
        yield started
    finally:
        for job in started.values():
            job.close()


@st.composite
def group_arrays(draw, *, vary_axis=False):
    """((ranks, devices per rank), per-device arrays of small integers, axis)."""
    n, k = draw(st.sampled_from(LAYOUTS))
    ndim = draw(st.integers(1, 3))
    shape = draw(st.lists(st.integers(0 if vary_axis else 1, 5), min_size=ndim, max_size=ndim))
    axis = draw(st.integers(-ndim, ndim - 1))
    dtype = tpmax.as_dtype(draw(st.sampled_from(DTYPES)))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    xs = []
    for _ in range(n * k):
        s = list(shape)
        if vary_axis:
            s[axis] = draw(st.integers(0, 4))
        xs.append(rng.integers(-16, 17, size=s).astype(dtype))
    return (n, k), xs, axis


def assert_same(outs, want):
    assert len(outs) == len(want)
    for o, w in zip(outs, want):
        assert o.dtype == w.dtype and o.shape == w.shape
        assert o.tobytes() == w.tobytes()  # bit for bit


def in_process(xs):
    return tpmax.InProcessCommunicator(tpmax.devices("cpu:" + ",".join(map(str, range(len(xs))))))


@requires_mpi
@EXAMPLES
@given(case=group_arrays())
def test_allreduce_sum(jobs, case):
    (n, k), xs, _ = case
    outs = jobs[n].call("allreduce_sum", xs, k=k)
    assert_same(outs, in_process(xs).allreduce_sum(xs))
    np.testing.assert_array_equal(outs[0].astype(np.float64), np.sum([x.astype(np.float64) for x in xs], axis=0))


@st.composite
def float_group(draw):
    """((ranks, devices per rank), per-device float32 arrays whose sum depends on the order
    of the additions: values spanning 1e-8..1e8, with cancellations)."""
    n, k = draw(st.sampled_from(LAYOUTS))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    size = draw(st.integers(1, 40))
    return (n, k), [(rng.standard_normal(size) * 10.0 ** rng.choice([-8, 0, 8], size)).astype(np.float32)
                    for _ in range(n * k)]


@requires_mpi
@settings(max_examples=100, derandomize=True)
@given(case=float_group())
def test_float_sums_across_ranks(jobs, case):
    """Bit for bit with one process where the order of the additions cannot matter (two
    devices: one addition); otherwise within rounding of the exact sum. Every rank and device
    gets the same bytes, deterministically (the worker runs each call twice)."""
    (n, k), xs = case
    outs = jobs[n].call("allreduce_sum", xs, k=k)
    assert all(o.tobytes() == outs[0].tobytes() for o in outs)
    if n * k == 2:
        assert_same(outs, in_process(xs).allreduce_sum(xs))
    exact = np.sum([x.astype(np.float64) for x in xs], axis=0)
    bound = len(xs) * np.finfo(xs[0].dtype).eps * np.sum([np.abs(x.astype(np.float64)) for x in xs], axis=0)
    assert (np.abs(outs[0] - exact) <= bound).all()


@requires_mpi
def test_float_sum_order_is_local_devices_then_ranks(jobs):
    """In float32 1e8 + 1 == 1e8: the order of the additions shows in the result. At 2 ranks
    of 2 devices MPI adds each rank's local sum: (x0 + x1) + (x2 + x3); one process adds in
    device order: ((x0 + x1) + x2) + x3."""
    xs = [np.array([v], np.float32) for v in (1e8, 1.0, -1e8, 1.0)]
    assert jobs[2].call("allreduce_sum", xs, k=2)[0][0] == (xs[0] + xs[1]) + (xs[2] + xs[3]) == 0.0
    assert in_process(xs).allreduce_sum(xs)[0][0] == ((xs[0] + xs[1]) + xs[2]) + xs[3] == 1.0
    two = [np.array([1e8], np.float32), np.array([1.0], np.float32)]
    assert_same(jobs[2].call("allreduce_sum", two, k=1), in_process(two).allreduce_sum(two))


@requires_mpi
@EXAMPLES
@given(case=group_arrays(vary_axis=True))
def test_allgather_uneven(jobs, case):
    (n, k), xs, axis = case
    outs = jobs[n].call("allgather", xs, k=k, axis=axis)
    assert_same(outs, in_process(xs).allgather(xs, axis=axis))
    np.testing.assert_array_equal(outs[-1], np.concatenate(xs, axis=axis))


@requires_mpi
@EXAMPLES
@given(case=group_arrays(), data=st.data())
def test_broadcast(jobs, case, data):
    (n, k), xs, _ = case
    root = data.draw(st.integers(0, n * k - 1))
    outs = jobs[n].call("broadcast", xs, k=k, root=root)
    assert_same(outs, in_process(xs).broadcast(xs[root], root=root))


@requires_mpi
@EXAMPLES
@given(case=group_arrays())
def test_reduce_scatter_uneven(jobs, case):
    (n, k), xs, axis = case
    outs = jobs[n].call("reduce_scatter", xs, k=k, axis=axis)
    assert_same(outs, in_process(xs).reduce_scatter(xs, axis=axis))
    total = np.sum([x.astype(np.float64) for x in xs], axis=0)
    assert [o.shape[axis] for o in outs] == tpmax.split_sizes(total.shape[axis], n * k)


@requires_mpi
def test_bad_arguments_raise_on_every_rank(jobs):
    ok = np.zeros((2, 3), np.float32)
    # Off-axis shapes that differ across ranks: every rank sees it in the size exchange.
    with pytest.raises(RuntimeError, match=r"all_ranks=True.*ranks disagree on dtype, ndim, axis or off-axis"):
        jobs[2].call("allgather", [ok, np.zeros((2, 4), np.float32)], k=1, axis=0)
    with pytest.raises(RuntimeError, match=r"all_ranks=True.*ranks disagree"):  # ndim differs
        jobs[3].call("allgather", [ok, ok, np.zeros((2, 3, 1), np.float32)], k=1, axis=0)
    with pytest.raises(RuntimeError, match=r"all_ranks=True.*ranks disagree"):  # dtype differs
        jobs[2].call("allgather", [ok, ok.astype(np.float16)], k=1, axis=1)
    # The local checks are comm._check's: same message as in one process.
    with pytest.raises(RuntimeError, match=r"all_ranks=True.*broadcast: root 5 is outside the group of 4"):
        jobs[2].call("broadcast", [ok] * 4, k=2, root=5)
    with pytest.raises(RuntimeError, match=r"all_ranks=True.*reduce_scatter: shapes differ across devices"):
        jobs[2].call("reduce_scatter", [ok, ok.T, ok, ok.T], k=2)
    assert_same(jobs[2].call("allreduce_sum", [ok + 1, ok + 2], k=1), [ok + 3, ok + 3])  # still serving


@requires_mpi
@pytest.mark.parametrize("n", [2, 3])
def test_lock_step_messages(jobs, n):
    """bcast_arrays / bcast_json from rank 0 and from the last rank: every dtype, 0-d and
    empty arrays, non-ASCII names, an empty dict (`tests/mpi/messages_worker.py`)."""
    assert jobs[n].call("messages", [], k=0) == []


@requires_mpi
@pytest.mark.parametrize("n,k", LAYOUTS)
def test_mlp_layer_across_ranks(jobs, n, k):
    """tpmax.mlp (gate/up rowwise, down columnwise, all-reduce) on MpiCommunicator equals the
    in-process layer; bit for bit when the all-reduce adds only two partial sums."""
    tp, d, f, t = n * k, 16, 22, 3  # F = 22 splits unevenly over 3 and 4
    rng = np.random.default_rng(tp)
    x = rng.standard_normal((t, d)).astype(np.float32)
    gate, up = (rng.standard_normal((f, d)).astype(np.float32) for _ in range(2))
    down = rng.standard_normal((d, f)).astype(np.float32)
    bounds = tpmax.split_bounds(f, tp)
    w13s = [np.concatenate([gate[a:b], up[a:b]]) for a, b in bounds]  # [2*F_r, D]
    w2s = [np.ascontiguousarray(down[:, a:b]) for a, b in bounds]  # [D, F_r]
    outs = jobs[n].call("mlp", [x] * tp + w13s + w2s, k=k)
    want = tpmax.mlp([x] * tp, w13s, w2s, in_process([x] * tp))
    for o, w in zip(outs, want):
        assert o.dtype == np.float32
        np.testing.assert_allclose(o, w, rtol=1e-5, atol=1e-5)
        if tp == 2:
            assert o.tobytes() == w.tobytes()


@requires_mpi
@pytest.mark.parametrize("n,spec,says", [
    (2, "cpu:0,1,2", "AllRanksError: --devices lists 3 devices for 2 MPI ranks; the count must be a multiple"),
    (2, "gpu:0,1,2,3", "AllRanksError: NCCL across MPI ranks drives one GPU per rank: --devices lists 4 GPUs for 2"),
    (2, "cpu:0,1,2,3", r"no error: MpiCommunicator\(rank [01]/2: cpu:[02], cpu:[13] of tp=4\)"),
])
def test_factory_under_mpi(jobs, n, spec, says):
    with pytest.raises(RuntimeError, match="all_ranks=True.*" + says):
        jobs[n].call("factory", [], k=0, devices=spec)


def gpu_factory(job, spec, **gpus):
    """Every rank's answer of `mpi_communicator(spec)` over fake GPUs (`tests/mpi/fake_gpu.py`)."""
    with pytest.raises(RuntimeError) as e:
        job.call("factory", [], k=0, devices=spec, gpus=gpus)
    assert "all_ranks=True" in str(e.value)
    return str(e.value)


@requires_mpi
@pytest.mark.parametrize("n,spec,gpus,bound", [
    (2, "gpu:0,1", dict(visible=2, isolated=False), [0, 1]),  # one host, every rank sees both GPUs
    (2, "gpu:0,0", dict(visible=1, isolated=True), [0, 0]),  # per-rank CUDA_VISIBLE_DEVICES: distinct GPUs
    (2, "gpu:0,1", dict(visible=1, isolated=True, bind="local"), [0, 0]),  # bound by local rank
    (3, "gpu:5,6,7", dict(visible=4, isolated=False, bind="local"), [0, 1, 2]),
])
def test_gpu_ranks_bind_their_gpu_and_share_the_nccl_id(jobs, n, spec, gpus, bound):
    said = gpu_factory(jobs[n], spec, **gpus)
    got = re.findall(r"NcclRankCommunicator\(rank (\d)/\d: gpu:(\d)\) bound (\d) joined \[\((\d), '(\w+)', (\d)\)\]",
                     said)
    assert sorted((int(r), int(g), int(b)) for r, g, b, *_ in got) == [(r, b, b) for r, b in enumerate(bound)], said
    assert {(int(size), uid) for _, _, _, size, uid, _ in got} == {(n, got[0][4])}, said  # one id, 128 bytes
    assert all(r == nccl_rank for r, *_, nccl_rank in got), said


@requires_mpi
@pytest.mark.parametrize("n,spec,gpus,says", [
    (3, "gpu:0,1,1", dict(visible=2, isolated=False), r"two MPI ranks on one host drive the same GPU "
                                                       r"\(PCI bus 0000:02:00.0, local ranks \[1, 2\]\)"),
    (2, "gpu:0,0", dict(visible=1, isolated=False), r"same GPU \(PCI bus 0000:01:00.0, local ranks \[0, 1\]\)"),
    (2, "gpu:0,1", dict(visible=1, isolated=True), r"rank 1 has no GPU 1: it sees 1; .*TPMAX_GPU_BIND=local"),
    (2, "gpu:0,1", dict(visible=0, isolated=True, bind="local"), r"rank 0 has no GPU 0: it sees 0; .*rank 1 has"),
    (2, "gpu:0,1", dict(visible=2, isolated=False, bind="rank"), r"TPMAX_GPU_BIND='rank': expected 'id' or 'local'"),
])
def test_gpu_setup_refused_alike_on_every_rank(jobs, n, spec, gpus, says):
    said = gpu_factory(jobs[n], spec, **gpus)
    assert re.search(r"AllRanksError: .*" + says, said), said
    assert said.count("AllRanksError") == 1, said  # every rank raised the same error


@requires_mpi
@pytest.mark.parametrize("n,per_rank,says", [
    (2, [{"a": 1, "b": [1, 2]}] * 2, "no error"),
    (2, [{"a": 1, "b": [1, 2]}, {"b": [1, 2], "a": 1}], "no error"),  # key order does not matter
    (2, [{"a": 1, "b": [1, 2]}, {"a": 1, "b": [2, 1]}], r"RanksDisagree: the ranks disagree with rank 0 \(rank 1: b\)"),
    (3, [{"a": 1}, {"a": 1, "c": 0}, {}], r"\(rank 1: keys rank 0 lacks; rank 2: a\)"),
    (3, [{"a": 1.0}, {"a": 1.0}, {"a": 1.0 + 1e-12}], r"\(rank 2: a\)"),
])
def test_agree(jobs, n, per_rank, says):
    with pytest.raises(RuntimeError, match=r"all_ranks=True: \[.(RanksDisagree: .*)?" + says):
        jobs[n].call("agree", [], k=0, per_rank=per_rank)


def test_checkpoint_fingerprint_reads_little_and_tells_checkpoints_apart(tmp_path):
    rng = np.random.default_rng(0)
    head = rng.bytes(1000)
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text('{"x": 1}')
    (tmp_path / "a" / "w.bin").write_bytes(head + rng.bytes(3 << 20))
    (tmp_path / "b" / "w.bin").write_bytes(head + rng.bytes(3 << 20))  # same header and size, other weights
    (tmp_path / "c" / "w.bin").write_bytes((tmp_path / "a" / "w.bin").read_bytes())
    fa, fb, fc = (mpi.checkpoint_fingerprint(tmp_path / n) for n in "abc")
    assert fa == fc and fa != fb and fa["config.json"] == fb["config.json"]
    big = tmp_path / "big.gguf"
    with open(big, "wb") as f:  # 4 GiB, sparse: costs no disk
        f.truncate(4 << 30)
    io = lambda: int(dict(ln.split(": ") for ln in Path("/proc/self/io").read_text().splitlines())["rchar"])  # noqa: E731
    before = io()
    assert mpi.checkpoint_fingerprint(big)["big.gguf"][0] == 4 << 30
    assert io() - before < 1.2 * 2**20  # 1 MiB + 16 blocks of 4 KiB


@requires_mpi
def test_ranks_with_other_devices_are_refused_alike(jobs):
    """Ranks given different --devices stop with one error on every rank (they used to hang
    after MPI_ERR_TRUNCATE)."""
    with pytest.raises(RuntimeError, match=r"all_ranks=True: \[.RanksDisagree: the MPI ranks' --devices disagree "
                                           r"with rank 0 \(rank 1: devices\)"):
        jobs[2].call("factory", [], k=0, devices="cpu:0,1", per_rank_devices=["cpu:0,1", "cpu:0,1,2,3"])


# ------------------------------------------------------------------------------------------
# Faults: one failing rank ends the job, promptly.


def run_job(n, *args, timeout=30):
    t0 = time.monotonic()
    proc = subprocess.Popen(mpirun(n, *args), env=mpi_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        pytest.fail(f"mpirun {args} hung for {timeout} s")
    return proc.returncode, out, time.monotonic() - t0


@requires_mpi
@pytest.mark.parametrize("mode,says", [
    ("raise", "tpmax (rank 1): ValueError: boom on purpose"),
    ("exit", "tpmax (rank 1): SystemExit: 3"),
    ("kill", "signal 9"),
    ("term", "signal 15"),
])
def test_a_failing_rank_ends_the_job(mode, says):
    rc, out, took = run_job(3, HERE / "mpi" / "fault_worker.py", mode)
    assert rc != 0, out
    assert took < 60, f"{took:.1f} s:\n{out}"  # ends, not hangs (a loaded runner is slow)
    assert out.count(says) == 1, out
    assert "tpmax (rank 0)" not in out and "tpmax (rank 2)" not in out, out
    assert "ok " not in out, out


@requires_mpi
def test_an_idle_follower_sleeps():
    """A rank waiting for rank 0's next message sleeps between polls instead of spinning a
    core in a blocking broadcast: 3 s of waiting cost it well under a second of CPU."""
    rc, out, _ = run_job(2, HERE / "mpi" / "fault_worker.py", "idle")
    assert rc == 0, out
    (line,) = [ln for ln in out.splitlines() if ln.startswith("idle ")]
    assert float(line.split()[2]) < 0.5, out


def test_step_timeout_setting(monkeypatch):
    from tpmax.parallel import mpi_wire
    for text, want in [("", 600.0), ("5", 5.0), ("0.5", 0.5), ("0", None)]:
        monkeypatch.setenv("TPMAX_MPI_TIMEOUT", text)
        assert mpi_wire.step_timeout() == want
    for bad in ("-1", "abc", "inf", "nan"):
        monkeypatch.setenv("TPMAX_MPI_TIMEOUT", bad)
        with pytest.raises(ValueError, match="TPMAX_MPI_TIMEOUT"):
            mpi_wire.step_timeout()


@requires_mpi
def test_healthy_job_exits_zero():
    rc, out, _ = run_job(2, HERE / "mpi" / "fault_worker.py", "ok")
    assert rc == 0, out
    assert sorted(line for line in out.splitlines() if line.startswith("ok ")) == ["ok 0 4.0", "ok 1 4.0"]


# ------------------------------------------------------------------------------------------
# NCCL across ranks needs two GPUs (and MPI); it cannot run on a CPU-only machine.


@requires_mpi
@pytest.mark.gpu
@pytest.mark.skipif(tpmax.gpu_count() < 2, reason="needs 2 CUDA GPUs")
def test_nccl_over_mpi_two_gpus():
    rc, out, _ = run_job(2, HERE / "mpi" / "nccl_worker.py", timeout=120)
    assert rc == 0, out
    assert out.count("nccl ok") == 2, out
