"""Tensor parallelism across MPI ranks: one process per rank, each driving its own block of
the device group.

This file owns launcher detection (`world`), the rank -> devices rule (`local_devices`), the
setup of a rank (`mpi_communicator`: the ranks agree on the devices, a GPU is checked and
bound; `agree_on_model` at load) and the fault policy (`install_abort_handler`). The
communicators live in `tpmax.mpi_comm`, the messages between ranks in `tpmax.mpi_wire`
(`bcast_arrays` and `bcast_json` are re-exported here). mpi4py is imported only when a
launcher started this process: `import tpmax` and a plain run never load it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Sequence

import numpy as np

from ..core.comm import communicator
from ..core.devices import Device, cupy_module
from ..core.launcher import LAUNCHER_ENV, launched_by_mpi, local_rank_count
from .world import World, local_devices, world, world_mpi
from .mpi_wire import AllRanksError, RanksDisagree, agree, bcast_arrays, bcast_json, wait

__all__ = ["LAUNCHER_ENV", "World", "world", "world_mpi", "launched_by_mpi", "local_devices", "local_rank_count",
           "mpi_communicator", "bind_gpu", "checkpoint_fingerprint", "agree_on_model", "install_abort_handler",
           "abort_on_error", "AllRanksError", "RanksDisagree", "bcast_arrays", "bcast_json"]



# ------------------------------------------------------------------------------------------
# Setup: this rank's communicator, its GPU, and the ranks' agreement on what they run.

GPU_BIND_ENV = "TPMAX_GPU_BIND"  # "id" (default): gpu:i is CUDA device i; "local": local rank
def mpi_communicator(all_devices: Sequence[Device], *, mpi_comm=None, cuda=None, nccl=None):
    """The communicator for this rank's part of the group `all_devices`.

    Without MPI (or in a one-rank job) this is `comm.communicator(all_devices)`. Across
    ranks, first the ranks agree on `all_devices` (else `RanksDisagree` on every rank); then
    CPU devices -> `mpi_comm.MpiCommunicator` (any multiple of the ranks); GPUs -> one per
    rank, checked, identified and bound (`bind_gpu`), then `mpi_comm.NcclRankCommunicator`.

    Args:
        mpi_comm: default `world().comm`.
        cuda, nccl: `cupy.cuda` and `cupy.cuda.nccl` (parameters so tests can pass doubles).
    Raises:
        AllRanksError (a ValueError), on every rank alike: ranks given other device lists
            (`RanksDisagree`), mixed kinds, a device count that is not a multiple of the
            ranks, GPUs that are not one per rank or cannot be used.
    """
    all_devices = list(all_devices)
    if mpi_comm is None:
        mpi_comm = world().comm
    if mpi_comm is None or mpi_comm.Get_size() == 1:
        return communicator(all_devices)
    agree(mpi_comm, {"devices": [str(d) for d in all_devices]}, label="the MPI ranks' --devices")
    # From here every rank holds the same list: a bad one is refused alike on every rank.
    kinds = {d.kind for d in all_devices}
    if len(kinds) > 1:
        raise AllRanksError(f"cannot mix cpu and gpu devices in one group: {[str(d) for d in all_devices]}")
    try:
        local_devices(all_devices, mpi_comm.Get_rank(), mpi_comm.Get_size())  # the count check
    except ValueError as e:
        raise AllRanksError(str(e)) from None
    from .mpi_comm import MpiCommunicator, NcclRankCommunicator

    if kinds == {"cpu"}:
        return MpiCommunicator(all_devices, mpi_comm)
    mine = bind_gpu(all_devices, mpi_comm, cuda=cuda)
    rank = mpi_comm.Get_rank()
    return NcclRankCommunicator(all_devices[:rank] + [mine] + all_devices[rank + 1:], mpi_comm, nccl=nccl)


def _allgather_text(comm, text: str, width: int) -> list[str]:
    """Every rank's `text` (UTF-8, cut to `width` bytes), in rank order."""
    mine = np.zeros(width, np.uint8)
    raw = text.encode()[:width]
    mine[:len(raw)] = np.frombuffer(raw, np.uint8)
    rows = np.empty((comm.Get_size(), width), np.uint8)
    wait(comm.Iallgather(mine, rows), "the GPU check", comm=comm)
    return [r.tobytes().rstrip(b"\0").decode(errors="replace") for r in rows]


