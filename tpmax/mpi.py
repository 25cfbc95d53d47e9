"""Tensor parallelism across MPI ranks: one process per rank, each driving its own block of
the device group.

This file owns launcher detection (`world`), the rank -> devices rule (`local_devices`), the
two cross-process communicators (`MpiCommunicator` for CPU devices over mpi4py's buffer API,
`NcclRankCommunicator` for one GPU per rank with the NCCL id broadcast over MPI), the
lock-step messages of the engine (`bcast_arrays`, `bcast_json`) and the fault policy
(`install_abort_handler`). mpi4py is imported only when a launcher started this process:
`import tpmax` and a plain run never load it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import signal
import sys
import threading
import traceback
from typing import Any, Mapping, Sequence

import numpy as np

from .comm import _HALF, _check, communicator
from .devices import Array, Device, asarray, bfloat16, cupy_module, float8_e4m3fn
from .sharding import split_bounds

# Environment variables that MPI launchers set in every process they start: Open MPI's
# mpirun, PMIx (Open MPI 5, `srun --mpi=pmix`), PMI-1/2 (MPICH/Hydra, Intel MPI,
# `srun --mpi=pmi2`), MVAPICH. Slurm's own SLURM_PROCID is not among them: it is also set
# in a plain `srun python ...` that no MPI library can join.
LAUNCHER_ENV = ("OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_SIZE", "PMI_RANK", "MV2_COMM_WORLD_SIZE")


# ------------------------------------------------------------------------------------------
# The world: is this process one MPI rank, and which?


@dataclasses.dataclass(frozen=True)
class World:
    """This process's place in the job: `rank` of `size`; `comm` is mpi4py's COMM_WORLD,
    or None in a plain run (size 1, mpi4py never imported)."""

    rank: int
    size: int
    comm: Any = None

    @property
    def is_mpi(self) -> bool:
        return self.comm is not None


def launched_by_mpi() -> bool:
    """True if an MPI launcher started this process (judged from its environment only)."""
    return any(k in os.environ for k in LAUNCHER_ENV)


def _import_mpi():
    try:
        from mpi4py import MPI
    except ImportError as e:
        found = ", ".join(f"{k}={os.environ[k]}" for k in LAUNCHER_ENV if k in os.environ)
        why = f"this process was started by an MPI launcher ({found}) but " if found else ""
        raise RuntimeError(f"{why}mpi4py cannot be imported ({e}); install it with: pip install 'tpmax[mpi]'") from None
    return MPI


@functools.cache
def world() -> World:
    """This process's rank and the job size.

    In a plain run: `World(0, 1, None)` without importing mpi4py. Under a launcher: imports
    mpi4py (which initializes MPI) and returns COMM_WORLD's rank and size.

    Raises:
        RuntimeError: launched by MPI but mpi4py is not installed.
    """
    if not launched_by_mpi():
        return World(0, 1, None)
    MPI = _import_mpi()
    comm = MPI.COMM_WORLD
    return World(comm.Get_rank(), comm.Get_size(), comm)


def world_mpi():
    """mpi4py's `MPI` module (for `MPI.IN_PLACE`, `MPI.SUM`, ...), imported on first use.

    Raises:
        RuntimeError: mpi4py is not installed (as `world()` under a launcher).
    """
    return _import_mpi()


def local_devices(all_devices: Sequence[Device], rank: int, size: int) -> list[Device]:
    """The devices rank `rank` of `size` drives: the contiguous block
    `all_devices[rank*k:(rank+1)*k]`, `k = len(all_devices) // size`.

    Raises:
        ValueError: the device count is not a positive multiple of the rank count, or `rank`
            is outside `[0, size)`.
    """
    n = len(all_devices)
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"rank {rank} is outside an MPI job of {size} ranks")
    if n == 0 or n % size:
        raise ValueError(
            f"--devices lists {n} device{'s' * (n != 1)} for {size} MPI ranks; "
            f"the count must be a multiple of the ranks"
        )
    k = n // size
    return list(all_devices[rank * k:(rank + 1) * k])


# ------------------------------------------------------------------------------------------
# Dtypes on the wire. Sums travel as a type MPI can add (halves as float32, rounded once at
# the end); gathers and broadcasts move raw bytes, so any dtype (bfloat16, float8) goes.

_DTYPES = tuple(np.dtype(t) for t in (
    np.float32, np.float16, bfloat16, np.float64, np.int8, np.int16, np.int32, np.int64,
    np.uint8, np.uint16, np.uint32, np.uint64, np.bool_, float8_e4m3fn,
))
_DTYPE_CODE = {d: i for i, d in enumerate(_DTYPES)}
_SUMMABLE = {np.dtype(t) for t in (np.float32, np.float64, np.int8, np.int16, np.int32, np.int64,
                                   np.uint8, np.uint16, np.uint32, np.uint64)}


def _dtype_code(dtype) -> int:
    dtype = np.dtype(dtype)
    if dtype not in _DTYPE_CODE:
        raise ValueError(f"MPI: unsupported dtype {dtype}; supported: {', '.join(d.name for d in _DTYPES)}")
    return _DTYPE_CODE[dtype]


def _sum_dtype(dtype, what):
    """The dtype a sum of `dtype` travels and accumulates in."""
    dtype = np.dtype(dtype)
    if dtype in _HALF:
        return np.dtype(np.float32)
    if dtype not in _SUMMABLE:
        raise ValueError(f"{what}: cannot sum dtype {dtype} over MPI")
    return dtype


_MAXDIMS = 64  # NumPy 2's limit; a fixed-size header costs one message, not two


def _array_head(x) -> np.ndarray:
    """`[dtype code, ndim, *shape, 0...]` as int64 (a receive buffer when `x` is None)."""
    head = np.zeros(2 + _MAXDIMS, np.int64)
    if x is not None:
        head[:2] = _dtype_code(x.dtype), x.ndim
        head[2:2 + x.ndim] = x.shape
    return head


def _exchange_sizes(mpi_comm, size, xs, ax) -> list[int]:
    """Every shard's size on the gather axis `ax`, for the whole group, in group order.

    One `Allgather` of a fixed-size int64 header per rank (so ranks that disagree on ndim
    still exchange matching counts); the dtype, ndim, axis and off-axis shape in it are
    checked on every rank, so a mismatch raises the same ValueError everywhere instead of
    hanging one rank in the gather.
    """
    mine = np.concatenate([_array_head(xs[0]), [ax], [x.shape[ax] for x in xs]]).astype(np.int64)
    mine[2 + ax] = 0  # the gathered axis may differ; the rest of the shape may not
    heads = np.empty((size, mine.size), np.int64)
    mpi_comm.Allgather(mine, heads)
    k = len(xs)
    if not (heads[:, :-k] == mine[:-k]).all():
        seen = [f"{_DTYPES[h[0]].name}{list(h[2:2 + h[1]])} axis {h[-k - 1]}" for h in heads]
        raise ValueError(f"allgather: ranks disagree on dtype, ndim, axis or off-axis shape: {seen} "
                         f"(0 marks the gathered axis)")
    return heads[:, -k:].reshape(-1).tolist()


def _empty_from_head(head) -> np.ndarray:
    return np.empty(tuple(head[2:2 + head[1]].tolist()), _DTYPES[head[0]])


def _bytes(x: np.ndarray) -> np.ndarray:
    """A C-contiguous array's memory as a flat uint8 view (no copy)."""
    return np.asarray(x, order="C").reshape(-1).view(np.uint8)


