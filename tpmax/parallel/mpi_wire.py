"""What travels between MPI ranks outside the collectives' arrays: dtype codes and array
headers, the engine's lock-step messages (`bcast_arrays`, `bcast_json`), the load-time
agreement of the ranks (`agree`) and the waiting policy (`wait`: sleeping, not spinning,
with a timeout inside a step).

Nothing here imports mpi4py: every function takes an mpi4py communicator (default
`tpmax.mpi.world().comm`, looked up when called).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import threading
import time
from typing import Any, Mapping

import numpy as np

from ..core.comm import sum_dtype as _acc_dtype
from ..core.devices import bfloat16, float8_e4m3fn

# ------------------------------------------------------------------------------------------
# Dtypes on the wire. Sums travel as a type MPI can add (halves as float32, rounded once at
# the end); gathers and broadcasts move raw bytes, so any dtype (bfloat16, float8) goes.

DTYPES = tuple(np.dtype(t) for t in (
    np.float32, np.float16, bfloat16, np.float64, np.int8, np.int16, np.int32, np.int64,
    np.uint8, np.uint16, np.uint32, np.uint64, np.bool_, float8_e4m3fn,
))
_DTYPE_CODE = {d: i for i, d in enumerate(DTYPES)}
_SUMMABLE = {np.dtype(t) for t in (np.float32, np.float64, np.int8, np.int16, np.int32, np.int64,
                                   np.uint8, np.uint16, np.uint32, np.uint64)}


def dtype_code(dtype) -> int:
    dtype = np.dtype(dtype)
    if dtype not in _DTYPE_CODE:
        raise ValueError(f"MPI: unsupported dtype {dtype}; supported: {', '.join(d.name for d in DTYPES)}")
    return _DTYPE_CODE[dtype]


def sum_dtype(dtype, what: str) -> np.dtype:
    """The dtype a sum of `dtype` travels and accumulates in (float32 for the half types)."""
    acc = _acc_dtype(dtype)
    if acc not in _SUMMABLE:
        raise ValueError(f"{what}: cannot sum dtype {np.dtype(dtype)} over MPI")
    return acc


MAXDIMS = 64  # NumPy 2's limit; a fixed-size header costs one message, not two


def array_head(x) -> np.ndarray:
    """`[dtype code, ndim, *shape, 0...]` as int64 (a receive buffer when `x` is None)."""
    head = np.zeros(2 + MAXDIMS, np.int64)
    if x is not None:
        head[:2] = dtype_code(x.dtype), x.ndim
        head[2:2 + x.ndim] = x.shape
    return head


def head_shape(head) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of an `array_head`."""
    return tuple(head[2:2 + head[1]].tolist()), DTYPES[head[0]]


def as_bytes(x: np.ndarray) -> np.ndarray:
    """A C-contiguous array's memory as a flat uint8 view (no copy)."""
    return np.asarray(x, order="C").reshape(-1).view(np.uint8)


# ------------------------------------------------------------------------------------------
# Waiting. Inside a step a rank waits at most `step_timeout()` seconds for the others, then
# ends the job with one line: a partner that stopped answering (stopped, hung, or running
# other code) would otherwise hang every rank. Between calls (a follower waiting for rank
# 0's next call, maybe for hours) there is no limit, and the wait sleeps instead of spinning.

TIMEOUT_ENV = "TPMAX_MPI_TIMEOUT"
DEFAULT_TIMEOUT = 600.0


def step_timeout() -> float | None:
    """Seconds a rank waits for the others inside a step (`TPMAX_MPI_TIMEOUT`, default 600;
    0 = wait forever, for debugging). None means no limit.

    Raises:
        ValueError: the variable is not a non-negative number.
    """
    return _timeout(os.environ.get(TIMEOUT_ENV, ""))


@functools.cache
def _timeout(text: str) -> float | None:
    text = text.strip()
    try:
        t = float(text) if text else DEFAULT_TIMEOUT
    except ValueError:
        t = -1.0
    if not t >= 0 or t == float("inf"):
        raise ValueError(f"{TIMEOUT_ENV}={text!r}: expected seconds, a non-negative number (0 = no limit)")
    return t or None


def _give_up(comm, limit: float, what: str) -> None:
    print(f"tpmax (rank {comm.Get_rank()}): no answer from the other ranks for {limit:g} s in {what}; "
          f"ending the job (a rank stopped, hung or runs other code; {TIMEOUT_ENV} sets the limit, 0 = none)",
          file=sys.stderr, flush=True)
    comm.Abort(3)


