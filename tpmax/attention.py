"""Tensor-parallel attention with RoPE over the paged KV cache (MAX's
`TensorParallelAttentionWithRope`), and `materialize_kv_from_hidden`.

Per device: fused qkv projection (+bias) -> optional per-head RMSNorm on q and k -> RoPE at
each token's absolute position -> `write_kv` -> attention over the cache (GQA) -> o_proj
partial; then one all-reduce over devices.
"""
from __future__ import annotations

import dataclasses
import enum
import math
from typing import Sequence

import numpy as np

from .comm import Communicator
from .devices import Array, xp_of
from .distributed import per_device
from .kv_cache import BatchSlots, PagedKVCache, gather_kv, write_kv
from .layers import apply_rope, linear, rms_norm
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

    def heads(self, tp: int) -> list[HeadShard]:
        """The heads of every device of a TP group."""
        return [head_shard(self.n_heads, self.n_kv_heads, tp, r) for r in range(tp)]


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


# ------------------------------------------------------------------------------------------
# One device.


def qkv_rope(x: Array, w: AttentionWeights, heads: HeadShard, cfg: AttentionConfig,
             cos: Array, sin: Array) -> tuple[Array, Array, Array]:
    """Project and rotate: x `[T, D]` -> q `[T, n_q, hd]`, k, v `[T, n_kv, hd]`."""
    T, hd = x.shape[0], cfg.head_dim
    qkv = linear(x, w.wqkv, w.bqkv)  # [T, (n_q + 2 n_kv) * hd]
    nq, nkv = heads.n_q * hd, heads.n_kv * hd
    q = qkv[:, :nq].reshape(T, heads.n_q, hd)  # [T, n_q, hd]
    k = qkv[:, nq:nq + nkv].reshape(T, heads.n_kv, hd)  # [T, n_kv, hd]
    v = qkv[:, nq + nkv:].reshape(T, heads.n_kv, hd)
    if cfg.qk_norm_eps is not None:
        q = rms_norm(q, w.q_norm, eps=cfg.qk_norm_eps)
        k = rms_norm(k, w.k_norm, eps=cfg.qk_norm_eps)
    q = apply_rope(q, cos, sin, interleaved=cfg.interleaved)
    k = apply_rope(k, cos, sin, interleaved=cfg.interleaved)
    return q, k, v


def attend(q: Array, k: Array, v: Array, kv_of_q: np.ndarray, q_start: int, cfg: AttentionConfig) -> Array:
    """Softmax attention of one sequence's new queries over its cached keys (float32).

    Args:
        q: `[n, n_q, hd]` queries at positions `q_start .. q_start + n - 1`.
        k, v: `[L, n_kv, hd]` keys/values at positions `0 .. L-1`.
        kv_of_q: `[n_q]` local kv head of each local q head (GQA).
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
    s *= cfg.softmax_scale
    if cfg.mask != MHAMaskVariant.NULL_MASK:
        qpos = np.tile(np.arange(q_start, q_start + n), g)[:, None]  # [g*n, 1]
        kpos = np.arange(L)[None, :]  # [1, L]
        allowed = kpos <= qpos
        if cfg.mask == MHAMaskVariant.SLIDING_WINDOW_CAUSAL_MASK:
            allowed &= kpos > qpos - cfg.sliding_window
        s = xp.where(xp.asarray(allowed), s, np.float32(-np.inf))
    s -= s.max(axis=-1, keepdims=True)
    p = xp.exp(s)
    p /= p.sum(axis=-1, keepdims=True)
    o = p @ v.transpose(1, 0, 2)  # [nkv, g*n, hd]
    return o.reshape(nkv, g, n, hd).transpose(2, 0, 1, 3).reshape(n, nq, hd)  # [n, n_q, hd]


def attention_local(x: Array, w: AttentionWeights, heads: HeadShard, cfg: AttentionConfig,
                    cos: Array, sin: Array, pages: Array, layer: int, slots: BatchSlots) -> Array:
    """One device's attention: x `[T, D]` -> o_proj partial `[T, D]` (not yet reduced)."""
    q, k, v = qkv_rope(x, w, heads, cfg, cos, sin)
    write_kv(pages, layer, k, v, slots)
    kv_of_q = heads.kv_of_q()
    out = xp_of(x).empty(q.shape, np.float32)  # [T, n_q, hd]
    offs = slots.input_row_offsets
    for b, table in enumerate(slots.tables):
        a, e = int(offs[b]), int(offs[b + 1])
        kb, vb = gather_kv(pages, layer, table, int(slots.start[b]) + e - a)  # [L, n_kv, hd]
        out[a:e] = attend(q[a:e], kb, vb, kv_of_q, int(slots.start[b]), cfg)
    o = out.reshape(x.shape[0], -1).astype(x.dtype, copy=False)  # [T, n_q * hd]
    return linear(o, w.wo)  # [T, D]


# ------------------------------------------------------------------------------------------
# Tensor parallel.


def tensor_parallel_attention_with_rope(xs: Sequence[Array], ws: Sequence[AttentionWeights],
                                        cfg: AttentionConfig, rope_cs, cache: PagedKVCache,
                                        layer: int, slots: BatchSlots, comm: Communicator) -> list[Array]:
    """Attention over every device's heads, then one all-reduce.

    Args:
        xs: per device `[T, D]` (replicated, already normed).
        ws: per device `AttentionWeights`.
        rope_cs: per device `(cos, sin)`, each `[T, hd/2]`, at the tokens' positions.
        cache: the paged KV cache; `slots` from `cache.reserve` for this batch.
    Returns:
        per device `[T, D]`.
    """
    heads = cfg.heads(len(xs))
    partials = per_device(
        lambda x, w, h, cs, pages: attention_local(x, w, h, cfg, cs[0], cs[1], pages, layer, slots),
        xs, ws, heads, rope_cs, cache.pages)
    return comm.allreduce_sum(partials)


def materialize_kv_from_hidden(layer_idx: int, hiddens: Sequence[Array], ws: Sequence[AttentionWeights],
                               cfg: AttentionConfig, cache: PagedKVCache, rope_cs, slots: BatchSlots) -> None:
    """Project hidden states to k/v (with qk-norm and RoPE) and store them in the cache.

    q is discarded and no collective runs. Used by speculative-decoding draft models to
    build their cache from the target model's hidden states.
    """
    heads = cfg.heads(len(hiddens))

    def one(x, w, h, cs, pages):
        _, k, v = qkv_rope(x, w, h, cfg, cs[0], cs[1])
        write_kv(pages, layer_idx, k, v, slots)

    per_device(one, hiddens, ws, heads, rope_cs, cache.pages)
