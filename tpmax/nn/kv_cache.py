"""The paged KV cache: parameters, page allocation per sequence, and `write_kv`, the one
function in tpmax that mutates an array in place.

Per device the pages are one array `[num_layers, 2, num_pages, page_size, kv_heads_local,
head_dim]` (2 = k, v). Page ids are the same on every device; a sequence's page table lists
its pages in order, so token position p lives in page `table[p // page_size]`, slot
`p % page_size`.

As in MAX, the cache manager lives outside the forward pass: the caller `reserve`s pages for
a step (getting the step's `BatchSlots`), runs the forward pass, which only writes K/V into
those slots, then `commit`s the step (or `rollback`s it if the pass failed).
"""
from __future__ import annotations

import dataclasses
from typing import Hashable, Sequence

import numpy as np

from ..core.devices import Array, Device, as_dtype, on_device_context
from ..core.sharding import ceil_div, head_shard

PAGE_SIZE = 16  # tokens per KV page unless a caller asks otherwise


class KVCacheFullError(RuntimeError):
    """Raised for the sequence whose request found too few free pages; nothing else changed."""

    def __init__(self, seq_id, needed: int, free: int):
        super().__init__(f"KV cache full: sequence {seq_id!r} needs {needed} more page(s), "
                         f"{free} free; release finished sequences or allocate more pages")
        self.seq_id, self.needed, self.free = seq_id, needed, free


@dataclasses.dataclass(frozen=True)
class KVCacheParams:
    """MAX's `KVCacheParams`: what the cache holds and how it is split.

    `n_heads` (query heads) decides which kv heads each device needs (see `head_shard`).
    """

    dtype: str
    n_kv_heads: int
    head_dim: int
    page_size: int
    num_layers: int
    devices: tuple[Device, ...]
    n_heads: int | None = None

    def __post_init__(self):
        for f in ("n_kv_heads", "head_dim", "page_size", "num_layers"):
            if getattr(self, f) <= 0:
                raise ValueError(f"KVCacheParams.{f} must be positive, got {getattr(self, f)}")

    @property
    def n_kv_heads_per_device(self) -> list[int]:
        n_heads = self.n_heads or self.n_kv_heads
        tp = len(self.devices)
        return [head_shard(n_heads, self.n_kv_heads, tp, r).n_kv for r in range(tp)]


@dataclasses.dataclass(frozen=True)
class BatchSlots:
    """Where the tokens of one ragged batch go: computed once per step, shared by layers.

    Attributes:
        input_row_offsets: `[B+1]` prefix sums of the new-token counts.
        start: `[B]` cache length of each sequence before this step.
        positions: `[T]` absolute position of every new token.
        page, slot: `[T]` page id and in-page slot of every new token.
        tables: per sequence `[n_pages]` page ids covering `start + new` tokens.
    """

    input_row_offsets: np.ndarray
    start: np.ndarray
    positions: np.ndarray
    page: np.ndarray
    slot: np.ndarray
    tables: tuple[np.ndarray, ...]


