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

from .comm import Communicator
from .devices import Array, Device, asarray, xp_of
from .distributed import per_device
from .kv_cache import BatchSlots, PagedKVCache, gather_kv, write_kv
from .layers import RopeTables, RotaryEmbedding, linear, rms_norm, rotate
from .sharding import HeadShard, head_shard


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
    the previous `window - 1` tokens); `interleaved` is the RoPE layout.
    """

    n_heads: int
    n_kv_heads: int
    head_dim: int
    scale: float | None = None
    mask: MHAMaskVariant = MHAMaskVariant.CAUSAL_MASK
    sliding_window: int | None = None
    qk_norm_eps: float | None = None
    interleaved: bool = False

    def __post_init__(self):
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if self.mask == MHAMaskVariant.SLIDING_WINDOW_CAUSAL_MASK and not (self.sliding_window or 0) > 0:
            raise ValueError("SLIDING_WINDOW_CAUSAL_MASK needs a positive sliding_window")

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
    masks: per sequence `[n, L]` bool, or None where nothing is masked.
    """

    rope: RopeTables
    page: Array
    slot: Array
    offsets: tuple[int, ...]
    starts: tuple[int, ...]
    lengths: tuple[int, ...]
    tables: tuple
    masks: tuple


def attention_inputs(cfg: AttentionConfig, rope: RotaryEmbedding, slots: BatchSlots,
                     devices: Sequence[Device]) -> list[AttentionInputs]:
    """Per device `AttentionInputs` for a batch (see `PagedKVCache.reserve` for `slots`)."""
    cos, sin = rope.cos_sin(slots.positions)  # [T, hd/2] each
    host_rope = RopeTables.build(cos, sin, interleaved=cfg.interleaved)
    offs = [int(o) for o in slots.input_row_offsets]
    starts = [int(s) for s in slots.start]
    lengths = [int(s + e - a) for s, a, e in zip(starts, offs[:-1], offs[1:])]
    masks = [_mask(cfg, st, e - a, L) for st, a, e, L in zip(starts, offs[:-1], offs[1:], lengths)]
    out = []
    for d in devices:
        put = lambda a: None if a is None else asarray(a, d)  # noqa: E731
        out.append(AttentionInputs(host_rope.to(d), put(slots.page), put(slots.slot), tuple(offs), tuple(starts),
                                   tuple(lengths), tuple(put(t) for t in slots.tables), tuple(put(m) for m in masks)))
    return out


def _mask(cfg: AttentionConfig, start: int, n: int, L: int) -> np.ndarray | None:
    """`[n, L]` allowed keys for queries at `start .. start+n-1`; None if all are allowed."""
    if cfg.mask == MHAMaskVariant.NULL_MASK:
        return None
    qpos = np.arange(start, start + n)[:, None]
    kpos = np.arange(L)[None, :]
    allowed = kpos <= qpos
    if cfg.mask == MHAMaskVariant.SLIDING_WINDOW_CAUSAL_MASK:
        allowed &= kpos > qpos - cfg.sliding_window
    return None if allowed.all() else allowed


# ------------------------------------------------------------------------------------------
# One device.


def qkv_rope(x: Array, w: AttentionWeights, heads: HeadShard, cfg: AttentionConfig,
             rope: RopeTables) -> tuple[Array, Array, Array]:
    """Project and rotate: x `[T, D]` -> q `[T, n_q, hd]`, k, v `[T, n_kv, hd]`."""
    T, hd, nq, nkv = x.shape[0], cfg.head_dim, heads.n_q, heads.n_kv
    qkv = linear(x, w.wqkv, w.bqkv).reshape(T, nq + 2 * nkv, hd)  # [T, n_q + 2 n_kv, hd]
    qk, v = qkv[:, :nq + nkv], qkv[:, nq + nkv:]
    if cfg.qk_norm_eps is not None:
        qk = xp_of(x).concatenate([rms_norm(qk[:, :nq], w.q_norm, eps=cfg.qk_norm_eps),
                                   rms_norm(qk[:, nq:], w.k_norm, eps=cfg.qk_norm_eps)], axis=1)
    qk = rotate(qk, rope)  # q and k heads in one go
    return qk[:, :nq], qk[:, nq:], v


