"""The seed's small helpers (`take`, `distribute_value`, `forward_sharded_layers`,
`ShardableCallable`) and `per_device`, which runs one function per device, in parallel.
"""
from __future__ import annotations

import contextlib
import itertools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Protocol, Sequence, runtime_checkable

from .devices import Array, Device, asarray


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


def forward_sharded_layers(layers: Sequence[Callable], xs: Sequence[Array]) -> list[Array]:
    """`[layer(x) for layer, x in zip(layers, xs)]`; the lengths must match.

    Raises:
        AssertionError: if the number of layers and inputs differ (as MAX does).
    """
    if len(layers) != len(xs):
        raise AssertionError(f"forward_sharded_layers: {len(layers)} layers for {len(xs)} inputs")
    return [layer(x) for layer, x in zip(layers, xs)]


# ------------------------------------------------------------------------------------------
# Running per-device work in parallel.

_pools: dict[int, ThreadPoolExecutor] = {}


def per_device(fn: Callable, *per_device_args: Sequence, threads: bool = False) -> list:
    """`[fn(*args_r) for each device r]`; with `threads`, devices 1.. run on worker threads
    while device 0 runs on the calling thread.

    NumPy and CuPy release the GIL inside BLAS and kernels, so with enough cores the devices
    really run side by side; small per-op work still takes turns on the GIL. CuPy work is
    asynchronous, so GPUs can overlap without threads.
    """
    n = len(per_device_args[0])
    if any(len(a) != n for a in per_device_args):
        raise ValueError(f"per_device: argument lists differ in length: {[len(a) for a in per_device_args]}")
    if n == 1 or not threads:
        return [fn(*args) for args in zip(*per_device_args)]
    pool = _pools.get(n)
    if pool is None:
        pool = _pools[n] = ThreadPoolExecutor(max_workers=n - 1, thread_name_prefix="tpmax-dev")
    args = list(zip(*per_device_args))
    others = [pool.submit(fn, *a) for a in args[1:]]  # devices 1.. on worker threads
    first = fn(*args[0])  # device 0 on the calling thread
    return [first] + [f.result() for f in others]


_blas = None


@contextlib.contextmanager
def blas_threads_for(devices: Sequence[Device]):
    """While several virtual CPU devices run side by side, give each one's BLAS calls
    `cores // devices` threads (at least 1), so device threads do not oversubscribe the cores.
    Restores the previous setting on exit; does nothing for one device or for GPUs."""
    global _blas
    if len(devices) < 2 or any(d.kind != "cpu" for d in devices):
        yield
        return
    if _blas is None:
        from threadpoolctl import ThreadpoolController
        _blas = ThreadpoolController()
    with _blas.limit(limits=max(1, len(os.sched_getaffinity(0)) // len(devices)), user_api="blas"):
        yield