# ------------------------------------------------------------------------------------------
# CPU devices across ranks: mpi4py's buffer API on NumPy arrays.


class MpiCommunicator:
    """Collectives of a group of virtual CPU devices spread over the ranks of `mpi_comm`.

    Rank r drives `local_devices(all_devices, r, size)`; every call takes and returns one
    array per local device and must be made by every rank (lock-step), with the same dtype
    and, off a gathered axis, the same shapes. Several local devices are reduced locally
    first, then across ranks; each local device gets a private copy of the result.
    float16/bfloat16 sums accumulate in float32 and round once. For integer-valued inputs
    every result equals `InProcessCommunicator` over the whole group, bit for bit.
    """

    def __init__(self, all_devices: Sequence[Device], mpi_comm):
        all_devices = list(all_devices)
        if any(d.kind != "cpu" for d in all_devices):
            raise ValueError("MpiCommunicator drives cpu devices; use mpi_communicator() for GPUs")
        self._mpi, self._MPI = mpi_comm, _import_mpi()
        self.rank, self.size = mpi_comm.Get_rank(), mpi_comm.Get_size()
        self.devices = local_devices(all_devices, self.rank, self.size)
        k = len(self.devices)
        self.ranks = list(range(self.rank * k, (self.rank + 1) * k))
        self.tp = len(all_devices)
        self.all_devices = all_devices
        self.mpi = mpi_comm  # the mpi4py communicator (lock-step messages travel on it)

    def __repr__(self):
        return (f"MpiCommunicator(rank {self.rank}/{self.size}: "
                f"{', '.join(map(str, self.devices))} of tp={self.tp})")

    def _to_all(self, x) -> list[Array]:
        # `x` is a fresh buffer: the first device keeps it, the others get private copies.
        return [x] + [asarray(x, d, copy=True) for d in self.devices[1:]]

    def _local_sum(self, xs, acc_dtype):
        acc = np.array(xs[0], dtype=acc_dtype, order="C", copy=True)
        for x in xs[1:]:
            acc += np.asarray(x, dtype=acc_dtype)
        return acc

    def allreduce_sum(self, xs):
        _check(self.devices, xs, "allreduce_sum")
        if self.tp == 1:
            return [xs[0]]
        dtype = xs[0].dtype
        acc = self._local_sum(xs, _sum_dtype(dtype, "allreduce_sum"))
        if self.size > 1:
            self._mpi.Allreduce(self._MPI.IN_PLACE, acc, op=self._MPI.SUM)
        return self._to_all(acc.astype(dtype, copy=False))

    def allgather(self, xs, axis=-1):
        ax = _check(self.devices, xs, "allgather", same_shape=False, axis=axis)
        if self.tp == 1:
            return [xs[0]]
        shape0 = xs[0].shape
        rest = shape0[:ax] + shape0[ax + 1:]
        if self.size > 1:
            sizes = _exchange_sizes(self._mpi, self.size, xs, ax)
        else:
            sizes = [x.shape[ax] for x in xs]
        # Move the axis first, lay the local shards back to back, gather bytes, move it back.
        row = int(np.prod(rest, dtype=np.int64)) * xs[0].dtype.itemsize  # bytes per index on `axis`
        send = np.concatenate([np.moveaxis(x, ax, 0) for x in xs], axis=0)  # [local rows, *rest]
        full = np.empty((sum(sizes),) + rest, xs[0].dtype)  # [all rows, *rest]
        if self.size > 1:
            k = len(xs)
            counts = [sum(sizes[r * k:(r + 1) * k]) * row for r in range(self.size)]
            displs = np.cumsum([0] + counts[:-1]).tolist()
            self._mpi.Allgatherv(_bytes(send), [_bytes(full), counts, displs, self._MPI.BYTE])
        else:
            full[...] = send
        return self._to_all(np.ascontiguousarray(np.moveaxis(full, 0, ax)))

    def broadcast(self, x, *, root=0):
        """`x` is read only on the rank that drives group device `root` (elsewhere it may be
        None or a placeholder): its dtype and shape travel with it."""
        if not 0 <= root < self.tp:
            raise ValueError(f"broadcast: root {root} is outside the group of {self.tp} devices")
        owner = root // len(self.devices)
        if self.rank == owner:
            _check(self.devices[root - self.ranks[0]:][:1], [x], "broadcast")
            buf = np.array(x, order="C", copy=True)
        if self.size > 1:
            head = _array_head(buf if self.rank == owner else None)
            self._mpi.Bcast(head, root=owner)
            if self.rank != owner:
                buf = _empty_from_head(head)
            self._mpi.Bcast(_bytes(buf), root=owner)
        return self._to_all(buf)

    def reduce_scatter(self, xs, axis=0):
        ax = _check(self.devices, xs, "reduce_scatter", axis=axis)
        dtype = xs[0].dtype
        if self.tp == 1:
            return [xs[0]]
        acc_dtype = _sum_dtype(dtype, "reduce_scatter")
        bounds = split_bounds(xs[0].shape[ax], self.tp)
        k = len(xs)
        # Sum the local devices' inputs with `axis` first, so each rank's block of rows
        # (its devices' slices, contiguous) is one contiguous run of memory.
        acc = self._local_sum([np.moveaxis(x, ax, 0) for x in xs], acc_dtype)  # [n, *rest]
        lo, hi = bounds[self.ranks[0]][0], bounds[self.ranks[-1]][1]  # this rank's rows
        if self.size > 1:
            row = int(np.prod(acc.shape[1:], dtype=np.int64))  # elements per row
            counts = [(bounds[(r + 1) * k - 1][1] - bounds[r * k][0]) * row for r in range(self.size)]
            mine = np.empty((hi - lo,) + acc.shape[1:], acc_dtype)  # [rows of this rank, *rest]
            self._mpi.Reduce_scatter(acc, mine, counts, op=self._MPI.SUM)
        else:
            mine = acc
        out = []
        for d, g in zip(self.devices, self.ranks):
            a, b = bounds[g]
            part = mine[a - lo:b - lo].astype(dtype)  # a private copy in the input dtype
            out.append(np.ascontiguousarray(np.moveaxis(part, 0, ax)))
        return out


