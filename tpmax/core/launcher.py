"""What the environment says about this process's place in an MPI job, read without MPI (no
mpi4py import): was it started by an MPI launcher, and how many ranks share its host."""
from __future__ import annotations

import os

# Environment variables that MPI launchers set in every process they start: Open MPI's
# mpirun, PMIx (Open MPI 5, `srun --mpi=pmix`), PMI-1/2 (MPICH/Hydra, Intel MPI,
# `srun --mpi=pmi2`), MVAPICH. Slurm's own SLURM_PROCID is not among them: it is also set
# in a plain `srun python ...` that no MPI library can join.
LAUNCHER_ENV = ("OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_SIZE", "PMI_RANK", "MV2_COMM_WORLD_SIZE")
# The ranks on this host, then (when no launcher says) the ranks of the whole job.
LOCAL_SIZE_ENV = ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "MV2_COMM_WORLD_LOCAL_SIZE",
                  "SLURM_NTASKS_PER_NODE")
WORLD_SIZE_ENV = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE", "SLURM_NTASKS")


def launched_by_mpi() -> bool:
    """True if an MPI launcher started this process (judged from its environment only)."""
    return any(k in os.environ for k in LAUNCHER_ENV)


def local_rank_count() -> int:
    """How many ranks of this job run on this host, from the launcher's environment (Open
    MPI, MPICH/Hydra, MVAPICH, Slurm); the job size when none says; 1 in a plain run."""
    if not launched_by_mpi():
        return 1
    for k in LOCAL_SIZE_ENV + WORLD_SIZE_ENV:
        if os.environ.get(k, "").strip().isdigit():
            return max(1, int(os.environ[k]))
    return 1