def attend(q: Array, k: Array, v: Array, kv_of_q: np.ndarray, mask: Array | None, scale: float) -> Array:
    """Softmax attention of one sequence's new queries over its cached keys (float32).

    Args:
        q: `[n, n_q, hd]`; k, v: `[L, n_kv, hd]`.
        kv_of_q: `[n_q]` local kv head of each local q head (GQA).
        mask: `[n, L]` allowed keys, or None (all allowed).
    Returns:
        `[n, n_q, hd]` in float32.
    """
    xp = xp_of(q)
    n, nq, hd = q.shape
    L = k.shape[0]
    q, k, v = (a.astype(np.float32, copy=False) for a in (q, k, v))
    nkv = k.shape[1]
    g = nq // nkv
    if not (nq == nkv * g and np.array_equal(kv_of_q, np.repeat(np.arange(nkv), g))):
        k, v, nkv, g = k[:, kv_of_q], v[:, kv_of_q], nq, 1  # irregular head map: one kv per q
    qh = q.reshape(n, nkv, g, hd).transpose(1, 2, 0, 3).reshape(nkv, g * n, hd)  # [nkv, g*n, hd]
    s = qh @ k.transpose(1, 2, 0)  # [nkv, g*n, L]
    s *= scale
    if mask is not None:
        s = xp.where(mask, s.reshape(nkv, g, n, L), np.float32(-np.inf)).reshape(nkv, g * n, L)
    s -= s.max(axis=-1, keepdims=True)
    p = xp.exp(s)
    p /= p.sum(axis=-1, keepdims=True)
    o = p @ v.transpose(1, 0, 2)  # [nkv, g*n, hd]
    return o.reshape(nkv, g, n, hd).transpose(2, 0, 1, 3).reshape(n, nq, hd)  # [n, n_q, hd]


def attention_local(x: Array, w: AttentionWeights, heads: HeadShard, cfg: AttentionConfig,
                    inp: AttentionInputs, pages: Array, layer: int) -> Array:
    """One device's attention: x `[T, D]` -> o_proj partial `[T, D]` (not yet reduced)."""
    q, k, v = qkv_rope(x, w, heads, cfg, inp.rope)
    write_kv(pages, layer, k, v, inp.page, inp.slot)
    kv_of_q, scale = heads.kv_of_q(), cfg.softmax_scale
    out = xp_of(x).empty(q.shape, np.float32)  # [T, n_q, hd]
    for b, table in enumerate(inp.tables):
        a, e = inp.offsets[b], inp.offsets[b + 1]
        kb, vb = gather_kv(pages, layer, table, inp.lengths[b])  # [L, n_kv, hd]
        out[a:e] = attend(q[a:e], kb, vb, kv_of_q, inp.masks[b], scale)
    o = out.reshape(x.shape[0], -1).astype(x.dtype, copy=False)  # [T, n_q * hd]
    return linear(o, w.wo)  # [T, D]


# ------------------------------------------------------------------------------------------
# Tensor parallel.


def tensor_parallel_attention_with_rope(xs: Sequence[Array], ws: Sequence[AttentionWeights],
                                        cfg: AttentionConfig, inputs: Sequence[AttentionInputs],
                                        cache: PagedKVCache, layer: int, comm: Communicator) -> list[Array]:
    """Attention over every device's heads, then one all-reduce.

    Args:
        xs: per device `[T, D]` (replicated, already normed).
        ws: per device `AttentionWeights`.
        inputs: per device `AttentionInputs` of this batch (from `attention_inputs`).
        cache: the paged KV cache the batch's pages were reserved in.
    Returns:
        per device `[T, D]`.
    """
    heads = cfg.heads(len(xs))
    partials = per_device(lambda x, w, h, inp, pages: attention_local(x, w, h, cfg, inp, pages, layer),
                          xs, ws, heads, inputs, cache.pages)
    return comm.allreduce_sum(partials)


def materialize_kv_from_hidden(layer_idx: int, hiddens: Sequence[Array], ws: Sequence[AttentionWeights],
                               cfg: AttentionConfig, cache: PagedKVCache,
                               inputs: Sequence[AttentionInputs]) -> None:
    """Project hidden states to k/v (with qk-norm and RoPE) and store them in the cache.

    q is discarded and no collective runs. Used by speculative-decoding draft models to
    build their cache from the target model's hidden states.
    """
    heads = cfg.heads(len(hiddens))

    def one(x, w, h, inp, pages):
        _, k, v = qkv_rope(x, w, h, cfg, inp.rope)
        write_kv(pages, layer_idx, k, v, inp.page, inp.slot)

    per_device(one, hiddens, ws, heads, inputs, cache.pages)