# ------------------------------------------------------------------------------------------
# GPUs across ranks: one GPU per rank, NCCL bootstrapped over MPI.


def _nccl_type(nccl, dtype):
    names = {"float32": "NCCL_FLOAT32", "float64": "NCCL_FLOAT64", "float16": "NCCL_FLOAT16",
             "int8": "NCCL_INT8", "uint8": "NCCL_UINT8", "int32": "NCCL_INT32", "uint32": "NCCL_UINT32",
             "int64": "NCCL_INT64", "uint64": "NCCL_UINT64"}
    dtype = np.dtype(dtype)
    if dtype == bfloat16:
        return getattr(nccl, "NCCL_BFLOAT16", 9)  # ncclBfloat16 is 9 where CuPy does not export it
    if dtype.name not in names or not hasattr(nccl, names[dtype.name]):
        raise ValueError(f"NCCL: cannot sum dtype {dtype}")
    return getattr(nccl, names[dtype.name])


class NcclRankCommunicator:
    """Collectives of a group of distinct GPUs, one per MPI rank, through NCCL.

    Group rank 0 makes the NCCL unique id and broadcasts it over `mpi_comm` (int64 buffer,
    no pickle); every rank then joins one `nccl.NcclCommunicator(size, uid, rank)` on its
    GPU `all_devices[rank]`. Calls are asynchronous on the current CuPy stream, as CuPy
    kernels are. Shapes of uneven gathers and broadcasts travel over MPI (host int64).
    float16/bfloat16 sums travel as float32 and round once, as the other communicators do.
    """

    def __init__(self, all_devices: Sequence[Device], mpi_comm):
        try:
            from cupy.cuda import nccl
        except Exception as e:
            raise RuntimeError(f"GPUs across MPI ranks need CuPy with NCCL ({e}); install tpmax[cuda12] "
                               f"or tpmax[cuda13], or use cpu devices") from None

        all_devices = list(all_devices)
        self._mpi, self._nccl = mpi_comm, nccl
        self.rank, self.size = mpi_comm.Get_rank(), mpi_comm.Get_size()
        if any(d.kind != "gpu" for d in all_devices):
            raise ValueError("NcclRankCommunicator drives gpu devices only")
        if len(all_devices) != self.size:
            raise ValueError(f"NCCL across MPI ranks drives one GPU per rank: --devices lists "
                             f"{len(all_devices)} GPUs for {self.size} MPI ranks")
        self.devices = local_devices(all_devices, self.rank, self.size)
        self.ranks = [self.rank]
        self.tp = self.size
        self.all_devices = all_devices
        self.mpi = mpi_comm
        self._cp = cupy_module()
        uid = np.zeros(129, np.int64)  # [length, *id bytes]: ncclUniqueId is 128 bytes
        if self.rank == 0:
            ident = nccl.get_unique_id()
            uid[0], uid[1:1 + len(ident)] = len(ident), ident
        mpi_comm.Bcast(uid, root=0)
        with self._cp.cuda.Device(self.devices[0].id):
            self._comm = nccl.NcclCommunicator(self.size, tuple(uid[1:1 + uid[0]].tolist()), self.rank)

    def __repr__(self):
        return f"NcclRankCommunicator(rank {self.rank}/{self.size}: {self.devices[0]})"

    def _stream(self):
        return self._cp.cuda.get_current_stream().ptr

    def allreduce_sum(self, xs):
        _check(self.devices, xs, "allreduce_sum")
        if self.tp == 1:
            return [xs[0]]
        cp, dtype = self._cp, xs[0].dtype
        acc_dtype = np.float32 if dtype in _HALF else dtype
        with cp.cuda.Device(self.devices[0].id):
            buf = cp.array(xs[0], dtype=acc_dtype, order="C", copy=True)
            self._comm.allReduce(buf.data.ptr, buf.data.ptr, buf.size, _nccl_type(self._nccl, acc_dtype),
                                 self._nccl.NCCL_SUM, self._stream())
            return [buf.astype(dtype, copy=False)]

    def allgather(self, xs, axis=-1):
        # NCCL gathers equal chunks: pad each shard (axis first) to the longest, gather bytes
        # [n, m, *rest], cut each shard back to its size, concatenate, move the axis back.
        ax = _check(self.devices, xs, "allgather", same_shape=False, axis=axis)
        if self.tp == 1:
            return [xs[0]]
        cp, x = self._cp, xs[0]
        rest = x.shape[:ax] + x.shape[ax + 1:]
        sizes = _exchange_sizes(self._mpi, self.size, xs, ax)
        m = max(sizes)
        with cp.cuda.Device(self.devices[0].id):
            send = cp.zeros((m,) + rest, x.dtype)  # [m, *rest]
            send[:sizes[self.rank]] = cp.moveaxis(x, ax, 0)
            recv = cp.empty((self.size, m) + rest, x.dtype)  # [n, m, *rest]
            self._comm.allGather(send.data.ptr, recv.data.ptr, send.nbytes, self._nccl.NCCL_UINT8,
                                 self._stream())
            full = cp.concatenate([recv[j, :sizes[j]] for j in range(self.size)], axis=0)
            return [cp.ascontiguousarray(cp.moveaxis(full, 0, ax))]

    def broadcast(self, x, *, root=0):
        """`x` is read only on rank `root` (elsewhere it may be None): dtype and shape travel."""
        if not 0 <= root < self.tp:
            raise ValueError(f"broadcast: root {root} is outside the group of {self.tp} devices")
        cp = self._cp
        if self.rank == root:
            _check(self.devices, [x], "broadcast")
        if self.tp == 1:
            with cp.cuda.Device(self.devices[0].id):
                return [x.copy()]
        head = _array_head(x if self.rank == root else None)
        self._mpi.Bcast(head, root=root)
        with cp.cuda.Device(self.devices[0].id):
            if self.rank == root:
                buf = cp.array(x, order="C", copy=True)
            else:
                buf = cp.empty(tuple(head[2:2 + head[1]].tolist()), _DTYPES[head[0]])
            self._comm.bcast(buf.data.ptr, buf.nbytes, self._nccl.NCCL_UINT8, root, self._stream())
            return [buf]

    def reduce_scatter(self, xs, axis=0):
        # NCCL scatters equal chunks: lay slice j into padded row j of [n, m, *rest],
        # reduce-scatter, cut the padding off.
        ax = _check(self.devices, xs, "reduce_scatter", axis=axis)
        if self.tp == 1:
            return [xs[0]]
        cp, x, n = self._cp, xs[0], self.size
        dtype = x.dtype
        acc_dtype = np.float32 if dtype in _HALF else dtype
        bounds = split_bounds(x.shape[ax], n)
        m = bounds[0][1] - bounds[0][0]
        with cp.cuda.Device(self.devices[0].id):
            xm = cp.moveaxis(x, ax, 0)  # [rows, *rest]
            send = cp.zeros((n, m) + xm.shape[1:], acc_dtype)  # [n, m, *rest]
            for j, (a, b) in enumerate(bounds):
                send[j, :b - a] = xm[a:b]
            recv = cp.empty((m,) + xm.shape[1:], acc_dtype)  # [m, *rest]
            self._comm.reduceScatter(send.data.ptr, recv.data.ptr, recv.size, _nccl_type(self._nccl, acc_dtype),
                                     self._nccl.NCCL_SUM, self._stream())
            a, b = bounds[self.rank]
            return [cp.ascontiguousarray(cp.moveaxis(recv[:b - a].astype(dtype), 0, ax))]


