"""Quantized linears kept quantized on the device: GPTQ / compressed-tensors integer weights
(`GPTQWeight`) and FP8 e4m3 weights (`FP8Weight`), the readers that build one device's piece
of them from a checkpoint, and the parsing of HF `quantization_config`.

Every quantized weight is plain frozen data with a logical shape `[out, in]`, its resident
`nbytes`, a reference `dequantize()` and `matmul_t(x) = x @ W.T`, computed a block of output
features at a time so no full float32 copy of the weight exists during a call. The same body
of math serves NumPy (`cpu:i`) and CuPy (`gpu:i`); FP8 weights are stored as their uint8 bits
and decoded through a 256-entry table, since CuPy has no float8 dtype.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from .devices import Array, Device, asarray, float8_e4m3fn, xp_of
from .errors import ConfigError, LoadError
from .sharding import ceil_div, split_bounds

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


# ------------------------------------------------------------------------------------------
# quantization_config -> QuantConfig.


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How a checkpoint's linears are quantized.

    method: "gptq", "compressed-tensors" or "fp8"; format: "gptq", "pack-quantized",
    "float-quantized" or "fp8-block"; bits; group_size (-1: one group over `in`);
    sym; desc_act (g_idx permuted); zero_offset: added to stored GPTQ zeros (1 for the v1
    format); strategy: "tensor", "channel", "group" or "block"; block: `(bo, bi)`;
    ignore: module names (or "re:" patterns) left unquantized.
    """

    method: str
    format: str
    bits: int
    group_size: int = -1
    sym: bool = True
    desc_act: bool = False
    zero_offset: int = 0
    strategy: str = "group"
    block: tuple[int, int] | None = None
    ignore: tuple[str, ...] = ()

    @property
    def suffixes(self) -> tuple[str, ...]:
        """The tensors each quantized linear stores beside its name (required ones)."""
        if self.format == "gptq":
            return ("qweight", "qzeros", "scales")
        if self.format == "pack-quantized":
            return ("weight_packed", "weight_scale", "weight_shape") + (() if self.sym else ("weight_zero_point",))
        if self.format == "fp8-block":
            return ("weight", "weight_scale_inv")
        return ("weight", "weight_scale")

    @property
    def optional_suffixes(self) -> tuple[str, ...]:
        return {"gptq": ("g_idx",), "pack-quantized": ("weight_g_idx",)}.get(self.format, ())

    def describe(self) -> str:
        """One line for `tpmax info`."""
        if self.format == "gptq":
            return (f"gptq {self.bits}-bit, group {self.group_size}, {'sym' if self.sym else 'asym'}"
                    + (", desc_act" if self.desc_act else ""))
        if self.format == "pack-quantized":
            return f"compressed-tensors pack-quantized int{self.bits}, {self.strategy}" + (
                f" {self.group_size}" if self.strategy == "group" else "") + (", asym" if not self.sym else "")
        if self.format == "fp8-block":
            return f"fp8 e4m3, block {self.block[0]}x{self.block[1]} scales"
        return f"compressed-tensors float-quantized fp8 e4m3, per-{self.strategy} scale"

    def quantizes(self, module: str) -> bool:
        """Whether the linear `module` (HF name without `.weight`) is quantized."""
        import re

        for pat in self.ignore:
            if pat.startswith("re:"):
                if re.match(pat[3:], module):
                    return False
            elif module == pat or module.endswith("." + pat) or pat.endswith("." + module):
                return False
        return True


def quant_config_from_hf(config: dict, *, source: str) -> QuantConfig | None:
    """The `quantization_config` of a HF config.json as a `QuantConfig` (None: not quantized).

    Raises:
        ConfigError: an unsupported quant_method, format, bit width or option, naming `source`.
    """
    qc = config.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise ConfigError(f"{source}: quantization_config must be an object")
    method = qc.get("quant_method")
    if method == "gptq":
        return _gptq_config(qc, source)
    if method == "compressed-tensors":
        return _compressed_tensors_config(qc, source)
    if method == "fp8":
        return _fp8_block_config(qc, source)
    raise ConfigError(f"{source}: unsupported quant_method {method!r}; supported: gptq, compressed-tensors, fp8")


