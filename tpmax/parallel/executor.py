"""A forward step is a value; an executor runs it, in one process or on every MPI rank.

A `Step` is one ragged forward pass as data: the sequences, their new tokens, and every
option of `distributed_transformer` (`PassOptions`). It is validated once, when made. An
executor owns the transaction around it: reserve the batch's KV slots, run the pass, commit
(roll back if the pass fails). Callers (`logits`, `perplexity`, the `Engine`, the server,
the benchmarks) make steps and hand them to `model.executor`; none of them knows whether
other ranks exist.

- `Executor`: one process.
- `MpiLeader` (rank 0 of an MPI job): before each pass it broadcasts the whole step (tokens,
  offsets, the slots it reserved and the options) and then runs the pass *decoded from the
  message it sent*, so no option can reach rank 0's pass without reaching every rank's.
- `MpiFollower` (ranks > 0): runs the passes rank 0 sends until rank 0's call is done.

An API call runs through `executor.call(body, send=..., receive=...)`: rank 0 (or the one
process) runs `body()`; on the way out the followers learn its JSON-able result (`send`) or
its error. Messages are int64 headers and host arrays (`tpmax.mpi.bcast_arrays`), never
pickles.
"""
from __future__ import annotations

import dataclasses
import enum
import json
from typing import Any, Callable, Hashable, Sequence

import numpy as np

from ..nn.attention import ATTENTION_BLOCK
from ..core.comm import Communicator
from ..nn.config import ModelConfig
from ..core.devices import Device
from ..nn.kv_cache import PAGE_SIZE, BatchSlots, KVCacheParams, PagedKVCache
from ..nn.layers import DistributedGemmConfig
from ..core.sharding import ceil_div
from ..nn.transformer import ReturnHiddenStates, ReturnLogits, distributed_transformer
from ..nn.weights import Weights


