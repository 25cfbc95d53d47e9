"""The layers: one-device math (`linear`, `rms_norm`, `rope`, `mlp_local`, ...) and their
tensor-parallel forms (`column_parallel_linear`, `row_parallel_linear`, `mlp`,
`vocab_parallel_embedding`), each with its collective written where it happens.

Every function takes its arrays positionally and options by keyword; the array module comes
from the input, so one body serves NumPy and CuPy. Weights are stored `[out, in]` as in HF.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Mapping, Sequence

import numpy as np

from ..core.comm import Communicator
from ..core.devices import Array, Device, bfloat16, on_device_context, xp_of
from ..core.distributed import per_device
from ..core.sharding import split_bounds

_HALF = (np.dtype(np.float16), bfloat16)


# ------------------------------------------------------------------------------------------
# Dense pieces.


def matmul_t(x: Array, w: Array) -> Array:
    """`x @ w.T` for x `[..., in]`, w `[out, in]` -> `[..., out]`.

    NumPy has no fast half-precision GEMM, so half weights are computed in float32 there.
    On CuPy, a bf16 matmul with an operand of more than two axes crashes (CuPy 14.2), so
    such an x is flattened to 2-D first (`matmul_t_2d`).
    A quantized weight (`tpmax.quant`: anything with its own `matmul_t`) computes it itself.
    """
    if not isinstance(w, np.ndarray) and hasattr(w, "matmul_t"):
        return w.matmul_t(x)
    if isinstance(x, np.ndarray):
        if w.dtype in _HALF:
            return x.astype(np.float32) @ w.astype(np.float32).T
        if x.ndim == 2 and 2 <= x.shape[0] <= 3:
            # OpenBLAS's sgemm is slow for 2-3 rows: one gemv per row measured 2x faster
            # (Xeon, 2 cores: [2, 576] x [1536, 576] 86 vs 182 us)
            return np.stack([w @ row for row in x])  # B x ([out, in] @ [in]) -> [B, out]
        if x.ndim == 2 and x.shape[0] == 4:
            # and 4 rows run ~30 % faster as w @ x.T (measured on the 2-core EPYC and Xeon)
            return (w @ x.T).T
        return x @ w.T
    if x.ndim > 2 and bfloat16 in (x.dtype, w.dtype):
        return matmul_t_2d(x, w)
    return x @ w.T


def matmul_t_2d(x: Array, w: Array) -> Array:
    """`x @ w.T` computed as one 2-D matmul: x `[..., in]` flattened to `[N, in]`.

    Args:
        x: `[..., in]`; w: `[out, in]`.
    Returns:
        `[..., out]`
    """
    y = x.reshape(-1, x.shape[-1]) @ w.T  # [N, in] @ [in, out] -> [N, out]
    return y.reshape(*x.shape[:-1], w.shape[0])  # -> [..., out]


def linear(x: Array, w: Array, b: Array | None = None, /, *, clip_weight: float | None = None) -> Array:
    """`y = x @ W.T + b`.

    Args:
        x: `[..., in]`; w: `[out, in]`; b: `[out]` or None.
        clip_weight: clamp W to `[-c, c]` first (MAX's `clip_weight`).
    Returns:
        `[..., out]`
    """
    if clip_weight is not None:
        w = xp_of(w).clip(w, -clip_weight, clip_weight)
    y = matmul_t(x, w)
    return y if b is None else y + b.astype(y.dtype, copy=False)


def rms_norm(x: Array, w: Array, /, *, eps: float) -> Array:
    """RMSNorm over the last axis, computed in float32, returned in x's dtype.

    Args:
        x: `[..., D]`; w: `[D]`.
    """
    xp = xp_of(x)
    x32 = x.astype(np.float32, copy=False)
    ms = (x32 * x32).sum(axis=-1, keepdims=True)  # [..., 1]
    ms *= 1.0 / x.shape[-1]
    ms += float(eps)
    y = x32 / xp.sqrt(ms, out=ms)
    y *= w.astype(np.float32, copy=False)
    return y.astype(x.dtype, copy=False)


def _in_float32(fn):
    """`fn` computed in float32 for float16/bfloat16 inputs and cast back, so every
    activation returns its input's dtype (CuPy's `erf`, for one, promotes half inputs)."""
    @functools.wraps(fn)
    def wrapped(x):
        if x.dtype in _HALF:
            return fn(x.astype(np.float32)).astype(x.dtype, copy=False)
        return fn(x)
    return wrapped


@_in_float32
def _silu(x):
    e = xp_of(x).exp(-x)
    e += 1.0
    return x / e


def _erf(x):
    """erf elementwise, in x's dtype."""
    if xp_of(x) is np:  # NumPy has no erf: math.erf per element, in float64
        return np.frompyfunc(math.erf, 1, 1)(x.astype(np.float64)).astype(x.dtype)
    from cupyx.scipy.special import erf
    return erf(x).astype(x.dtype, copy=False)