# ------------------------------------------------------------------------------------------
# The factory.


def mpi_communicator(all_devices: Sequence[Device], *, mpi_comm=None):
    """The communicator for this rank's part of the group `all_devices`.

    Without MPI (or in a one-rank job) this is `comm.communicator(all_devices)`. Across
    ranks: CPU devices -> `MpiCommunicator` (any multiple of the ranks); GPUs -> one per rank,
    `NcclRankCommunicator`. `mpi_comm` defaults to `world().comm`.

    Raises:
        ValueError: mixed kinds, a device count that is not a multiple of the ranks, or
            GPUs that are not one per rank.
    """
    all_devices = list(all_devices)
    if mpi_comm is None:
        mpi_comm = world().comm
    if mpi_comm is None or mpi_comm.Get_size() == 1:
        return communicator(all_devices)
    kinds = {d.kind for d in all_devices}
    if len(kinds) > 1:
        raise ValueError(f"cannot mix cpu and gpu devices in one group: {[str(d) for d in all_devices]}")
    local_devices(all_devices, mpi_comm.Get_rank(), mpi_comm.Get_size())  # the count check
    if kinds == {"cpu"}:
        return MpiCommunicator(all_devices, mpi_comm)
    _check_one_gpu_per_rank(all_devices, mpi_comm)
    return NcclRankCommunicator(all_devices, mpi_comm)