class PagedKVCache:
    """Pages on every device plus the host-side allocator (page tables, lengths, free list)."""

    def __init__(self, params: KVCacheParams, num_pages: int, *, ranks: Sequence[int] | None = None):
        """Allocate `num_pages` pages on the devices of `params` this process drives.

        Args:
            ranks: group indices of the devices held here (default: all of `params.devices`;
                under MPI each process holds its own block, see `Communicator.ranks`).
        """
        if num_pages <= 0:
            raise ValueError(f"num_pages must be positive, got {num_pages}")
        self.params = params
        self.num_pages = num_pages
        self.ranks = list(range(len(params.devices)) if ranks is None else ranks)
        dtype = as_dtype(params.dtype)
        n_kv_all = params.n_kv_heads_per_device
        self.pages: list[Array] = []  # one per held device
        for r in self.ranks:
            d, n_kv = params.devices[r], n_kv_all[r]
            shape = (params.num_layers, 2, num_pages, params.page_size, n_kv, params.head_dim)
            try:
                with on_device_context(d):
                    self.pages.append(d.xp.zeros(shape, dtype))
            except MemoryError as e:  # CuPy's OutOfMemoryError subclasses MemoryError
                gib = np.prod(shape) * dtype.itemsize / 2**30
                raise MemoryError(f"KV cache: {num_pages} pages ({gib:.2f} GiB) do not fit on {d}") from e
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out low ids first
        self._tables: dict[Hashable, list[int]] = {}
        self._lengths: dict[Hashable, int] = {}

    # -- allocator --------------------------------------------------------------------------

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def __contains__(self, seq_id) -> bool:
        return seq_id in self._tables

    def length(self, seq_id) -> int:
        return self._lengths[seq_id]

    def add(self, seq_id) -> None:
        """Start an empty sequence."""
        if seq_id in self._tables:
            raise ValueError(f"sequence {seq_id!r} is already in the KV cache")
        self._tables[seq_id], self._lengths[seq_id] = [], 0

    def release(self, seq_id) -> None:
        """Free a sequence's pages."""
        self._free.extend(reversed(self._tables.pop(seq_id)))
        del self._lengths[seq_id]

    def pages_for(self, num_tokens: int) -> int:
        """Pages that hold `num_tokens` tokens of one sequence."""
        return ceil_div(num_tokens, self.params.page_size)

    def pages_needed(self, seq_id, n_new: int) -> int:
        ps = self.params.page_size
        need = ceil_div(self._lengths[seq_id] + n_new, ps)
        return max(0, need - len(self._tables[seq_id]))

    def reserve(self, seq_ids: Sequence[Hashable], n_new: Sequence[int]) -> BatchSlots:
        """Give every sequence pages for its `n_new` tokens and return where they go.

        All or nothing: if a sequence cannot get its pages, the pages given in this call are
        returned and `KVCacheFullError` names that sequence; no other sequence changes.
        """
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError("a sequence appears twice in one batch")
        for s in seq_ids:
            if s not in self._tables:
                raise KeyError(f"sequence {s!r} is not in the KV cache (call add first)")
        given: list[tuple[Hashable, int]] = []
        for s, n in zip(seq_ids, n_new):
            need = self.pages_needed(s, n)
            if need > len(self._free):
                for s2, k in reversed(given):  # undo this call's allocations
                    kept = len(self._tables[s2]) - k
                    self._free.extend(reversed(self._tables[s2][kept:]))
                    del self._tables[s2][kept:]
                raise KVCacheFullError(s, need, len(self._free))
            self._tables[s].extend(self._free.pop() for _ in range(need))
            given.append((s, need))
        return self._slots(seq_ids, n_new)

    def _slots(self, seq_ids, n_new) -> BatchSlots:
        ps = self.params.page_size
        offsets = np.concatenate([[0], np.cumsum(n_new)]).astype(np.int64)
        start = np.array([self._lengths[s] for s in seq_ids], np.int64)
        positions = np.concatenate([np.arange(st, st + n) for st, n in zip(start, n_new)]
                                   or [np.zeros(0)]).astype(np.int64)
        tables = tuple(np.asarray(self._tables[s][:ceil_div(st + n, ps)], np.int64)
                       for s, st, n in zip(seq_ids, start, n_new))
        seq_of = np.repeat(np.arange(len(seq_ids)), n_new)
        page = np.array([tables[b][p // ps] for b, p in zip(seq_of, positions)], np.int64)
        return BatchSlots(offsets, start, positions, page, positions % ps, tables)

    def commit(self, seq_ids: Sequence[Hashable], n_new: Sequence[int]) -> None:
        """Count the tokens of a finished step as cached."""
        for s, n in zip(seq_ids, n_new):
            self._lengths[s] += int(n)

    def rollback(self, seq_ids: Sequence[Hashable]) -> None:
        """Undo an uncommitted `reserve`: give back every page beyond what each sequence's
        committed tokens occupy (a failed step leaves no page reserved but uncommitted)."""
        ps = self.params.page_size
        for s in seq_ids:
            if s in self._tables:
                keep = ceil_div(self._lengths[s], ps)
                self._free.extend(reversed(self._tables[s][keep:]))
                del self._tables[s][keep:]


def write_kv(pages: Array, layer: int, k: Array, v: Array, page: Array, slot: Array) -> None:
    """Store k, v `[T, kv_local, hd]` of the new tokens into one device's pages, in place, at
    `page`, `slot` `[T]` (from `BatchSlots`, on the pages' device)."""
    pages[layer, 0, page, slot] = k
    pages[layer, 1, page, slot] = v


def gather_kv(pages: Array, layer: int, table: Array, length: int) -> tuple[Array, Array]:
    """k, v `[length, kv_local, hd]` of one sequence, gathered from its pages `table`."""
    kv = pages[layer][:, table]  # [2, n_pages, page_size, kv, hd]
    kv = kv.reshape(2, -1, *kv.shape[-2:])[:, :length]  # [2, L, kv, hd]
    return kv[0], kv[1]
