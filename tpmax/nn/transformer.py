"""The distributed transformer (MAX's `distributed_transformer` module): the block, the
whole forward pass over a ragged batch with a paged KV cache, and
`distributed_logits_postprocess`.

The hidden state is replicated: one `[T, D]` array per device. Each layer makes exactly two
all-reduces: one after o_proj (inside `tensor_parallel_attention_with_rope`) and one after
down_proj (inside `mlp`).
"""
from __future__ import annotations

import contextlib
import enum
import functools
from typing import Callable, Sequence

import numpy as np

from .attention import ATTENTION_BLOCK, AttentionInputs, attention_inputs, tensor_parallel_attention_with_rope
from ..core.comm import Communicator
from .config import ModelConfig
from ..core.devices import Array, Device, asarray, device_of, on_device_context, to_numpy
from ..core.distributed import blas_threads_for, forward_sharded_layers, per_device
from .kv_cache import BatchSlots
from .layers import (DistributedGemmConfig, check_token_ids, column_parallel_linear, mlp, rms_norm,
                     vocab_parallel_embedding)
from .weights import LayerWeights, Weights


class ReturnLogits(str, enum.Enum):
    LAST_TOKEN = "last_token"
    VARIABLE = "variable"
    ALL = "all"


class ReturnHiddenStates(str, enum.Enum):
    NONE = "none"
    LAST = "last"  # last token of each sequence, before the final norm
    ALL = "all"  # every token, before the final norm
    ALL_NORMALIZED = "all_normalized"  # every token, after the final norm


# ------------------------------------------------------------------------------------------
# Block.


def distributed_transformer_block(xs: list[Array], lw: LayerWeights, layer: int, cfg: ModelConfig, *,
                                  inputs: Sequence[AttentionInputs], kv_pages: Sequence[Array], comm: Communicator,
                                  gemm_config: DistributedGemmConfig | None = None,
                                  threads: bool = False) -> list[Array]:
    """`h = x + allreduce(attn(norm(x)))`, `out = h + allreduce(mlp(norm(h)))`.

    The two halves are MAX's public TP layers, `tensor_parallel_attention_with_rope` and
    `mlp`, each ending in its own all-reduce.

    Args:
        xs: per device `[T, D]` (replicated). Returns per device `[T, D]`.
        inputs, kv_pages: see `tensor_parallel_attention_with_rope`.
        threads: run the devices' shares on their own threads (`per_device`).
    """
    eps, m = cfg.norm_eps, cfg.residual_multiplier
    norm = lambda x, w: rms_norm(x, w, eps=eps)  # noqa: E731

    devs = comm.devices
    residual = lambda x, y: x + y * m if m != 1.0 else x + y  # noqa: E731

    normed = per_device(norm, xs, lw.attn_norm, devices=devs, threads=threads)  # per device [T, D]
    attn = tensor_parallel_attention_with_rope(normed, lw.attn, cfg.attention(), inputs, kv_pages, layer, comm,
                                               threads=threads)  # all-reduce #1
    hs = per_device(residual, xs, attn, devices=devs)
    normed = per_device(norm, hs, lw.mlp_norm, devices=devs, threads=threads)
    ff = mlp(normed, lw.w13, lw.w2, comm, act=cfg.activation, gemm_config=gemm_config, threads=threads)  # #2
    return per_device(residual, hs, ff, devices=devs)


# ------------------------------------------------------------------------------------------
# Whole model.


