"""CuPy launchers of the decode-step kernels: each function takes CuPy arrays in the layouts of
its twin in `tpmax.kernels.twins` (bf16 activations and weights, int32 indices) and launches its
kernel on the current device and stream. Imported only on a GPU machine (it imports CuPy).

Status: written against the kernels' header comments and tested (tests marked `gpu`) against
the twins, but those tests have not yet run on a GPU: the first device run must look here first.
"""
from __future__ import annotations

import functools

import cupy as cp
import numpy as np

from ..core.devices import bfloat16
from .compile import include_dirs, source
from .twins import ACTS, GEMV_MAX_B, num_splits

_NULL = np.uint64(0)  # a null pointer argument
_f, _i = np.float32, np.int32


@functools.cache
def _module(name: str, device_id: int) -> cp.RawModule:
    """The compiled `.cu` source `name` on device `device_id` (compiled once per device).

    The CUDA 12 pip headers (`include_dirs`) are added only under a CUDA 12 runtime; under
    CUDA 13 CuPy's own header search must find `cuda_bf16.h` / `cuda_fp8.h`."""
    cuda12 = cp.cuda.runtime.runtimeGetVersion() // 1000 == 12
    with cp.cuda.Device(device_id):
        return cp.RawModule(code=source(name),
                            options=("--std=c++17", *(f"-I{d}" for d in (include_dirs() if cuda12 else ()))))


def _kernel(name: str, kernel: str):
    return _module(name, cp.cuda.Device().id).get_function(kernel)


def _ptr(a):
    return _NULL if a is None else _contig(a)


def _contig(a):
    if not a.flags.c_contiguous:
        raise ValueError(f"the kernels take C-contiguous arrays, got strides {a.strides}")
    return a


def _bf16(a, what: str):
    """a, checked to be a C-contiguous bf16 array (weights, activations, cache pages)."""
    if a.dtype != bfloat16:
        raise ValueError(f"{what} must be bfloat16 for the GPU kernels, got {a.dtype} (load the model with "
                         "dtype='bfloat16')")
    return _contig(a)


def _check(x, *, what: str) -> tuple[int, int]:
    if x.dtype != bfloat16 or x.ndim != 2 or not 1 <= x.shape[0] <= GEMV_MAX_B:
        raise ValueError(f"{what}: x must be bf16 [B, K] with 1 <= B <= {GEMV_MAX_B}, got {x.dtype} {x.shape}")
    return x.shape


# ------------------------------------------------------------------------------------------
# gemv.cu


