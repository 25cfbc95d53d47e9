"""Reading one device's piece of a quantized linear from a checkpoint, still packed: only the
words, groups and scales the piece covers are read (GPTQ, compressed-tensors pack-quantized
and float-quantized, block FP8), and every tensor is checked (shape, dtype, finite scales)
with LoadErrors naming it. Also which checkpoint keys form each quantized linear
(`group_quantized`)."""
from __future__ import annotations

from typing import Callable

import numpy as np

from ..core.devices import bfloat16, float8_e4m3fn
from ..core.errors import LoadError
from ..nn.quant import FP8Weight, GPTQWeight, gptq_zeros, pack_int32, uniform_group_size, unpack_int32
from .quant_config import QuantConfig
from ..core.sharding import ceil_div

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
    zeros = gptq_zeros(qzeros, bits, qc.zero_offset, oa - z0 * pf, ob - z0 * pf)
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
    scales = t.read("weight_scale", (slice(oa, ob), slice(g0, g1)), (np.float16, np.float32, bfloat16))
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
    dt = (np.float32, np.float16, bfloat16)
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


