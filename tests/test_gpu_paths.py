"""The CuPy code paths, checked on CPU through test doubles (and on a GPU when there is one).

- current device: every per-device call, and every op on a device's weights, runs with its
  own device current (a recording device-context factory stands in for `cupy.cuda.Device`);
- peer copies: the order of stream events around a copy between GPUs (a recording
  `cupy.cuda` double);
- NCCL: availability and the bf16 type come from `cupy.cuda.nccl`; one device never uses it;
- dtypes: activations keep half dtypes; the bf16 N-D matmul is flattened to 2-D;
- the GPU benchmark runs end to end on CPU in its small mode.
"""
from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import types
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import tpmax
from tpmax import Device
from tpmax.core import comm as comm_mod
from tpmax.nn import layers
from tpmax.core.devices import cupy_version, device_context_factory, on_device_context, peer_copy
from conftest import cpu_group, requires_gpu

ROOT = Path(__file__).resolve().parent.parent
HALF_AND_F32 = [np.dtype(np.float32), np.dtype(np.float16), tpmax.bfloat16]


# ------------------------------------------------------------------------------------------
# Doubles.


class ContextRecorder:
    """A device-context factory that records, per thread, which device is current."""

    def __init__(self):
        self._local = threading.local()
        self.entered: list[tuple[Device, str]] = []  # (device, thread name) per entry
        self._lock = threading.Lock()

    def now(self) -> Device | None:
        """The device current on the calling thread (None outside every context)."""
        return getattr(self._local, "device", None)

    @contextlib.contextmanager
    def __call__(self, device: Device):
        prev = self.now()
        self._local.device = device
        with self._lock:
            self.entered.append((device, threading.current_thread().name))
        try:
            yield
        finally:
            self._local.device = prev


class Placed(np.ndarray):
    """A NumPy array that belongs to one device: every ufunc (matmul included) that reads it
    appends `(its device, the device current then)` to `log`."""

    def __new__(cls, a, device: Device, log: list, recorder: ContextRecorder):
        obj = np.asarray(a).view(cls)
        obj.home, obj.log, obj.recorder = device, log, recorder
        return obj

    def __array_finalize__(self, obj):
        self.home = getattr(obj, "home", None)
        self.log = getattr(obj, "log", None)
        self.recorder = getattr(obj, "recorder", None)

    def __getitem__(self, index):  # gathers (fancy indexing) run on the current device too
        if not isinstance(index, (int, slice, tuple)) or (isinstance(index, tuple) and any(
                isinstance(i, np.ndarray) for i in index)):
            self.log.append((self.home, self.recorder.now()))
        return super().__getitem__(index)

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        for x in inputs:
            if isinstance(x, Placed):
                x.log.append((x.home, x.recorder.now()))
        plain = [np.asarray(x) if isinstance(x, Placed) else x for x in inputs]
        if "out" in kwargs:
            kwargs["out"] = tuple(np.asarray(o) for o in kwargs["out"])
        return getattr(ufunc, method)(*plain, **kwargs)


class RecordingComm(tpmax.InProcessCommunicator):
    """The in-process communicator, recording the device current at each all-reduce."""

    def __init__(self, devs, recorder):
        super().__init__(devs)
        self.recorder, self.calls = recorder, []

    def allreduce_sum(self, xs):
        self.calls.append((self.recorder.now(), threading.current_thread().name))
        return super().allreduce_sum(xs)


# ------------------------------------------------------------------------------------------
# Current device.


