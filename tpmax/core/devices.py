"""Devices and per-device arrays: the bottom layer of tpmax.

A `Device` is `cpu:i` (a *virtual* device: NumPy arrays in host memory) or `gpu:i` (CuPy
arrays on CUDA device i). CuPy is optional: importing tpmax never needs CUDA, and asking
for a GPU without CuPy or a GPU is an error that says what is available. This module also
owns the current-device context (`on_device_context`, replaceable per device kind through
`device_context_factory`) and stream-ordered copies between GPUs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from typing import Any, Callable, ContextManager, Iterator

import ml_dtypes
import numpy as np

try:  # CuPy is an optional extra ([cuda12] / [cuda13]).
    import cupy as _cupy
except Exception:  # ImportError, or a CuPy wheel that finds no CUDA runtime
    _cupy = None

bfloat16 = np.dtype(ml_dtypes.bfloat16)
float8_e4m3fn = np.dtype(ml_dtypes.float8_e4m3fn)

DTYPES = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": bfloat16,
    "int32": np.dtype(np.int32),
    "int64": np.dtype(np.int64),
}

Array = Any  # numpy.ndarray on cpu:i, cupy.ndarray on gpu:i


@dataclasses.dataclass(frozen=True)
class Device:
    """One device: `kind` is "cpu" or "gpu", `id` the device number."""

    kind: str
    id: int = 0

    def __post_init__(self):
        if self.kind not in ("cpu", "gpu"):
            raise ValueError(f"device kind must be 'cpu' or 'gpu', got {self.kind!r}")
        if not isinstance(self.id, int) or self.id < 0:
            raise ValueError(f"device id must be a non-negative int, got {self.id!r}")

    def __str__(self):
        return f"{self.kind}:{self.id}"

    @property
    def xp(self):
        """The array module for this device: numpy or cupy."""
        return np if self.kind == "cpu" else cupy_module()


def cupy_module():
    """CuPy, or a RuntimeError saying why it cannot be used."""
    if _cupy is None:
        raise RuntimeError(
            "a GPU device needs CuPy, which is not installed or found no CUDA runtime; "
            "install tpmax[cuda12] or tpmax[cuda13], or use cpu devices (e.g. 'cpu:0,1')"
        )
    return _cupy


def cupy_version() -> str | None:
    """CuPy's version, or None when CuPy is not importable."""
    return None if _cupy is None else _cupy.__version__


@functools.cache
def gpu_count() -> int:
    """Number of visible CUDA devices (0 without CuPy or without a driver)."""
    if _cupy is None:
        return 0
    try:
        return _cupy.cuda.runtime.getDeviceCount()
    except Exception:
        return 0


def devices(spec: str) -> list[Device]:
    """Parse a device spec (MAX CLI syntax) into a list of devices.

    `cpu` / `gpu` mean device 0; `cpu:0,1,2,3` is four virtual CPU devices; `gpu:0,1,3`
    three GPUs; a repeated GPU id (`gpu:0,0`) is two logical devices on one GPU.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("empty device spec; expected e.g. 'cpu', 'cpu:0,1', 'gpu', 'gpu:0,1'")
    kind, _, ids_text = spec.strip().partition(":")
    if kind not in ("cpu", "gpu"):
        raise ValueError(f"device spec {spec!r}: kind must be 'cpu' or 'gpu', got {kind!r}")
    ids = []
    for part in (ids_text.split(",") if ids_text else ["0"]):
        part = part.strip()
        if not part.isdigit():
            raise ValueError(f"device spec {spec!r}: {part!r} is not a non-negative integer id")
        ids.append(int(part))
    if kind == "cpu" and len(set(ids)) != len(ids):
        raise ValueError(f"device spec {spec!r}: virtual CPU ids must be distinct")
    if kind == "gpu":
        cupy_module()
        from .launcher import launched_by_mpi

        if not launched_by_mpi():  # under MPI the spec names the whole group: each rank checks its own
            for i in ids:
                check_gpu(i, f"device spec {spec!r}: ")
    return [Device(kind, i) for i in ids]


def check_gpu(i: int, where: str = "") -> int:
    """`i` if CUDA device `i` is visible to this process, else a RuntimeError saying how many are.

    Args:
        where: a prefix for the message (what asked for the GPU).
    """
    n = gpu_count()
    if not 0 <= i < n:
        cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise RuntimeError(
            f"{where}no GPU {i}; {n} GPU(s) visible"
            + (f" (ids 0..{n - 1})" if n else "; use cpu devices instead")
            + (f"; CUDA_VISIBLE_DEVICES={cvd}" if cvd is not None else "")
        )
    return i


def as_dtype(dtype) -> np.dtype:
    """A dtype name ("bfloat16", ...) or dtype-like as a NumPy dtype (bf16 via ml_dtypes)."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unsupported dtype {dtype!r}; supported: {', '.join(DTYPES)}")
        return DTYPES[dtype]
    return np.dtype(dtype)


def is_gpu_array(x) -> bool:
    return _cupy is not None and isinstance(x, _cupy.ndarray)


def xp_of(x):
    """The array module of `x` (numpy or cupy): one function body serves both."""
    return _cupy if is_gpu_array(x) else np