def _gptq_config(qc: dict, source: str) -> QuantConfig:
    bits = qc.get("bits")
    if bits not in PACKED_BITS:
        raise ConfigError(f"{source}: GPTQ bits={bits!r} unsupported; supported: {', '.join(map(str, PACKED_BITS))}")
    group = qc.get("group_size", 128)
    if not isinstance(group, int) or (group <= 0 and group != -1):
        raise ConfigError(f"{source}: GPTQ group_size={group!r} must be a positive int or -1")
    fmt = qc.get("checkpoint_format", qc.get("format", "gptq"))
    if fmt not in ("gptq", "gptq_v2"):
        raise ConfigError(f"{source}: GPTQ checkpoint_format {fmt!r} unsupported; supported: gptq, gptq_v2")
    if qc.get("dynamic"):
        raise ConfigError(f"{source}: GPTQ per-module overrides (dynamic) are unsupported")
    ignore = tuple(qc.get("modules_to_not_convert") or ()) + (() if qc.get("lm_head") else ("lm_head",))
    return QuantConfig("gptq", "gptq", bits, group, bool(qc.get("sym", True)), bool(qc.get("desc_act", False)),
                       1 if fmt == "gptq" else 0, "group" if group != -1 else "channel", None, ignore)


def _compressed_tensors_config(qc: dict, source: str) -> QuantConfig:
    groups = qc.get("config_groups") or {}
    if len(groups) != 1:
        raise ConfigError(f"{source}: compressed-tensors with {len(groups)} config_groups unsupported (need exactly 1)")
    (gname, group), = groups.items()
    fmt = group.get("format") or qc.get("format")
    w = group.get("weights") or {}
    if group.get("input_activations") or group.get("output_activations"):
        raise ConfigError(f"{source}: compressed-tensors activation quantization ({gname}) unsupported; "
                          "only weight-only schemes load")
    targets = group.get("targets") or []
    if targets and "Linear" not in targets:
        raise ConfigError(f"{source}: compressed-tensors targets {targets} unsupported (need 'Linear')")
    typ, bits, strategy = w.get("type"), w.get("num_bits"), w.get("strategy")
    ignore = tuple(qc.get("ignore") or ())
    if fmt == "float-quantized":
        if typ != "float" or bits != 8:
            raise ConfigError(f"{source}: float-quantized weights type={typ!r} num_bits={bits!r} unsupported "
                              "(need float 8 = e4m3)")
        if strategy not in ("tensor", "channel", "block"):
            raise ConfigError(f"{source}: float-quantized strategy {strategy!r} unsupported; "
                              "supported: tensor, channel, block")
        if not w.get("symmetric", True):
            raise ConfigError(f"{source}: asymmetric FP8 weights unsupported")
        block = tuple(w.get("block_structure") or ()) or None
        if strategy == "block" and (not block or len(block) != 2):
            raise ConfigError(f"{source}: block strategy needs block_structure [rows, cols]")
        return QuantConfig("compressed-tensors", "float-quantized", 8, -1, True, False, 0, strategy, block, ignore)
    if fmt == "pack-quantized":
        if typ != "int" or bits not in (4, 8):
            raise ConfigError(f"{source}: pack-quantized weights type={typ!r} num_bits={bits!r} unsupported "
                              "(need int 4 or 8)")
        if strategy not in ("channel", "group"):
            raise ConfigError(f"{source}: pack-quantized strategy {strategy!r} unsupported; supported: channel, group")
        gs = w.get("group_size") if strategy == "group" else -1
        if strategy == "group" and (not isinstance(gs, int) or gs <= 0):
            raise ConfigError(f"{source}: pack-quantized group strategy needs a positive group_size, got {gs!r}")
        actorder = w.get("actorder")
        return QuantConfig("compressed-tensors", "pack-quantized", bits, gs, bool(w.get("symmetric", True)),
                           actorder in ("group", True), 0, strategy, None, ignore)
    raise ConfigError(f"{source}: compressed-tensors format {fmt!r} unsupported; "
                      "supported: float-quantized, pack-quantized")


def _fp8_block_config(qc: dict, source: str) -> QuantConfig:
    if qc.get("fmt", "e4m3") != "e4m3":
        raise ConfigError(f"{source}: fp8 fmt {qc.get('fmt')!r} unsupported (need e4m3)")
    if qc.get("activation_scheme", "dynamic") != "dynamic":
        raise ConfigError(f"{source}: fp8 activation_scheme {qc.get('activation_scheme')!r} unsupported "
                          "(need dynamic: weights only)")
    block = qc.get("weight_block_size")
    if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise ConfigError(f"{source}: fp8 needs weight_block_size [rows, cols], got {block!r}")
    return QuantConfig("fp8", "fp8-block", 8, -1, True, False, 0, "block", tuple(block),
                       tuple(qc.get("modules_to_not_convert") or ()) or ("lm_head",))