@pytest.mark.parametrize("threads", [False, True])
@pytest.mark.parametrize("kind", ["cpu", "gpu"])
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_per_device_runs_each_call_under_its_device(kind, n, threads):
    # gpu devices need no CuPy here: the recorder replaces their context, per_device moves no arrays.
    devs = [Device(kind, i) for i in range(n)]
    rec = ContextRecorder()
    with device_context_factory(kind, rec):
        out = tpmax.per_device(lambda r: (r, rec.now(), threading.current_thread().name), list(range(n)),
                               devices=devs, threads=threads)
    assert [r for r, _, _ in out] == list(range(n))
    assert [d for _, d, _ in out] == devs
    workers = {name for _, _, name in out[1:]}
    if threads and n > 1:
        assert all(name.startswith("tpmax-dev") for name in workers), workers
    else:
        assert workers <= {threading.current_thread().name}
    assert rec.now() is None  # nothing left current on the calling thread


def test_per_device_without_devices_enters_no_context():
    rec = ContextRecorder()
    with device_context_factory("cpu", rec):
        out = tpmax.per_device(lambda r: rec.now(), [0, 1], threads=True)
    assert out == [None, None] and rec.entered == []


def test_per_device_checks_the_device_count():
    with pytest.raises(ValueError, match="2 devices for 3"):
        tpmax.per_device(lambda r: r, [0, 1, 2], devices=cpu_group(2))


def test_device_context_factory_restores_and_rejects_unknown_kinds():
    rec = ContextRecorder()
    with device_context_factory("gpu", rec):
        with on_device_context(Device("gpu", 3)):
            assert rec.now() == Device("gpu", 3)
    with pytest.raises(ValueError, match="kind"):
        with device_context_factory("tpu", rec):
            pass
    if tpmax.gpu_count() == 0:  # the real GPU context is back: it needs CuPy again
        with pytest.raises(RuntimeError, match="CuPy"):
            on_device_context(Device("gpu", 0))


def _placed_mlp(tp, recorder, *, T=5, D=8, F=12, seed=0):
    """A sharded MLP whose weight shards are `Placed` on their devices; also the full weights."""
    rng = np.random.default_rng(seed)
    devs = cpu_group(tp)
    log: list = []
    x = rng.standard_normal((T, D)).astype(np.float32)  # [T, D]
    w13 = rng.standard_normal((2 * F, D)).astype(np.float32)  # [gate; up] [2F, D]
    w2 = rng.standard_normal((D, F)).astype(np.float32)  # [D, F]
    bounds = tpmax.split_bounds(F, tp)
    w13s = [Placed(np.concatenate([w13[a:b], w13[F + a:F + b]]), d, log, recorder) for d, (a, b) in zip(devs, bounds)]
    w2s = [Placed(w2[:, a:b], d, log, recorder) for d, (a, b) in zip(devs, bounds)]
    return devs, log, [x.copy() for _ in devs], w13s, w2s, (w13, w2)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("tp", [1, 2, 3])
def test_mlp_computes_each_shard_under_its_device(tp, fused):
    rec = ContextRecorder()
    devs, log, xs, w13s, w2s, (w13, w2) = _placed_mlp(tp, rec)
    comm = RecordingComm(devs, rec)
    gemm = tpmax.DistributedGemmConfig(enable_matmul_allreduce=True, chunks=2) if fused else None
    with device_context_factory("cpu", rec):
        ys = tpmax.mlp(xs, w13s, w2s, comm, gemm_config=gemm)
    chunks = 2 if fused else 1
    # gate/up and down matmul of every device and chunk (a 2-3 row matmul runs as one gemv per row)
    assert len(log) >= 2 * tp * chunks and {home for home, _ in log} == set(devs)
    assert all(home == now for home, now in log), log
    assert len(comm.calls) == chunks
    if fused:  # the reducer thread's all-reduces run with device 0 current, not the thread's default
        assert all(now == devs[0] and name.startswith("tpmax-allreduce") for now, name in comm.calls)
    want = layers.mlp_local(xs[0], w13, w2)  # unsharded
    for y in ys:
        np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)