def _check_one_gpu_per_rank(all_devices, mpi_comm) -> None:
    """Raise on every rank, before NCCL starts, unless each rank has one GPU and no two
    ranks on one host name the same GPU id (NCCL refuses a GPU twice in a communicator)."""
    size, rank = mpi_comm.Get_size(), mpi_comm.Get_rank()
    if len(all_devices) != size:
        raise ValueError(f"NCCL across MPI ranks drives one GPU per rank: --devices lists "
                         f"{len(all_devices)} GPUs for {size} MPI ranks")
    MPI = _import_mpi()
    host = mpi_comm.Split_type(MPI.COMM_TYPE_SHARED)  # the ranks on this host
    try:
        ids = np.empty(host.Get_size(), np.int64)
        host.Allgather(np.array([all_devices[rank].id], np.int64), ids)
    finally:
        host.Free()
    bad = np.array([len(set(ids.tolist())) != ids.size], np.int64)
    mpi_comm.Allreduce(MPI.IN_PLACE, bad, op=MPI.MAX)  # every rank raises, or none
    if bad[0]:
        raise ValueError(f"two MPI ranks on one host drive the same GPU (the ranks on this host drive "
                         f"gpu ids {ids.tolist()}); NCCL needs a distinct GPU per rank; for several "
                         f"logical devices on one GPU use one process (e.g. --devices gpu:0,0)")


