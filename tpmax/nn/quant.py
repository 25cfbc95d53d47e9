"""Quantized linears kept quantized on the device: GPTQ / compressed-tensors integer weights
(`GPTQWeight`) and FP8 e4m3 weights (`FP8Weight`), their fusion along `out` (`concat_out`),
and the MAX-seed functions over them (`gptq_linear`, `fp8_linear`, ...). How a checkpoint
declares its quantization is `quant_config.py`; reading one device's piece of a checkpoint,
still packed, is `quant_read.py`.

Every quantized weight is plain frozen data with a logical shape `[out, in]`, its resident
`nbytes`, a reference `dequantize()` and `matmul_t(x) = x @ W.T`, computed a block of output
features at a time so no full float32 copy of the weight exists during a call. The same body
of math serves NumPy (`cpu:i`) and CuPy (`gpu:i`); FP8 weights are stored as their uint8 bits
and decoded through a 256-entry table, since CuPy has no float8 dtype.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from ..core.devices import Array, Device, asarray, float8_e4m3fn, xp_of

# Output features dequantized per step of `matmul_t`: the float32 block is at most this many
# bytes (or one row when a single row is larger).
BLOCK_BYTES = 4 << 20


def _out_blocks(n_out: int, n_in: int, block_bytes: int | None):
    step = max(1, (block_bytes or BLOCK_BYTES) // (4 * max(1, n_in)))
    return [(a, min(a + step, n_out)) for a in range(0, n_out, step)]


def _compute_x(x: Array) -> Array:
    return x if x.dtype == np.float32 else x.astype(np.float32)


# ------------------------------------------------------------------------------------------
# Integer packing: `bits`-bit values packed 32/bits to an int32 word, value j of a word in bits
# [j*bits, (j+1)*bits) (GPTQ packs along `in`, compressed-tensors along the last axis).

PACKED_BITS = (2, 4, 8)


def unpack_int32(packed: Array, bits: int, *, axis: int) -> Array:
    """Unsigned `bits`-bit values of int32 words, unpacked along `axis` (0 or 1) of a 2-D array.

    `[n, m]` packed along axis 0 -> `[n * 32/bits, m]` (uint8); along axis 1 -> `[n, m * 32/bits]`.
    """
    xp = xp_of(packed)
    pf = 32 // bits
    shifts = xp.arange(0, 32, bits, dtype=np.uint32)  # [pf]
    u = packed.view(np.uint32) if packed.dtype == np.int32 else packed.astype(np.uint32)
    mask = np.uint32((1 << bits) - 1)
    if axis == 0:
        q = (u[:, None, :] >> shifts[None, :, None]) & mask  # [n, pf, m]
        return q.reshape(u.shape[0] * pf, u.shape[1]).astype(np.uint8)
    q = (u[:, :, None] >> shifts[None, None, :]) & mask  # [n, m, pf]
    return q.reshape(u.shape[0], u.shape[1] * pf).astype(np.uint8)


def pack_int32(q: np.ndarray, bits: int, *, axis: int) -> np.ndarray:
    """Pack unsigned `bits`-bit values `q` (2-D) into int32 words along `axis`, zero-padded."""
    pf = 32 // bits
    q = np.asarray(q).astype(np.uint32)
    if axis == 1:
        return pack_int32(q.T, bits, axis=0).T.copy()
    n = q.shape[0]
    pad = -n % pf
    if pad:
        q = np.concatenate([q, np.zeros((pad, q.shape[1]), np.uint32)], axis=0)
    q = q.reshape(-1, pf, q.shape[1])  # [n/pf, pf, m]
    packed = np.zeros((q.shape[0], q.shape[2]), np.uint32)
    for j in range(pf):
        packed |= q[:, j] << np.uint32(bits * j)
    return packed.view(np.int32)


# ------------------------------------------------------------------------------------------
# GPTQWeight: W[o, i] = (q[i, o] - zeros[g_idx[i], o]) * scales[g_idx[i], o].


@dataclasses.dataclass(frozen=True)
class GPTQWeight:
    """An integer-quantized linear (GPTQ, or compressed-tensors pack-quantized), one device's piece.

    qweight: int32 `[ceil(in / pf), out]`, pf = 32/bits values per word along `in` (zero-padded)
    scales: float16/float32 `[groups, out]`
    zeros: uint8 (uint16 if one is 256) `[groups, out]`, the real zero points (GPTQ v1's +1 applied)
    g_idx: int16 (int32 past 32767 groups) `[in]`, the local group of each input feature
    group_size: g when `g_idx[i] == i // g` and g divides `in` (groups in order, whole), else 0;
    then the matmul skips the g_idx gathers (`uniform_group_size` finds it on the host)
    """

    qweight: Array
    scales: Array
    zeros: Array
    g_idx: Array
    bits: int
    in_features: int
    group_size: int = 0

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.qweight.shape[1]), self.in_features)

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in (self.qweight, self.scales, self.zeros, self.g_idx)))

    def _ints(self, a: int, b: int) -> Array:
        """float32 `[in, b - a]`: the unsigned integers of output features `[a, b)`."""
        return unpack_int32(self.qweight[:, a:b], self.bits, axis=0)[: self.in_features].astype(np.float32)

    def _block(self, a: int, b: int) -> Array:
        """float32 `[in, b - a]` = dequantized W.T for output features `[a, b)`."""
        q = self._ints(a, b)
        z, s = self.zeros[:, a:b].astype(np.float32), self.scales[:, a:b].astype(np.float32)  # [groups, b-a]
        if self.group_size:
            gs = self.group_size
            q = q.reshape(-1, gs, b - a)  # [groups, gs, b-a]
            return ((q - z[:, None]) * s[:, None]).reshape(self.in_features, b - a)
        return (q - z[self.g_idx]) * s[self.g_idx]  # [in, b-a]

    def dequantize(self) -> Array:
        """The float32 weight `[out, in]` (the reference the blocked matmul is tested against)."""
        return self._block(0, self.shape[0]).T

    def matmul_t(self, x: Array, /, *, block_bytes: int | None = None) -> Array:
        """`x @ W.T` for x `[..., in]` -> `[..., out]`, a block of output features at a time.

        With whole, ordered groups and few rows (decode), the scales and zeros are applied after
        the per-group products instead of to the weight: y = sum_g s_g (x_g @ q_g - sum(x_g) z_g).
        """
        xp = xp_of(self.qweight)
        xf = _compute_x(x)
        lead, n_in, n_out = xf.shape[:-1], self.in_features, self.shape[0]
        x2 = xf.reshape(-1, n_in)  # [T, in]
        T, gs = x2.shape[0], self.group_size
        y = xp.empty((T, n_out), np.float32)
        if gs and T <= gs:
            G = n_in // gs
            xg = x2.reshape(T, G, gs).transpose(1, 0, 2)  # [G, T, gs]
            xsum = xg.sum(-1).T  # [T, G]
        for a, b in _out_blocks(n_out, n_in, block_bytes):
            if gs and T <= gs:
                q = self._ints(a, b).reshape(G, gs, b - a)  # [G, gs, b-a]
                s = self.scales[:, a:b].astype(np.float32)  # [G, b-a]
                part = xp.matmul(xg, q)  # [G, T, b-a]
                y[:, a:b] = (part * s[:, None]).sum(0) - xsum @ (self.zeros[:, a:b].astype(np.float32) * s)
            else:
                y[:, a:b] = x2 @ self._block(a, b)  # [T, in] @ [in, b-a]
        y = y.reshape(lead + (n_out,))
        return y if x.dtype == np.float32 else y.astype(x.dtype)

    def to(self, device: Device) -> "GPTQWeight":
        return dataclasses.replace(self, **{f: asarray(getattr(self, f), device)
                                            for f in ("qweight", "scales", "zeros", "g_idx")})

    def take_out(self, a: int, b: int) -> "GPTQWeight":
        """Output features `[a, b)` (no copy of other features)."""
        return dataclasses.replace(self, qweight=self.qweight[:, a:b], scales=self.scales[:, a:b],
                                   zeros=self.zeros[:, a:b])


# ------------------------------------------------------------------------------------------
# FP8Weight: W = e4m3(bits) * scale, scale per tensor `[]`, per row `[out]`, or per block
# `[ceil(out/bo), ceil(in/bi)]` (the piece may start inside a block: `origin`).


def _e4m3_table() -> np.ndarray:
    return np.arange(256, dtype=np.uint8).view(float8_e4m3fn).astype(np.float32)


E4M3_TABLE = _e4m3_table()  # [256] float32: the value of each uint8 bit pattern (NaN at 0x7f/0xff)
# [65536] uint64: two float32 values per little-endian byte pair (NumPy decodes pairs: half the
# lookups of E4M3_TABLE, ~1.5x faster on a 2-core host)
_PAIR = np.arange(65536, dtype=np.uint32)
E4M3_PAIRS = np.stack([E4M3_TABLE[_PAIR & 0xFF], E4M3_TABLE[_PAIR >> 8]], -1).view(np.uint64).reshape(-1)
del _PAIR
_device_tables: dict = {}


def decode_e4m3(w: Array) -> Array:
    """float32 values of e4m3 bit patterns `w` (uint8), on w's device."""
    xp = xp_of(w)
    if xp is np:
        if w.ndim == 2 and w.shape[1] % 2 == 0 and w.flags.c_contiguous and np.little_endian:
            return E4M3_PAIRS.take(w.view(np.uint16)).view(np.float32).reshape(w.shape)
        return E4M3_TABLE.take(w)
    key = w.device.id
    if key not in _device_tables:
        _device_tables[key] = xp.asarray(E4M3_TABLE)
    return _device_tables[key][w]


@dataclasses.dataclass(frozen=True)
class FP8Weight:
    """An FP8 (e4m3) linear, one device's piece.

    w: uint8 `[out, in]`, the e4m3 bit patterns
    scale: float32 `[]` (tensor), `[out]` (channel) or `[block rows, block cols]` (block)
    block: `(bo, bi)` for block scales, else None; origin: `(r, c)` offset of the piece's
    first element inside its block (0 unless a split cut a block)
    """

    w: Array
    scale: Array
    block: tuple[int, int] | None = None
    origin: tuple[int, int] = (0, 0)

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.w.shape[0]), int(self.w.shape[1]))

    @property
    def nbytes(self) -> int:
        return int(self.w.nbytes + self.scale.nbytes)

    @property
    def kind(self) -> str:
        return "block" if self.block else ("channel" if self.scale.ndim == 1 else "tensor")

    def _scale_rows(self, a: int, b: int) -> Array:
        """float32 scale broadcastable to rows `[a, b)` of w: `[]`, `[b-a, 1]` or `[b-a, in]`."""
        xp = xp_of(self.w)
        if self.block is None:
            return self.scale if self.scale.ndim == 0 else self.scale[a:b, None]
        (bo, bi), (r0, c0) = self.block, self.origin
        rb = (xp.arange(a, b) + r0) // bo  # [b-a] block row of each row
        cb = (xp.arange(self.shape[1]) + c0) // bi  # [in] block column of each column
        return self.scale[rb[:, None], cb[None, :]]  # [b-a, in]

    def _block(self, a: int, b: int) -> Array:
        """float32 rows `[a, b)` of W `[b-a, in]`."""
        return decode_e4m3(self.w[a:b]) * self._scale_rows(a, b)

    def dequantize(self) -> Array:
        return self._block(0, self.shape[0])

    def matmul_t(self, x: Array, /, *, block_bytes: int | None = None) -> Array:
        """`x @ W.T` for x `[..., in]` -> `[..., out]`, a block of output rows at a time."""
        xp = xp_of(self.w)
        xf = _compute_x(x)
        n_out, n_in = self.shape
        y = xp.empty(xf.shape[:-1] + (n_out,), np.float32)
        for a, b in _out_blocks(n_out, n_in, block_bytes):
            if self.block is None:  # a scale per tensor or row: applied to the outputs
                s = self.scale if self.scale.ndim == 0 else self.scale[a:b]
                y[..., a:b] = (xf @ decode_e4m3(self.w[a:b]).T) * s  # [..., in] @ [in, b-a]
            else:
                y[..., a:b] = xf @ self._block(a, b).T  # [..., in] @ [in, b-a]
        return y if x.dtype == np.float32 else y.astype(x.dtype)

    def to(self, device: Device) -> "FP8Weight":
        return dataclasses.replace(self, w=asarray(self.w, device), scale=asarray(self.scale, device))

    def take_out(self, a: int, b: int) -> "FP8Weight":
        """Output rows `[a, b)`."""
        if self.block is None:
            scale = self.scale if self.scale.ndim == 0 else self.scale[a:b]
            return dataclasses.replace(self, w=self.w[a:b], scale=scale)
        (bo, _), (r0, c0) = self.block, self.origin
        b0, b1 = (a + r0) // bo, (b - 1 + r0) // bo + 1
        return dataclasses.replace(self, w=self.w[a:b], scale=self.scale[b0:b1], origin=((a + r0) % bo, c0))


