"""Tensor-parallel scaling on CPU: tpmax decode (batch 1 and 8) and prefill (128 and 512
tokens) at TP 1 in one process (BLAS on every core), TP 2 over 2 MPI ranks (one BLAS thread
per rank, one device each) and TP 2 in one process (two virtual devices taking turns), all
measured in one run, with each rank's decode step profiled (BLAS, collectives, the rest).

This machine is memory-bandwidth bound with few cores, so TP here measures the cost of the
TP structure (split matmuls, collectives, per-device Python), not added hardware. The MPI
case runs this script under `mpirun -n 2` (`--mpi-worker`): rank 0 times and profiles,
rank 1 follows it step by step (`tpmax.parallel.executor`).

    python bench/tp_scaling.py [--steps 24] [--repeats 3] [--model PATH] [--out DIR]
"""
from __future__ import annotations

import cProfile
import json
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import decode  # noqa: E402
import prefill  # noqa: E402
import roofline  # noqa: E402

COLUMNS = ["setup", "decode_b1_tok_s", "decode_b1_vs_tp1", "decode_b8_tok_s", "decode_b8_vs_tp1",
           "prefill_128_tok_s", "prefill_128_vs_tp1", "prefill_512_tok_s", "prefill_512_vs_tp1"]
BATCHES = (1, 8)
PREFILLS = (128, 512)


def measure(model, args) -> dict:
    """Decode tokens/s at each batch and prefill tokens/s at each length, for one model."""
    cfg = model.cfg
    out = {}
    for b in BATCHES:
        t, _, _ = decode.tpmax_decode(model, decode.prompts_for(b, args.prompt, cfg.vocab_size), args.steps,
                                      args.warmup)
        out[f"decode_b{b}_tok_s"] = b / t.median
        out[f"decode_b{b}_timing"] = t.as_dict()
    for n in PREFILLS:
        ids = decode.prompts_for(1, n, cfg.vocab_size, seed=n)[0]
        t = prefill.tpmax_prefill(model, ids, warmup=1, repeats=args.repeats)
        out[f"prefill_{n}_tok_s"] = n / t.median
        out[f"prefill_{n}_timing"] = t.as_dict()
    return out


def profile_decode(model, args) -> dict:
    """Where one process's batch-1 decode step goes: seconds per step in BLAS (the matmul
    helpers' own time), in collectives (the communicators' own time: MPI calls, waiting for
    the other rank included, and in-process copies) and everything else (Python and small
    NumPy ops)."""
    prof = cProfile.Profile()
    prof.enable()
    t, _, _ = decode.tpmax_decode(model, decode.prompts_for(1, args.prompt, model.cfg.vocab_size), args.steps, 0)
    prof.disable()
    st = pstats.Stats(prof).stats
    total = sum(t.times)
    blas = sum(v[2] for (f, _, name), v in st.items() if name in ("matmul_t", "linear") and "layers.py" in f)
    # mpi4py's calls are compiled (Cython) and invisible to cProfile: their time is the own time
    # of the communicator functions calling them (tpmax/parallel/mpi.py, tpmax/core/comm.py).
    comm = sum(v[2] for (f, _, name), v in st.items() if f.endswith(("tpmax/parallel/mpi.py", "tpmax/core/comm.py")))
    steps = len(t.times)
    return {"step_ms": 1e3 * total / steps, "blas_ms": 1e3 * blas / steps, "collectives_ms": 1e3 * comm / steps,
            "other_ms": 1e3 * (total - blas - comm) / steps}


def one_process(path: Path, spec: str, args) -> dict:
    import tpmax

    model = tpmax.load(path, devices=spec, dtype="float32", progress=False)
    row = {"setup": f"{spec} (1 process)", "tp": len(model.devices), **measure(model, args)}
    row["profile"] = profile_decode(model, args)
    return row