# ------------------------------------------------------------------------------------------
# Lock-step messages: rank 0 schedules, the other ranks follow.


_ALIGN = 16


def _mpi_comm(comm):
    return world().comm if comm is None else comm


def bcast_arrays(arrays: Mapping[str, np.ndarray] | None, *, root: int = 0, comm=None) -> dict[str, np.ndarray]:
    """Broadcast a dict of host arrays from MPI rank `root` (others pass None).

    Two `Bcast`s, no pickle: the sizes `[header bytes, blob bytes]`, then one uint8 blob
    holding an int64 header (`n`, then per array: name length, dtype code, ndim, *shape),
    the UTF-8 names, and each array's bytes (16-byte aligned). Receivers get aligned views
    into their copy of the blob; root gets its arrays back (as contiguous arrays).

    Args:
        arrays: on root, `{name: array}` (any dtype in `_DTYPES`, bfloat16 included).
        comm: an mpi4py communicator; default `world().comm`. Without MPI, returns `arrays`.
    """
    comm = _mpi_comm(comm)
    if comm is None or comm.Get_size() == 1:
        return {k: np.asarray(v, order="C") for k, v in arrays.items()}
    sizes = np.zeros(2, np.int64)
    if comm.Get_rank() == root:
        arrays = {str(k): np.asarray(v, order="C") for k, v in arrays.items()}  # (0-d stays 0-d)
        names = [k.encode() for k in arrays]
        head = [len(arrays)]
        for name, a in zip(names, arrays.values()):
            head += [len(name), _dtype_code(a.dtype), a.ndim, *a.shape]
        head = np.array(head, np.int64).view(np.uint8)
        parts, offset = [head, np.frombuffer(b"".join(names), np.uint8)], head.size + sum(map(len, names))
        for a in arrays.values():
            pad = -offset % _ALIGN
            parts += [np.zeros(pad, np.uint8), _bytes(a)]
            offset += pad + a.nbytes
        blob = np.concatenate(parts) if parts else np.zeros(0, np.uint8)
        sizes[:] = head.size, blob.size
        comm.Bcast(sizes, root=root)
        comm.Bcast(blob, root=root)
        return arrays
    comm.Bcast(sizes, root=root)
    blob = np.empty(int(sizes[1]), np.uint8)
    comm.Bcast(blob, root=root)
    head = blob[:sizes[0]].view(np.int64).tolist()
    n, i, specs = head[0], 1, []
    for _ in range(n):
        name_len, code, ndim = head[i:i + 3]
        specs.append((name_len, _DTYPES[code], tuple(head[i + 3:i + 3 + ndim])))
        i += 3 + ndim
    offset, names = int(sizes[0]), []
    for name_len, _, _ in specs:
        names.append(blob[offset:offset + name_len].tobytes().decode())
        offset += name_len
    out = {}
    for name, (_, dtype, shape) in zip(names, specs):
        offset += -offset % _ALIGN
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        out[name] = blob[offset:offset + nbytes].view(dtype).reshape(shape)
        offset += nbytes
    return out