# ------------------------------------------------------------------------------------------
# Fusing along `out` (q/k/v -> wqkv, gate/up -> w13).


@dataclasses.dataclass(frozen=True)
class ConcatOut:
    """Several linears sharing `in`, stacked along `out`; `matmul_t` concatenates their outputs.
    Used when the parts cannot be merged into one quantized tensor (different g_idx, formats)."""

    parts: tuple

    @property
    def shape(self) -> tuple[int, int]:
        return (sum(int(p.shape[0]) for p in self.parts), int(self.parts[0].shape[1]))

    @property
    def nbytes(self) -> int:
        return int(sum(p.nbytes for p in self.parts))

    def dequantize(self) -> Array:
        xp = xp_of(_first_array(self))
        return xp.concatenate([_dequantize(p) for p in self.parts], axis=0)

    def matmul_t(self, x: Array, /, *, block_bytes: int | None = None) -> Array:
        xp = xp_of(_first_array(self))
        return xp.concatenate([_matmul_t(x, p, block_bytes) for p in self.parts], axis=-1)

    def to(self, device: Device) -> "ConcatOut":
        return ConcatOut(tuple(p.to(device) if is_quantized(p) else asarray(p, device) for p in self.parts))

    def take_out(self, a: int, b: int):
        parts, start = [], 0
        for p in self.parts:
            n = int(p.shape[0])
            lo, hi = max(a, start) - start, min(b, start + n) - start
            if lo < hi:
                parts.append(p.take_out(lo, hi) if is_quantized(p) else p[lo:hi])
            start += n
        return parts[0] if len(parts) == 1 else ConcatOut(tuple(parts))