def mpi_ranks(path: Path, spec: str, n: int, args) -> dict | None:
    """The MPI case: this script under `mpirun -n n`, one BLAS thread per rank."""
    mpirun = shutil.which("mpirun", path=str(Path(sys.executable).parent)) or shutil.which("mpirun")
    if mpirun is None:
        print("mpirun not found (pip install -e '.[mpi]'): MPI case skipped")
        return None
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        res = Path(tmp) / "rank0.json"
        cmd = [mpirun, "-n", str(n), "--oversubscribe", "--bind-to", "none", sys.executable, __file__,
               "--mpi-worker", str(res), "--devices", spec, "--model", str(path), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--prompt", str(args.prompt), "--repeats", str(args.repeats)]
        subprocess.run(cmd, env=env, check=True, timeout=1800)
        return json.loads(res.read_text())


def mpi_worker(args) -> int:
    """One rank of the MPI case: rank 0 measures, the others follow it."""
    import tpmax

    model = tpmax.load(args.model, devices=args.devices, dtype="float32", progress=False)

    def lead():
        row = {"setup": f"{args.devices} ({model.comm.mpi.Get_size()} MPI ranks)", "tp": model.comm.tp,
               **measure(model, args)}
        row["profile"] = profile_decode(model, args)
        Path(args.mpi_worker).write_text(json.dumps(row))

    model.executor.call(lead)
    return 0


def run(args) -> dict:
    path = common.model_path(args.model)
    roof = roofline.measure_verbose(quick=args.quick_roofline)
    rows = [one_process(path, "cpu", args), mpi_ranks(path, "cpu:0,1", 2, args), one_process(path, "cpu:0,1", args)]
    rows = [r for r in rows if r is not None]
    base = rows[0]
    for r in rows:
        for k in ("decode_b1", "decode_b8", "prefill_128", "prefill_512"):
            r[f"{k}_vs_tp1"] = r[f"{k}_tok_s"] / base[f"{k}_tok_s"]
    common.print_table(rows, COLUMNS, title=f"TP scaling on CPU: decode (prompt {args.prompt}, {args.steps} timed "
                                            f"steps), prefill; ratios against TP 1 in one process")
    common.print_table([{"setup": r["setup"], **r["profile"]} for r in rows],
                       ["setup", "step_ms", "blas_ms", "collectives_ms", "other_ms"],
                       title="decode batch 1, one rank's step (rank 0 under MPI; collectives include waiting)")
    common.write_json("tp_scaling", backend="numpy", devices=[r["setup"] for r in rows], model=str(path),
                      dtype="float32", roofline=roof,
                      protocol={"decode_batches": BATCHES, "prompt_tokens": args.prompt, "warmup_steps": args.warmup,
                                "timed_steps": args.steps, "prefill_tokens": PREFILLS,
                                "prefill_repeats": args.repeats,
                                "mpi": "mpirun -n 2 --bind-to none, OPENBLAS_NUM_THREADS=1 per rank",
                                "ratios": "tokens/s over TP 1 in one process (BLAS on every core)"},
                      figures=rows, out=args.out)
    return {"rows": rows}


def parser():
    ap = common.arg_parser(__doc__)
    ap.add_argument("--steps", type=int, default=24, help="timed decode steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed decode steps")
    ap.add_argument("--prompt", type=int, default=32, help="decode prompt tokens")
    ap.add_argument("--repeats", type=int, default=3, help="timed prefill repeats")
    ap.add_argument("--model", default=None, help="GGUF file (default: tpmax's default model)")
    ap.add_argument("--quick-roofline", action="store_true", help="fewer roofline repeats")
    ap.add_argument("--devices", default="cpu:0,1", help=argparse_suppress())
    ap.add_argument("--mpi-worker", default=None, metavar="JSON", help=argparse_suppress())
    common.add_out_arg(ap)
    return ap


def argparse_suppress():
    import argparse

    return argparse.SUPPRESS


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.mpi_worker:
        return mpi_worker(args)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
