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
from typing import Callable, Hashable, Sequence

import numpy as np

from .attention import AttentionInputs, attention_inputs, attention_local
from .comm import Communicator
from .config import ModelConfig
from .devices import Array, Device, asarray, to_numpy
from .distributed import blas_threads_for, forward_sharded_layers, per_device
from .kv_cache import PagedKVCache
from .layers import DistributedGemmConfig, column_parallel_linear, mlp, mlp_local, rms_norm, vocab_parallel_embedding
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
                                  inputs: Sequence[AttentionInputs], cache: PagedKVCache, comm: Communicator,
                                  gemm_config: DistributedGemmConfig | None = None,
                                  parallel: bool = False) -> list[Array]:
    """`h = x + allreduce(attn(norm(x)))`, `out = h + allreduce(mlp(norm(h)))`.

    Each half is one task per device (the norm and the device's share of attention or MLP)
    followed by its all-reduce.

    Args:
        xs: per device `[T, D]` (replicated). Returns per device `[T, D]`.
        parallel: run the devices' tasks on their own threads (`per_device`).
    """
    eps, m, acfg = cfg.norm_eps, cfg.residual_multiplier, cfg.attention()

    def attention_part(x, norm_w, w, heads, inp, pages):  # [T, D] -> partial [T, D]
        return attention_local(rms_norm(x, norm_w, eps=eps), w, heads, acfg, inp, pages, layer)

    partials = per_device(attention_part, xs, lw.attn_norm, lw.attn, acfg.heads(len(xs)), inputs, cache.pages,
                          parallel=parallel)
    attn = comm.allreduce_sum(partials)  # all-reduce #1
    hs = [x + a * m if m != 1.0 else x + a for x, a in zip(xs, attn)]
    if gemm_config is not None and gemm_config.enable_matmul_allreduce:
        normed = per_device(lambda h, w: rms_norm(h, w, eps=eps), hs, lw.mlp_norm)
        ff = mlp(normed, lw.w13, lw.w2, comm, act=cfg.activation, gemm_config=gemm_config)  # all-reduce #2, chunked
    else:
        def mlp_part(h, norm_w, w13, w2):  # [T, D] -> partial [T, D]
            return mlp_local(rms_norm(h, norm_w, eps=eps), w13, w2, act=cfg.activation)

        ff = comm.allreduce_sum(per_device(mlp_part, hs, lw.mlp_norm, lw.w13, lw.w2, parallel=parallel))  # #2
    return [h + f * m if m != 1.0 else h + f for h, f in zip(hs, ff)]


# ------------------------------------------------------------------------------------------
# Whole model.