def _first_array(c: ConcatOut):
    p = c.parts[0]
    return p.qweight if isinstance(p, GPTQWeight) else p.w if isinstance(p, FP8Weight) else _first_array(p) \
        if isinstance(p, ConcatOut) else p


def _dequantize(p) -> Array:
    return p.dequantize() if is_quantized(p) else p.astype(np.float32)


def _matmul_t(x, p, block_bytes):
    if is_quantized(p):
        return p.matmul_t(x, block_bytes=block_bytes)
    return _compute_x(x) @ p.astype(np.float32).T


def is_quantized(w) -> bool:
    """True for a quantized weight (anything with `matmul_t` and `dequantize`), not an array."""
    return hasattr(w, "matmul_t") and hasattr(w, "dequantize")


def concat_out(parts: Sequence) -> object:
    """Stack linears (quantized or plain arrays) sharing `in` along `out`.

    GPTQ parts with equal bits and g_idx merge into one `GPTQWeight`; FP8 tensor/channel parts
    into one channel-scaled `FP8Weight`; block-scaled FP8 parts whose boundaries fall on block
    rows into one block `FP8Weight`; anything else becomes a `ConcatOut`.
    """
    parts = list(parts)
    if len(parts) == 1:
        return parts[0]
    if len({int(p.shape[1]) for p in parts}) != 1:
        raise ValueError(f"cannot stack linears with different in features {[tuple(p.shape) for p in parts]}")
    first = parts[0]
    if all(isinstance(p, GPTQWeight) for p in parts):
        xp = xp_of(first.qweight)
        if all(p.bits == first.bits and p.scales.dtype == first.scales.dtype and p.g_idx.shape == first.g_idx.shape
               and bool((p.g_idx == first.g_idx).all()) for p in parts):
            cat = lambda f: xp.concatenate([getattr(p, f) for p in parts], axis=1)  # noqa: E731
            return dataclasses.replace(first, qweight=cat("qweight"), scales=cat("scales"), zeros=cat("zeros"))
    if all(isinstance(p, FP8Weight) and p.block is None for p in parts):
        xp = xp_of(first.w)
        scale = xp.concatenate([xp.broadcast_to(p.scale, (p.shape[0],)).astype(np.float32) for p in parts])
        return FP8Weight(xp.concatenate([p.w for p in parts], axis=0), scale)
    if first.__class__ is FP8Weight and first.block and all(
            isinstance(p, FP8Weight) and p.block == first.block and p.origin == (0, first.origin[1]) for p in parts) \
            and all(p.shape[0] % first.block[0] == 0 for p in parts[:-1]):
        xp = xp_of(first.w)
        return FP8Weight(xp.concatenate([p.w for p in parts], axis=0),
                         xp.concatenate([p.scale for p in parts], axis=0), first.block, first.origin)
    flat = []
    for p in parts:
        flat.extend(p.parts if isinstance(p, ConcatOut) else [p])
    return ConcatOut(tuple(flat))