def _placed(obj, device, log, recorder):
    """`obj` (arrays, tuples, dataclasses of them) with every array `Placed` on `device`."""
    import dataclasses
    if isinstance(obj, np.ndarray):
        return Placed(obj, device, log, recorder)
    if isinstance(obj, tuple):
        return tuple(_placed(x, device, log, recorder) for x in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _placed(getattr(obj, f.name), device, log, recorder)
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


def _placed_weights(weights, devs, log, recorder):
    """Every per-device entry of a `tpmax.Weights` `Placed` on its device."""
    per_dev = lambda t: tuple(_placed(x, d, log, recorder) for x, d in zip(t, devs))  # noqa: E731
    layers = tuple(tpmax.LayerWeights(**{f: per_dev(getattr(lw, f)) for f in ("attn_norm", "attn", "mlp_norm",
                                                                             "w13", "w2")})
                   for lw in weights.layers)
    return tpmax.Weights(embed=per_dev(weights.embed), layers=layers, norm=per_dev(weights.norm),
                         lm_head=per_dev(weights.lm_head))


@pytest.mark.parametrize("threads", [False, True])
def test_forward_runs_every_device_op_under_its_device(threads):
    cfg = tpmax.ModelConfig(arch="llama", vocab_size=29, hidden_size=16, n_layers=2, n_heads=4, n_kv_heads=2,
                            head_dim=4, ffn_size=12)
    devs = cpu_group(3)
    rec, log = ContextRecorder(), []
    weights = _placed_weights(tpmax.shard_weights(tpmax.DictSource(tpmax.random_weights(cfg)), cfg, devs), devs,
                              log, rec)
    params = tpmax.KVCacheParams("float32", cfg.n_kv_heads, cfg.head_dim, 4, cfg.n_layers, tuple(devs),
                                 n_heads=cfg.n_heads)
    cache = tpmax.PagedKVCache(params, 8)
    cache.pages[:] = [Placed(p, d, log, rec) for p, d in zip(cache.pages, devs)]
    comm = tpmax.communicator(devs)
    for s in (0, 1):
        cache.add(s)
    with device_context_factory("cpu", rec):
        for tokens, offs in (([1, 2, 3, 4, 5], [0, 3, 5]), ([6, 7], [0, 1, 2])):  # prefill, then one decode step
            n_new = np.diff(offs).tolist()
            slots = cache.reserve([0, 1], n_new)
            tpmax.distributed_transformer(weights, cfg, np.array(tokens), np.array(offs), cache.pages, slots, comm,
                                          threads=threads)
            cache.commit([0, 1], n_new)
    assert len(log) > 0
    wrong = [(home, now) for home, now in log if home != now]
    assert not wrong, f"{len(wrong)} of {len(log)} ops ran under the wrong device, e.g. {wrong[:3]}"


def test_in_process_collectives_work_under_their_devices():
    rec = ContextRecorder()
    devs = cpu_group(3)
    comm = tpmax.communicator(devs)
    xs = [np.full((2, 3), r, np.float32) for r in range(3)]
    with device_context_factory("cpu", rec):
        comm.allreduce_sum(xs)
        comm.allgather(xs, axis=0)
    assert {d for d, _ in rec.entered} == {devs[0]}  # the sum and the concatenation run on device 0


# ------------------------------------------------------------------------------------------
# Copies between GPUs.


class FakeCuda:
    """Records, in order, what `peer_copy` does with `cupy.cuda`."""

    def __init__(self):
        self.log: list[tuple] = []
        self.current = 0
        self._events = 0

    @contextlib.contextmanager
    def Device(self, i):  # noqa: N802 - the name of cupy.cuda.Device
        prev, self.current = self.current, i
        try:
            yield
        finally:
            self.current = prev

    def Event(self, **kwargs):  # noqa: N802
        self._events += 1
        fake, n = self, self._events

        class Ev:
            id = n

            def record(self, stream):
                fake.log.append(("record", n, stream.device))
        return Ev()

    def get_current_stream(self):
        fake, device = self, self.current

        class Stream:
            def wait_event(self, ev):
                fake.log.append(("wait", ev.id, device))
        s = Stream()
        s.device = device
        return s

    def array(self, *, contiguous=True):
        fake = self

        class Arr:
            flags = types.SimpleNamespace(c_contiguous=contiguous)

            def copy(self):  # CuPy: a C-contiguous copy on the current device
                fake.log.append(("copy", fake.current))
                return fake.array()
        return Arr()


def test_peer_copy_waits_for_the_source_and_holds_its_memory():
    cuda = FakeCuda()
    out = peer_copy(cuda.array(), 1, 2, cuda)
    assert out.flags.c_contiguous
    assert cuda.log == [
        ("record", 1, 1),  # what wrote the source, on the source's stream
        ("wait", 1, 2),  # the destination stream waits for it
        ("copy", 2),  # the copy runs on the destination
        ("record", 2, 2),  # the copy's end, on the destination's stream
        ("wait", 2, 1),  # the source stream waits before reusing the memory
    ]
    assert cuda.current == 0  # the caller's device is current again


def test_peer_copy_makes_a_strided_source_contiguous_before_the_event():
    # e.g. reduce_scatter's slices on an axis other than 0: the contiguous copy must run on
    # the source stream *before* the event the destination waits for.
    cuda = FakeCuda()
    peer_copy(cuda.array(contiguous=False), 1, 2, cuda)
    assert cuda.log[:3] == [("copy", 1), ("record", 1, 1), ("wait", 1, 2)]
    assert cuda.log[3] == ("copy", 2)


# ------------------------------------------------------------------------------------------
# NCCL.


def test_nccl_available_reads_the_flag_not_the_import():
    assert tpmax.nccl_available(types.SimpleNamespace(available=True)) is True
    assert tpmax.nccl_available(types.SimpleNamespace(available=False)) is False
    assert tpmax.nccl_available(types.SimpleNamespace()) is False
    if tpmax.gpu_count() == 0 and cupy_version() is None:
        assert tpmax.nccl_available() is False  # CuPy missing: test_import_needs_no_cuda hides it too


def _fake_nccl(**extra):
    return types.SimpleNamespace(NCCL_FLOAT32=7, NCCL_FLOAT16=6, NCCL_FLOAT64=8, NCCL_INT32=2, NCCL_INT64=4,
                                 **extra)


def test_nccl_bfloat16_uses_the_exported_constant():
    assert comm_mod.nccl_dtype(tpmax.bfloat16, _fake_nccl(NCCL_BFLOAT16=42)) == 42
    assert comm_mod.nccl_dtype(tpmax.bfloat16, _fake_nccl()) == 9
    assert comm_mod.nccl_dtype(np.float16, _fake_nccl()) == 6
    with pytest.raises(ValueError, match="unsupported"):
        comm_mod.nccl_dtype(np.int8, _fake_nccl())


@pytest.mark.parametrize("spec, want", [
    ("gpu:0", False), ("gpu:0,1", True), ("gpu:0,0", False), ("gpu:0,1,1", False), ("cpu:0,1", False),
])
def test_which_groups_use_nccl(spec, want):
    kind, ids = spec.split(":")
    devs = [Device(kind, int(i)) for i in ids.split(",")]
    assert comm_mod.uses_nccl(devs, True) is want
    assert comm_mod.uses_nccl(devs, False) is False


@settings(max_examples=100, derandomize=True)
@given(st.integers(1, 5), st.integers(1, 3), st.data())
def test_padded_nccl_chunks_round_trip(n, ndim, data):
    """The padding both NCCL communicators share: gathering padded shards and cutting them
    equals concatenating; scattering padded slices and cutting equals splitting."""
    ax = data.draw(st.integers(0, ndim - 1))
    rest = data.draw(st.lists(st.integers(1, 3), min_size=ndim - 1, max_size=ndim - 1))
    sizes = data.draw(st.lists(st.integers(0, 4), min_size=n, max_size=n))
    shape = lambda k: tuple(rest[:ax]) + (k,) + tuple(rest[ax:])  # noqa: E731
    rng = np.random.default_rng(n * 7 + ndim)
    shards = [rng.standard_normal(shape(k)).astype(np.float32) for k in sizes]
    recv = np.stack([comm_mod.pad_shard(x, ax, max(sizes)) for x in shards])  # what allGather fills: [n, m, *rest]
    np.testing.assert_array_equal(comm_mod.unpad_gathered(recv, sizes, ax), np.concatenate(shards, axis=ax))
    full = np.concatenate(shards, axis=ax).astype(tpmax.bfloat16)
    bounds = tpmax.split_bounds(full.shape[ax], n)
    sent = comm_mod.pad_slices(full, ax, bounds, np.float32)  # [n, m, *rest] in the sum dtype
    assert sent.dtype == np.float32
    for j, (a, b) in enumerate(bounds):
        got = comm_mod.unpad_slice(sent[j], b - a, ax, full.dtype)
        assert got.dtype == full.dtype and got.flags.c_contiguous
        np.testing.assert_array_equal(got, np.take(full, range(a, b), axis=ax))


def test_nccl_sums_halves_in_float32():
    assert comm_mod.sum_dtype(tpmax.bfloat16) == comm_mod.sum_dtype(np.float16) == np.float32
    assert comm_mod.sum_dtype(np.int32) == np.int32


class FakeCupy:
    """`cupy` as `devices` sees it, with `visible` GPUs (no CUDA needed)."""

    class ndarray:  # noqa: N801 - CuPy's name; nothing is one here
        pass

    def __init__(self, visible):
        self.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=lambda: visible),
                                          Device=lambda i: contextlib.nullcontext(i))