def check_ragged(tokens, input_row_offsets, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Validate a ragged batch on the host; returns (tokens `[T]` int64, offsets `[B+1]`)."""
    tokens = np.asarray(to_numpy(tokens) if not isinstance(tokens, (list, tuple)) else tokens)
    offs = np.asarray(to_numpy(input_row_offsets) if not isinstance(input_row_offsets, (list, tuple))
                      else input_row_offsets)
    if tokens.ndim != 1 or (tokens.size and not np.issubdtype(tokens.dtype, np.integer)):
        raise ValueError(f"tokens must be a flat integer array [total_tokens], got shape {tokens.shape} "
                         f"dtype {tokens.dtype}")
    if offs.ndim != 1 or offs.size < 2 or not np.issubdtype(offs.dtype, np.integer):
        raise ValueError(f"input_row_offsets must be an integer array [batch+1], got {offs!r}")
    if offs[0] != 0 or offs[-1] != tokens.size or np.any(np.diff(offs) <= 0):
        raise ValueError(f"input_row_offsets {offs.tolist()} must rise strictly from 0 to "
                         f"len(tokens)={tokens.size} (every sequence needs at least one token)")
    bad = tokens[(tokens < 0) | (tokens >= vocab_size)]
    if bad.size:
        raise ValueError(f"token id {int(bad[0])} outside the vocabulary [0, {vocab_size})")
    return tokens.astype(np.int64), offs.astype(np.int64)


def distributed_transformer(weights: Weights, cfg: ModelConfig, tokens, input_row_offsets,
                            cache: PagedKVCache, seq_ids: Sequence[Hashable], comm: Communicator, *,
                            return_logits: ReturnLogits = ReturnLogits.LAST_TOKEN, return_n_logits: int = 1,
                            return_hidden_states: ReturnHiddenStates = ReturnHiddenStates.NONE,
                            subgraph_layer_groups: Sequence[Sequence[int]] | None = None,
                            gemm_config: DistributedGemmConfig | None = None, threads: bool = False) -> tuple:
    """MAX's `DistributedTransformer` forward pass over one ragged batch.

    Embedding (vocab-parallel, all-reduce) -> layers -> final norm -> lm head (column
    parallel, allgather), through `distributed_logits_postprocess`. Sequence `seq_ids[b]`
    gets tokens `tokens[offsets[b]:offsets[b+1]]` appended after what the cache holds.

    Args:
        tokens: `[T]` token ids; input_row_offsets: `[B+1]`; seq_ids: `[B]` cache sequence ids.
        subgraph_layer_groups: layer groups (a GPU capture unit; no numeric effect); must list
            every layer once, in order.
        threads: run each device's work on its own thread (BLAS limited to cores / devices).
            Off by default: on a 2-core machine, threads for virtual CPU devices measured slower
            than running them in turn with every core for BLAS (decode 15 vs 21 tok/s at TP 2).
    Returns:
        the tuple of `distributed_logits_postprocess`.
    Raises:
        KVCacheFullError: for the first sequence that found too few pages (nothing changed).
    """
    tokens, offs = check_ragged(tokens, input_row_offsets, cfg.vocab_size)
    if len(seq_ids) != len(offs) - 1:
        raise ValueError(f"{len(seq_ids)} seq_ids for a batch of {len(offs) - 1} sequences")
    groups = _layer_groups(subgraph_layer_groups, cfg.n_layers)
    n_new = np.diff(offs).tolist()
    slots = cache.reserve(seq_ids, n_new)
    devices = comm.devices
    xs = vocab_parallel_embedding(tokens, weights.embed, comm)  # per device [T, D]
    if cfg.embedding_multiplier != 1.0:
        xs = [x * cfg.embedding_multiplier for x in xs]
    inputs = attention_inputs(cfg.attention(), cfg.rope(), slots, devices)  # once per pass, for every layer
    with blas_threads_for(devices) if threads else contextlib.nullcontext():
        for group in groups:
            for i in group:
                xs = distributed_transformer_block(xs, weights.layers[i], i, cfg, inputs=inputs, cache=cache,
                                                   comm=comm, gemm_config=gemm_config, parallel=threads)
    cache.commit(seq_ids, n_new)
    norm_shards = [functools.partial(_final_norm, w=w, eps=cfg.norm_eps) for w in weights.norm]
    lm_head = functools.partial(_lm_head, weights.lm_head)
    return distributed_logits_postprocess(xs, offs, return_n_logits, norm_shards, lm_head, comm, return_logits,
                                          devices[0], return_hidden_states, cfg.logits_scaling)


def _final_norm(x, *, w, eps):
    return rms_norm(x, w, eps=eps)


def _lm_head(tables, xs, comm):
    return column_parallel_linear(xs, tables, None, comm)


def _layer_groups(groups, n_layers):
    if groups is None:
        return [range(n_layers)]
    flat = [i for g in groups for i in g]
    if flat != list(range(n_layers)):
        raise ValueError(f"subgraph_layer_groups must list layers 0..{n_layers - 1} once each, in order; "
                         f"got {[list(g) for g in groups]}")
    return groups


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
    offs = np.asarray(to_numpy(input_row_offsets), np.int64)
    r = device if isinstance(device, int) else comm.devices.index(device)
    last = offs[1:] - 1  # [B]

    def logits_at(rows: np.ndarray | None):
        xs = list(h) if rows is None else [x[_idx(x, rows)] for x in h]
        ys = lm_head(forward_sharded_layers(norm_shards, xs), comm)  # per device [n, V]
        y = ys[r].astype(np.float32)
        return y / np.float32(logits_scaling) if logits_scaling != 1.0 else y

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
        out.append(h[r][_idx(h[r], last)])
    elif return_hidden_states == ReturnHiddenStates.ALL:
        out.append(h[r])
    elif return_hidden_states == ReturnHiddenStates.ALL_NORMALIZED:
        out.append(norm_shards[r](h[r]))
    elif return_hidden_states != ReturnHiddenStates.NONE:
        raise ValueError(f"unknown return_hidden_states {return_hidden_states!r}")
    return tuple(out)


def _idx(x, rows):
    return rows if isinstance(x, np.ndarray) else asarray(rows, Device("gpu", x.device.id))
