"""The two cross-process communicators: `MpiCommunicator` (virtual CPU devices, mpi4py's
buffer API) and `NcclRankCommunicator` (one GPU per MPI rank, NCCL bootstrapped over MPI).

Every MPI collective here runs under `mpi_wire.guard`: a partner that never answers ends
the job after the step timeout.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..core.comm import _check, nccl_dtype, pad_shard, pad_slices, sum_dtype, unpad_gathered, unpad_slice
from ..core.devices import Array, Device, asarray, cupy_module, on_device_context
from .world import local_devices, world_mpi
from .mpi_wire import DTYPES, array_head, as_bytes, guard, head_shape
from .mpi_wire import sum_dtype as mpi_sum_dtype
from ..core.sharding import split_bounds


def _exchange_sizes(mpi_comm, size, xs, ax) -> list[int]:
    """Every shard's size on the gather axis `ax`, for the whole group, in group order.

    One all-gather of a fixed-size int64 header per rank (so ranks that disagree on ndim
    still exchange matching counts); the dtype, ndim, axis and off-axis shape in it are
    checked on every rank, so a mismatch raises the same ValueError everywhere instead of
    hanging one rank in the gather.
    """
    mine = np.concatenate([array_head(xs[0]), [ax], [x.shape[ax] for x in xs]]).astype(np.int64)
    mine[2 + ax] = 0  # the gathered axis may differ; the rest of the shape may not
    heads = np.empty((size, mine.size), np.int64)
    with guard(mpi_comm, "allgather"):
        mpi_comm.Allgather(mine, heads)
    k = len(xs)
    if not (heads[:, :-k] == mine[:-k]).all():
        seen = [f"{DTYPES[h[0]].name}{list(h[2:2 + h[1]])} axis {h[-k - 1]}" for h in heads]
        raise ValueError(f"allgather: ranks disagree on dtype, ndim, axis or off-axis shape: {seen} "
                         f"(0 marks the gathered axis)")
    return heads[:, -k:].reshape(-1).tolist()


class _RankGroup:
    """What both communicators know: this rank's block of the group."""

    def __init__(self, all_devices: Sequence[Device], mpi_comm):
        self.mpi = mpi_comm  # the mpi4py communicator (lock-step messages travel on it)
        self._MPI = world_mpi()
        self.rank, self.size = mpi_comm.Get_rank(), mpi_comm.Get_size()
        self.all_devices = list(all_devices)
        self.devices = local_devices(self.all_devices, self.rank, self.size)
        k = len(self.devices)
        self.ranks = list(range(self.rank * k, (self.rank + 1) * k))
        self.tp = len(self.all_devices)

    def _bcast(self, buf, root, what):
        with guard(self.mpi, what):
            self.mpi.Bcast(buf, root=root)


# ------------------------------------------------------------------------------------------
# CPU devices across ranks: mpi4py's buffer API on NumPy arrays.


class MpiCommunicator(_RankGroup):
    """Collectives of a group of virtual CPU devices spread over the ranks of `mpi_comm`.

    Rank r drives `local_devices(all_devices, r, size)`; every call takes and returns one
    array per local device and must be made by every rank (lock-step), with the same dtype
    and, off a gathered axis, the same shapes. Several local devices are reduced locally
    first, then across ranks; each local device gets a private copy of the result.
    float16/bfloat16 sums accumulate in float32 and round once.

    Equal to `InProcessCommunicator` over the whole group bit for bit when the sum's order
    does not matter (integer-valued inputs, or two devices: one addition); otherwise equal
    to float rounding (MPI adds the ranks' partial sums in its own order), deterministic,
    and every rank gets the same bytes.
    """

    def __init__(self, all_devices: Sequence[Device], mpi_comm):
        if any(d.kind != "cpu" for d in all_devices):
            raise ValueError("MpiCommunicator drives cpu devices; use mpi_communicator() for GPUs")
        super().__init__(all_devices, mpi_comm)

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
        acc = self._local_sum(xs, mpi_sum_dtype(dtype, "allreduce_sum"))
        if self.size > 1:
            with guard(self.mpi, "allreduce_sum"):
                self.mpi.Allreduce(self._MPI.IN_PLACE, acc, op=self._MPI.SUM)
        return self._to_all(acc.astype(dtype, copy=False))

    def allgather(self, xs, axis=-1):
        ax = _check(self.devices, xs, "allgather", same_shape=False, axis=axis)
        if self.tp == 1:
            return [xs[0]]
        shape0 = xs[0].shape
        rest = shape0[:ax] + shape0[ax + 1:]
        if self.size > 1:
            sizes = _exchange_sizes(self.mpi, self.size, xs, ax)
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
            with guard(self.mpi, "allgather"):
                self.mpi.Allgatherv(as_bytes(send), [as_bytes(full), counts, displs, self._MPI.BYTE])
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
            head = array_head(buf if self.rank == owner else None)
            self._bcast(head, owner, "broadcast")
            if self.rank != owner:
                shape, dtype = head_shape(head)
                buf = np.empty(shape, dtype)
            self._bcast(as_bytes(buf), owner, "broadcast")
        return self._to_all(buf)

    def reduce_scatter(self, xs, axis=0):
        ax = _check(self.devices, xs, "reduce_scatter", axis=axis)
        dtype = xs[0].dtype
        if self.tp == 1:
            return [xs[0]]
        acc_dtype = mpi_sum_dtype(dtype, "reduce_scatter")
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
            with guard(self.mpi, "reduce_scatter"):
                self.mpi.Reduce_scatter(acc, mine, counts, op=self._MPI.SUM)
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

