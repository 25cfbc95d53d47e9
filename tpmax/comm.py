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
# NCCL.


_NCCL_BFLOAT16 = 9  # ncclBfloat16 in nccl.h, for CuPy builds that do not export it


def nccl_dtype(dtype, nccl=None) -> int:
    """The NCCL data type of a NumPy dtype; ValueError for one NCCL cannot reduce.

    Args:
        nccl: the `cupy.cuda.nccl` module (default: imported here); its `NCCL_BFLOAT16` is
            used when exported, else ncclBfloat16's value 9.
    """
    if nccl is None:
        from cupy.cuda import nccl
    table = {
        np.dtype(np.float32): nccl.NCCL_FLOAT32,
        np.dtype(np.float16): nccl.NCCL_FLOAT16,
        np.dtype(np.float64): nccl.NCCL_FLOAT64,
        np.dtype(np.int32): nccl.NCCL_INT32,
        np.dtype(np.int64): nccl.NCCL_INT64,
        bfloat16: getattr(nccl, "NCCL_BFLOAT16", _NCCL_BFLOAT16),
    }
    if np.dtype(dtype) not in table:
        raise ValueError(f"NCCL: unsupported dtype {dtype}")
    return table[np.dtype(dtype)]


class NcclCommunicator:
    """Collectives over NCCL: one communicator per distinct GPU, one process."""

    def __init__(self, devs: Sequence[Device]):
        from cupy.cuda import nccl

        self.devices = list(devs)
        if (len(self.devices) < 2 or any(d.kind != "gpu" for d in self.devices)
                or len({d.id for d in devs}) != len(devs)):
            raise ValueError("NCCL needs two or more distinct GPUs; use InProcessCommunicator otherwise")
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

    def _contiguous(self, xs):
        cp = cupy_module()
        out = []
        for d, x in zip(self.devices, xs):
            with cp.cuda.Device(d.id):
                out.append(cp.ascontiguousarray(x))
        return out

    def _empty(self, shape, dtype):
        cp = cupy_module()
        out = []
        for d in self.devices:
            with cp.cuda.Device(d.id):
                out.append(cp.empty(shape, dtype))
        return out

    def allreduce_sum(self, xs):
        _check(self.devices, xs, "allreduce_sum")
        xs = self._contiguous(xs)
        outs = self._empty(xs[0].shape, xs[0].dtype)
        t = nccl_dtype(xs[0].dtype, self._nccl)
        self._group(lambda r, c, s: c.allReduce(xs[r].data.ptr, outs[r].data.ptr, xs[r].size, t,
                                                self._nccl.NCCL_SUM, s))
        return outs

    def allgather(self, xs, axis=-1):
        # NCCL gathers equal flat chunks: move `axis` first, pad shards to the longest, gather
        # [n, m, ...], then cut each shard back to its size and concatenate.
        ax = _check(self.devices, xs, "allgather", same_shape=False, axis=axis)
        cp = cupy_module()
        sizes = [x.shape[ax] for x in xs]
        m, n = max(sizes), len(xs)
        rest = tuple(np.delete(xs[0].shape, ax))
        bufs = self._empty((m,) + rest, xs[0].dtype)
        for b, x in zip(bufs, xs):
            with b.device:
                b[: x.shape[ax]] = cp.moveaxis(x, ax, 0)
        recv = self._empty((n, m) + rest, xs[0].dtype)
        t = nccl_dtype(xs[0].dtype, self._nccl)
        self._group(lambda r, c, s: c.allGather(bufs[r].data.ptr, recv[r].data.ptr, bufs[r].size, t, s))
        out = []
        for rv in recv:
            with rv.device:
                full = cp.concatenate([rv[j, : sizes[j]] for j in range(n)], axis=0)
                out.append(cp.ascontiguousarray(cp.moveaxis(full, 0, ax)))
        return out

    def broadcast(self, x, *, root=0):
        _check(self.devices[root:root + 1], [x], "broadcast")
        bufs = self._empty(x.shape, x.dtype)
        with bufs[root].device:
            bufs[root][...] = x
        t = nccl_dtype(x.dtype, self._nccl)
        self._group(lambda r, c, s: c.bcast(bufs[r].data.ptr, bufs[r].size, t, root, s))
        return bufs

    def reduce_scatter(self, xs, axis=0):
        # NCCL scatters equal chunks: lay each device's slice j into a padded row j of
        # [n, m, ...], reduce-scatter, then cut the padding off.
        ax = _check(self.devices, xs, "reduce_scatter", axis=axis)
        cp = cupy_module()
        n = len(xs)
        bounds = split_bounds(xs[0].shape[ax], n)
        m = bounds[0][1] - bounds[0][0]
        rest = tuple(np.delete(xs[0].shape, ax))
        sends = self._empty((n, m) + rest, xs[0].dtype)
        for sb, x in zip(sends, xs):
            with sb.device:
                sb[...] = 0
                xm = cp.moveaxis(x, ax, 0)
                for j, (a, b) in enumerate(bounds):
                    sb[j, : b - a] = xm[a:b]
        recv = self._empty((m,) + rest, xs[0].dtype)
        t = nccl_dtype(xs[0].dtype, self._nccl)
        self._group(lambda r, c, s: c.reduceScatter(sends[r].data.ptr, recv[r].data.ptr, recv[r].size,
                                                    t, self._nccl.NCCL_SUM, s))
        out = []
        for r, rv in enumerate(recv):
            a, b = bounds[r]
            with rv.device:
                out.append(cp.ascontiguousarray(cp.moveaxis(rv[: b - a], 0, ax)))
        return out
