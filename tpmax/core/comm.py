"""Communicators: the collectives of tensor parallelism, one array per device in and out.

Two implementations of one interface:
- `InProcessCommunicator`: virtual CPU devices, logical devices sharing a GPU (NCCL refuses
  two ranks on one GPU), and any group of one device (whose collectives return their input:
  no copy, no launch). Reduces in device order, so results are deterministic.
- `NcclCommunicator`: distinct GPUs, through `cupy.cuda.nccl` (one communicator per GPU
  from `initAll`, every call inside `groupStart()/groupEnd()`).
`communicator(devices)` picks the right one. Both make each device current
(`on_device_context`) for the work they do on it, so they can be called from any thread. In MAX's signatures this object takes the
place of `signal_buffers`.
"""
from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np

from .devices import Array, Device, asarray, bfloat16, cupy_module, on_device, on_device_context, xp_of
from .sharding import split_bounds

_HALF = (np.dtype(np.float16), bfloat16)


class Communicator(Protocol):
    """The collectives of one tensor-parallel group.

    `devices` are the devices this process drives, in group order: every per-device list
    passed in or returned holds one array for each of them. `ranks[i]` is the index of
    `devices[i]` in the whole group and `tp` the number of devices in the group; in one
    process they are `range(len(devices))` and `len(devices)`, across MPI ranks each
    process holds only its own block of the group.
    """

    devices: list[Device]
    ranks: list[int]
    tp: int

    def allreduce_sum(self, xs: Sequence[Array]) -> list[Array]: ...
    def allgather(self, xs: Sequence[Array], axis: int = -1) -> list[Array]: ...
    def broadcast(self, x: Array, *, root: int = 0) -> list[Array]: ...
    def reduce_scatter(self, xs: Sequence[Array], axis: int = 0) -> list[Array]: ...


def communicator(devs: Sequence[Device]) -> Communicator:
    """The communicator for a device group: NCCL for two or more distinct GPUs when NCCL is
    available, in-process otherwise (one device, CPU devices, a GPU repeated)."""
    devs = list(devs)
    if not devs:
        raise ValueError("a communicator needs at least one device")
    kinds = {d.kind for d in devs}
    if len(kinds) > 1:
        raise ValueError(f"cannot mix cpu and gpu devices in one group: {[str(d) for d in devs]}")
    if uses_nccl(devs, nccl_available()):
        return NcclCommunicator(devs)
    return InProcessCommunicator(devs)


def uses_nccl(devs: Sequence[Device], nccl_ok: bool) -> bool:
    """Whether a group runs over NCCL: two or more distinct GPUs and NCCL loaded (`nccl_ok`).

    One device needs no collective; a repeated GPU is refused by NCCL; CPU devices have none.
    """
    return (nccl_ok and len(devs) > 1 and all(d.kind == "gpu" for d in devs)
            and len({d.id for d in devs}) == len(devs))


def nccl_available(nccl=None) -> bool:
    """True when CuPy imports and its NCCL library loaded (`cupy.cuda.nccl.available`).

    `cupy.cuda.nccl` imports even without libnccl (it then sets `available = False`), so
    importability alone says nothing.

    Args:
        nccl: the `cupy.cuda.nccl` module to ask (default: imported here; False when CuPy
            does not import).
    """
    if nccl is None:
        try:
            from cupy.cuda import nccl
        except Exception:
            return False
    return bool(getattr(nccl, "available", False))


# ------------------------------------------------------------------------------------------
# Argument checks shared by both implementations.


def _check(devs, xs, what, *, same_shape=True, axis=None):
    if len(xs) != len(devs):
        raise ValueError(f"{what}: got {len(xs)} arrays for {len(devs)} devices")
    for i, (x, d) in enumerate(zip(xs, devs)):
        if not on_device(x, d):
            raise ValueError(f"{what}: array {i} ({type(x).__name__}) is not on device {d}")
    dtypes = {x.dtype for x in xs}
    if len(dtypes) > 1:
        raise ValueError(f"{what}: dtypes differ across devices: {sorted(map(str, dtypes))}")
    shapes = [tuple(x.shape) for x in xs]
    if same_shape and len(set(shapes)) > 1:
        raise ValueError(f"{what}: shapes differ across devices: {shapes}")
    if axis is not None:
        nd = len(shapes[0])
        if any(len(s) != nd for s in shapes) or not -nd <= axis < nd:
            raise ValueError(f"{what}: axis {axis} invalid for shapes {shapes}")
        ax = axis % nd
        rest = {s[:ax] + s[ax + 1:] for s in shapes}
        if len(rest) > 1:
            raise ValueError(f"{what}: shapes {shapes} differ off the gather axis {axis}")
        return ax
    return None


# ------------------------------------------------------------------------------------------
# In-process.