NCCL_ID_BYTES = 128  # sizeof(ncclUniqueId)


class NcclRankCommunicator(_RankGroup):
    """Collectives of a group of distinct GPUs, one per MPI rank, through NCCL.

    Group rank 0 makes the NCCL unique id (128 raw bytes, CuPy >= 14) and broadcasts it over
    `mpi_comm`; every rank then joins one `nccl.NcclCommunicator(size, uid, rank)` with its
    GPU `all_devices[rank]` current. Calls are asynchronous on the current CuPy stream, as
    CuPy kernels are, each inside the rank's device context. Shapes of uneven gathers and
    broadcasts travel over MPI (host int64). float16/bfloat16 sums travel as float32 and
    round once, as the other communicators do. `mpi.mpi_communicator` checks and binds the
    GPU before building this.

    Args:
        nccl: the `cupy.cuda.nccl` module (a parameter so tests can pass a double).
    """

    def __init__(self, all_devices: Sequence[Device], mpi_comm, *, nccl=None):
        if nccl is None:
            try:
                from cupy.cuda import nccl
            except Exception as e:
                raise RuntimeError(f"GPUs across MPI ranks need CuPy with NCCL ({e}); install tpmax[cuda12] "
                                   f"or tpmax[cuda13], or use cpu devices") from None
        if any(d.kind != "gpu" for d in all_devices):
            raise ValueError("NcclRankCommunicator drives gpu devices only")
        if len(all_devices) != mpi_comm.Get_size():
            raise ValueError(f"NCCL across MPI ranks drives one GPU per rank: --devices lists "
                             f"{len(all_devices)} GPUs for {mpi_comm.Get_size()} MPI ranks")
        super().__init__(all_devices, mpi_comm)
        self._nccl = nccl
        uid = np.zeros(NCCL_ID_BYTES, np.uint8)
        if self.rank == 0:
            ident = bytes(nccl.get_unique_id())
            if len(ident) != NCCL_ID_BYTES:
                raise RuntimeError(f"NCCL unique id of {len(ident)} bytes, expected {NCCL_ID_BYTES}")
            uid[:] = np.frombuffer(ident, np.uint8)
        self._bcast(uid, 0, "the NCCL id broadcast")
        with on_device_context(self.devices[0]):
            self._comm = nccl.NcclCommunicator(self.size, uid.tobytes(), self.rank)

    def __repr__(self):
        return f"NcclRankCommunicator(rank {self.rank}/{self.size}: {self.devices[0]})"

    def _stream(self):
        return cupy_module().cuda.get_current_stream().ptr

    def allreduce_sum(self, xs):
        _check(self.devices, xs, "allreduce_sum")
        if self.tp == 1:
            return [xs[0]]
        cp, dtype = cupy_module(), xs[0].dtype
        acc = sum_dtype(dtype)
        with on_device_context(self.devices[0]):
            buf = cp.array(xs[0], dtype=acc, order="C", copy=True)
            self._comm.allReduce(buf.data.ptr, buf.data.ptr, buf.size, nccl_dtype(acc, self._nccl),
                                 self._nccl.NCCL_SUM, self._stream())
            return [buf.astype(dtype, copy=False)]

    def allgather(self, xs, axis=-1):
        ax = _check(self.devices, xs, "allgather", same_shape=False, axis=axis)
        if self.tp == 1:
            return [xs[0]]
        cp = cupy_module()
        sizes = _exchange_sizes(self.mpi, self.size, xs, ax)
        with on_device_context(self.devices[0]):
            send = pad_shard(xs[0], ax, max(sizes))  # [m, *rest]
            recv = cp.empty((self.size,) + send.shape, send.dtype)  # [n, m, *rest]
            self._comm.allGather(send.data.ptr, recv.data.ptr, send.nbytes, self._nccl.NCCL_UINT8, self._stream())
            return [unpad_gathered(recv, sizes, ax)]

    def broadcast(self, x, *, root=0):
        """`x` is read only on rank `root` (elsewhere it may be None): dtype and shape travel."""
        if not 0 <= root < self.tp:
            raise ValueError(f"broadcast: root {root} is outside the group of {self.tp} devices")
        cp = cupy_module()
        if self.rank == root:
            _check(self.devices, [x], "broadcast")
        if self.tp == 1:
            with on_device_context(self.devices[0]):
                return [x.copy()]
        head = array_head(x if self.rank == root else None)
        self._bcast(head, root, "broadcast")
        with on_device_context(self.devices[0]):
            if self.rank == root:
                buf = cp.array(x, order="C", copy=True)
            else:
                shape, dtype = head_shape(head)
                buf = cp.empty(shape, dtype)
            self._comm.bcast(buf.data.ptr, buf.nbytes, self._nccl.NCCL_UINT8, root, self._stream())
            return [buf]

    def reduce_scatter(self, xs, axis=0):
        ax = _check(self.devices, xs, "reduce_scatter", axis=axis)
        if self.tp == 1:
            return [xs[0]]
        cp, x = cupy_module(), xs[0]
        acc = sum_dtype(x.dtype)
        bounds = split_bounds(x.shape[ax], self.size)
        with on_device_context(self.devices[0]):
            send = pad_slices(x, ax, bounds, acc)  # [n, m, *rest]
            recv = cp.empty(send.shape[1:], acc)  # [m, *rest]
            self._comm.reduceScatter(send.data.ptr, recv.data.ptr, recv.size, nccl_dtype(acc, self._nccl),
                                     self._nccl.NCCL_SUM, self._stream())
            a, b = bounds[self.rank]
            return [unpad_slice(recv, b - a, ax, x.dtype)]
