"""Tensor-parallel attention with RoPE over the paged KV cache (MAX's
`TensorParallelAttentionWithRope`), and `materialize_kv_from_hidden`.

Per device: fused qkv projection (+bias) -> optional per-head RMSNorm on q and k -> RoPE at
each token's absolute position -> `write_kv` -> attention over the cache (GQA) -> o_proj
partial; then one all-reduce over devices.
"""
from __future__ import annotations

import dataclasses
import enum
import functools
import math
from typing import Sequence

import numpy as np

from ..core.comm import Communicator
from ..core.devices import Array, Device, asarray, xp_of
from ..core.distributed import distribute_value, per_device
from .kv_cache import BatchSlots, gather_kv, write_kv
from .layers import RopeTables, RotaryEmbedding, linear, rms_norm, rotate
from ..core.sharding import HeadShard, check_heads, head_shard


class MHAMaskVariant(str, enum.Enum):
    CAUSAL_MASK = "causal"
    SLIDING_WINDOW_CAUSAL_MASK = "sliding_window_causal"
    NULL_MASK = "null"


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """The hyper-parameters of one attention layer (the non-weight arguments of MAX's
    `TensorParallelAttentionWithRope`).

    `scale` defaults to `1/sqrt(head_dim)`; `qk_norm_eps` is None without qk-norm;
    `sliding_window` is the window of `SLIDING_WINDOW_CAUSAL_MASK` (a token sees itself and
    the previous `window - 1` tokens); `clip_qkv` clamps the q/k/v projection *weights* to
    `[-clip_qkv, clip_qkv]` (MAX's `clip_qkv`). The RoPE layout is the `RotaryEmbedding`'s.
    """

    n_heads: int
    n_kv_heads: int
    head_dim: int
    scale: float | None = None
    mask: MHAMaskVariant = MHAMaskVariant.CAUSAL_MASK
    sliding_window: int | None = None
    qk_norm_eps: float | None = None
    clip_qkv: float | None = None

    def __post_init__(self):
        check_heads(self.n_heads, self.n_kv_heads)
        if self.mask == MHAMaskVariant.SLIDING_WINDOW_CAUSAL_MASK and not (self.sliding_window or 0) > 0:
            raise ValueError("SLIDING_WINDOW_CAUSAL_MASK needs a positive sliding_window")
        if self.clip_qkv is not None and not self.clip_qkv > 0:
            raise ValueError(f"clip_qkv must be positive (or None), got {self.clip_qkv}")

    @property
    def softmax_scale(self) -> float:
        return float(self.scale) if self.scale is not None else 1.0 / math.sqrt(self.head_dim)

    @functools.cache
    def heads(self, tp: int) -> tuple[HeadShard, ...]:
        """The heads of every device of a TP group."""
        return tuple(head_shard(self.n_heads, self.n_kv_heads, tp, r) for r in range(tp))


@dataclasses.dataclass(frozen=True)
class AttentionWeights:
    """One device's attention weights.

    wqkv: `[(n_q + 2 n_kv) * hd, D]` (this device's q heads, then k, then v)
    bqkv: `[(n_q + 2 n_kv) * hd]` or None
    q_norm, k_norm: `[hd]` or None
    wo:   `[D, n_q * hd]`
    """

    wqkv: Array
    wo: Array
    bqkv: Array | None = None
    q_norm: Array | None = None
    k_norm: Array | None = None


@dataclasses.dataclass(frozen=True)
class AttentionInputs:
    """What attention needs about one ragged batch on one device, prepared once per forward
    pass and shared by every layer.

    rope: RoPE tables at the tokens' positions `[T, 1, hd]`.
    page, slot: `[T]` where each new token's k/v goes.
    tables: per sequence, its page ids; lengths/starts: per sequence cache length after/before.
    blocks: per sequence, its `QueryBlock`s.
    decode: when every sequence brings one token (a decode step of several sequences), the
        padded batch that lets all of them attend in one go; else None.
    """

    rope: RopeTables
    page: Array
    slot: Array
    offsets: tuple[int, ...]
    starts: tuple[int, ...]
    lengths: tuple[int, ...]
    tables: tuple
    blocks: tuple
    decode: "DecodeBatch | None" = None


@dataclasses.dataclass(frozen=True)
class DecodeBatch:
    """B sequences with one new token each, padded to the longest: tables `[B, P]` page ids,
    bias `[B, 1, 1, L]` float32 (0 where a key is visible, -inf past a sequence's end or
    outside its window)."""

    tables: Array
    bias: Array


