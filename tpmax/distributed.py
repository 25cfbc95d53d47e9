"""The seed's small helpers (`take`, `distribute_value`, `forward_sharded_layers`,
`ShardableCallable`) and `per_device`, which runs one function per device, in parallel.
"""
from __future__ import annotations

import itertools
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


def per_device(fn: Callable, *per_device_args: Sequence, parallel: bool = True) -> list:
    """`[fn(*args_r) for each device r]`, one worker thread per device when `parallel`.

    NumPy and CuPy release the GIL inside BLAS and kernels, so virtual CPU devices (and GPUs
    driven from one process) really run side by side.
    """
    n = len(per_device_args[0])
    if any(len(a) != n for a in per_device_args):
        raise ValueError(f"per_device: argument lists differ in length: {[len(a) for a in per_device_args]}")
    if n == 1 or not parallel:
        return [fn(*args) for args in zip(*per_device_args)]
    pool = _pools.get(n)
    if pool is None:
        pool = _pools[n] = ThreadPoolExecutor(max_workers=n, thread_name_prefix="tpmax-dev")
    return list(pool.map(lambda args: fn(*args), zip(*per_device_args)))
