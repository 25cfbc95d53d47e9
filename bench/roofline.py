"""The measured machine roofline: float32 matmul FLOP/s and streaming read bandwidth on the
CPU (NumPy, default threads), and on GPU 0 copy bandwidth and bf16 matmul FLOP/s (CuPy);
`device_roofline` measures the same two figures on any one tpmax device.

The other benchmarks call `measure()` in their own run, so every ratio they report is
against a roofline taken minutes earlier on the same machine state.

    python bench/roofline.py [--quick] [--out DIR]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

STREAM_MB = 512


# ------------------------------------------------------------------------------------------
# CPU.


def cpu_matmul(n: int = 2048, *, repeats: int = 5) -> dict:
    """`[n, n] @ [n, n]` float32: 2 n^3 FLOPs, compute bound."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    c = np.empty((n, n), np.float32)
    t = common.timed(lambda: np.matmul(a, b, out=c), warmup=2, repeats=repeats)
    return {"shape": [n, n, n], "gflops": 2 * n**3 / t.best / 1e9, "timing": t.as_dict()}


def cpu_gemv(rows: int, cols: int, *, repeats: int = 5) -> dict:
    """`W [rows, cols] @ x [cols]` float32: the decode shape, bound by reading W once."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((rows, cols), dtype=np.float32)
    x = rng.standard_normal(cols, dtype=np.float32)
    y = np.empty(rows, np.float32)
    t = common.timed(lambda: np.matmul(w, x, out=y), warmup=2, repeats=repeats)
    return {"shape": [rows, cols], "gflops": 2 * rows * cols / t.best / 1e9,
            "read_gbps": w.nbytes / t.best / 1e9, "timing": t.as_dict()}


def cpu_stream(mb: int = STREAM_MB, *, repeats: int = 5) -> dict:
    """Streaming reads of one `mb` MB float32 array, three ways (best time of each).

    - `sum`: `a.sum()`, NumPy's own SIMD reduction on one thread.
    - `dot`: `np.dot(a, a)` (BLAS sdot, may use every BLAS thread; reads the array once).
    - `gemv`: the array as a `[n/4096, 4096]` matrix times a vector (BLAS sgemv, all BLAS
      threads) - the access pattern of a decode step.
    The roofline is the best of the three: what a NumPy program on this machine can read.
    """
    n = mb * 2**20 // 4
    a = np.random.default_rng(2).standard_normal(n, dtype=np.float32)
    x = np.ones(4096, np.float32)
    m = a.reshape(-1, 4096)
    ways = {"sum": lambda: a.sum(), "dot": lambda: np.dot(a, a), "gemv": lambda: m @ x}
    out = {}
    for name, fn in ways.items():
        t = common.timed(fn, warmup=1, repeats=repeats)
        out[name] = {"gbps": a.nbytes / t.best / 1e9, "timing": t.as_dict()}
    best = max(out, key=lambda k: out[k]["gbps"])
    return {"bytes": a.nbytes, "ways": out, "best_way": best, "gbps": out[best]["gbps"]}


def measure_cpu(*, quick: bool = False) -> dict:
    r = 3 if quick else 7
    mm = cpu_matmul(2048, repeats=r)
    stream = cpu_stream(STREAM_MB, repeats=r)
    return {
        "threads": "default (BLAS: see machine.blas)",
        "matmul_f32": mm,
        "gemv_f32_decode_shape": cpu_gemv(49152, 576, repeats=r),  # SmolLM2's lm_head
        "stream_read": stream,
        "peak_gflops_f32": mm["gflops"],
        "peak_read_gbps": stream["gbps"],
    }


# ------------------------------------------------------------------------------------------
# GPU.


def measure_gpu(*, quick: bool = False) -> dict:
    import tpmax

    if tpmax.gpu_count() == 0:
        reason = "CuPy not installed" if common.version_of("cupy") is None else "no CUDA device visible"
        return {"available": False, "reason": reason, "copy_gbps": None, "peak_tflops_bf16": None}
    cp = tpmax.devices("gpu")[0].xp
    r = 5 if quick else 20
    sync = cp.cuda.Device(0).synchronize
    n = 2**28  # 1 GiB of float32
    a = cp.ones(n, cp.float32)
    b = cp.empty_like(a)
    t = common.timed(lambda: cp.copyto(b, a), warmup=3, repeats=r, sync=sync)
    copy_gbps = 2 * a.nbytes / t.best / 1e9  # read + write
    del a, b
    k = 8192
    dtype_used, mm = None, None
    for dt in (tpmax.bfloat16, np.float16):
        try:
            x = cp.asarray(_random_matrix(k)).astype(dt)  # random data: all-ones reads ~13 % fast
            y = cp.empty((k, k), dt)
            cp.matmul(x, x, out=y)
            mm = common.timed(lambda: cp.matmul(x, x, out=y), warmup=3, repeats=r, sync=sync)
            dtype_used = str(np.dtype(dt))
            break
        except Exception as e:  # CuPy without bf16 GEMM: fall back to fp16
            err = repr(e)
    return {
        "available": True, "device": common.gpu_info()[0],
        "copy_d2d": {"bytes_moved": 2 * n * 4, "timing": t.as_dict()},
        "copy_gbps": copy_gbps,
        "matmul": None if mm is None else {"shape": [k, k, k], "dtype": dtype_used, "timing": mm.as_dict()},
        "matmul_error": None if mm is not None else err,
        "peak_tflops_bf16": None if mm is None else 2 * k**3 / mm.best / 1e12,
        "peak_dtype": dtype_used,
    }


def _random_matrix(k: int) -> np.ndarray:
    """`[k, k]` float32 standard normal: a matmul peak measured on constant data is inflated
    (on an H200, bf16 zeros gave 894 TFLOP/s and random data 788)."""
    return np.random.default_rng(0).standard_normal((k, k), np.float32)


def device_roofline(device, *, copy_mib: int = 1024, matmul_n: int = 8192, repeats: int = 20) -> dict:
    """Copy bandwidth and matmul peak of one tpmax device, measured on that device.

    The matmul runs in the dtype tpmax's matmuls use there: bf16 on a GPU (CuPy), float32 on
    a virtual CPU device (NumPy has no fast half GEMM, so tpmax computes half weights in
    float32). Copy GB/s counts read + write bytes, as a decode step's weight reads are
    compared against it.

    Args:
        device: a `tpmax.Device`; copy_mib: copy size; matmul_n: square matmul size.
    Returns:
        `{"device", "copy_gbps", "matmul_tflops", "matmul_dtype", "copy", "matmul"}`.
    """
    import tpmax
    from tpmax.core.devices import asarray, on_device_context

    xp = device.xp
    sync = (lambda: tpmax.synchronize([device])) if device.kind == "gpu" else None
    dtype = tpmax.bfloat16 if device.kind == "gpu" else np.dtype(np.float32)
    with on_device_context(device):
        a = xp.ones(copy_mib * 2**20 // 4, xp.float32)
        b = xp.empty_like(a)
        copy = common.timed(lambda: xp.copyto(b, a), warmup=2, repeats=repeats, sync=sync)
        nbytes = a.nbytes
        del a, b
        k = matmul_n
        x = asarray(_random_matrix(k), device).astype(dtype)
        y = xp.empty((k, k), dtype if device.kind == "gpu" else np.float32)
        mm = common.timed(lambda: xp.matmul(x, x, out=y), warmup=2, repeats=repeats, sync=sync)
        del x, y
    return {
        "device": str(device),
        "copy_gbps": 2 * nbytes / copy.best / 1e9,
        "matmul_tflops": 2 * k**3 / mm.best / 1e12,
        "matmul_dtype": str(np.dtype(dtype)),
        "copy": {"bytes_moved": 2 * nbytes, "timing": copy.as_dict()},
        "matmul": {"shape": [k, k, k], "timing": mm.as_dict()},
    }


def measure(*, quick: bool = False) -> dict:
    """The roofline numbers other benchmarks divide by (CPU always, GPU when present)."""
    return {"cpu": measure_cpu(quick=quick), "gpu": measure_gpu(quick=quick)}


def measure_verbose(*, quick: bool = False) -> dict:
    """`measure`, saying so on stdout (for the benchmarks that re-measure it in their run)."""
    print(f"measuring the roofline ({'quick' if quick else 'full'}) ...", flush=True)
    roof = measure(quick=quick)
    print(f"  f32 matmul {roof['cpu']['peak_gflops_f32']:.1f} GFLOP/s, "
          f"stream read {roof['cpu']['peak_read_gbps']:.2f} GB/s", flush=True)
    return roof


def summary_rows(roof: dict) -> list[dict]:
    c, g = roof["cpu"], roof["gpu"]
    rows = [
        {"what": "cpu f32 matmul 2048^3", "value": c["matmul_f32"]["gflops"], "unit": "GFLOP/s"},
        {"what": "cpu f32 gemv 49152x576", "value": c["gemv_f32_decode_shape"]["gflops"], "unit": "GFLOP/s"},
        {"what": "cpu f32 gemv 49152x576 read", "value": c["gemv_f32_decode_shape"]["read_gbps"], "unit": "GB/s"},
    ]
    for way, v in c["stream_read"]["ways"].items():
        rows.append({"what": f"cpu stream read {STREAM_MB} MB ({way})", "value": v["gbps"], "unit": "GB/s"})
    rows.append({"what": "cpu roofline read (best)", "value": c["peak_read_gbps"], "unit": "GB/s"})
    if g["available"]:
        rows.append({"what": "gpu0 d2d copy", "value": g["copy_gbps"], "unit": "GB/s"})
        rows.append({"what": f"gpu0 {g['peak_dtype']} matmul 8192^3", "value": (g["peak_tflops_bf16"] or 0) * 1e3,
                     "unit": "GFLOP/s"})
    else:
        rows.append({"what": f"gpu: {g['reason']}", "value": None, "unit": ""})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    common.add_out_arg(ap)
    args = ap.parse_args(argv)
    roof = measure(quick=args.quick)
    common.print_table(summary_rows(roof), ["what", "value", "unit"], title="machine roofline")
    common.write_json("roofline", backend="numpy" + ("+cupy" if roof["gpu"]["available"] else ""),
                      devices="cpu" + (",gpu:0" if roof["gpu"]["available"] else ""), model=None, dtype="float32",
                      figures=roof, out=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