@dataclasses.dataclass(frozen=True)
class QueryBlock:
    """Queries `[a, b)` of a sequence's new tokens and the keys `[lo, hi)` they may see (the
    causal / sliding-window bounds, so masked-out key ranges are never computed).

    bias: `[b-a, hi-lo]` float32, 0 where allowed and -inf where masked; None if all allowed.
    """

    a: int
    b: int
    lo: int
    hi: int
    bias: Array | None


ATTENTION_BLOCK = 256  # queries per block: prefill never holds more than [heads, 256, L] scores


def attention_inputs(cfg: AttentionConfig, rope: RotaryEmbedding, slots: BatchSlots,
                     devices: Sequence[Device], *, block: int = ATTENTION_BLOCK) -> list[AttentionInputs]:
    """Per device `AttentionInputs` for a batch (see `PagedKVCache.reserve` for `slots`).

    `block`: queries per prefill block (scores of at most `[heads, block, L]` at a time).
    """
    cos, sin = rope.cos_sin(slots.positions)  # [T, hd/2] each
    host_rope = RopeTables.build(cos, sin, interleaved=rope.interleaved)
    offs = [int(o) for o in slots.input_row_offsets]
    starts = [int(s) for s in slots.start]
    lengths = [int(s + e - a) for s, a, e in zip(starts, offs[:-1], offs[1:])]
    host_blocks = [list(_query_blocks(cfg, st, e - a0, L, block))  # per sequence (a, b, lo, hi, bias)
                   for st, a0, e, L in zip(starts, offs[:-1], offs[1:], lengths)]
    decode = _decode_batch(cfg, slots, lengths)
    # MAX's distribute_value: one copy of each host array per device.
    pages, slot_ids = distribute_value(slots.page, devices), distribute_value(slots.slot, devices)
    tables = list(zip(*[distribute_value(t, devices) for t in slots.tables])) or [()] * len(devices)
    out = []
    for i, d in enumerate(devices):
        put = lambda a: None if a is None else asarray(a, d)  # noqa: E731
        blocks = tuple(tuple(QueryBlock(a, b, lo, hi, put(bias)) for a, b, lo, hi, bias in seq) for seq in host_blocks)
        dec = None if decode is None else DecodeBatch(put(decode[0]), put(decode[1]))
        out.append(AttentionInputs(host_rope.to(d), pages[i], slot_ids[i], tuple(offs), tuple(starts),
                                   tuple(lengths), tuple(tables[i]), blocks, dec))
    return out


def _decode_batch(cfg: AttentionConfig, slots: BatchSlots, lengths: list[int]):
    """(tables `[B, P]`, bias `[B, 1, 1, L]`) when every sequence has one new token and B > 1."""
    B = len(lengths)
    if B < 2 or len(slots.positions) != B:
        return None
    P = max(len(t) for t in slots.tables)
    tables = np.zeros((B, P), np.int64)  # padding points at page 0; the bias hides it
    for b, t in enumerate(slots.tables):
        tables[b, :len(t)] = t
    L = max(lengths)
    kpos = np.arange(L)[None, :]  # [1, L]
    qpos = slots.positions[:, None]  # [B, 1]: each sequence's one query
    visible = kpos < np.asarray(lengths)[:, None]
    if cfg.mask == MHAMaskVariant.SLIDING_WINDOW_CAUSAL_MASK:
        visible &= kpos > qpos - cfg.sliding_window
    bias = np.where(visible, 0.0, -np.inf).astype(np.float32)
    return tables, bias[:, None, None, :]


def _query_blocks(cfg: AttentionConfig, start: int, n: int, L: int, block: int):
    """`(a, b, lo, hi, bias)` for blocks of `block` queries at positions `start + a ..`."""
    for a in range(0, n, block):
        b = min(n, a + block)
        if cfg.mask == MHAMaskVariant.NULL_MASK:
            yield a, b, 0, L, None
            continue
        window = cfg.sliding_window if cfg.mask == MHAMaskVariant.SLIDING_WINDOW_CAUSAL_MASK else None
        lo, hi = (max(0, start + a - window + 1) if window else 0), start + b
        qpos = np.arange(start + a, start + b)[:, None]  # [b-a, 1]
        kpos = np.arange(lo, hi)[None, :]  # [1, hi-lo]
        allowed = kpos <= qpos
        if window:
            allowed &= kpos > qpos - window
        yield a, b, lo, hi, None if allowed.all() else np.where(allowed, 0.0, -np.inf).astype(np.float32)