def token_ids(seq, vocab_size: int, what: str = "sequence") -> np.ndarray:
    """`seq` as a non-empty int64 array `[n]` of ids in `[0, vocab_size)`, or ValueError.

    Refuses what NumPy would silently change: floats (`1.7`), bools, ids too large for int64.
    """
    try:
        a = np.asarray(seq)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{what}: not a list of token ids ({e})") from None
    if a.ndim != 1:
        raise ValueError(f"{what} must be a 1-d list of token ids, got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"empty {what}: no token ids")
    if a.dtype.kind not in "iu":  # float, bool, object (ints beyond int64), strings
        raise ValueError(f"{what}: token ids must be integers, got {a.dtype} values like {a.flat[0]!r}")
    if a.min() < 0 or a.max() >= vocab_size:
        bad = a[(a < 0) | (a >= vocab_size)][0]
        raise ValueError(f"{what}: token id {int(bad)} outside the vocabulary [0, {vocab_size})")
    return a.astype(np.int64, copy=False)


# ------------------------------------------------------------------------------------------
# The step.


@dataclasses.dataclass(frozen=True)
class PassOptions:
    """Every keyword option of `distributed_transformer`, as one value (a test checks that the
    two lists agree, so a new option cannot be left out of what MPI ranks receive)."""

    return_logits: ReturnLogits = ReturnLogits.LAST_TOKEN
    return_n_logits: int = 1
    return_hidden_states: ReturnHiddenStates = ReturnHiddenStates.NONE
    use_subgraphs: bool = False
    subgraph_layer_groups: tuple[tuple[int, ...], ...] | None = None
    logits_scaling: float | None = None
    gemm_config: DistributedGemmConfig | None = None
    threads: bool = False
    attention_block: int = ATTENTION_BLOCK

    def __post_init__(self):
        object.__setattr__(self, "return_logits", ReturnLogits(self.return_logits))
        object.__setattr__(self, "return_hidden_states", ReturnHiddenStates(self.return_hidden_states))
        if self.subgraph_layer_groups is not None:
            object.__setattr__(self, "subgraph_layer_groups",
                               tuple(tuple(int(i) for i in g) for g in self.subgraph_layer_groups))

    def to_json(self) -> dict:
        """Plain JSON values: enums by value, dataclasses as dicts, tuples as lists."""
        def plain(v):
            if isinstance(v, enum.Enum):
                return v.value
            if dataclasses.is_dataclass(v):
                return dataclasses.asdict(v)
            return [plain(x) for x in v] if isinstance(v, tuple) else v
        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_json(cls, d: dict) -> PassOptions:
        gemm = d["gemm_config"]
        return cls(**{**d, "gemm_config": None if gemm is None else DistributedGemmConfig(**gemm)})


@dataclasses.dataclass(frozen=True)
class Step:
    """One ragged forward pass: `tokens [T]` (int64) of sequences `seq_ids`, split by
    `offsets [B+1]`, with the pass's `options`."""

    seq_ids: tuple[Hashable, ...]
    tokens: np.ndarray
    offsets: np.ndarray
    options: PassOptions = PassOptions()

    @classmethod
    def make(cls, seq_ids: Sequence[Hashable], chunks: Sequence[Sequence[int]], vocab_size: int,
             **options) -> Step:
        """`chunks[b]` are the new tokens of `seq_ids[b]`; `options` as `distributed_transformer`'s.
        Validated here, once: ValueError for a bad id, an empty chunk or a count mismatch."""
        if len(seq_ids) != len(chunks) or not chunks:
            raise ValueError(f"a step needs one chunk of new tokens per sequence: {len(seq_ids)} sequences, "
                             f"{len(chunks)} chunks")
        try:  # one check of the whole batch; on failure, name the sequence at fault
            arrays = [np.asarray(c) for c in chunks]
            if any(a.ndim != 1 or a.size == 0 for a in arrays):
                raise ValueError
            tokens = token_ids(np.concatenate(arrays), vocab_size)
        except ValueError:
            for s, c in zip(seq_ids, chunks):
                token_ids(c, vocab_size, f"sequence {s!r}")
            raise
        offsets = np.cumsum([0] + [a.size for a in arrays], dtype=np.int64)
        return cls(tuple(seq_ids), tokens, offsets, PassOptions(**options))

    @property
    def n_new(self) -> list[int]:
        return np.diff(self.offsets).tolist()


# ------------------------------------------------------------------------------------------
# One process.


class Executor:
    """Runs steps in this process over one model's weights (see the module docstring)."""

    leads = True  # this process decides (rank 0, or the only process)

    def __init__(self, weights: Weights, cfg: ModelConfig, comm: Communicator, dtype: str):
        self.weights, self.cfg, self.comm, self.dtype = weights, cfg, comm, dtype

    def new_cache(self, num_tokens: int, *, page_size: int = PAGE_SIZE) -> PagedKVCache:
        """A paged KV cache with room for `num_tokens` tokens in all (rounded up to pages)."""
        group = getattr(self.comm, "all_devices", None) or self.comm.devices  # every device of the group
        return new_kv_cache(self.cfg, group, self.dtype, num_tokens, page_size=page_size, ranks=self.comm.ranks)

    def free_cache(self, cache: PagedKVCache) -> None:
        """Done with `cache` (its pages are garbage once nothing refers to it)."""

    def step(self, seq_ids: Sequence[Hashable], chunks: Sequence[Sequence[int]], **options) -> Step:
        return Step.make(seq_ids, chunks, self.cfg.vocab_size, **options)

    def run(self, cache: PagedKVCache, step: Step) -> tuple:
        """Reserve the step's KV slots in `cache`, run the pass, commit; on failure roll the
        reservation back and raise. Returns the tuple of `distributed_transformer`."""
        slots = cache.reserve(step.seq_ids, step.n_new)
        try:
            out = self._pass(cache, step, slots)
        except BaseException:
            cache.rollback(step.seq_ids)
            raise
        cache.commit(step.seq_ids, step.n_new)
        return out

    def _pass(self, cache: PagedKVCache, step: Step, slots: BatchSlots) -> tuple:
        return forward_pass(self.weights, self.cfg, self.comm, cache.pages, step.tokens, step.offsets, slots,
                            step.options)

    def call(self, body: Callable[[], Any], *, send: Callable[[Any], Any] | None = None,
             receive: Callable[[Any, tuple | None], Any] | None = None) -> Any:
        """One API call: `body()` here. Across ranks, rank 0 runs it and the others run its
        passes; `send(result)` (JSON-able) is what they learn of its result, and each returns
        `receive(that, its last pass's output)`."""
        return body()


def new_kv_cache(cfg: ModelConfig, devices: Sequence[Device], dtype: str, num_tokens: int, *,
                 page_size: int = PAGE_SIZE, ranks: Sequence[int] | None = None) -> PagedKVCache:
    """A paged KV cache for a model over a TP group's `devices`, with room for `num_tokens`
    tokens (rounded up to pages); `ranks`: which of them this process holds (default all)."""
    params = KVCacheParams(dtype, cfg.n_kv_heads, cfg.head_dim, page_size, cfg.n_layers, tuple(devices),
                           n_heads=cfg.n_heads)
    return PagedKVCache(params, max(1, ceil_div(num_tokens, page_size)), ranks=ranks)


def forward_pass(weights: Weights, cfg: ModelConfig, comm: Communicator, pages: Sequence, tokens: np.ndarray,
                 offsets: np.ndarray, slots: BatchSlots, options: PassOptions) -> tuple:
    """`distributed_transformer` with a step's options: the one call of the pass."""
    kw = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
    return distributed_transformer(weights, cfg, tokens, offsets, pages, slots, comm, **kw)


def executor_for(weights: Weights, cfg: ModelConfig, comm: Communicator, dtype: str) -> Executor:
    """The executor of a model: across MPI ranks the leader or a follower, else `Executor`."""
    mpi = getattr(comm, "mpi", None)
    if mpi is None or mpi.Get_size() == 1:
        return Executor(weights, cfg, comm, dtype)
    return (MpiLeader if mpi.Get_rank() == 0 else MpiFollower)(weights, cfg, comm, dtype)


# ------------------------------------------------------------------------------------------
# Across MPI ranks: rank 0 leads, the others follow. The messages, as bcast_arrays dicts:


class LeaderError(RuntimeError):
    """Raised on ranks > 0 when rank 0's call failed (rank 0 printed the cause)."""


class Op(enum.IntEnum):
    NEW_CACHE = 1  # ints: cache id, num_pages, page_size
    FREE_CACHE = 2  # ints: cache id
    FORWARD = 3  # ints: cache id; arrays: the step and its slots (`_step_message`)
    DONE = 4  # then one JSON message: {"result": ...} or {"error": "..."}


def _step_message(cache_id: int, step: Step, slots: BatchSlots) -> dict[str, np.ndarray]:
    tables = [np.asarray(t, np.int64) for t in slots.tables]
    return {"op": np.array([Op.FORWARD, cache_id], np.int64), "tokens": step.tokens, "offsets": step.offsets,
            "options": np.frombuffer(json.dumps(step.options.to_json()).encode(), np.uint8),
            "start": np.asarray(slots.start, np.int64), "positions": np.asarray(slots.positions, np.int64),
            "page": np.asarray(slots.page, np.int64), "slot": np.asarray(slots.slot, np.int64),
            "table_lens": np.array([len(t) for t in tables], np.int64),
            "tables": np.concatenate(tables) if tables else np.zeros(0, np.int64)}


def _read_step(msg: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, BatchSlots, PassOptions]:
    offs, lens = msg["offsets"], msg["table_lens"]
    bounds = np.concatenate([[0], np.cumsum(lens)])
    tables = tuple(msg["tables"][a:b] for a, b in zip(bounds[:-1], bounds[1:]))
    slots = BatchSlots(offs, msg["start"], msg["positions"], msg["page"], msg["slot"], tables)
    options = PassOptions.from_json(json.loads(msg["options"].tobytes().decode()))
    return msg["tokens"], offs, slots, options


class _MpiExecutor(Executor):
    def _bcast(self, msg: dict | None) -> dict[str, np.ndarray]:
        from .mpi_wire import bcast_arrays

        return bcast_arrays(msg, comm=self.comm.mpi)

    def _bcast_json(self, obj: Any = None) -> Any:
        from .mpi_wire import bcast_json

        return bcast_json(obj, comm=self.comm.mpi)

    def _run_message(self, pages: Sequence, msg: dict[str, np.ndarray]) -> tuple:
        tokens, offsets, slots, options = _read_step(msg)
        return forward_pass(self.weights, self.cfg, self.comm, pages, tokens, offsets, slots, options)


class MpiLeader(_MpiExecutor):
    """Rank 0: an `Executor` that tells the other ranks each cache and step first."""

    def new_cache(self, num_tokens: int, *, page_size: int = PAGE_SIZE) -> PagedKVCache:
        cache = super().new_cache(num_tokens, page_size=page_size)
        self._bcast({"op": np.array([Op.NEW_CACHE, id(cache), cache.num_pages, page_size], np.int64)})
        return cache

    def free_cache(self, cache: PagedKVCache) -> None:
        self._bcast({"op": np.array([Op.FREE_CACHE, id(cache)], np.int64)})

    def _pass(self, cache: PagedKVCache, step: Step, slots: BatchSlots) -> tuple:
        msg = self._bcast(_step_message(id(cache), step, slots))
        return self._run_message(cache.pages, msg)  # the very step every rank runs

    def call(self, body, *, send=None, receive=None):
        try:
            result = body()
        except BaseException as e:
            self._done({"error": f"{type(e).__name__}: {e}"})
            e.tpmax_followers_told = True  # the other ranks left the call too: no need to abort the job
            raise
        self._done({"result": None if send is None else send(result)})
        return result

    def _done(self, payload: dict) -> None:
        self._bcast({"op": np.array([Op.DONE], np.int64)})
        self._bcast_json(payload)


class MpiFollower(_MpiExecutor):
    """Ranks > 0: each call runs rank 0's passes on this rank's devices until rank 0 is done."""

    leads = False

    def call(self, body, *, send=None, receive=None):
        payload, last = self._follow()
        return None if receive is None else receive(payload, last)

    def _follow(self) -> tuple[Any, tuple | None]:
        """Mirror rank 0 until its call is DONE. Returns (its sent result, this rank's last
        pass output); raises LeaderError if its call failed."""
        caches: dict[int, PagedKVCache] = {}
        last = None
        while True:
            msg = self._bcast(None)
            op, *ints = msg["op"].tolist()
            if op == Op.NEW_CACHE:
                cid, num_pages, page_size = ints
                caches[cid] = Executor.new_cache(self, num_pages * page_size, page_size=page_size)
            elif op == Op.FREE_CACHE:
                caches.pop(ints[0], None)
            elif op == Op.FORWARD:
                last = self._run_message(caches[ints[0]].pages, msg)
            elif op == Op.DONE:
                payload = self._bcast_json()
                if "error" in payload:
                    raise LeaderError(f"rank 0 failed: {payload['error']}")
                return payload["result"], last
            else:
                raise RuntimeError(f"tpmax lock-step: unknown message {op}")