class InProcessCommunicator:
    """Collectives by copying between devices of one process (NumPy or CuPy arrays).

    float16/bfloat16 sums accumulate in float32 and round once.
    """

    def __init__(self, devs: Sequence[Device]):
        self.devices = list(devs)
        self.ranks = list(range(len(self.devices)))
        self.tp = len(self.devices)

    def __repr__(self):
        return f"InProcessCommunicator({', '.join(map(str, self.devices))})"

    def _to_all(self, x) -> list[Array]:
        # One private copy per device: no two devices ever share a buffer.
        return [asarray(x, d, copy=True) for d in self.devices]

    def _sum(self, xs):
        # Accumulate on device 0 (current while its kernels launch), in device order.
        d0 = self.devices[0]
        acc_dtype = np.float32 if xs[0].dtype in _HALF else None
        acc = asarray(xs[0], d0, dtype=acc_dtype, copy=True)
        with on_device_context(d0):
            for x in xs[1:]:
                acc += asarray(x, d0, dtype=acc_dtype)
            return acc.astype(xs[0].dtype, copy=False)

    def allreduce_sum(self, xs):
        _check(self.devices, xs, "allreduce_sum")
        if self.tp == 1:
            return [xs[0]]
        return self._to_all(self._sum(xs))

    def allgather(self, xs, axis=-1):
        ax = _check(self.devices, xs, "allgather", same_shape=False, axis=axis)
        if self.tp == 1:
            return [xs[0]]
        d0 = self.devices[0]
        parts = [asarray(x, d0) for x in xs]
        with on_device_context(d0):
            full = xp_of(xs[0]).concatenate(parts, axis=ax)
        return self._to_all(full)

    def broadcast(self, x, *, root=0):
        _check(self.devices[root:root + 1], [x], "broadcast")
        if self.tp == 1:
            return [x]
        return self._to_all(x)

    def reduce_scatter(self, xs, axis=0):
        _check(self.devices, xs, "reduce_scatter", axis=axis)
        if self.tp == 1:
            return [xs[0]]
        total = self._sum(xs)
        ax = axis % total.ndim
        out = []
        for d, (a, b) in zip(self.devices, split_bounds(total.shape[ax], len(self.devices))):
            idx = (slice(None),) * ax + (slice(a, b),)
            out.append(asarray(total[idx], d, copy=True))
        return out


# ------------------------------------------------------------------------------------------
# NCCL: the dtype table and the padding of uneven shards, shared by `NcclCommunicator` (one
# process) and `mpi_comm.NcclRankCommunicator` (one GPU per MPI rank).


_NCCL_BFLOAT16 = 9  # ncclBfloat16 in nccl.h, for CuPy builds that do not export it
_NCCL_NAMES = {np.dtype(t): f"NCCL_{np.dtype(t).name.upper()}" for t in (
    np.float32, np.float16, np.float64, np.int8, np.uint8, np.int32, np.uint32, np.int64, np.uint64)}


def nccl_dtype(dtype, nccl=None) -> int:
    """The NCCL data type of a NumPy dtype; ValueError for one NCCL cannot reduce.

    Args:
        nccl: the `cupy.cuda.nccl` module (default: imported here); its `NCCL_BFLOAT16` is
            used when exported, else ncclBfloat16's value 9.
    """
    if nccl is None:
        from cupy.cuda import nccl
    dtype = np.dtype(dtype)
    if dtype == bfloat16:
        return getattr(nccl, "NCCL_BFLOAT16", _NCCL_BFLOAT16)
    if dtype not in _NCCL_NAMES or not hasattr(nccl, _NCCL_NAMES[dtype]):
        raise ValueError(f"NCCL: unsupported dtype {dtype}")
    return getattr(nccl, _NCCL_NAMES[dtype])


def sum_dtype(dtype) -> np.dtype:
    """The dtype a sum travels and accumulates in: float32 for float16/bfloat16 (rounded
    once at the end, as every communicator does), else the dtype itself."""
    return np.dtype(np.float32) if np.dtype(dtype) in _HALF else np.dtype(dtype)


def pad_shard(x, ax: int, m: int):
    """`x` with axis `ax` moved first and zero-padded to `m` rows: `[m, *rest]` (the equal
    chunk NCCL's all-gather needs), on the current device."""
    xp = xp_of(x)
    xm = xp.moveaxis(x, ax, 0)  # [rows, *rest]
    out = xp.zeros((m,) + xm.shape[1:], x.dtype)
    out[:xm.shape[0]] = xm
    return out


def unpad_gathered(recv, sizes: Sequence[int], ax: int):
    """`[n, m, *rest]` gathered padded shards -> the concatenation of shard j's first
    `sizes[j]` rows, with the rows moved back to axis `ax` (contiguous)."""
    xp = xp_of(recv)
    full = xp.concatenate([recv[j, :s] for j, s in enumerate(sizes)], axis=0)  # [sum(sizes), *rest]
    return xp.ascontiguousarray(xp.moveaxis(full, 0, ax))