# ------------------------------------------------------------------------------------------
# Readers: one device's piece of a quantized linear, reading only what the piece needs.
# `reader(suffix)` returns a safetensors-slice-like object (`get_shape()`, `[slices]`) or None /
# raises KeyError when the checkpoint lacks that tensor. `index` is one sharding piece in
# logical `[out, in]` coordinates: `(rows,)` or `(rows, cols)` of slices.

Reader = Callable[[str], object]


def _range(s: slice, n: int) -> tuple[int, int]:
    a, b, step = s.indices(n)
    if step != 1:
        raise ValueError(f"sharding pieces must be contiguous, got {s}")
    return a, max(a, b)


def _piece(index: tuple, shape: tuple[int, int]) -> tuple[int, int, int, int]:
    rows = index[0] if len(index) > 0 else slice(None)
    cols = index[1] if len(index) > 1 else slice(None)
    return _range(rows, shape[0]) + _range(cols, shape[1])


class _Tensors:
    """The stored tensors of one linear, with errors naming them (and `source`, the file)."""

    def __init__(self, reader: Reader, name: str, source: str | None = None):
        self.reader, self.name, self.source = reader, name, source

    def get(self, suffix: str, *, required: bool = True):
        try:
            t = self.reader(suffix)
        except KeyError:
            t = None
        if t is None and required:
            self.fail(suffix, "is missing")
        return t

    def shape(self, suffix: str) -> tuple[int, ...]:
        return tuple(int(n) for n in self.get(suffix).get_shape())

    def read(self, suffix: str, index: tuple, dtypes: tuple) -> np.ndarray:
        a = np.asarray(self.get(suffix)[index])
        if a.dtype not in [np.dtype(d) for d in dtypes]:
            self.fail(suffix, f"has dtype {a.dtype}, expected " + " or ".join(str(np.dtype(d)) for d in dtypes))
        return a

    def fail(self, suffix: str, msg: str):
        raise LoadError((f"{self.source}: " if self.source else "") + f"tensor {self.name}.{suffix} {msg}")


def quantized_shape(reader: Reader, qc: QuantConfig, *, name: str, source: str | None = None) -> tuple[int, int]:
    """The logical `[out, in]` of a stored quantized linear (validating its tensors' shapes)."""
    t = _Tensors(reader, name, source)
    if qc.format == "gptq":
        return _gptq_layout(t, qc)[:2]
    if qc.format == "pack-quantized":
        return _ct_int_layout(t, qc)[:2]
    return _fp8_layout(t, qc)[:2]


def read_quantized(reader: Reader, qc: QuantConfig, index: tuple, *, name: str, source: str | None = None,
                   repack: bool = True):
    """One device's piece `index` of the quantized linear `name`, as a `GPTQWeight` / `FP8Weight`.

    Args:
        repack: allow input-feature pieces that do not start/end on a packing word or group
            boundary (they are unpacked and repacked; touched groups are read by every device
            that touches them). With False such a piece is a LoadError.
    Raises:
        LoadError: missing tensors, wrong packed shapes or dtypes, naming the tensor (and
            `source`, the checkpoint, when given).
    """
    t = _Tensors(reader, name, source)
    if qc.format == "gptq":
        return _read_gptq(t, qc, index, repack)
    if qc.format == "pack-quantized":
        return _read_ct_int(t, qc, index, repack)
    return _read_fp8(t, qc, index)


def _n_groups(n_in: int, group: int) -> int:
    return 1 if group == -1 else ceil_div(n_in, group)


