"""The seed's small helpers (`take`, `distribute_value`, `forward_sharded_layers`,
`ShardableCallable`) and `per_device`, which runs one function per device, each call inside
its device's context, optionally on one thread per device.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Protocol, Sequence, runtime_checkable

from .devices import Array, Device, asarray, on_device_context


@runtime_checkable
class ShardableCallable(Protocol):
    """Anything with a sharding strategy, per-device shards, and a call on one device's array.

    A protocol, not a base class: tpmax's layers are plain functions over plain data.
    """

    sharding_strategy: Any

    def shard(self, devices: Sequence[Device]) -> Sequence["ShardableCallable"]: ...
    def __call__(self, x: Array) -> Array: ...


def take(it: Iterable, n: int) -> list:
    """Return the next `n` items from `it` as a list."""
    return list(itertools.islice(it, n))


def distribute_value(v, devices: Sequence[Device]) -> list[Array]:
    """One private copy of `v` per device, in device order."""
    return [asarray(v, d, copy=True) for d in devices]


def forward_sharded_layers(layers: Sequence[Callable], xs: Sequence[Array], *,
                           devices: Sequence[Device] | None = None) -> list[Array]:
    """`[layer(x) for layer, x in zip(layers, xs)]`; the lengths must match.

    Args:
        devices: as for `per_device`: layer r runs with `devices[r]` current (None: no context).
    Raises:
        AssertionError: if the number of layers and inputs differ (as MAX does).
    """
    if len(layers) != len(xs):
        raise AssertionError(f"forward_sharded_layers: {len(layers)} layers for {len(xs)} inputs")
    return per_device(lambda layer, x: layer(x), layers, xs, devices=devices)


# ------------------------------------------------------------------------------------------
# Running per-device work in parallel.

_pools: dict[int, ThreadPoolExecutor] = {}


def per_device(fn: Callable, *per_device_args: Sequence, devices: Sequence[Device] | None = None,
               threads: bool = False) -> list:
    """`[fn(*args_r) for each device r]`, each call inside device r's context.

    Args:
        fn: the per-device function.
        per_device_args: one sequence per argument position, one entry per device.
        devices: the device of each entry, in order; call r runs inside
            `on_device_context(devices[r])`, so CuPy allocates and launches on its GPU (on a
            worker thread too). None (virtual CPU devices only): no context is entered.
        threads: devices 1.. run on worker threads while device 0 runs on the calling thread.
            NumPy and CuPy release the GIL inside BLAS and kernels, so with enough cores the
            devices really run side by side; small per-op work still takes turns on the GIL.
            CuPy work is asynchronous, so GPUs can overlap without threads.
    Returns:
        the n results, in device order.
    """
    n = len(per_device_args[0])
    if len(per_device_args) > 1 and len({len(a) for a in per_device_args}) > 1:
        raise ValueError(f"per_device: argument lists differ in length: {[len(a) for a in per_device_args]}")
    if devices is not None and len(devices) != n:
        raise ValueError(f"per_device: {len(devices)} devices for {n} entries per argument")
    if n == 1 or not threads:  # in turn, on this thread (the common case: keep it lean)
        if devices is None:
            return [fn(*a) for a in zip(*per_device_args)]
        out = []
        for d, a in zip(devices, zip(*per_device_args)):
            with on_device_context(d):
                out.append(fn(*a))
        return out
    args = list(zip(*per_device_args))
    calls = [functools.partial(_on, None if devices is None else devices[r], fn, *args[r]) for r in range(n)]
    pool = _pools.get(n)
    if pool is None:
        pool = _pools[n] = ThreadPoolExecutor(max_workers=n - 1, thread_name_prefix="tpmax-dev")
    others = [pool.submit(call) for call in calls[1:]]  # devices 1.. on worker threads
    first = calls[0]()  # device 0 on the calling thread
    return [first] + [f.result() for f in others]


def _on(device: Device | None, fn: Callable, *args):
    """`fn(*args)` inside `device`'s context (none for None)."""
    if device is None:
        return fn(*args)
    with on_device_context(device):
        return fn(*args)


# ------------------------------------------------------------------------------------------
# BLAS threads: one pool per process, sized so the ranks on a host do not oversubscribe it.

THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS")
_blas = None
_threads: int | None = None  # what set_threads applied (None: nothing yet)


def _controller():
    global _blas
    if _blas is None:
        from threadpoolctl import ThreadpoolController
        _blas = ThreadpoolController()
    return _blas


def default_threads() -> int:
    """The cores this process may use (`os.sched_getaffinity`) divided among the MPI ranks
    on this host (`mpi.local_rank_count`, 1 in a plain run), at least 1."""
    from .launcher import local_rank_count

    return max(1, len(os.sched_getaffinity(0)) // local_rank_count())


def set_threads(n: int | None = None) -> int | None:
    """Size this process's BLAS and OpenMP thread pools (through threadpoolctl), for good.

    Args:
        n: threads; None for `default_threads()`, unless one of `OMP_NUM_THREADS`,
            `OPENBLAS_NUM_THREADS`, `MKL_NUM_THREADS`, `BLIS_NUM_THREADS` is set (then the
            pools are left as that says, and None is returned).
    Returns:
        the thread count applied, or None when left to the environment.
    Raises:
        ValueError: `n` is not a positive int.
    """
    global _threads
    if n is None:
        if any(os.environ.get(k) for k in THREAD_ENV):
            return None
        n = default_threads()
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"threads must be a positive integer, got {n!r}")
    if n != _threads:
        _controller().limit(limits=n)
        _threads = n
    return n


@contextlib.contextmanager
def blas_threads_for(devices: Sequence[Device]):
    """While several virtual CPU devices run side by side, give each one's BLAS calls an
    equal share (at least 1) of the process's threads (`set_threads`'s count, else its
    cores), so device threads do not oversubscribe the cores. Restores the previous setting
    on exit; does nothing for one device or for GPUs."""
    if len(devices) < 2 or any(d.kind != "cpu" for d in devices):
        yield
        return
    total = _threads or len(os.sched_getaffinity(0))
    with _controller().limit(limits=max(1, total // len(devices)), user_api="blas"):
        yield