def pad_slices(x, ax: int, bounds: Sequence[tuple[int, int]], dtype):
    """Slice j of `x` along `ax` (rows `bounds[j]`) laid into padded row j of `[n, m, *rest]`
    in `dtype` (the equal chunks NCCL's reduce-scatter needs; `m` = the first, largest slice)."""
    xp = xp_of(x)
    xm = xp.moveaxis(x, ax, 0)  # [rows, *rest]
    m = bounds[0][1] - bounds[0][0]
    out = xp.zeros((len(bounds), m) + xm.shape[1:], dtype)  # [n, m, *rest]
    for j, (a, b) in enumerate(bounds):
        out[j, :b - a] = xm[a:b]
    return out


def unpad_slice(recv, rows: int, ax: int, dtype):
    """The first `rows` rows of a reduce-scattered `[m, *rest]` chunk, in `dtype`, rows moved
    back to axis `ax` (a private contiguous array)."""
    xp = xp_of(recv)
    return xp.ascontiguousarray(xp.moveaxis(recv[:rows].astype(dtype), 0, ax))


class NcclCommunicator:
    """Collectives over NCCL: one communicator per distinct GPU, one process.

    Sums of float16/bfloat16 travel and accumulate as float32 and round once (twice the
    bytes of the input), as the other communicators do; gathers and broadcasts move bytes.
    """

    def __init__(self, devs: Sequence[Device]):
        self.devices = list(devs)
        if not uses_nccl(self.devices, True):
            raise ValueError("NCCL needs two or more distinct GPUs; use InProcessCommunicator otherwise")
        from cupy.cuda import nccl

        self.ranks = list(range(len(self.devices)))
        self.tp = len(self.devices)
        self._nccl = nccl
        self._comms = nccl.NcclCommunicator.initAll([d.id for d in self.devices])

    def __repr__(self):
        return f"NcclCommunicator({', '.join(map(str, self.devices))})"

    def _group(self, body):
        """Run `body(rank, comm, stream_ptr)` for every rank inside one NCCL group."""
        cp = cupy_module()
        self._nccl.groupStart()
        try:
            for r, (d, c) in enumerate(zip(self.devices, self._comms)):
                with cp.cuda.Device(d.id):
                    body(r, c, cp.cuda.get_current_stream().ptr)
        finally:
            self._nccl.groupEnd()

    def _each(self, fn, *per_device):
        """`[fn(*args_r)]` with device r current for call r."""
        out = []
        for d, args in zip(self.devices, zip(*per_device)):
            with on_device_context(d):
                out.append(fn(*args))
        return out

    def allreduce_sum(self, xs):
        _check(self.devices, xs, "allreduce_sum")
        dtype, acc = xs[0].dtype, sum_dtype(xs[0].dtype)
        bufs = self._each(lambda x: xp_of(x).array(x, dtype=acc, order="C", copy=True), xs)
        t = nccl_dtype(acc, self._nccl)
        self._group(lambda r, c, s: c.allReduce(bufs[r].data.ptr, bufs[r].data.ptr, bufs[r].size, t,
                                                self._nccl.NCCL_SUM, s))
        return self._each(lambda b: b.astype(dtype, copy=False), bufs)

    def allgather(self, xs, axis=-1):
        ax = _check(self.devices, xs, "allgather", same_shape=False, axis=axis)
        sizes = [x.shape[ax] for x in xs]
        n, m = len(xs), max(sizes)
        sends = self._each(lambda x: pad_shard(x, ax, m), xs)  # [m, *rest] each
        recv = self._each(lambda s: xp_of(s).empty((n,) + s.shape, s.dtype), sends)  # [n, m, *rest]
        u8 = self._nccl.NCCL_UINT8
        self._group(lambda r, c, s: c.allGather(sends[r].data.ptr, recv[r].data.ptr, sends[r].nbytes, u8, s))
        return self._each(lambda rv: unpad_gathered(rv, sizes, ax), recv)

    def broadcast(self, x, *, root=0):
        _check(self.devices[root:root + 1], [x], "broadcast")
        bufs = self._each(lambda d: asarray(x, d, copy=True) if d == self.devices[root]
                          else cupy_module().empty(x.shape, x.dtype), self.devices)
        u8 = self._nccl.NCCL_UINT8
        self._group(lambda r, c, s: c.bcast(bufs[r].data.ptr, bufs[r].nbytes, u8, root, s))
        return bufs

    def reduce_scatter(self, xs, axis=0):
        ax = _check(self.devices, xs, "reduce_scatter", axis=axis)
        dtype, acc = xs[0].dtype, sum_dtype(xs[0].dtype)
        bounds = split_bounds(xs[0].shape[ax], len(xs))
        sends = self._each(lambda x: pad_slices(x, ax, bounds, acc), xs)  # [n, m, *rest] each
        recv = self._each(lambda s: xp_of(s).empty(s.shape[1:], acc), sends)  # [m, *rest]
        t = nccl_dtype(acc, self._nccl)
        self._group(lambda r, c, s: c.reduceScatter(sends[r].data.ptr, recv[r].data.ptr, recv[r].size,
                                                    t, self._nccl.NCCL_SUM, s))
        return self._each(lambda rv, bd: unpad_slice(rv, bd[1] - bd[0], ax, dtype), recv, bounds)