def device_of(x) -> Device:
    """The device an array lives on.

    NumPy arrays report `cpu:0`: virtual CPU devices share host memory, so a NumPy array
    does not record which virtual device it was placed on.
    """
    if is_gpu_array(x):
        return Device("gpu", x.device.id)
    if isinstance(x, np.ndarray):
        return Device("cpu", 0)
    raise TypeError(f"expected a NumPy or CuPy array, got {type(x).__name__}")


def on_device(x, device: Device) -> bool:
    """True if `x` can serve as `device`'s array (right backend, right GPU)."""
    if device.kind == "cpu":
        return isinstance(x, np.ndarray)
    return is_gpu_array(x) and x.device.id == device.id


def asarray(a, device: Device, dtype=None, *, copy: bool = False) -> Array:
    """Place `a` (NumPy, CuPy, or nested lists) on `device`, optionally converting dtype.

    A CuPy array from another GPU is copied in stream order (`peer_copy`): the copy waits for
    the work that produced it, and the source does not reuse its memory before the copy ends.
    """
    dtype = None if dtype is None else as_dtype(dtype)
    if device.kind == "cpu":
        out = to_numpy(a) if is_gpu_array(a) else np.asarray(a)
        if dtype is not None and out.dtype != dtype:
            return out.astype(dtype)
        # np.asarray returns `a` itself, or a view of it for an ndarray subclass: copy both
        return out.copy() if copy and isinstance(a, np.ndarray) else out
    cp = cupy_module()
    if is_gpu_array(a) and a.device.id != device.id:
        a = peer_copy(a, a.device.id, device.id, cp.cuda)
        copy = False  # already a private copy
    with cp.cuda.Device(check_gpu(device.id)):
        out = cp.asarray(a)
        if dtype is not None and out.dtype != dtype:
            out = out.astype(dtype)
        return out.copy() if copy and out is a else out


def peer_copy(a, src: int, dst: int, cuda) -> Array:
    """Copy GPU array `a` from GPU `src` to GPU `dst`, ordered on both devices' current streams.

    A non-contiguous `a` is first made contiguous on the source stream (CuPy would do that
    inside the copy, after the event below). An event recorded on the source stream then
    makes the destination stream wait for the work that wrote it; a second event recorded
    after the copy makes the source stream wait before it can reuse the memory (CuPy's pool
    reuses freed blocks in stream order).

    Args:
        a: array on GPU `src`; cuda: the `cupy.cuda` namespace (a parameter so tests can
            pass a recording double).
    Returns:
        a new array on GPU `dst`.
    """
    with cuda.Device(src):
        if not a.flags.c_contiguous:
            a = a.copy()  # on src's stream, before `written` is recorded
        written = cuda.Event(disable_timing=True)
        written.record(cuda.get_current_stream())
    with cuda.Device(dst):
        dst_stream = cuda.get_current_stream()
        dst_stream.wait_event(written)
        out = a.copy()  # allocates on the current device: a peer copy on dst's stream
        read = cuda.Event(disable_timing=True)
        read.record(dst_stream)
    with cuda.Device(src):
        cuda.get_current_stream().wait_event(read)
    return out


def to_numpy(x) -> np.ndarray:
    """Copy any per-device array to a host NumPy array."""
    return x.get() if is_gpu_array(x) else np.asarray(x)


def _gpu_context(device: Device) -> ContextManager:
    return cupy_module().cuda.Device(check_gpu(device.id))


def _cpu_context(device: Device) -> ContextManager:
    return contextlib.nullcontext()


# Device kind -> the function making a device current. Replaced (within a block) only
# through `device_context_factory`, e.g. by a test double that records which device each
# per-device call ran under.
_CONTEXTS: dict[str, Callable[[Device], ContextManager]] = {"cpu": _cpu_context, "gpu": _gpu_context}


def on_device_context(device: Device) -> ContextManager:
    """Context manager making `device` current (the CUDA device for gpu:i; nothing for cpu).

    CuPy allocates and launches on the current device of the calling thread, so every
    per-device computation runs inside this, on worker threads too.
    """
    return _CONTEXTS[device.kind](device)


@contextlib.contextmanager
def device_context_factory(kind: str, factory: Callable[[Device], ContextManager]) -> Iterator[None]:
    """Within the block, `on_device_context(d)` for devices of `kind` returns `factory(d)`.

    Process-wide (worker threads see it too); the previous factory is restored on exit.

    Args:
        kind: "cpu" or "gpu".
        factory: device -> context manager.
    """
    if kind not in _CONTEXTS:
        raise ValueError(f"device kind must be 'cpu' or 'gpu', got {kind!r}")
    previous = _CONTEXTS[kind]
    _CONTEXTS[kind] = factory
    try:
        yield
    finally:
        _CONTEXTS[kind] = previous


def synchronize(devs) -> None:
    """Wait for queued GPU work on every GPU in `devs` (no-op on CPU)."""
    for d in devs:
        if d.kind == "gpu":
            with cupy_module().cuda.Device(d.id):
                cupy_module().cuda.get_current_stream().synchronize()