# ------------------------------------------------------------------------------------------
# One device.


def qkv_rope(x: Array, w: AttentionWeights, heads: HeadShard, cfg: AttentionConfig,
             rope: RopeTables) -> tuple[Array, Array, Array]:
    """Project and rotate: x `[T, D]` -> q `[T, n_q, hd]`, k, v `[T, n_kv, hd]`."""
    T, hd, nq, nkv = x.shape[0], cfg.head_dim, heads.n_q, heads.n_kv
    qkv = linear(x, w.wqkv, w.bqkv, clip_weight=cfg.clip_qkv).reshape(T, nq + 2 * nkv, hd)  # [T, n_q+2n_kv, hd]
    qk, v = qkv[:, :nq + nkv], qkv[:, nq + nkv:]
    if cfg.qk_norm_eps is not None:
        qk = xp_of(x).concatenate([rms_norm(qk[:, :nq], w.q_norm, eps=cfg.qk_norm_eps),
                                   rms_norm(qk[:, nq:], w.k_norm, eps=cfg.qk_norm_eps)], axis=1)
    qk = rotate(qk, rope)  # q and k heads in one go
    return qk[:, :nq], qk[:, nq:], v


def attend(q: Array, k: Array, v: Array, heads: HeadShard, blocks: Sequence[QueryBlock], scale: float) -> Array:
    """Softmax attention of one sequence's new queries over its cached keys (float32).

    Args:
        q: `[n, n_q, hd]`; k, v: `[L, n_kv, hd]`.
        heads: the device's heads (which local kv head each local q head reads).
        blocks: the query blocks, their key ranges and masks.
    Returns:
        `[n, n_q, hd]` in float32.
    """
    xp = xp_of(q)
    n, nq, hd = q.shape
    q = q.astype(np.float32) * scale  # scale the few queries, not the many scores
    k, v = k.astype(np.float32, copy=False), v.astype(np.float32, copy=False)
    if heads.grouped:
        nkv, g = k.shape[1], nq // k.shape[1]
    else:  # irregular head map (kv heads replicated unevenly): one kv head per q head
        k, v, nkv, g = k[:, heads.kv_of_q()], v[:, heads.kv_of_q()], nq, 1
    kt, vt = k.transpose(1, 2, 0), v.transpose(1, 0, 2)  # [nkv, hd, L], [nkv, L, hd]
    out = xp.empty((n, nq, hd), np.float32)
    for blk in blocks:
        nb = blk.b - blk.a
        qh = q[blk.a:blk.b].reshape(nb, nkv, g, hd).transpose(1, 2, 0, 3).reshape(nkv, g * nb, hd)
        s = qh @ kt[:, :, blk.lo:blk.hi]  # [nkv, g*nb, K]
        if blk.bias is not None:
            s = s.reshape(nkv, g, nb, -1)
            s += blk.bias  # -inf where masked
            s = s.reshape(nkv, g * nb, -1)
        s -= s.max(axis=-1, keepdims=True)
        xp.exp(s, out=s)
        o = s @ vt[:, blk.lo:blk.hi]  # [nkv, g*nb, hd], unnormalised
        o /= s.sum(axis=-1, keepdims=True)
        out[blk.a:blk.b] = o.reshape(nkv, g, nb, hd).transpose(2, 0, 1, 3).reshape(nb, nq, hd)
    return out  # [n, n_q, hd]


def attend_decode(q: Array, pages: Array, layer: int, heads: HeadShard, dec: DecodeBatch, scale: float) -> Array:
    """One decode step of B sequences at once: q `[B, n_q, hd]` -> `[B, n_q, hd]` float32."""
    xp = xp_of(q)
    B, nq, hd = q.shape
    kv = pages[layer][:, dec.tables]  # [2, B, P, page_size, n_kv, hd]
    kv = kv.reshape(2, B, -1, *kv.shape[-2:])[:, :, :dec.bias.shape[-1]].astype(np.float32, copy=False)
    k, v = kv[0], kv[1]  # [B, L, n_kv, hd]
    if heads.grouped:
        nkv, g = k.shape[2], nq // k.shape[2]
    else:  # irregular head map: one kv head per q head
        k, v, nkv, g = k[:, :, heads.kv_of_q()], v[:, :, heads.kv_of_q()], nq, 1
    qh = (q.astype(np.float32) * scale).reshape(B, nkv, g, hd)  # [B, nkv, g, hd]
    s = qh @ k.transpose(0, 2, 3, 1)  # [B, nkv, g, L]
    s += dec.bias
    s -= s.max(axis=-1, keepdims=True)
    xp.exp(s, out=s)
    o = s @ v.transpose(0, 2, 1, 3)  # [B, nkv, g, hd], unnormalised
    o /= s.sum(axis=-1, keepdims=True)
    return o.reshape(B, nq, hd)