@pytest.fixture
def fake_gpus(monkeypatch):
    """`fake_gpus(n)`: tpmax.devices sees n GPUs through `FakeCupy` until the test ends."""
    dev_mod = sys.modules["tpmax.core.devices"]  # (`tpmax.devices` is also the parsing function)

    def install(n):
        monkeypatch.setattr(dev_mod, "_cupy", FakeCupy(n))
        dev_mod.gpu_count.cache_clear()
    yield install
    dev_mod.gpu_count.cache_clear()


def test_a_gpu_id_past_the_visible_count_is_a_clear_error(fake_gpus, monkeypatch):
    fake_gpus(1)
    with on_device_context(Device("gpu", 0)):
        pass
    with pytest.raises(RuntimeError, match=r"no GPU 2; 1 GPU\(s\) visible \(ids 0..0\); CUDA_VISIBLE_DEVICES=3"):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
        on_device_context(Device("gpu", 2))
    with pytest.raises(RuntimeError, match="no GPU 1"):
        tpmax.asarray(np.zeros(2), Device("gpu", 1))


def test_under_mpi_each_rank_checks_only_its_own_gpu(fake_gpus, monkeypatch):
    """`gpu:0,1` over two ranks that each see one GPU (per-rank CUDA_VISIBLE_DEVICES): the
    spec names the whole group, so parsing it must not check ids against this rank's count
    (`mpi.bind_gpu` checks this rank's GPU; tests/test_mpi.py runs it)."""
    from tpmax.parallel import mpi
    fake_gpus(1)
    for k in mpi.LAUNCHER_ENV:
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(RuntimeError, match="no GPU 1; 1 GPU"):
        tpmax.devices("gpu:0,1")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    assert tpmax.devices("gpu:0,1") == [Device("gpu", 0), Device("gpu", 1)]


