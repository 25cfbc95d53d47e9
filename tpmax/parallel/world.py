"""This process's place in an MPI job: its rank, the job's size, mpi4py's COMM_WORLD (imported
only under a launcher), and which of the group's devices each rank drives."""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Sequence

from ..core.devices import Device
from ..core.launcher import LAUNCHER_ENV, launched_by_mpi

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


def world_mpi():
    """mpi4py's `MPI` module (for `MPI.IN_PLACE`, `MPI.SUM`, ...), imported on first use.

    Raises:
        RuntimeError: mpi4py is not installed; under a launcher the message names it.
    """
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
    comm = world_mpi().COMM_WORLD
    return World(comm.Get_rank(), comm.Get_size(), comm)


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
