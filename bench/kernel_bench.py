"""The decode kernels alone, on one device: the bytes each launch must read and the bandwidth it
achieves, at Llama-3-8B shapes (TP 1), against the device's measured copy bandwidth. On a GPU the
kernels run through `tpmax.kernels.gpu_ops`; on a CPU the NumPy twins run (a smoke test of this
script: their timings say nothing about the kernels).

    python bench/kernel_bench.py [--device gpu:0] [--out PATH]
    python bench/kernel_bench.py --device cpu --small      # the CPU smoke mode (tests)

Writes `bench/results/kernel_bench-<machine>.json` (or `--out`).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import roofline  # noqa: E402

# (name, N, K): the GEMVs of one Llama-3-8B layer and the lm head; small: the CPU smoke shapes
GEMVS = [("qkv", 6144, 4096), ("o_proj", 4096, 4096), ("gate_up", 2 * 14336, 4096), ("down", 4096, 14336),
         ("lm_head", 128256, 4096)]
SMALL_GEMVS = [("qkv", 96, 64), ("down", 64, 96)]


def cases(device, small: bool):
    """(name, bytes read, launch) for every benchmarked launch, inputs on `device`."""
    import tpmax
    from tpmax.kernels.step import kernels_for

    ops, xp = kernels_for(device), device.xp
    rng = np.random.default_rng(0)
    bf = lambda *s: xp.asarray((0.05 * rng.standard_normal(s)).astype(tpmax.bfloat16))  # noqa: E731
    out = []
    for B in (1, 8):
        for name, N, K in (SMALL_GEMVS if small else GEMVS):
            x, w, nw = bf(B, K), bf(N, K), bf(K)
            glu = "silu" if name == "gate_up" else None
            out.append((f"gemv {name} B={B}", w.nbytes, lambda x=x, w=w, nw=nw, glu=glu: ops.gemv(
                x, w, norm_w=nw, eps=1e-5, glu=glu)))
    n_q, n_kv, hd, ps = (4, 2, 16, 4) if small else (32, 8, 128, 16)
    for L in ((16, 64) if small else (4096, 32768)):
        B = 8
        pages_n = B * L // ps
        pages = bf(1, 2, pages_n, ps, n_kv, hd)
        tables = xp.asarray(np.arange(pages_n, dtype=np.int32).reshape(B, L // ps))
        lengths = xp.asarray(np.full(B, L, np.int32))
        q = bf(B, n_q, hd)
        kv_of_q = np.arange(n_q) // (n_q // n_kv)
        out.append((f"flash_decode B={B} L={L}", pages.nbytes, lambda q=q, p=pages, t=tables, n=lengths: ops.flash_decode(
            q, p, 0, t, n, kv_of_q, scale=0.1, chunk=256)))
    V, B = (500, 8) if small else (128256, 8)
    logits = xp.asarray(rng.standard_normal((B, V)).astype(np.float32))
    params = [xp.asarray(np.full(B, v, t)) for v, t in ((0.8, np.float32), (50, np.int32), (0.9, np.float32),
                                                        (7, np.uint64), (3, np.int64))]
    out.append((f"sample_tokens B={B} V={V}", logits.nbytes, lambda: ops.sample_tokens(logits, *params)))
    N, K = (64, 96) if small else (14336, 4096)
    from tpmax.nn.quant import pack_int32
    qw = xp.asarray(pack_int32(rng.integers(0, 16, (K, N)), 4, axis=0))
    scales, zeros = xp.asarray(np.ones((K // 32, N), np.float16)), xp.asarray(np.full((K // 32, N), 8, np.uint8))
    fp8 = xp.asarray(rng.integers(0, 0x70, (N, K)).astype(np.uint8))
    one = xp.asarray(np.ones(1, np.float32))
    for B in (1, 8):
        x = bf(B, K)
        out.append((f"gptq_int4 B={B}", qw.nbytes + scales.nbytes + zeros.nbytes,
                    lambda x=x: ops.gptq_int4_gemv(x, qw, scales, zeros, None, group_size=32, in_features=K)))
        out.append((f"fp8_e4m3 B={B}", fp8.nbytes, lambda x=x: ops.fp8_e4m3_gemv(x, fp8, one)))
    return out


def main(argv=None) -> int:
    import tpmax
    from tpmax.core.devices import on_device_context

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="gpu:0", help="one tpmax device (default gpu:0)")
    ap.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke test)")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/kernel_bench-<machine>.json)")
    args = ap.parse_args(argv)
    (device,) = tpmax.devices(args.device)
    sync = (lambda: tpmax.synchronize([device])) if device.kind == "gpu" else None
    roof = (roofline.device_roofline(device, copy_mib=8, matmul_n=128, repeats=3) if args.small
            else roofline.device_roofline(device))
    rows = []
    with on_device_context(device):
        for name, nbytes, fn in cases(device, args.small):
            t = common.timed(fn, warmup=2, repeats=3 if args.small else 20, sync=sync)
            gbps = nbytes / t.median / 1e9
            rows.append({"kernel": name, "bytes": nbytes, "us": t.median * 1e6, "gbps": gbps,
                         "bw_frac": gbps / roof["copy_gbps"], "timing": t.as_dict()})
    common.print_table(rows, ["kernel", "bytes", "us", "gbps", "bw_frac"],
                       title=f"decode kernels on {device} (copy {roof['copy_gbps']:.0f} GB/s)")
    doc = {"benchmark": "kernel_bench", "device": str(device), "roofline": roof, "machine": common.machine_info(),
           "kernels_ran": "twins (NumPy)" if device.kind == "cpu" else "CUDA (gpu_ops)", "figures": rows}
    common.save_json(doc, Path(args.out) if args.out else common.RESULTS / f"kernel_bench-{common.machine_tag()}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