@pytest.mark.parametrize("spec", ["gpu:0", "gpu:0,0", "cpu:0,1", "gpu:0,1"])
def test_one_gpu_group_is_in_process_and_nccl_refuses_it(monkeypatch, spec):
    kind, ids = spec.split(":")
    devs = [Device(kind, int(i)) for i in ids.split(",")]
    if kind == "gpu" and len(devs) == 1:
        comm = tpmax.communicator(devs)
        assert isinstance(comm, tpmax.InProcessCommunicator) and comm.tp == 1
    # A `cupy.cuda.nccl` double, with or without CuPy here: the refusal must be
    # NcclCommunicator's own check, before NCCL is initialised, not a missing CuPy.
    inits = []
    nccl = types.SimpleNamespace(available=True, NcclCommunicator=types.SimpleNamespace(initAll=inits.append))
    cuda = types.SimpleNamespace(nccl=nccl)
    for name, mod in (("cupy", types.SimpleNamespace(cuda=cuda)), ("cupy.cuda", cuda), ("cupy.cuda.nccl", nccl)):
        monkeypatch.setitem(sys.modules, name, mod)
    if spec == "gpu:0,1":  # two distinct GPUs: the one group NCCL takes
        assert tpmax.NcclCommunicator(devs).tp == 2 and inits == [[0, 1]]
        return
    with pytest.raises(ValueError, match="NCCL needs two or more distinct GPUs"):
        tpmax.NcclCommunicator(devs)
    assert inits == []


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int32"])
def test_one_device_collectives_return_their_input(dtype):
    comm = tpmax.communicator([Device("cpu", 0)])
    x = np.arange(12).reshape(3, 4).astype(tpmax.as_dtype(dtype))
    assert comm.allreduce_sum([x])[0] is x
    assert comm.allgather([x], axis=-1)[0] is x
    assert comm.broadcast(x, root=0)[0] is x
    assert comm.reduce_scatter([x], axis=0)[0] is x