@_in_float32
def _gelu(x):
    return 0.5 * x * (1.0 + _erf(x * (1.0 / math.sqrt(2.0))))


@_in_float32
def _gelu_tanh(x):
    xp = xp_of(x)
    c = math.sqrt(2.0 / math.pi)  # a Python float: stays in x's dtype under NumPy 2
    return 0.5 * x * (1.0 + xp.tanh(c * (x + 0.044715 * x * x * x)))


@_in_float32
def _sigmoid(x):
    return 1.0 / (1.0 + xp_of(x).exp(-x))


@_in_float32
def _tanh(x):
    return xp_of(x).tanh(x)


def _relu(x):
    return xp_of(x).maximum(x, 0)  # exact in every dtype


ACTIVATIONS = {
    "silu": _silu,
    "gelu": _gelu,
    "gelu_tanh": _gelu_tanh,
    "relu": _relu,
    "tanh": _tanh,
    "sigmoid": _sigmoid,
}


def activation(name: str):
    """The activation function `name` (`[...]` -> `[...]`, same dtype)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; supported: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


# ------------------------------------------------------------------------------------------
# Rotary position embedding.


@dataclasses.dataclass(frozen=True)
class Llama3Scaling:
    """Llama-3 frequency scaling (HF `rope_type: llama3`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position: int


@dataclasses.dataclass(frozen=True)
class LinearScaling:
    """Position interpolation (HF `rope_type: linear`): every frequency divided by `factor`."""

    factor: float


@dataclasses.dataclass(frozen=True)
class RotaryEmbedding:
    """RoPE parameters (MAX's `RotaryEmbedding`).

    `interleaved=True` rotates pairs (2i, 2i+1) (GGUF / llama.cpp layout); False rotates the
    two halves (HF layout). `inv_freq_i = theta^(-2i/head_dim)`, computed in float64.
    """

    dim: int
    n_heads: int
    theta: float
    max_seq_len: int
    head_dim: int | None = None
    interleaved: bool = False
    scaling: Llama3Scaling | LinearScaling | None = None

    @property
    def rot_dim(self) -> int:
        return self.head_dim or self.dim // self.n_heads

    def inv_freq(self) -> np.ndarray:
        """`[head_dim/2]` float64."""
        hd = self.rot_dim
        inv = 1.0 / self.theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
        s = self.scaling
        if isinstance(s, LinearScaling):
            return inv / s.factor
        if isinstance(s, Llama3Scaling):
            wavelen = 2 * math.pi / inv
            low_wl = s.original_max_position / s.low_freq_factor
            high_wl = s.original_max_position / s.high_freq_factor
            smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
            mid = (1 - smooth) * inv / s.factor + smooth * inv
            inv = np.where(wavelen > low_wl, inv / s.factor, np.where(wavelen < high_wl, inv, mid))
        return inv

    def cos_sin(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin `[T, head_dim/2]` float32 for integer `positions [T]`."""
        ang = np.asarray(positions, np.float64)[:, None] * self.inv_freq()[None, :]  # [T, hd/2]
        return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class RopeTables:
    """RoPE as `x * cos + x[..., perm] * sin`, tables prepared once per forward pass.

    cos, sin: `[T, 1, hd]` float32 (sin carries the rotation's signs); perm: `[hd]` pairs each
    element with its partner (i <-> i+hd/2 for the half-split layout, 2i <-> 2i+1 interleaved).
    """

    cos: Array
    sin: Array
    perm: Array

    @classmethod
    def build(cls, cos: np.ndarray, sin: np.ndarray, *, interleaved: bool) -> "RopeTables":
        """From cos, sin `[T, hd/2]`."""
        half = cos.shape[-1]
        if interleaved:
            c = np.repeat(cos, 2, axis=-1)  # [T, hd]: c0 c0 c1 c1 ...
            s = np.stack([-sin, sin], axis=-1).reshape(len(sin), 2 * half)  # -s0 s0 -s1 s1 ...
            perm = np.arange(2 * half).reshape(half, 2)[:, ::-1].reshape(-1)  # 1 0 3 2 ...
        else:
            c = np.concatenate([cos, cos], axis=-1)
            s = np.concatenate([-sin, sin], axis=-1)
            perm = np.concatenate([np.arange(half, 2 * half), np.arange(half)])
        return cls(c[:, None, :], s[:, None, :], perm)

    def to(self, device) -> "RopeTables":
        from ..core.devices import asarray
        return RopeTables(asarray(self.cos, device), asarray(self.sin, device), asarray(self.perm, device))


def rotate(x: Array, rope: RopeTables) -> Array:
    """Apply RoPE to x `[T, H, hd]` (float32 math, x's dtype out)."""
    x32 = x.astype(np.float32, copy=False)
    return (x32 * rope.cos + x32[..., rope.perm] * rope.sin).astype(x.dtype, copy=False)


def apply_rope(x: Array, cos: Array, sin: Array, /, *, interleaved: bool) -> Array:
    """Rotate x `[T, H, hd]` by cos/sin `[T, hd/2]` (float32 math, x's dtype out)."""
    return rotate(x, RopeTables.build(cos, sin, interleaved=interleaved))


# ------------------------------------------------------------------------------------------
# Tensor-parallel linears.


def column_parallel_linear(xs: Sequence[Array], ws: Sequence[Array], bs: Sequence[Array] | None,
                           comm: Communicator) -> list[Array]:
    """MAX's `ColumnParallelLinear`: each device computes its rows of the output, then
    allgather on the last axis so every device holds the full output.

    Args:
        xs: per device `[T, in]` (replicated); ws: per device `[out_r, in]`; bs: `[out_r]`.
    Returns:
        per device `[T, out]`.
    """
    bs = bs or [None] * len(ws)
    ys = per_device(linear, xs, ws, bs, devices=comm.devices)  # per device [T, out_r]
    return comm.allgather(ys, axis=-1)  # -> [T, out]


def row_parallel_linear(xs: Sequence[Array], ws: Sequence[Array], b: Array | None,
                        comm: Communicator) -> list[Array]:
    """Row-parallel linear: input split on its last axis, partial products all-reduced,
    bias added once after the reduction.

    Args:
        xs: per device `[T, in_r]`; ws: per device `[out, in_r]`; b: `[out]` (replicated).
    Returns:
        per device `[T, out]`.
    """
    partials = per_device(linear, xs, ws, devices=comm.devices)  # per device [T, out] partial sums
    ys = comm.allreduce_sum(partials)
    return ys if b is None else per_device(lambda y: y + b, ys, devices=comm.devices)


# ------------------------------------------------------------------------------------------
# MLP.


@dataclasses.dataclass(frozen=True)
class DistributedGemmConfig:
    """MAX's `DistributedGemmConfig`: with `enable_matmul_allreduce`, the down projection and
    its all-reduce run chunk by chunk, so one chunk's reduction overlaps the next chunk's
    matmul. Same numbers as the unfused path."""

    enable_matmul_allreduce: bool = False
    chunks: int = 4

    @staticmethod
    def generate(environ: Mapping[str, str] | None = None) -> DistributedGemmConfig:
        """MAX's default: enabled, unless `LLAMA_ENABLE_DIST_GEMM_KERNELS` (in `environ`,
        default `os.environ`) says otherwise. tpmax reads "0", "false", "no", "off" and ""
        as off (MAX turns only "" off: `bool("0")` is True there)."""
        value = (os.environ if environ is None else environ).get("LLAMA_ENABLE_DIST_GEMM_KERNELS")
        if value is None:
            return DistributedGemmConfig(True)
        return DistributedGemmConfig(value.strip().lower() not in ("", "0", "false", "no", "off"))


def mlp_local(x: Array, w13: Array, w2: Array, /, *, act: str = "silu",
              b13: Array | None = None) -> Array:
    """One device's MLP partial: `down(act(gate(x)) * up(x))` over its slice of F.

    Args:
        x: `[T, D]`; w13: `[2*F_r, D]` (`[gate_r; up_r]`); w2: `[D, F_r]`; b13: `[2*F_r]`.
    Returns:
        `[T, D]` partial sum (needs an all-reduce over devices).
    """
    gu = linear(x, w13, b13)  # [T, 2*F_r]
    f = gu.shape[-1] // 2
    h = activation(act)(gu[..., :f]) * gu[..., f:]  # [T, F_r]
    return matmul_t(h, w2).astype(x.dtype, copy=False)  # [T, D]


def mlp(xs: Sequence[Array], w13s: Sequence[Array], w2s: Sequence[Array], comm: Communicator, *,
        act: str = "silu", b13s=None, b2: Array | None = None,
        gemm_config: DistributedGemmConfig | None = None, threads: bool = False) -> list[Array]:
    """MAX's tensor-parallel `MLP`: gate/up rowwise, down columnwise, then all-reduce.

    Args:
        xs: per device `[T, D]` (replicated); w13s: per device `[2*F_r, D]`; w2s: `[D, F_r]`.
        gemm_config: with `enable_matmul_allreduce`, the down projection and its all-reduce
            run chunk by chunk (`DistributedGemmConfig`).
        threads: run the devices' shares on their own threads (see `per_device`).
    Returns:
        per device `[T, D]`.
    """
    b13s = b13s or [None] * len(xs)
    if gemm_config is None or not gemm_config.enable_matmul_allreduce or xs[0].shape[0] < 2:
        partials = per_device(lambda x, a, b, c: mlp_local(x, a, b, act=act, b13=c), xs, w13s, w2s, b13s,
                              devices=comm.devices, threads=threads)  # per device [T, D] partial
        ys = comm.allreduce_sum(partials)  # -> [T, D]
    else:
        ys = _mlp_matmul_allreduce(xs, w13s, w2s, b13s, comm, act, gemm_config.chunks)
    return ys if b2 is None else per_device(lambda y: y + b2, ys, devices=comm.devices)


_reducer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tpmax-allreduce")


def _mlp_matmul_allreduce(xs, w13s, w2s, b13s, comm, act, chunks):
    # Split the tokens into chunks: chunk i's all-reduce runs on the reducer thread while the
    # devices compute chunk i+1 (on GPU both are also asynchronous on the stream).
    devices = comm.devices
    pending = []
    for a, b in split_bounds(xs[0].shape[0], min(chunks, xs[0].shape[0])):
        partials = per_device(lambda x, w13, w2, b13: mlp_local(x[a:b], w13, w2, act=act, b13=b13),
                              xs, w13s, w2s, b13s, devices=devices)  # per device [Tc, D]
        pending.append(_reducer.submit(_allreduce_on, devices[0], comm, partials))
    outs = [f.result() for f in pending]  # per chunk, per device [Tc, D]
    xp = xp_of(xs[0])
    return per_device(lambda *chunks_r: xp.concatenate(chunks_r, axis=0), *outs,
                      devices=devices)  # per device [T, D]


def _allreduce_on(device: Device, comm: Communicator, partials: list[Array]) -> list[Array]:
    """`comm.allreduce_sum(partials)` with `device` current (the reducer thread's default
    CUDA device would otherwise be GPU 0); the communicator enters each device it touches."""
    with on_device_context(device):
        return comm.allreduce_sum(partials)


# ------------------------------------------------------------------------------------------
# Vocab-parallel embedding.


def embedding_local(ids: np.ndarray, table: Array, start: int, /) -> Array:
    """One device's lookup over its vocab rows `[start, start + V_r)`; other ids give zero.

    Args:
        ids: `[T]` int (host); table: `[V_r, D]`. Returns `[T, D]`.
    """
    xp = xp_of(table)
    local = ids - start
    mine = (local >= 0) & (local < table.shape[0])  # [T]
    out = xp.zeros((len(ids), table.shape[1]), table.dtype)
    if mine.any():
        idx = np.nonzero(mine)[0]
        out[xp.asarray(idx)] = table[xp.asarray(local[idx])]
    return out


def vocab_parallel_embedding(ids, tables: Sequence[Array], comm: Communicator, *,
                             vocab_size: int | None = None) -> list[Array]:
    """MAX's `VocabParallelEmbedding`: contiguous vocab ranges per device, then all-reduce.

    Args:
        ids: `[T]` token ids (host ints); tables: per device `[V_r, D]`, the rows the split
            rule gives each device of `comm` (by its index in the group).
        vocab_size: the whole vocabulary V; may be left out when `comm` drives the whole group.
    Returns:
        per device `[T, D]`.
    Raises:
        ValueError: for ids outside `[0, vocab)` (MAX silently returns zeros).
    """
    if vocab_size is None:
        if len(tables) != comm.tp:
            raise ValueError("vocab_parallel_embedding: pass vocab_size when this process holds part of the group")
        vocab_size = sum(t.shape[0] for t in tables)
    check_token_ids(ids, vocab_size)
    ids = np.asarray(ids)
    bounds = split_bounds(vocab_size, comm.tp)
    starts = []
    for t, r in zip(tables, comm.ranks):
        a, b = bounds[r]
        if t.shape[0] != b - a:
            raise ValueError(f"vocab_parallel_embedding: device {r} holds {t.shape[0]} rows, the split rule "
                             f"gives it {b - a} of {vocab_size}")
        starts.append(a)
    partials = per_device(lambda t, s: embedding_local(ids, t, s), tables, starts,
                          devices=comm.devices)  # [T, D] each
    return comm.allreduce_sum(partials)


def check_token_ids(ids, vocab_size: int) -> None:
    """Token ids must be a 1-D integer array inside `[0, vocab_size)` (the one check tpmax
    makes of ids, wherever they enter)."""
    ids = np.asarray(ids)
    if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
        raise ValueError(f"token ids must be a 1-D integer array, got shape {ids.shape} dtype {ids.dtype}")
    bad = ids[(ids < 0) | (ids >= vocab_size)]
    if bad.size:
        raise ValueError(f"token id {int(bad[0])} outside the vocabulary [0, {vocab_size})")
