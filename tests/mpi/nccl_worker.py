"""NCCL across MPI ranks, one GPU per rank: every collective against NumPy.

Usage: mpirun -n N python nccl_worker.py (needs N CUDA GPUs, CuPy with NCCL and mpi4py).
Every rank prints "nccl ok RANK" when all checks pass.
"""
import numpy as np

import tpmax
from tpmax.parallel import mpi
from tpmax.parallel import mpi_comm


def main():
    mpi.install_abort_handler()
    w = mpi.world()
    devs = tpmax.devices("gpu:" + ",".join(map(str, range(w.size))))
    comm = mpi.mpi_communicator(devs)
    assert isinstance(comm, mpi_comm.NcclRankCommunicator), comm
    assert comm.devices == [devs[w.rank]] and comm.ranks == [w.rank] and comm.tp == w.size
    rng = np.random.default_rng(0)
    for dtype in ("float32", "float16", "bfloat16", "int32", "int64"):
        dt = tpmax.as_dtype(dtype)
        full = [rng.integers(-16, 17, size=(5, 7)).astype(dt) for _ in range(w.size)]  # every rank's input
        mine = [tpmax.asarray(full[w.rank], comm.devices[0])]
        total = np.sum([x.astype(np.float64) for x in full], axis=0)

        out = tpmax.to_numpy(comm.allreduce_sum(mine)[0])
        assert out.dtype == dt and (out.astype(np.float64) == total).all(), dtype

        for axis in (0, 1):
            rs = tpmax.to_numpy(comm.reduce_scatter(mine, axis=axis)[0])
            a, b = tpmax.split_bounds(total.shape[axis], w.size)[w.rank]
            assert (rs.astype(np.float64) == np.take(total, range(a, b), axis=axis)).all(), (dtype, axis)

        shards = [x[:, : 1 + r] for r, x in enumerate(full)]  # uneven on axis 1
        ag = tpmax.to_numpy(comm.allgather([tpmax.asarray(shards[w.rank], comm.devices[0])], axis=1)[0])
        assert ag.tobytes() == np.concatenate(shards, axis=1).tobytes(), dtype

        root = w.size - 1
        bc = comm.broadcast(mine[0] if w.rank == root else None, root=root)
        assert tpmax.to_numpy(bc[0]).tobytes() == full[root].tobytes(), dtype
    tpmax.synchronize(comm.devices)
    print(f"nccl ok {w.rank}", flush=True)


if __name__ == "__main__":
    main()
