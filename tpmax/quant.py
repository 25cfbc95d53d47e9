"""Quantized linears: GPTQ 4-bit (HF layout) and FP8 e4m3, each defined as
dequantize-then-matmul, plus their row-wise (output-feature) shards for tensor parallelism.
"""
from __future__ import annotations

import numpy as np

from .devices import Array, float8_e4m3fn, xp_of
from .layers import linear
from .sharding import split_bounds

# ------------------------------------------------------------------------------------------
# GPTQ: qweight int32 [in/8, out] holds 8 nibbles along `in` (nibble j of word i is input row
# 8i + j); scales fp16 [in/group, out]; symmetric, zero point 8; g_idx [in] maps each input
# row to its scale group (act-order / desc_act checkpoints permute it).


def gptq_dequantize(qweight: Array, scales: Array, g_idx: Array | None = None, /, *,
                    group_size: int | None = None) -> Array:
    """The float32 weight `[out, in]` of a 4-bit GPTQ linear.

    Args:
        qweight: int32 `[in/8, out]`; scales: `[n_groups, out]`; g_idx: int `[in]` or None
        (then `group_size` gives `g_idx = arange(in) // group_size`).
    """
    xp = xp_of(qweight)
    n_in = qweight.shape[0] * 8
    shifts = xp.arange(0, 32, 4, dtype=np.uint32)  # [8]
    q = (qweight.view(np.uint32)[:, None, :] >> shifts[None, :, None]) & 0xF  # [in/8, 8, out]
    q = q.reshape(n_in, -1).astype(np.float32) - 8.0  # [in, out]
    if g_idx is None:
        if not group_size:
            raise ValueError("gptq_dequantize needs g_idx or group_size")
        g_idx = xp.arange(n_in) // group_size
    if len(g_idx) != n_in:
        raise ValueError(f"g_idx has {len(g_idx)} entries for {n_in} input features")
    return (q * scales.astype(np.float32)[g_idx]).T  # [out, in]


def gptq_linear(x: Array, qweight: Array, scales: Array, g_idx: Array | None = None, bias: Array | None = None,
                /, *, group_size: int | None = None) -> Array:
    """`x @ dequantize(W).T + b` for x `[T, in]` -> `[T, out]` (float32)."""
    w = gptq_dequantize(qweight, scales, g_idx, group_size=group_size)
    return linear(x.astype(np.float32, copy=False), w, bias)


def gptq_pack(q: np.ndarray) -> np.ndarray:
    """Pack 4-bit values `q [in, out]` (0..15) into GPTQ's int32 `[in/8, out]`."""
    n_in, n_out = q.shape
    if n_in % 8:
        raise ValueError(f"GPTQ needs in_features divisible by 8, got {n_in}")
    q = q.astype(np.uint32).reshape(n_in // 8, 8, n_out)
    packed = np.zeros((n_in // 8, n_out), np.uint32)
    for j in range(8):
        packed |= q[:, j] << np.uint32(4 * j)
    return packed.view(np.int32)


def gptq_shard_rowwise(qweight, scales, tp: int, rank: int):
    """Device `rank`'s output features of a GPTQ linear (the column-parallel split)."""
    a, b = split_bounds(qweight.shape[1], tp)[rank]
    return qweight[:, a:b], scales[:, a:b]


# ------------------------------------------------------------------------------------------
# FP8 (e4m3) with a per-tensor scale `[]` or a per-row scale `[out]` / `[out, 1]`.


def fp8_dequantize(w: Array, scale: Array, /) -> Array:
    """float32 `[out, in]` = e4m3 weight times its scale."""
    if w.dtype != float8_e4m3fn:
        raise ValueError(f"FP8 weight must be float8_e4m3fn, got {w.dtype}")
    s = scale.astype(np.float32).reshape(-1, 1) if scale.size > 1 else scale.astype(np.float32).reshape(())
    if scale.size > 1 and s.shape[0] != w.shape[0]:
        raise ValueError(f"row-wise FP8 scale has {s.shape[0]} rows for a weight of {w.shape[0]}")
    return w.astype(np.float32) * s


def fp8_linear(x: Array, w: Array, scale: Array, bias: Array | None = None, /) -> Array:
    """`x @ (w * scale).T + b` -> `[T, out]` float32."""
    return linear(x.astype(np.float32, copy=False), fp8_dequantize(w, scale), bias)


def fp8_quantize(w: np.ndarray, *, rowwise: bool) -> tuple[np.ndarray, np.ndarray]:
    """e4m3 weight and scale (per row or per tensor) such that `w ~= q * scale`."""
    amax = np.abs(w).max(axis=1, keepdims=True) if rowwise else np.abs(w).max()
    scale = (np.maximum(amax, 1e-12) / 448.0).astype(np.float32)  # 448 = e4m3 max
    return (w / scale).astype(float8_e4m3fn), scale.reshape(-1) if rowwise else scale.reshape(())
