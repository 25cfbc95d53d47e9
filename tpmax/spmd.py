"""One model over MPI ranks in lock-step: rank 0 decides, the other ranks follow.

Under `mpirun` every rank runs the same program and calls the same API (`tpmax.load`, then
`tpmax.generate` / `logits` / `perplexity`, or `tpmax serve`). Rank 0 does the work as in one
process: it schedules, owns the KV-cache allocator and samples. Before each forward pass it
broadcasts the step (tokens, row offsets and the KV slots it reserved) and the other ranks
run the same forward pass on their own devices, taking part in its collectives. A call ends
with DONE, which carries rank 0's result (or its error) to every rank. Messages are int64
headers and host arrays broadcast through `tpmax.mpi.bcast_arrays`: nothing is pickled.

In one process (no MPI, or one rank) every function here does nothing.
"""
from __future__ import annotations

import contextlib
import enum
from typing import Any, Sequence

import numpy as np

from .kv_cache import BatchSlots, PagedKVCache
from .transformer import ReturnHiddenStates, ReturnLogits, distributed_transformer


class LeaderError(RuntimeError):
    """Raised on ranks > 0 when rank 0's call failed (rank 0 printed the cause)."""


class Op(enum.IntEnum):
    NEW_CACHE = 1  # cache id, num_pages, page_size
    FREE_CACHE = 2  # cache id
    FORWARD = 3  # cache id, return_logits, return_n_logits
    DONE = 4  # then a JSON result: {"result": ...} or {"error": "..."}


_RETURN_LOGITS = list(ReturnLogits)


def _mpi(model):
    """mpi4py communicator of `model`'s group when it spans several ranks, else None."""
    comm = getattr(model.comm, "mpi", None)
    return comm if comm is not None and comm.Get_size() > 1 else None


def is_leader(model) -> bool:
    """True on rank 0, and always in one process."""
    comm = _mpi(model)
    return comm is None or comm.Get_rank() == 0


def _send(model, op: Op, ints: Sequence[int] = (), **arrays) -> None:
    from .mpi import bcast_arrays

    bcast_arrays({"op": np.array([int(op), *ints], np.int64), **arrays}, comm=_mpi(model))


# ------------------------------------------------------------------------------------------
# Rank 0: announce what the followers must mirror.


def announce_cache(model, cache: PagedKVCache) -> None:
    """Rank 0 made `cache`: the followers make theirs (same pages on their devices)."""
    if _mpi(model) is not None and is_leader(model):
        _send(model, Op.NEW_CACHE, [id(cache), cache.num_pages, cache.params.page_size])


def free_cache(model, cache: PagedKVCache) -> None:
    """Rank 0 is done with `cache`: the followers free theirs."""
    if _mpi(model) is not None and is_leader(model):
        _send(model, Op.FREE_CACHE, [id(cache)])


def announce_step(model, cache: PagedKVCache, tokens: np.ndarray, offsets: np.ndarray, slots: BatchSlots,
                  return_logits: ReturnLogits, return_n_logits: int) -> None:
    """Rank 0 is about to run a forward pass: send it to the followers."""
    if _mpi(model) is None or not is_leader(model):
        return
    tables = [np.asarray(t, np.int64) for t in slots.tables]
    _send(model, Op.FORWARD, [id(cache), _RETURN_LOGITS.index(ReturnLogits(return_logits)), return_n_logits],
          tokens=np.asarray(tokens, np.int64), offsets=np.asarray(offsets, np.int64),
          start=np.asarray(slots.start, np.int64), positions=np.asarray(slots.positions, np.int64),
          page=np.asarray(slots.page, np.int64), slot=np.asarray(slots.slot, np.int64),
          table_lens=np.array([len(t) for t in tables], np.int64),
          tables=np.concatenate(tables) if tables else np.zeros(0, np.int64))


@contextlib.contextmanager
def session(model):
    """Rank 0's side of one API call: on the way out DONE carries the call's result (set
    `box["result"]`, JSON-able) or its error to the followers."""
    box: dict[str, Any] = {}
    try:
        yield box
    except BaseException as e:
        _done(model, {"error": f"{type(e).__name__}: {e}"})
        if _mpi(model) is not None:
            e.tpmax_followers_told = True  # the other ranks left the call too: no need to abort the job
        raise
    _done(model, {"result": box.get("result")})


def _done(model, payload: dict) -> None:
    if _mpi(model) is not None and is_leader(model):
        from .mpi import bcast_json

        _send(model, Op.DONE)
        bcast_json(payload, comm=_mpi(model))


# ------------------------------------------------------------------------------------------
# Ranks > 0.


def follow(model) -> tuple[Any, tuple | None]:
    """Mirror rank 0 until its call is DONE.

    Returns:
        (rank 0's result, the output of this rank's last forward pass).
    Raises:
        LeaderError: rank 0's call failed.
    """
    try:
        return _follow(model)
    except LeaderError:
        raise
    except BaseException as e:
        e.tpmax_in_lockstep = True  # this rank broke while rank 0 waits on it: the job must end
        raise


def _follow(model):
    from .mpi import bcast_arrays, bcast_json

    comm = _mpi(model)
    caches: dict[int, PagedKVCache] = {}
    last = None
    while True:
        msg = bcast_arrays(None, comm=comm)
        op, *ints = msg["op"].tolist()
        if op == Op.NEW_CACHE:
            cid, num_pages, page_size = ints
            caches[cid] = model.new_cache(num_pages * page_size, page_size=page_size, announce=False)
        elif op == Op.FREE_CACHE:
            caches.pop(ints[0], None)
        elif op == Op.FORWARD:
            cid, rl, n = ints
            offs, lens = msg["offsets"], msg["table_lens"]
            bounds = np.concatenate([[0], np.cumsum(lens)])
            tables = tuple(msg["tables"][a:b] for a, b in zip(bounds[:-1], bounds[1:]))
            slots = BatchSlots(offs, msg["start"], msg["positions"], msg["page"], msg["slot"], tables)
            last = distributed_transformer(model.weights, model.cfg, msg["tokens"], offs, caches[cid].pages, slots,
                                           model.comm, return_logits=_RETURN_LOGITS[rl], return_n_logits=n,
                                           return_hidden_states=ReturnHiddenStates.NONE)
        elif op == Op.DONE:
            payload = bcast_json(None, comm=comm)
            if "error" in payload:
                raise LeaderError(f"rank 0 failed: {payload['error']}")
            return payload.get("result"), last
        else:
            raise RuntimeError(f"tpmax lock-step: unknown message {op}")