def uniform_group_size(g_idx: np.ndarray) -> int:
    """g when host array `g_idx == arange(len) // g` with g dividing its length, else 0."""
    n = len(g_idx)
    if not n:
        return 0
    groups = int(g_idx.max()) + 1
    if n % groups:
        return 0
    g = n // groups
    return g if np.array_equal(g_idx, np.arange(n) // g) else 0




def resident_bytes(weights) -> list[tuple[int, int]]:
    """Per device `(bytes held, bytes as float32)` of a `Weights` (fields: one entry per
    device; layers a tuple of such). Arrays shared between fields (tied embeddings) count once."""
    per_dev: dict[int, list[int]] = {}
    seen: set[int] = set()

    def add(r, v):
        if v is None or id(v) in seen:
            return
        seen.add(id(v))
        acc = per_dev.setdefault(r, [0, 0])
        if is_quantized(v):
            acc[0] += v.nbytes
            acc[1] += 4 * int(v.shape[0]) * int(v.shape[1])
        elif dataclasses.is_dataclass(v):
            for f in dataclasses.fields(v):
                add(r, getattr(v, f.name))
        elif hasattr(v, "nbytes") and hasattr(v, "size"):
            acc[0] += int(v.nbytes)
            acc[1] += 4 * int(v.size)

    def walk(obj):
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if f.name == "layers":
                for layer in v:
                    walk(layer)
            else:
                for r, x in enumerate(v):
                    add(r, x)

    walk(weights)
    return [tuple(per_dev[r]) for r in sorted(per_dev)]


# ------------------------------------------------------------------------------------------
# The MAX-seed functions (parity API), expressed over the types above.


def gptq_zeros(qzeros: Array, bits: int, zero_offset: int, a: int, b: int) -> Array:
    """Zero points `[groups, b - a]` of output features `[a, b)` from GPTQ's `qzeros` `[groups,
    words]`, packed 32/bits per int32 along `out` starting at feature 0 of word 0. uint8 (uint16
    where a v1 8-bit zero reads 256); `zero_offset` 1 for v1 checkpoints (they store zero - 1)."""
    zeros = unpack_int32(qzeros, bits, axis=1)[:, a:b].astype(np.int32) + zero_offset
    return zeros.astype(np.uint8 if not zeros.size or int(zeros.max()) <= 255 else np.uint16)


def gptq_weight(qweight: Array, scales: Array, g_idx: Array | None = None, /, *, qzeros: Array | None = None,
                bits: int = 4, group_size: int | None = None, zero_offset: int = 1) -> GPTQWeight:
    """A GPTQ linear in the HF / AutoGPTQ stored layout, as a `GPTQWeight` on qweight's device.

    W[o, i] = (q[i, o] - zero[g_idx[i], o]) * scales[g_idx[i], o].

    Args:
        qweight: int32 `[in * bits / 32, out]`, 32/bits values per word along `in` (value j of a
            word in bits `[j*bits, (j+1)*bits)`).
        scales: float16/float32 `[groups, out]`.
        g_idx: int `[in]`, each input feature's group, in any order (desc_act / act-order); None:
            `arange(in) // group_size` (`group_size` -1: one group).
        qzeros: int32 `[groups, ceil(out * bits / 32)]`, packed the same way along `out`; None:
            symmetric, every zero point 2^(bits-1).
        bits: 2, 4 or 8.
        zero_offset: added to the stored zeros: 1 for `checkpoint_format` "gptq" (v1 stores
            zero - 1), 0 for "gptq_v2".
    Raises:
        ValueError: a bit width, shape or group index that does not fit.
    """
    if bits not in PACKED_BITS:
        raise ValueError(f"GPTQ bits={bits!r} unsupported; supported: {', '.join(map(str, PACKED_BITS))}")
    xp, pf = xp_of(qweight), 32 // bits
    if qweight.ndim != 2 or qweight.dtype != np.int32:
        raise ValueError(f"qweight must be 2-D int32 [in/{pf}, out], got {qweight.dtype} {tuple(qweight.shape)}")
    n_in, n_out = int(qweight.shape[0]) * pf, int(qweight.shape[1])
    groups = int(scales.shape[0]) if scales.ndim == 2 else -1
    if scales.ndim != 2 or scales.shape[1] != n_out:
        raise ValueError(f"scales has shape {tuple(scales.shape)}, expected [groups, {n_out}]")
    if g_idx is None:
        if group_size is None or group_size == 0 or group_size < -1:
            raise ValueError("gptq_weight needs g_idx or group_size (a positive int, or -1 for one group)")
        g_idx = xp.arange(n_in) // (n_in if group_size == -1 else group_size)
    if len(g_idx) != n_in:
        raise ValueError(f"g_idx has {len(g_idx)} entries for {n_in} input features")
    host = g_idx if isinstance(g_idx, np.ndarray) else g_idx.get()
    if n_in and (int(host.min()) < 0 or int(host.max()) >= groups):
        raise ValueError(f"g_idx holds groups outside [0, {groups}) of scales {tuple(scales.shape)}")
    if qzeros is None:
        zeros = xp.full(scales.shape, 1 << (bits - 1), np.uint8 if bits < 8 else np.uint16)
    elif tuple(qzeros.shape) != (groups, -(-n_out // pf)) or qzeros.dtype != np.int32:
        raise ValueError(f"qzeros has {qzeros.dtype} {tuple(qzeros.shape)}, expected int32 "
                         f"{(groups, -(-n_out // pf))} ({bits}-bit zeros packed {pf} per int32 along out)")
    else:
        zeros = gptq_zeros(qzeros, bits, zero_offset, 0, n_out)
    return GPTQWeight(qweight, scales, zeros, xp.asarray(g_idx).astype(np.int32), bits, n_in,
                      uniform_group_size(host))


def gptq_dequantize(qweight: Array, scales: Array, g_idx: Array | None = None, /, **layout) -> Array:
    """The float32 weight `[out, in]` of a GPTQ linear; arguments as `gptq_weight`."""
    return gptq_weight(qweight, scales, g_idx, **layout).dequantize()


def gptq_linear(x: Array, qweight: Array, scales: Array, g_idx: Array | None = None, bias: Array | None = None,
                /, **layout) -> Array:
    """MAX's GPTQLinear as a function: `x @ W.T + b` for x `[..., in]` -> `[..., out]` float32,
    W the GPTQ linear `gptq_weight(qweight, scales, g_idx, **layout)` describes (2/4/8-bit,
    symmetric or with `qzeros`, ordered groups or a desc_act `g_idx`), kept packed."""
    y = gptq_weight(qweight, scales, g_idx, **layout).matmul_t(x.astype(np.float32, copy=False))
    return y if bias is None else y + bias.astype(np.float32)


def fp8_dequantize(w: Array, scale: Array, /) -> Array:
    """float32 `[out, in]` = e4m3 weight (float8_e4m3fn or its uint8 bits) times its scale
    (per tensor `[]`, per row `[out]` / `[out, 1]`)."""
    if w.dtype not in (float8_e4m3fn, np.uint8):
        raise ValueError(f"FP8 weight must be float8_e4m3fn, got {w.dtype}")
    return _fp8_weight(w, scale).dequantize()


def _fp8_weight(w, scale) -> FP8Weight:
    bits = w.view(np.uint8)
    s = scale.astype(np.float32)
    if scale.size > 1:
        s = s.reshape(-1)
        if s.shape[0] != w.shape[0]:
            raise ValueError(f"row-wise FP8 scale has {s.shape[0]} rows for a weight of {w.shape[0]}")
    else:
        s = s.reshape(())
    return FP8Weight(bits, s)


def fp8_linear(x: Array, w: Array, scale: Array, bias: Array | None = None, /) -> Array:
    """`x @ (w * scale).T + b` -> `[T, out]` float32."""
    y = _fp8_weight(w, scale).matmul_t(x.astype(np.float32, copy=False))
    return y if bias is None else y + bias.astype(np.float32)