# ------------------------------------------------------------------------------------------
# Dtypes.


@pytest.mark.parametrize("name", sorted(layers.ACTIVATIONS))
@pytest.mark.parametrize("dtype", HALF_AND_F32, ids=str)
def test_activations_keep_dtype(name, dtype):
    x = np.linspace(-4, 4, 33, dtype=np.float32).astype(dtype)
    y = layers.activation(name)(x)
    assert y.dtype == dtype and y.shape == x.shape
    ref = layers.activation(name)(x.astype(np.float32))
    tol = 1e-6 if dtype == np.float32 else (1e-2 if dtype == np.float16 else 2e-2)
    np.testing.assert_allclose(y.astype(np.float32), ref, rtol=tol, atol=tol)


def test_gelu_matches_erf_formula():
    import math
    x = np.linspace(-3, 3, 13)
    want = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x], np.float32)
    np.testing.assert_allclose(layers.activation("gelu")(x.astype(np.float32)), want, rtol=1e-6, atol=1e-7)


HALF = (np.dtype(np.float16), tpmax.bfloat16)


class Promoting(np.ndarray):
    """A NumPy array whose exp and tanh return float32 for half inputs, as CuPy's erf does."""

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        plain = lambda a: a.view(np.ndarray) if isinstance(a, Promoting) else a  # noqa: E731
        inputs = [plain(a) for a in inputs]
        if "out" in kwargs:
            kwargs["out"] = tuple(plain(a) for a in kwargs["out"])
        if ufunc in (np.exp, np.tanh):
            inputs = [a.astype(np.float32) if getattr(a, "dtype", None) in HALF else a for a in inputs]
        y = getattr(ufunc, method)(*inputs, **kwargs)
        return y.view(Promoting) if isinstance(y, np.ndarray) else y