def bcast_json(obj: Any = None, *, root: int = 0, comm=None) -> Any:
    """Broadcast a small JSON-able control message from MPI rank `root` (others pass None).

    Two `Bcast`s of UTF-8 bytes (length, then text). Every rank, root included, returns the
    decoded JSON, so all ranks hold equal values (tuples arrive as lists). Without MPI,
    returns the JSON round trip of `obj`.
    """
    comm = _mpi_comm(comm)
    if comm is None or comm.Get_size() == 1:
        return json.loads(json.dumps(obj))
    n = np.zeros(1, np.int64)
    if comm.Get_rank() == root:
        data = np.frombuffer(json.dumps(obj).encode(), np.uint8).copy()
        n[0] = data.size
        comm.Bcast(n, root=root)
    else:
        comm.Bcast(n, root=root)
        data = np.empty(int(n[0]), np.uint8)
    comm.Bcast(data, root=root)
    return json.loads(data.tobytes().decode())


# ------------------------------------------------------------------------------------------
# Faults: one failing rank ends the whole job, promptly, with one message.


def _abort(w: World, exc_type, exc, tb) -> None:
    code = exc.code if isinstance(exc, SystemExit) and isinstance(exc.code, int) else 1
    try:
        sys.stdout.flush()
        traceback.print_exception(exc_type, exc, tb, file=sys.stderr)
        print(f"tpmax (rank {w.rank}): {exc_type.__name__}: {exc}", file=sys.stderr, flush=True)
    finally:
        w.comm.Abort(code)


def install_abort_handler() -> bool:
    """Under MPI, make any uncaught exception (main thread or any thread) print its
    traceback and `tpmax (rank R): <Type>: <message>` from the failing rank only, then
    `COMM_WORLD.Abort(1)`: mpirun kills every rank and exits non-zero within seconds,
    instead of the others waiting forever in their next collective.

    SIGTERM (mpirun, Slurm or a user ending the job) keeps its default action, immediate
    exit, even while a rank is blocked inside MPI; SIGINT (Ctrl-C) raises KeyboardInterrupt,
    which aborts like any exception. A rank killed outright (SIGKILL, the OOM killer) makes
    mpirun end the job. `sys.exit(non-zero)` is not an exception hook's business (Python exits
    through MPI_Finalize, which waits for the other ranks forever): run the rank's work
    inside `abort_on_error()` for that.
    In a plain run this does nothing and returns False.
    """
    w = world()
    if not w.is_mpi:
        return False

    def hook(exc_type, exc, tb):
        if issubclass(exc_type, SystemExit) and exc.code in (None, 0):
            return
        _abort(w, exc_type, exc, tb)

    sys.excepthook = hook
    threading.excepthook = lambda a: hook(a.exc_type, a.exc_value, a.exc_traceback)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    return True


@contextlib.contextmanager
def abort_on_error():
    """Under MPI, abort the job (as `install_abort_handler` does) on any exception leaving
    the block, `SystemExit` with a non-zero code and `KeyboardInterrupt` included. Outside
    MPI, exceptions pass through unchanged. Use it around a rank's whole work:
    `with abort_on_error(): sys.exit(main())`.
    """
    try:
        yield
    except SystemExit as e:
        w = world()
        if w.is_mpi and e.code not in (None, 0):
            _abort(w, type(e), e, e.__traceback__)
        raise
    except BaseException as e:
        w = world()
        if w.is_mpi:
            _abort(w, type(e), e, e.__traceback__)
        raise
