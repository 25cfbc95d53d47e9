"""An MPI job in which rank 1 fails while the others wait in a collective.

Usage: mpirun -n N python fault_worker.py MODE, MODE one of
  raise    rank 1 raises ValueError (the abort handler must end the job),
  kill     rank 1 SIGKILLs itself (mpirun must end the job),
  term     rank 1 SIGTERMs itself,
  exit     rank 1 calls sys.exit(3) inside `abort_on_error()`,
  ok       nobody fails (every rank prints "ok RANK SUM"),
  idle     rank 0 sends a lock-step message after 3 s; the others print the CPU seconds
           they used waiting for it ("idle RANK SECONDS").
"""
import os
import signal
import sys
import time

import numpy as np

from tpmax.parallel import mpi


def fail(mode):
    time.sleep(0.2)  # let the other ranks block in the next collective
    if mode == "raise":
        raise ValueError("boom on purpose")
    if mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "term":
        os.kill(os.getpid(), signal.SIGTERM)
    if mode == "exit":
        with mpi.abort_on_error():
            sys.exit(3)


def idle(w):
    if w.rank == 0:
        time.sleep(3)
        mpi.bcast_arrays({"op": np.array([1], np.int64)})
        return
    t0 = time.process_time()
    mpi.bcast_arrays(None)
    print(f"idle {w.rank} {time.process_time() - t0:.3f}", flush=True)


def main(mode):
    mpi.install_abort_handler()
    w, MPI = mpi.world(), mpi.world_mpi()
    if mode == "idle":
        return idle(w)
    x = np.ones(4, np.float32)
    w.comm.Allreduce(MPI.IN_PLACE, x)  # everybody is up
    if w.rank == 1:
        fail(mode)
    w.comm.Allreduce(MPI.IN_PLACE, x)
    print(f"ok {w.rank} {x[0]}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