@pytest.mark.parametrize("name", ["silu", "gelu_tanh", "sigmoid", "tanh"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_activation_survives_a_promoting_backend(name, dtype):
    # A backend whose exp/tanh turn half inputs into float32: the activation still returns half.
    x = np.linspace(-4, 4, 9, dtype=np.float32).astype(dtype)
    assert np.tanh(x.view(Promoting)).dtype == np.float32  # the stand-in does promote
    y = layers.activation(name)(x.view(Promoting))
    assert y.dtype == dtype
    np.testing.assert_array_equal(np.asarray(y), layers.activation(name)(x))


@settings(max_examples=50, derandomize=True)
@given(st.lists(st.integers(1, 4), min_size=2, max_size=4), st.integers(1, 6), st.integers(0, 2**31))
def test_matmul_t_2d_equals_batched_matmul(lead, out, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((*lead, 5)).astype(tpmax.bfloat16)  # [..., in], 2-4 leading axes -> 3-D to 5-D
    w = rng.standard_normal((out, 5)).astype(tpmax.bfloat16)  # [out, in]
    y = layers.matmul_t_2d(x, w)
    batched = x @ w.T  # the N-D matmul the 2-D one replaces (bf16 in, float32 out under ml_dtypes)
    assert y.shape == batched.shape == (*lead, out) and y.dtype == batched.dtype
    np.testing.assert_allclose(y.astype(np.float32), batched.astype(np.float32), rtol=1e-6, atol=1e-6)


def test_import_needs_no_cuda():
    code = ("import sys; sys.modules['cupy'] = None; import tpmax; "
            "assert tpmax.gpu_count() == 0 and not tpmax.nccl_available(); "
            "assert type(tpmax.communicator([tpmax.Device('gpu', 0)])).__name__ == 'InProcessCommunicator'; "
            "print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


# ------------------------------------------------------------------------------------------
# Benchmarks in their CPU mode.


def test_gpu_decode_small_runs_on_cpu(tmp_path):
    out = tmp_path / "gpu_decode.json"
    # The timeout only bounds a hang: with transformers installed the peer runs too (~15 s loaded).
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_decode.py"), "--devices", "cpu", "--layers", "2",
                        "--small", "--out", str(out)], capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert {"benchmark", "device", "model", "roofline", "figures"} <= set(doc)
    figs = doc["figures"]
    assert {"decode", "prefill", "transformers"} <= set(figs)
    assert [row["batch"] for row in figs["decode"]] == doc["config"]["batches"]
    for row in figs["decode"]:
        assert row["tokens_per_s"] > 0 and row["achieved_gbps"] > 0
    assert figs["prefill"]["tokens_per_s"] > 0 and figs["prefill"]["achieved_tflops"] > 0
    assert doc["roofline"]["copy_gbps"] > 0 and doc["roofline"]["matmul_tflops"] > 0


def test_launch_profile_runs_on_cpu(tmp_path):
    out = tmp_path / "launch_profile.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "launch_profile.py"), "--devices", "cpu:0,1",
                        "--layers", "2", "--small", "--out", str(out)], capture_output=True, text=True, timeout=20,
                       cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    doc = json.loads(out.read_text())
    per_layer = doc["figures"]["per_layer"]
    assert len(per_layer) == 2
    for row in per_layer:
        assert row["collectives"] == 2  # exactly two all-reduces per layer
        assert row["array_ops"] > 0
    assert doc["figures"]["total"]["array_ops"] >= sum(r["array_ops"] for r in per_layer)


def test_launch_profile_attributes_cuda_calls_to_segments():
    sys.path.insert(0, str(ROOT / "bench"))
    import launch_profile

    seg = launch_profile.Segments()
    seg.cut("allreduce_sum")  # two segments
    events = [("seg:0000", 0, 10), ("seg:0001", 10, 20), ("seg:-001", 20, 30),
              ("cudaLaunchKernel", 1, 2), ("cuLaunchKernel", 3, 4), ("cudaMemcpyAsync", 5, 6),
              ("cudaLaunchKernel", 12, 13), ("cudaStreamSynchronize", 14, 15), ("cudaMalloc", 16, 17),
              ("cudaLaunchKernel", 25, 26)]  # after the last segment: not counted
    launch_profile.attribute(events, seg)
    assert seg.rows[0] == {"op.kernel": 2, "copy.cudaMemcpyAsync": 1}
    assert seg.rows[1] == {"op.kernel": 1, "sync.cudaStreamSynchronize": 1}


# ------------------------------------------------------------------------------------------
# On a GPU.


@requires_gpu
def test_gpu_per_device_allocates_on_its_gpu():
    import cupy as cp
    devs = tpmax.devices("gpu:" + ",".join(str(i) for i in range(tpmax.gpu_count())))
    out = tpmax.per_device(lambda r: cp.zeros(3), list(range(len(devs))), devices=devs, threads=True)
    assert [a.device.id for a in out] == [d.id for d in devs]


@requires_gpu
@pytest.mark.parametrize("name", sorted(layers.ACTIVATIONS))
def test_gpu_activations_keep_bf16(name):
    import cupy as cp
    x = cp.linspace(-4, 4, 33, dtype=cp.float32).astype(tpmax.bfloat16)
    assert layers.activation(name)(x).dtype == tpmax.bfloat16


@requires_gpu
def test_gpu_bf16_3d_matmul():
    import cupy as cp
    x = cp.ones((2, 3, 8), cp.float32).astype(tpmax.bfloat16)
    w = cp.ones((4, 8), cp.float32).astype(tpmax.bfloat16)
    y = layers.matmul_t(x, w)
    assert y.shape == (2, 3, 4) and float(y.astype(cp.float32)[0, 0, 0]) == 8.0


@pytest.mark.skipif(tpmax.gpu_count() < 2, reason="needs two CUDA GPUs")
def test_gpu_in_process_allreduce_across_gpus():
    devs = tpmax.devices("gpu:0,1")
    comm = tpmax.InProcessCommunicator(devs)
    xs = [tpmax.asarray(np.full(1 << 20, r + 1, np.float32), d) for r, d in enumerate(devs)]
    out = comm.allreduce_sum(xs)
    assert [o.device.id for o in out] == [0, 1]
    assert all(float(o.sum()) == 3 * (1 << 20) for o in out)


@pytest.mark.parametrize("mode", ["all", "variable", "hidden"])
def test_logits_gathers_run_under_the_returned_device(mode):
    """The rows picked from the returned device's logits / hidden states (all-token and last-n
    logits, hidden states) are gathered with that device current, not device 0."""
    cfg = tpmax.ModelConfig(arch="llama", vocab_size=29, hidden_size=16, n_layers=1, n_heads=4, n_kv_heads=2,
                            head_dim=4, ffn_size=12)
    devs = cpu_group(2)
    rec, log = ContextRecorder(), []
    weights = tpmax.shard_weights(tpmax.DictSource(tpmax.random_weights(cfg)), cfg, devs)
    comm = tpmax.communicator(devs)
    h = [Placed(np.random.default_rng(0).standard_normal((5, 16)).astype(np.float32), d, log, rec) for d in devs]
    norms = [lambda x, w=w: layers.rms_norm(x, w, eps=1e-5) for w in weights.norm]
    head = lambda xs, c: tpmax.column_parallel_linear(xs, weights.lm_head, None, c)  # noqa: E731
    kw = {"all": dict(return_logits=tpmax.ReturnLogits.ALL),
          "variable": dict(return_logits=tpmax.ReturnLogits.VARIABLE),
          "hidden": dict(return_logits=tpmax.ReturnLogits.LAST_TOKEN,
                         return_hidden_states=tpmax.ReturnHiddenStates.LAST)}[mode]
    with device_context_factory("cpu", rec):
        tpmax.distributed_logits_postprocess(h, np.array([0, 3, 5]), 2, norms, head, comm, device=devs[1], **kw)
    assert any(home == devs[1] for home, _ in log)
    wrong = [(home, now) for home, now in log if home != now]
    assert not wrong, f"{len(wrong)} of {len(log)} ops ran under the wrong device, e.g. {wrong[:3]}"
