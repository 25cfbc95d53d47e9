"""Running forward steps: the step value and its executors, in one process or across MPI ranks (the
launcher, the MPI communicators and the lock-step messages).
"""