_SPIN_S = 0.05  # poll without sleeping this long first: MPI progresses a request only while polled


def wait(req, what: str, *, comm, timeout: float | None | str = "step") -> None:
    """Wait for the mpi4py request `req`: polled without pause for 50 ms, then with sleeps of
    50 µs doubling to 5 ms, so a long wait costs no core.

    Args:
        what: the operation, for the message.
        timeout: "step" for `step_timeout()`; None to wait forever (between calls). On
            expiry this rank aborts the job (`_give_up`).
    """
    if req.Test():
        return
    limit = step_timeout() if timeout == "step" else timeout
    start, nap = time.monotonic(), 0.0
    while not req.Test():
        if nap:
            time.sleep(nap)
        waited = time.monotonic() - start
        if waited > _SPIN_S:
            nap = min(max(2 * nap, 5e-5), 5e-3)
        if limit is not None and waited > limit:
            _give_up(comm, limit, what)


class _Watchdog:
    """Ends the job when a blocking collective of a step runs past `step_timeout()`: one
    daemon thread per process, waking every `limit / 8` seconds (at most 1 s), which reads the
    start time each `guard` block records. Blocking collectives keep MPI's tuned algorithms
    (a non-blocking all-reduce polled from Python measured 2-4x slower per call here)."""

    def __init__(self):
        self.active: dict[int, tuple[float, str, float, Any]] = {}  # thread id -> (start, what, limit, comm)
        self.thread: threading.Thread | None = None

    def run(self) -> None:
        while True:
            time.sleep(min(1.0, min((lim for _, _, lim, _ in list(self.active.values())), default=8.0) / 8))
            now = time.monotonic()
            for start, what, limit, comm in list(self.active.values()):
                if now - start > limit:
                    _give_up(comm, limit, what)


_watchdog = _Watchdog()


class guard:  # noqa: N801 - used as a function: `with guard(comm, "allreduce_sum"): ...`
    """Inside the block (a blocking collective of a step) this thread may wait at most
    `step_timeout()` seconds; past that the watchdog ends the job. Nested blocks count from
    the outermost. (A class, not a generator: it wraps every collective of a step.)"""

    __slots__ = ("entry", "me")

    def __init__(self, comm, what: str):
        limit, self.me = step_timeout(), threading.get_ident()
        self.entry = None if limit is None or self.me in _watchdog.active else (0.0, what, limit, comm)

    def __enter__(self) -> None:
        if self.entry is not None:
            if _watchdog.thread is None:
                _watchdog.thread = threading.Thread(target=_watchdog.run, name="tpmax-mpi-watchdog", daemon=True)
                _watchdog.thread.start()
            _watchdog.active[self.me] = (time.monotonic(), *self.entry[1:])

    def __exit__(self, *exc) -> None:
        if self.entry is not None:
            del _watchdog.active[self.me]


def _comm(comm):
    if comm is not None:
        return comm
    from .world import world

    return world().comm


def bcast(comm, buf, root: int, what: str, *, timeout: float | None | str = "step") -> None:
    """`comm.Bcast(buf, root)`, waited for with `wait`."""
    wait(comm.Ibcast(buf, root=root), what, comm=comm, timeout=timeout)


# ------------------------------------------------------------------------------------------
# Lock-step messages: rank 0 schedules, the other ranks follow.

_ALIGN = 16


