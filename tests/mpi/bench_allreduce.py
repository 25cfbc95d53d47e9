"""Per-call latency of the all-reduce (and reduce-scatter) between MPI ranks on this host.

Usage: mpirun -n 2 python tests/mpi/bench_allreduce.py [CALLS]
Prints one JSON object (rank 0): for each shape, the median and 90th percentile in
microseconds over CALLS calls (after 10% warm-up), each call started right after a
Barrier, timed on every rank, the slowest rank counted. Rows: `mpi_Allreduce` (the bare
mpi4py call, in place), `allreduce_sum` (tpmax's MpiCommunicator: checks, local copy,
Allreduce, result buffer), and the two ways to do a reduce-scatter on axis 0.
"""
import json
import sys
import time

import numpy as np

import tpmax
from tpmax.parallel import mpi
from tpmax.parallel import mpi_comm

SHAPES = [(1, 576), (8, 4096)]


def timed(comm, fn, calls):
    for _ in range(max(1, calls // 10)):
        fn()
    ts = np.empty(calls)
    for i in range(calls):
        comm.Barrier()
        t0 = time.perf_counter()
        fn()
        ts[i] = time.perf_counter() - t0
    worst = np.empty_like(ts)
    comm.Allreduce(ts, worst, op=mpi.world_mpi().MAX)  # a collective ends when its slowest rank does
    return {"median_us": round(float(np.median(worst)) * 1e6, 2),
            "p90_us": round(float(np.percentile(worst, 90)) * 1e6, 2)}


def main(calls):
    w, MPI = mpi.world(), mpi.world_mpi()
    devs = tpmax.devices("cpu:" + ",".join(map(str, range(w.size))))
    comm = mpi_comm.MpiCommunicator(devs, w.comm)
    out = {"ranks": w.size, "calls": calls, "mpi": MPI.Get_library_version().splitlines()[0].rstrip("\x00"), "shapes": {}}
    for shape in SHAPES:
        x = np.random.default_rng(w.rank).standard_normal(shape).astype(np.float32)
        buf = x.copy()
        rows = tpmax.split_sizes(shape[0], w.size)
        recv = np.empty((rows[w.rank], shape[1]), np.float32)
        a, b = tpmax.split_bounds(shape[0], w.size)[w.rank]
        full = np.empty_like(x)
        r = {
            "bytes": x.nbytes,
            "mpi_Allreduce": timed(w.comm, lambda: w.comm.Allreduce(MPI.IN_PLACE, buf), calls),
            "allreduce_sum": timed(w.comm, lambda: comm.allreduce_sum([x]), calls),
            "Reduce_scatter": timed(w.comm, lambda: w.comm.Reduce_scatter(x, recv, [n * shape[1] for n in rows]), calls),
            "Allreduce+slice": timed(w.comm, lambda: (w.comm.Allreduce(x, full), full[a:b].copy()), calls),
        }
        out["shapes"]["x".join(map(str, shape))] = r
    if w.rank == 0:
        print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000)