def check_ragged(tokens, input_row_offsets, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Validate a ragged batch on the host; returns (tokens `[T]` int64, offsets `[B+1]`)."""
    tokens = np.asarray(to_numpy(tokens) if not isinstance(tokens, (list, tuple)) else tokens)
    offs = _offsets(input_row_offsets)
    check_token_ids(tokens, vocab_size)
    if offs[0] != 0 or offs[-1] != tokens.size or np.any(np.diff(offs) <= 0):
        raise ValueError(f"input_row_offsets {offs.tolist()} must rise strictly from 0 to "
                         f"len(tokens)={tokens.size} (every sequence needs at least one token)")
    return tokens.astype(np.int64), offs


def _offsets(input_row_offsets) -> np.ndarray:
    """`input_row_offsets` as one host int64 array `[B+1]`: given as one array (or list of
    ints), or as MAX passes it, one equal copy per device."""
    v = input_row_offsets
    if isinstance(v, (list, tuple)) and v and not isinstance(v[0], (int, np.integer)):
        copies = [np.asarray(to_numpy(c)) for c in v]
        if any(c.shape != copies[0].shape or not np.array_equal(c, copies[0]) for c in copies):
            raise ValueError("input_row_offsets: the per-device copies differ")
        v = copies[0]
    offs = np.asarray(to_numpy(v) if not isinstance(v, (list, tuple)) else v)
    if offs.ndim != 1 or offs.size < 2 or not np.issubdtype(offs.dtype, np.integer):
        raise ValueError(f"input_row_offsets must be an integer array [batch+1] (or one copy per device), "
                         f"got shape {offs.shape} dtype {offs.dtype}")
    return offs.astype(np.int64)


def distributed_transformer(weights: Weights, cfg: ModelConfig, tokens, input_row_offsets,
                            kv_pages: Sequence[Array], kv_slots: BatchSlots, comm: Communicator, *,
                            return_logits: ReturnLogits = ReturnLogits.LAST_TOKEN, return_n_logits: int = 1,
                            return_hidden_states: ReturnHiddenStates = ReturnHiddenStates.NONE,
                            use_subgraphs: bool = False, subgraph_layer_groups: Sequence[Sequence[int]] | None = None,
                            logits_scaling: float | None = None, gemm_config: DistributedGemmConfig | None = None,
                            threads: bool = False, attention_block: int = ATTENTION_BLOCK) -> tuple:
    """MAX's `DistributedTransformer` forward pass over one ragged batch.

    Embedding (vocab-parallel, all-reduce) -> layers -> final norm -> lm head (column
    parallel, allgather), through `distributed_logits_postprocess`. The pass only computes:
    as in MAX, the KV-cache manager lives outside it. The caller reserves the batch's slots
    (`kv_slots = cache.reserve(seq_ids, lengths)`), the pass writes every layer's K/V into
    them, and the caller commits (`cache.commit`) or rolls back (`cache.rollback`).

    Args:
        tokens: `[T]` token ids; input_row_offsets: `[B+1]` (or one copy per device).
        kv_pages: per device the cache pages (`PagedKVCache.pages`); kv_slots: the batch's
            reserved slots (cache lengths, page tables, where each new token goes).
        use_subgraphs, subgraph_layer_groups: as in MAX, groups of layers that share one
            compiled step (on GPUs, the unit of graph capture); no numeric effect. Layers always
            run in order; a group lists layers in any order, each layer in at most one group.
        logits_scaling: divide the logits by this; None = the model's (`cfg.logits_scaling`).
        threads: run each device's work on its own thread (BLAS limited to cores / devices).
            Off by default: on a 2-core machine, threads for virtual CPU devices measured slower
            than running them in turn with every core for BLAS (decode 15 vs 21 tok/s at TP 2).
        attention_block: queries per prefill attention block (no numeric effect; bounds the
            scores held at once to `[heads, block, context]`).
    Returns:
        the tuple of `distributed_logits_postprocess`.
    """
    tokens, offs = check_ragged(tokens, input_row_offsets, cfg.vocab_size)
    if not np.array_equal(np.asarray(kv_slots.input_row_offsets), offs):
        raise ValueError(f"kv_slots were reserved for a batch with offsets {list(kv_slots.input_row_offsets)}, "
                         f"not {offs.tolist()}")
    if len(kv_pages) != len(comm.devices):
        raise ValueError(f"{len(kv_pages)} KV page arrays for {len(comm.devices)} devices")
    _check_layer_groups(subgraph_layer_groups, cfg.n_layers)
    devices = comm.devices
    xs = vocab_parallel_embedding(tokens, weights.embed, comm, vocab_size=cfg.vocab_size)  # per device [T, D]
    if cfg.embedding_multiplier != 1.0:
        xs = per_device(lambda x: x * cfg.embedding_multiplier, xs, devices=devices)
    inputs = attention_inputs(cfg.attention(), cfg.rope(), kv_slots, devices,
                              block=attention_block)  # once per pass, for every layer
    with blas_threads_for(devices) if threads else contextlib.nullcontext():
        for i, lw in enumerate(weights.layers):
            xs = distributed_transformer_block(xs, lw, i, cfg, inputs=inputs, kv_pages=kv_pages, comm=comm,
                                               gemm_config=gemm_config, threads=threads)
    norm_shards = [functools.partial(_final_norm, w=w, eps=cfg.norm_eps) for w in weights.norm]
    lm_head = functools.partial(_lm_head, weights.lm_head)
    scaling = cfg.logits_scaling if logits_scaling is None else logits_scaling
    return distributed_logits_postprocess(xs, offs, return_n_logits, norm_shards, lm_head, comm, return_logits,
                                          0, return_hidden_states, scaling)


def _final_norm(x, *, w, eps):
    return rms_norm(x, w, eps=eps)


def _lm_head(tables, xs, comm):
    return column_parallel_linear(xs, tables, None, comm)


def _check_layer_groups(groups, n_layers: int) -> None:
    """MAX's grouping rule: non-empty groups of valid layer indices, no layer in two groups."""
    if groups is None:
        return
    seen: set[int] = set()
    for g in groups:
        g = list(g)
        if not g or any(not isinstance(i, (int, np.integer)) or not 0 <= i < n_layers or i in seen for i in g) \
                or len(set(g)) != len(g):
            raise ValueError(f"subgraph_layer_groups must be non-empty groups of layers in 0..{n_layers - 1}, "
                             f"each layer in at most one group; got {[list(x) for x in groups]}")
        seen.update(int(i) for i in g)


# ------------------------------------------------------------------------------------------
# Logits.


def distributed_logits_postprocess(h: Sequence[Array], input_row_offsets, return_n_logits: int,
                                   norm_shards: Sequence[Callable[[Array], Array]],
                                   lm_head: Callable[[list[Array], Communicator], Sequence[Array]],
                                   comm: Communicator, return_logits: ReturnLogits, device: Device | int,
                                   return_hidden_states: ReturnHiddenStates = ReturnHiddenStates.NONE,
                                   logits_scaling: float = 1.0) -> tuple:
    """Logits (and hidden states) from the final hidden states of a ragged batch.

    Args:
        h: per device `[T, D]` (replicated); input_row_offsets: `[B+1]`.
        norm_shards: per device final norm; lm_head: `(xs, comm) -> per device [n, V]`.
        device: which device's copy to return (a `Device` of `comm`, or its index).
    Returns:
        `(last_logits [B, V],)`; with VARIABLE also `logits [B*n, V], offsets range(0, B*n+1, n)`;
        with ALL also `logits [T, V], input_row_offsets`; then the hidden states asked for
        (LAST `[B, D]`, ALL / ALL_NORMALIZED `[T, D]`). Logits are float32, divided by
        `logits_scaling` when it is not 1.
    """
    offs = _offsets(input_row_offsets)
    if len(h) != len(comm.devices) or len(norm_shards) != len(h):
        raise ValueError(f"distributed_logits_postprocess: {len(h)} hidden states and {len(norm_shards)} norms "
                         f"for {len(comm.devices)} devices")
    if offs[0] != 0 or offs[-1] != h[0].shape[0] or np.any(np.diff(offs) <= 0):
        raise ValueError(f"input_row_offsets {offs.tolist()} must rise strictly from 0 to the "
                         f"{h[0].shape[0]} rows of the hidden states")
    if isinstance(device, int):
        if not 0 <= device < len(comm.devices):
            raise ValueError(f"device index {device} out of range for {len(comm.devices)} devices")
        r = device
    elif device in comm.devices:
        r = comm.devices.index(device)
    else:
        raise ValueError(f"device {device} is not one of this communicator's devices {list(map(str, comm.devices))}")
    last = offs[1:] - 1  # [B]

    devs = comm.devices

    def logits_at(rows: np.ndarray | None):
        xs = list(h) if rows is None else per_device(lambda x: x[_idx(x, rows)], h, devices=devs)
        ys = lm_head(forward_sharded_layers(norm_shards, xs, devices=devs), comm)  # per device [n, V]
        y = ys[r].astype(np.float32)
        return y / np.float32(logits_scaling) if logits_scaling != 1.0 else y

    with on_device_context(devs[r]):  # every gather below runs on the device whose copy is returned
        return _postprocess(h[r], norm_shards[r], offs, last, logits_at, return_logits, return_n_logits,
                            return_hidden_states)


def _postprocess(h, norm, offs, last, logits_at, return_logits, return_n_logits, return_hidden_states) -> tuple:
    """The rows `distributed_logits_postprocess` returns, from one device's hidden states `h`."""
    out: list = []
    if return_logits == ReturnLogits.ALL:
        all_logits = logits_at(None)
        out = [all_logits[_idx(all_logits, last)], all_logits, offs]
    elif return_logits == ReturnLogits.VARIABLE:
        n = int(return_n_logits)
        lengths = np.diff(offs)
        if n < 1 or np.any(lengths < n):
            raise ValueError(f"return_n_logits={n} but a sequence has only {int(lengths.min())} token(s)")
        rows = (offs[1:, None] - n + np.arange(n)[None, :]).reshape(-1)  # [B*n]
        var = logits_at(rows)
        out = [var[_idx(var, np.arange(n - 1, len(rows), n))], var, np.arange(0, len(rows) + 1, n)]
    elif return_logits == ReturnLogits.LAST_TOKEN:
        out = [logits_at(last)]
    else:
        raise ValueError(f"unknown return_logits {return_logits!r}")
    if return_hidden_states == ReturnHiddenStates.LAST:
        out.append(h[_idx(h, last)])
    elif return_hidden_states == ReturnHiddenStates.ALL:
        out.append(h)
    elif return_hidden_states == ReturnHiddenStates.ALL_NORMALIZED:
        out.append(norm(h))
    elif return_hidden_states != ReturnHiddenStates.NONE:
        raise ValueError(f"unknown return_hidden_states {return_hidden_states!r}")
    return tuple(out)


def _idx(x, rows):
    return rows if isinstance(x, np.ndarray) else asarray(rows, device_of(x))