def bcast_arrays(arrays: Mapping[str, np.ndarray] | None, *, root: int = 0, comm=None,
                 idle: bool = True) -> dict[str, np.ndarray]:
    """Broadcast a dict of host arrays from MPI rank `root` (others pass None).

    Two broadcasts, no pickle: the sizes `[header bytes, blob bytes]`, then one uint8 blob
    holding an int64 header (`n`, then per array: name length, dtype code, ndim, *shape),
    the UTF-8 names, and each array's bytes (16-byte aligned). Receivers get aligned views
    into their copy of the blob; root gets its arrays back (as contiguous arrays).

    Args:
        arrays: on root, `{name: array}` (any dtype in `DTYPES`, bfloat16 included).
        comm: an mpi4py communicator; default `world().comm`. Without MPI, returns `arrays`.
        idle: receivers wait for the sizes without a time limit (sleeping: the message
            may be rank 0's next call, hours away); False puts the sizes under the step
            timeout too. The blob that follows is always under the step timeout.
    """
    comm = _comm(comm)
    if comm is None or comm.Get_size() == 1:
        return {k: np.asarray(v, order="C") for k, v in arrays.items()}
    sizes = np.zeros(2, np.int64)
    if comm.Get_rank() == root:
        arrays = {str(k): np.asarray(v, order="C") for k, v in arrays.items()}  # (0-d stays 0-d)
        names = [k.encode() for k in arrays]
        head = [len(arrays)]
        for name, a in zip(names, arrays.values()):
            head += [len(name), dtype_code(a.dtype), a.ndim, *a.shape]
        head = np.array(head, np.int64).view(np.uint8)
        parts, offset = [head, np.frombuffer(b"".join(names), np.uint8)], head.size + sum(map(len, names))
        for a in arrays.values():
            pad = -offset % _ALIGN
            parts += [np.zeros(pad, np.uint8), as_bytes(a)]
            offset += pad + a.nbytes
        blob = np.concatenate(parts)
        sizes[:] = head.size, blob.size
        bcast(comm, sizes, root, "a lock-step message")
        bcast(comm, blob, root, "a lock-step message")
        return arrays
    bcast(comm, sizes, root, "a lock-step message", timeout=None if idle else "step")
    blob = np.empty(int(sizes[1]), np.uint8)
    bcast(comm, blob, root, "a lock-step message")
    head = blob[:sizes[0]].view(np.int64).tolist()
    n, i, specs = head[0], 1, []
    for _ in range(n):
        name_len, code, ndim = head[i:i + 3]
        specs.append((name_len, DTYPES[code], tuple(head[i + 3:i + 3 + ndim])))
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


def bcast_json(obj: Any = None, *, root: int = 0, comm=None, idle: bool = False) -> Any:
    """Broadcast a small JSON-able control message from MPI rank `root` (others pass None).

    Two broadcasts of UTF-8 bytes (length, then text), under the step timeout (`idle=True`:
    receivers wait for the length without one, as in `bcast_arrays`). Every rank, root
    included, returns the decoded JSON, so all ranks hold equal values (tuples arrive as
    lists). Without MPI, returns the JSON round trip of `obj`.
    """
    comm = _comm(comm)
    if comm is None or comm.Get_size() == 1:
        return json.loads(json.dumps(obj))
    n = np.zeros(1, np.int64)
    if comm.Get_rank() == root:
        data = np.frombuffer(json.dumps(obj).encode(), np.uint8).copy()
        n[0] = data.size
        bcast(comm, n, root, "a lock-step message")
    else:
        bcast(comm, n, root, "a lock-step message", timeout=None if idle else "step")
        data = np.empty(int(n[0]), np.uint8)
    bcast(comm, data, root, "a lock-step message")
    return json.loads(data.tobytes().decode())


# ------------------------------------------------------------------------------------------
# Agreement: ranks that would compute different things stop before they start.


class AllRanksError(ValueError):
    """An error every rank of the job raised alike, at the same point, so no rank waits on
    another: callers report it on rank 0 and exit cleanly everywhere (no abort)."""

    tpmax_followers_told = True  # nobody is left waiting (read by tpmax.cli)


class RanksDisagree(AllRanksError):
    """The ranks of one job were started with different models, dtypes or devices (rank
    0's message lists the differences)."""


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def agree(comm, what: Mapping[str, Any], *, label: str = "the ranks") -> None:
    """Check that every rank of `comm` holds the same `what` (JSON-able values), or raise
    `RanksDisagree` on every rank.

    One broadcast of rank 0's per-key SHA-256 digests (JSON) and one all-gather of a
    fixed-size int64 row per rank: a bit per key of rank 0's, plus one for keys rank 0
    lacks, so ranks with different key sets still exchange matching counts. Both under the
    step timeout.

    Raises:
        RanksDisagree: some rank differs; the message names the ranks and keys.
    """
    comm = _comm(comm)
    if comm is None or comm.Get_size() == 1:
        return
    mine = {k: _digest(v) for k, v in what.items()}
    theirs = bcast_json(mine if comm.Get_rank() == 0 else None, comm=comm)
    keys = sorted(theirs)
    row = np.array([mine.get(k) != theirs[k] for k in keys] + [bool(set(mine) - set(theirs))], np.int64)
    rows = np.empty((comm.Get_size(), row.size), np.int64)
    wait(comm.Iallgather(row, rows), "the ranks' agreement at load", comm=comm)
    if rows.any():
        names = keys + ["keys rank 0 lacks"]
        diffs = "; ".join(f"rank {r}: " + ", ".join(k for k, bad in zip(names, row) if bad)
                          for r, row in enumerate(rows) if row.any())
        raise RanksDisagree(f"{label} disagree with rank 0 ({diffs}); every rank must run the same "
                            f"command with the same model, dtype and --devices")