def gemv(x, w, /, *, norm_w=None, eps: float = 0.0, residual=None, glu: str | None = None, out_scale: float = 1.0,
         out_dtype=None):
    """The GEMV family (see `twins.gemv` for which kernel each option set launches)."""
    B, K = _check(x, what="gemv")
    n = w.shape[0] // 2 if glu is not None else w.shape[0]
    f32_out = np.dtype(out_dtype or bfloat16) == np.float32
    y = cp.empty((B, n), np.float32 if f32_out else bfloat16)
    grid, block = ((n + 3) // 4,), (128,)
    x, w = _contig(x), _bf16(w, "gemv: the weight")
    if glu is not None:
        if norm_w is None:
            raise ValueError("gemv: the gate/up epilogue runs with the RMSNorm prologue")
        _kernel("gemv.cu", "rmsnorm_gemv_glu_bf16")(grid, block, (x, _contig(norm_w), w, y, _i(B), _i(n), _i(K),
                                                                  _f(eps), _i(ACTS.index(glu))))
    elif norm_w is not None:
        name = "rmsnorm_gemv_f32" if f32_out else "rmsnorm_gemv_bf16"
        _kernel("gemv.cu", name)(grid, block, (x, _contig(norm_w), w, y, _i(B), _i(n), _i(K), _f(eps), _f(out_scale)))
    elif residual is not None:
        _kernel("gemv.cu", "gemv_residual_bf16")(grid, block, (x, w, _contig(residual), y, _i(B), _i(n), _i(K),
                                                               _f(out_scale)))
    else:
        _kernel("gemv.cu", "gemv_bf16")(grid, block, (x, w, y, _i(B), _i(n), _i(K), _f(out_scale)))
    return y


def rms_norm_rows(x, w, /, *, eps: float):
    B, K = _check(x, what="rms_norm_rows")
    y = cp.empty_like(x)
    _kernel("gemv.cu", "rms_norm_bf16")((B,), (128,), (_contig(x), _contig(w), y, _i(K), _f(eps)))
    return y


def glu(gu, /, *, act: str):
    B, n = gu.shape[0], gu.shape[1] // 2
    y = cp.empty((B, n), bfloat16)
    _kernel("gemv.cu", "glu_bf16")(((B * n + 255) // 256,), (256,), (_contig(gu), y, _i(B), _i(n), _i(ACTS.index(act))))
    return y


def residual_add(x, a, /, *, scale: float = 1.0):
    y = cp.empty_like(x)
    _kernel("gemv.cu", "residual_add_bf16")(((x.size + 255) // 256,), (256,), (_contig(x), _contig(a), y, _i(x.size),
                                                                                _f(scale)))
    return y


# ------------------------------------------------------------------------------------------
# qkv_rope.cu


def qkv_rope_kv_write(qkv, bias, q_norm, k_norm, qk_eps, cos_tab, sin_tab, positions, page, slot, pages, layer, /,
                      *, n_q: int, n_kv: int, head_dim: int, interleaved: bool):
    B = qkv.shape[0]
    q = cp.empty((B, n_q, head_dim), bfloat16)
    num_pages, page_size = pages.shape[2], pages.shape[3]
    _bf16(qkv, "qkv_rope_kv_write: qkv")
    _bf16(pages, "qkv_rope_kv_write: the KV cache")
    _kernel("qkv_rope.cu", "qkv_rope_kv_write")(
        (B, n_q + 2 * n_kv), ((head_dim // 2 + 31) // 32 * 32,),
        (_contig(qkv), _ptr(bias), _ptr(q_norm), _ptr(k_norm), _f(qk_eps), _contig(cos_tab), _contig(sin_tab),
         _contig(positions), _contig(page), _contig(slot), _contig(pages), _i(layer), _i(num_pages), _i(page_size),
         _i(n_q), _i(n_kv), _i(head_dim), _i(bool(interleaved)), q))
    return q


# ------------------------------------------------------------------------------------------
# flash_decode.cu


def heads_per_block(kv_of_q: np.ndarray) -> int:
    """G: the most consecutive q heads (<= 8, dividing n_q) that all read one kv head."""
    for G in range(min(8, len(kv_of_q)), 0, -1):
        if len(kv_of_q) % G == 0 and all(len(set(kv_of_q[a:a + G])) == 1 for a in range(0, len(kv_of_q), G)):
            return G
    return 1


def flash_decode(q, pages, layer, tables, lengths, kv_of_q, /, *, scale: float, window: int = 0, chunk: int = 256,
                 max_splits: int | None = None):
    """Split then combine. kv_of_q: host `[n_q]` ints (static per model); max_splits: the split
    grid (default: from `lengths`, which costs a device-to-host copy; pass it to avoid one)."""
    B, n_q, hd = q.shape
    if hd > 256:
        raise ValueError(f"flash_decode supports head_dim <= 256, got {hd}")
    kv_host = np.asarray(kv_of_q, np.int32)
    G = heads_per_block(kv_host)
    S = max_splits or num_splits(cp.asnumpy(lengths), window, chunk)
    o_part = cp.empty((B, n_q, S, hd), np.float32)
    ml_part = cp.empty((B, n_q, S, 2), np.float32)
    num_pages, page_size, n_kv = pages.shape[2], pages.shape[3], pages.shape[4]
    _kernel("flash_decode.cu", "flash_decode_split")(
        (B, n_q // G, S), (128,),
        (_contig(q), _contig(pages), _contig(tables), _contig(lengths), cp.asarray(kv_host), _i(layer), _i(num_pages),
         _i(page_size), _i(tables.shape[1]), _i(n_q), _i(n_kv), _i(hd), _i(G), _i(window), _i(chunk), _i(S), _f(scale),
         o_part, ml_part))
    out = cp.empty((B, n_q, hd), bfloat16)
    _kernel("flash_decode.cu", "flash_decode_combine")((B * n_q,), (128,), (o_part, ml_part, _i(S), _i(hd), out))
    return out


# ------------------------------------------------------------------------------------------
# sample.cu


def sample_tokens(logits, temperature, top_k, top_p, seed, position, /):
    """`[B]` int32 token ids (the only thing a GPU step returns to the host)."""
    B, V = logits.shape
    out = cp.empty(B, np.int32)
    _kernel("sample.cu", "sample_tokens")(
        (B,), (1024,), (_contig(logits.astype(np.float32, copy=False)), _i(V), temperature.astype(np.float32),
                        top_k.astype(np.int32), top_p.astype(np.float32), seed.astype(np.uint64),
                        position.astype(np.int64), out))
    return out


# ------------------------------------------------------------------------------------------
# dequant_gemv.cu


def gptq_int4_gemv(x, qweight, scales, zeros, g_idx, /, *, group_size: int, in_features: int, out_scale: float = 1.0):
    B, K = _check(x, what="gptq_int4_gemv")
    N = qweight.shape[1]
    if K != in_features:
        raise ValueError(f"gptq_int4_gemv: x has {K} features, the weight {in_features}")
    y = cp.empty((B, N), bfloat16)
    gi = None if g_idx is None else g_idx.astype(np.int32)
    _kernel("dequant_gemv.cu", "gptq_int4_gemv")(
        ((N + 127) // 128,), (32, 8),
        (_contig(x), _contig(qweight), _contig(scales.astype(np.float16, copy=False)), _contig(zeros), _ptr(gi),
         _i(group_size), y, _i(B), _i(N), _i(K), _f(out_scale)))
    return y


def fp8_e4m3_gemv(x, w, scale, /, *, out_scale: float = 1.0):
    B, K = _check(x, what="fp8_e4m3_gemv")
    N = w.shape[0]
    y = cp.empty((B, N), bfloat16)
    s = scale.astype(np.float32).reshape(-1)
    _kernel("dequant_gemv.cu", "fp8_e4m3_gemv")(
        ((N + 3) // 4,), (128,), (_contig(x), _contig(w), s, _i(s.size > 1), y, _i(B), _i(N), _i(K), _f(out_scale)))
    return y