def attention_local(x: Array, w: AttentionWeights, heads: HeadShard, cfg: AttentionConfig,
                    inp: AttentionInputs, pages: Array, layer: int) -> Array:
    """One device's attention: x `[T, D]` -> o_proj partial `[T, D]` (not yet reduced)."""
    q, k, v = qkv_rope(x, w, heads, cfg, inp.rope)
    write_kv(pages, layer, k, v, inp.page, inp.slot)
    scale = cfg.softmax_scale
    if inp.decode is not None:
        o = attend_decode(q, pages, layer, heads, inp.decode, scale)  # [B, n_q, hd]
        return linear(o.reshape(x.shape[0], -1).astype(x.dtype, copy=False), w.wo)  # [B, D]
    out = xp_of(x).empty(q.shape, np.float32)  # [T, n_q, hd]
    for b, table in enumerate(inp.tables):
        a, e = inp.offsets[b], inp.offsets[b + 1]
        kb, vb = gather_kv(pages, layer, table, inp.lengths[b])  # [L, n_kv, hd]
        out[a:e] = attend(q[a:e], kb, vb, heads, inp.blocks[b], scale)
    o = out.reshape(x.shape[0], -1).astype(x.dtype, copy=False)  # [T, n_q * hd]
    return linear(o, w.wo)  # [T, D]


# ------------------------------------------------------------------------------------------
# Tensor parallel.


def tensor_parallel_attention_with_rope(xs: Sequence[Array], ws: Sequence[AttentionWeights],
                                        cfg: AttentionConfig, inputs: Sequence[AttentionInputs],
                                        kv_pages: Sequence[Array], layer: int, comm: Communicator, *,
                                        threads: bool = False) -> list[Array]:
    """MAX's `TensorParallelAttentionWithRope`: every device's heads, then one all-reduce.

    Args:
        xs: per device `[T, D]` (replicated, already normed).
        ws: per device `AttentionWeights`.
        inputs: per device `AttentionInputs` of this batch (from `attention_inputs`).
        kv_pages: per device the paged KV cache (`PagedKVCache.pages`) whose slots the caller
            reserved for this batch; this layer's K/V are written into them.
        threads: run the devices' shares on their own threads (see `per_device`).
    Returns:
        per device `[T, D]`.
    """
    heads = local_heads(cfg, comm)
    partials = per_device(lambda x, w, h, inp, pages: attention_local(x, w, h, cfg, inp, pages, layer),
                          xs, ws, heads, inputs, kv_pages, devices=comm.devices,
                          threads=threads)  # per device [T, D] partial
    return comm.allreduce_sum(partials)  # -> [T, D]


def local_heads(cfg: AttentionConfig, comm: Communicator) -> list[HeadShard]:
    """The heads of each device `comm` drives (by the device's index in the whole group)."""
    group = cfg.heads(comm.tp)
    return [group[r] for r in comm.ranks]


def materialize_kv_from_hidden(layer_idx: int, hiddens: Sequence[Array], ws: Sequence[AttentionWeights],
                               cfg: AttentionConfig, kv_pages: Sequence[Array],
                               inputs: Sequence[AttentionInputs], comm: Communicator) -> None:
    """Project hidden states to k/v (with qk-norm and RoPE) and store them in the cache.

    q is discarded and no collective runs. Used by speculative-decoding draft models to
    build their cache from the target model's hidden states.

    Args:
        hiddens: per device `[T, D]`; kv_pages, inputs: as for
            `tensor_parallel_attention_with_rope`.
    """
    def one(x, w, h, inp, pages):
        _, k, v = qkv_rope(x, w, h, cfg, inp.rope)
        write_kv(pages, layer_idx, k, v, inp.page, inp.slot)

    per_device(one, hiddens, ws, local_heads(cfg, comm), inputs, kv_pages, devices=comm.devices)