def _gptq_layout(t: _Tensors, qc: QuantConfig):
    pf = 32 // qc.bits
    qw = t.shape("qweight")
    if len(qw) != 2:
        t.fail("qweight", f"has shape {qw}, expected [in/{pf}, out]")
    n_in, n_out = qw[0] * pf, qw[1]
    if t.get("g_idx", required=False) is not None and t.shape("g_idx") != (n_in,):
        t.fail("qweight", f"has shape {qw} ({n_in} input features, {pf} per int32 row) but {t.name}.g_idx "
                          f"has {t.shape('g_idx')[0]} entries")
    groups = _n_groups(n_in, qc.group_size)
    if t.shape("scales") != (groups, n_out):
        t.fail("scales", f"has shape {t.shape('scales')}, expected {(groups, n_out)} for qweight {qw} "
                         f"(group_size {qc.group_size})")
    if n_out % pf or t.shape("qzeros") != (groups, n_out // pf):
        t.fail("qzeros", f"has shape {t.shape('qzeros')}, expected {(groups, n_out / pf)} "
                         f"({qc.bits}-bit zeros packed {pf} per int32 along out)")
    if t.get("g_idx", required=False) is not None and t.shape("g_idx") != (n_in,):
        t.fail("g_idx", f"has shape {t.shape('g_idx')}, expected ({n_in},)")
    if qc.desc_act and t.get("g_idx", required=False) is None:
        t.fail("g_idx", "is missing (desc_act checkpoints need it)")
    return n_out, n_in, groups


def _read_g_idx(t: _Tensors, suffix: str, a: int, b: int, group: int, groups: int) -> np.ndarray:
    """Global groups of input features `[a, b)` (int64; the caller stores them local and small)."""
    if t.get(suffix, required=False) is None:
        return np.arange(a, b) // group if group != -1 else np.zeros(b - a, np.int64)
    g = t.read(suffix, (slice(a, b),), (np.int32, np.int64)).astype(np.int64)
    if g.size and (g.min() < 0 or g.max() >= groups):
        t.fail(suffix, f"has group indices outside [0, {groups})")
    return g


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


def _local_groups(g_idx: np.ndarray) -> tuple[int, int, np.ndarray]:
    """`(g0, g1, g_idx - g0)`: the range of groups a piece touches and its local g_idx."""
    if not g_idx.size:
        return 0, 0, g_idx.astype(np.int16)
    g0, g1 = int(g_idx.min()), int(g_idx.max()) + 1
    return g0, g1, (g_idx - g0).astype(np.int16 if g1 - g0 <= 32767 else np.int32)


def _check_cut(t: _Tensors, suffix: str, ia: int, ib: int, n_in: int, pf: int, group: int, repack: bool):
    if repack:
        return
    for edge in (ia, ib):
        if edge not in (0, n_in) and (edge % pf or (group != -1 and edge % group)):
            t.fail(suffix, f"input split at {edge} cuts a {pf}-value word or a {group}-wide group "
                           "and repacking is off")


def _read_gptq(t: _Tensors, qc: QuantConfig, index: tuple, repack: bool) -> GPTQWeight:
    n_out, n_in, groups = _gptq_layout(t, qc)
    pf, bits = 32 // qc.bits, qc.bits
    oa, ob, ia, ib = _piece(index, (n_out, n_in))
    _check_cut(t, "qweight", ia, ib, n_in, pf, qc.group_size, repack)
    g0, g1, g_idx = _local_groups(_read_g_idx(t, "g_idx", ia, ib, qc.group_size, groups))  # [ib-ia]
    # Packed rows covering [ia, ib); repack only when the piece does not start on a word.
    w0, w1 = ia // pf, ceil_div(ib, pf)
    qweight = t.read("qweight", (slice(w0, w1), slice(oa, ob)), (np.int32, np.uint32)).view(np.int32)
    if ia % pf:
        q = unpack_int32(qweight, bits, axis=0)[ia - w0 * pf: ib - w0 * pf]
        qweight = pack_int32(q, bits, axis=0)
    scales = t.read("scales", (slice(g0, g1), slice(oa, ob)), (np.float16, np.float32))
    # Zeros: packed along out; read the words covering [oa, ob) and unpack.
    z0, z1 = oa // pf, ceil_div(ob, pf)
    qzeros = t.read("qzeros", (slice(g0, g1), slice(z0, z1)), (np.int32, np.uint32)).view(np.int32)
    # v1 stores real zero - 1, so a stored all-ones value reads as 2^bits (uint16 for 8 bits).
    zeros = unpack_int32(qzeros, bits, axis=1)[:, oa - z0 * pf: ob - z0 * pf].astype(np.int32) + qc.zero_offset
    zeros = zeros.astype(np.uint8 if not zeros.size or zeros.max() <= 255 else np.uint16)
    _check_finite(t, "scales", scales)
    return GPTQWeight(qweight, scales, zeros, g_idx, bits, ib - ia, uniform_group_size(g_idx))


def _ct_int_layout(t: _Tensors, qc: QuantConfig):
    pf = 32 // qc.bits
    shape = t.read("weight_shape", (slice(None),), (np.int32, np.int64))
    if shape.shape != (2,):
        t.fail("weight_shape", f"has {shape.tolist()}, expected [out, in]")
    n_out, n_in = (int(v) for v in shape)
    if t.shape("weight_packed") != (n_out, ceil_div(n_in, pf)):
        t.fail("weight_packed", f"has shape {t.shape('weight_packed')}, expected {(n_out, ceil_div(n_in, pf))} "
                                f"for weight_shape {[n_out, n_in]} ({qc.bits}-bit, {pf} per int32)")
    groups = _n_groups(n_in, qc.group_size)
    if t.shape("weight_scale") != (n_out, groups):
        t.fail("weight_scale", f"has shape {t.shape('weight_scale')}, expected {(n_out, groups)}")
    if not qc.sym and t.shape("weight_zero_point") != (ceil_div(n_out, pf), groups):
        t.fail("weight_zero_point", f"has shape {t.shape('weight_zero_point')}, "
                                    f"expected {(ceil_div(n_out, pf), groups)}")
    return n_out, n_in, groups


def _read_ct_int(t: _Tensors, qc: QuantConfig, index: tuple, repack: bool) -> GPTQWeight:
    """compressed-tensors pack-quantized: weight_packed int32 `[out, in/pf]` (signed values
    stored +2^(bits-1)), weight_scale `[out, groups]`, weight_zero_point int32 `[out/pf, groups]`
    packed along out (signed). Converted to the GPTQ layout: zero = zero_point + 2^(bits-1)."""
    n_out, n_in, groups = _ct_int_layout(t, qc)
    pf, bits, half = 32 // qc.bits, qc.bits, 1 << (qc.bits - 1)
    oa, ob, ia, ib = _piece(index, (n_out, n_in))
    _check_cut(t, "weight_packed", ia, ib, n_in, pf, qc.group_size, repack)
    g0, g1, g_idx = _local_groups(_read_g_idx(t, "weight_g_idx", ia, ib, qc.group_size, groups))
    w0, w1 = ia // pf, ceil_div(ib, pf)
    packed = t.read("weight_packed", (slice(oa, ob), slice(w0, w1)), (np.int32,))
    q = unpack_int32(packed, bits, axis=1)[:, ia - w0 * pf: ib - w0 * pf]  # [out', in'] unsigned
    scales = t.read("weight_scale", (slice(oa, ob), slice(g0, g1)), (np.float16, np.float32, _bf16()))
    _check_finite(t, "weight_scale", scales)
    scales = scales.T.astype(np.float16 if scales.dtype == np.float16 else np.float32)  # [groups', out']
    if qc.sym:
        zeros = np.full(scales.shape, half, np.uint8)
    else:
        z0, z1 = oa // pf, ceil_div(ob, pf)
        zp = t.read("weight_zero_point", (slice(z0, z1), slice(g0, g1)), (np.int32,))
        zp = unpack_int32(zp, bits, axis=0)[oa - z0 * pf: ob - z0 * pf]  # [out', groups'] stored +half
        zeros = zp.T.astype(np.uint8)  # (signed zp + half) = the unsigned zero
    return GPTQWeight(pack_int32(q.T, bits, axis=0), np.ascontiguousarray(scales), np.ascontiguousarray(zeros),
                      g_idx, bits, ib - ia, uniform_group_size(g_idx))


def _bf16():
    from .devices import bfloat16
    return bfloat16


def _fp8_layout(t: _Tensors, qc: QuantConfig):
    w = t.shape("weight")
    if len(w) != 2:
        t.fail("weight", f"has shape {w}, expected [out, in]")
    n_out, n_in = w
    sfx = "weight_scale_inv" if qc.format == "fp8-block" else "weight_scale"
    s = t.shape(sfx)
    if qc.strategy == "block":
        bo, bi = qc.block
        want = [(ceil_div(n_out, bo), ceil_div(n_in, bi))]
    elif qc.strategy == "channel":
        want = [(n_out, 1), (n_out,)]
    else:
        want = [(), (1,)]
    if s not in want:
        t.fail(sfx, f"has shape {s}, expected {want[0]} ({qc.strategy} scales of a {[n_out, n_in]} weight)")
    return n_out, n_in, sfx


def _read_fp8(t: _Tensors, qc: QuantConfig, index: tuple) -> FP8Weight:
    n_out, n_in, sfx = _fp8_layout(t, qc)
    oa, ob, ia, ib = _piece(index, (n_out, n_in))
    raw = t.read("weight", (slice(oa, ob), slice(ia, ib)), (float8_e4m3fn, np.uint8))
    w = raw.view(np.uint8)
    if ((w & 0x7F) == 0x7F).any():
        t.fail("weight", "contains NaN (e4m3 bit pattern 0x7f/0xff)")
    dt = (np.float32, np.float16, _bf16())
    if qc.strategy == "block":
        bo, bi = qc.block
        scale = t.read(sfx, (slice(oa // bo, (ob - 1) // bo + 1), slice(ia // bi, (ib - 1) // bi + 1)), dt)
        _check_finite(t, sfx, scale)
        return FP8Weight(w, scale.astype(np.float32), (bo, bi), (oa % bo, ia % bi))
    if qc.strategy == "channel":
        full = t.shape(sfx)
        scale = t.read(sfx, (slice(oa, ob),) + ((slice(None),) if len(full) == 2 else ()), dt)
        _check_finite(t, sfx, scale)
        return FP8Weight(w, scale.astype(np.float32).reshape(-1))
    scale = t.read(sfx, (slice(None),) * len(t.shape(sfx)), dt) if t.shape(sfx) else np.asarray(t.get(sfx)[()])
    _check_finite(t, sfx, scale)
    return FP8Weight(w, scale.astype(np.float32).reshape(()))


def _check_finite(t: _Tensors, sfx: str, a: np.ndarray):
    if not np.isfinite(a).all():
        t.fail(sfx, "contains NaN or inf")


def marker_suffix(qc: QuantConfig) -> str:
    """The tensor whose presence makes a linear quantized (its float twin lacks it)."""
    return {"gptq": "qweight", "pack-quantized": "weight_packed", "fp8-block": "weight_scale_inv"}.get(
        qc.format, "weight_scale")


def group_quantized(keys, qc: QuantConfig, *, source: str, is_fp8=lambda key: False) -> dict[str, dict[str, str]]:
    """The quantized linears among checkpoint `keys`: `{module: {suffix: key}}`.

    A module is quantized when its marker tensor (`marker_suffix`) is present, or, for FP8
    formats, when its `weight` is stored as F8_E4M3 (`is_fp8(key)`); then every required
    suffix must be present.
    Raises:
        LoadError: a quantized linear missing a required tensor, naming it.
    """
    keys = set(keys)
    wanted = qc.suffixes + qc.optional_suffixes
    fp8 = qc.format in ("float-quantized", "fp8-block")
    modules = {k[: -len(marker_suffix(qc)) - 1] for k in keys if k.endswith("." + marker_suffix(qc))}
    if fp8:
        modules |= {k[: -len(".weight")] for k in keys if k.endswith(".weight") and is_fp8(k)}
    if qc.format == "gptq":  # any GPTQ tensor marks the module (a missing qweight is then an error)
        modules |= {k.rsplit(".", 1)[0] for k in keys if k.rsplit(".", 1)[-1] in ("qzeros", "scales", "g_idx")}
    out = {}
    for m in sorted(modules):
        have = {sfx: f"{m}.{sfx}" for sfx in wanted if f"{m}.{sfx}" in keys}
        for sfx in qc.suffixes:
            if sfx not in have:
                raise LoadError(f"{source}: tensor {m}.{sfx} is missing ({qc.describe()} linear)")
        out[m] = have
    return out


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
# safetensors tensors NumPy's safetensors binding cannot read (F8_E4M3, BF16): the file is
# memory-mapped and a slice reads only the pages it touches.

_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
              "I16": np.int16, "I8": np.int8, "U8": np.uint8, "U16": np.uint16, "U32": np.uint32,
              "U64": np.uint64, "BOOL": np.bool_}


def _st_dtype(name: str):
    import ml_dtypes

    extra = {"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}
    return np.dtype(_ST_DTYPES.get(name) or extra[name])


class SafetensorsFile:
    """A safetensors file read through its header and a memory map (every dtype, incl. F8_E4M3).

    `get_slice(key)` answers like safetensors' own: `get_shape()` and `[slices]` -> NumPy copy.
    """

    def __init__(self, path):
        import json

        self.path = str(path)
        try:
            with open(self.path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
            self._mm = np.memmap(self.path, np.uint8, "r")
            self._base = 8 + n
            self._meta = {k: v for k, v in header.items() if k != "__metadata__"}
        except Exception as e:
            raise LoadError(f"{self.path}: not a valid safetensors file ({e})") from None

    def keys(self):
        return list(self._meta)

    def get_slice(self, key: str) -> "_MappedTensor":
        m = self._meta[key]
        try:
            dt = _st_dtype(m["dtype"])
        except KeyError:
            raise LoadError(f"{self.path}: tensor {key} has unsupported dtype {m['dtype']}") from None
        a, b = m["data_offsets"]
        shape = tuple(m["shape"])
        if b - a != dt.itemsize * int(np.prod(shape, dtype=np.int64)) or self._base + b > self._mm.size:
            raise LoadError(f"{self.path}: tensor {key} has a data range that does not fit its shape or the file")
        return _MappedTensor(self._mm[self._base + a: self._base + b].view(dt).reshape(shape))


class _MappedTensor:
    def __init__(self, view: np.ndarray):
        self._view = view

    def get_shape(self):
        return list(self._view.shape)

    def get_dtype(self) -> str:
        return str(self._view.dtype)

    def __getitem__(self, index):
        return np.array(self._view[index])


# ------------------------------------------------------------------------------------------
# The MAX-seed functions (parity API), expressed over the types above.


def gptq_dequantize(qweight: Array, scales: Array, g_idx: Array | None = None, /, *,
                    group_size: int | None = None) -> Array:
    """The float32 weight `[out, in]` of a symmetric 4-bit GPTQ linear (zero point 8).

    Args:
        qweight: int32 `[in/8, out]`; scales: `[n_groups, out]`; g_idx: int `[in]` or None
        (then `group_size` gives `g_idx = arange(in) // group_size`).
    """
    return _gptq_sym4(qweight, scales, g_idx, group_size).dequantize()


def _gptq_sym4(qweight, scales, g_idx, group_size) -> GPTQWeight:
    xp = xp_of(qweight)
    n_in = qweight.shape[0] * 8
    if g_idx is None:
        if not group_size:
            raise ValueError("gptq_dequantize needs g_idx or group_size")
        g_idx = xp.arange(n_in) // group_size
    if len(g_idx) != n_in:
        raise ValueError(f"g_idx has {len(g_idx)} entries for {n_in} input features")
    zeros = xp.full(scales.shape, 8, np.uint8)
    host = g_idx if isinstance(g_idx, np.ndarray) else g_idx.get()
    return GPTQWeight(qweight, scales, zeros, xp.asarray(g_idx).astype(np.int32), 4, n_in, uniform_group_size(host))


def gptq_linear(x: Array, qweight: Array, scales: Array, g_idx: Array | None = None, bias: Array | None = None,
                /, *, group_size: int | None = None) -> Array:
    """`x @ dequantize(W).T + b` for x `[T, in]` -> `[T, out]` (float32)."""
    y = _gptq_sym4(qweight, scales, g_idx, group_size).matmul_t(x.astype(np.float32, copy=False))
    return y if bias is None else y + bias.astype(np.float32)


def gptq_pack(q: np.ndarray) -> np.ndarray:
    """Pack 4-bit values `q [in, out]` (0..15) into GPTQ's int32 `[in/8, out]`."""
    if q.shape[0] % 8:
        raise ValueError(f"GPTQ needs in_features divisible by 8, got {q.shape[0]}")
    return pack_int32(q, 4, axis=0)


def gptq_shard_rowwise(qweight, scales, tp: int, rank: int):
    """Device `rank`'s output features of a GPTQ linear (the column-parallel split)."""
    a, b = split_bounds(qweight.shape[1], tp)[rank]
    return qweight[:, a:b], scales[:, a:b]


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


def fp8_quantize(w: np.ndarray, *, rowwise: bool) -> tuple[np.ndarray, np.ndarray]:
    """e4m3 weight and scale (per row or per tensor) such that `w ~= q * scale`."""
    amax = np.abs(w).max(axis=1, keepdims=True) if rowwise else np.abs(w).max()
    scale = (np.maximum(amax, 1e-12) / 448.0).astype(np.float32)  # 448 = e4m3 max
    return (w / scale).astype(float8_e4m3fn), scale.reshape(-1) if rowwise else scale.reshape(())