def bind_gpu(all_devices: Sequence[Device], mpi_comm, *, cuda=None) -> Device:
    """Check, identify and bind this rank's GPU; returns it as the CUDA device it uses.

    The GPU is `all_devices[rank]`'s id among the GPUs this rank sees, or, with
    `TPMAX_GPU_BIND=local`, `local rank % visible GPUs` (the ranks on a host counted by
    `Split_type(COMM_TYPE_SHARED)`): with per-rank `CUDA_VISIBLE_DEVICES` (`srun
    --gpus-per-task=1`) every rank sees its own GPU as 0. Two ranks of one host drive the
    same GPU when their PCI bus ids are equal (ids alone cannot tell: `gpu:0` is another GPU
    on each rank under per-rank visibility). Every rank raises alike, or none does; then the
    GPU is made current on this rank (`cuda.Device(i).use()`).

    Raises:
        AllRanksError: on every rank, naming each rank's problem.
    """
    rank, size = mpi_comm.Get_rank(), mpi_comm.Get_size()
    if len(all_devices) != size:
        raise AllRanksError(f"NCCL across MPI ranks drives one GPU per rank: --devices lists "
                         f"{len(all_devices)} GPUs for {size} MPI ranks")
    cuda = cuda if cuda is not None else cupy_module().cuda
    bind = os.environ.get(GPU_BIND_ENV, "id").strip() or "id"
    host = mpi_comm.Split_type(world_mpi().COMM_TYPE_SHARED)  # the ranks on this host
    try:
        local = host.Get_rank()
        try:
            visible = cuda.runtime.getDeviceCount()
        except Exception:
            visible = 0
        gid = local % visible if bind == "local" and visible else all_devices[rank].id
        problem, bus = "", ""
        if bind not in ("id", "local"):
            problem = f"{GPU_BIND_ENV}={bind!r}: expected 'id' or 'local'"
        elif gid >= visible:
            cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
            problem = (f"rank {rank} has no GPU {gid}: it sees {visible}"
                       + (f" (CUDA_VISIBLE_DEVICES={cvd})" if cvd is not None else "")
                       + f"; where each rank sees only its own GPU, use {GPU_BIND_ENV}=local")
        else:
            bus = str(cuda.Device(gid).pci_bus_id)
        buses = _allgather_text(host, bus, 64)
    finally:
        host.Free()
    if bus and buses.count(bus) > 1:
        problem = (f"two MPI ranks on one host drive the same GPU (PCI bus {bus}, local ranks "
                   f"{[i for i, b in enumerate(buses) if b == bus]}); NCCL needs a distinct GPU per rank; "
                   f"for several logical devices on one GPU use one process (e.g. --devices gpu:0,0)")
    problems = [p for p in dict.fromkeys(_allgather_text(mpi_comm, problem, 512)) if p]
    if problems:
        raise AllRanksError("; ".join(problems))
    cuda.Device(gid).use()
    return Device("gpu", gid)


_SAMPLES, _BLOCK, _HEAD = 16, 4096, 1 << 20


def checkpoint_fingerprint(path: str | Path) -> dict[str, list]:
    """A cheap fingerprint of a checkpoint (a GGUF file, or every file of a directory):
    per file its name, size and the SHA-256 of its first MiB (headers: tensor names, shapes,
    dtypes, metadata, configs) and of 16 blocks of 4 KiB spread evenly over the rest
    (weights: checkpoints with equal shapes but other values differ there), for the first
    1000 files by name. Reads at most 1.06 MiB per file whatever its size (milliseconds);
    it tells checkpoints apart, it does not detect a damaged byte (the loaders' checks do)."""
    path = Path(path)
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    out = {}
    for f in files[:1000]:
        size = f.stat().st_size
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            h.update(fh.read(_HEAD))
            if size > _HEAD:
                for i in range(_SAMPLES):
                    fh.seek(_HEAD + (size - _HEAD - _BLOCK) * i // max(1, _SAMPLES - 1))
                    h.update(fh.read(_BLOCK))
        out[f.name] = [size, h.hexdigest()]
    return out


def agree_on_model(comm, *, config, dtype, path) -> None:
    """At load, across MPI ranks: every rank has the same model config, weight dtype and
    checkpoint (`checkpoint_fingerprint`), or every rank raises `RanksDisagree` (the
    devices were agreed on when the communicator was made). Does nothing in one process.

    Args:
        comm: the model's communicator (its `mpi` attribute, when there is one, is used).
        config: the parsed config (a dataclass); dtype: the weight dtype; path: checkpoint.
    """
    mpi_comm = getattr(comm, "mpi", None)
    if mpi_comm is None or mpi_comm.Get_size() == 1:
        return
    agree(mpi_comm, {"config": dataclasses.asdict(config), "dtype": str(np.dtype(dtype)),
                     "checkpoint": checkpoint_fingerprint(path)}, label="the MPI ranks' models")

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

    An `AllRanksError` (raised alike on every rank: ranks that disagree, a GPU setup
    refused) is printed by rank 0 only and every rank exits normally.
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
        if isinstance(exc, AllRanksError):  # every rank raised it: rank 0 says it, all exit
            if w.rank == 0:
                sys.__excepthook__(exc_type, exc, tb)
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
