"""The engine's lock-step messages between ranks: `bcast_arrays` and `bcast_json`.

Usage: mpirun -n N python messages_worker.py (the tests run `check` inside the
collectives job instead, op "messages"). Every rank builds the same expected values,
receives them from a root rank and checks them; prints "messages ok RANK".
"""
import numpy as np

from tpmax.parallel import mpi
from tpmax.core.devices import bfloat16, float8_e4m3fn


def expected():
    rng = np.random.default_rng(7)
    out = {}
    for i, dt in enumerate([np.float32, np.float16, bfloat16, np.float64, np.int8, np.int16, np.int32,
                            np.int64, np.uint8, np.uint16, np.uint32, np.uint64, np.bool_, float8_e4m3fn]):
        out[f"a{i}"] = rng.integers(-3, 4, size=(i % 4 + 1, 3)).astype(dt)
    out["scalar"] = np.array(5, np.int64)
    out["empty"] = np.zeros((0, 4), np.float32)
    out["tokens"] = np.arange(37, dtype=np.int64)
    out["größe ✓"] = np.ones((2, 2, 2), bfloat16)
    out["kind"] = np.array([1], np.int64)
    return out


def check(w):
    """Raises AssertionError on the first difference."""
    want = expected()
    for root in (0, w.size - 1):
        got = mpi.bcast_arrays(want if w.rank == root else None, root=root)
        assert list(got) == list(want), (list(got), list(want))
        for name, a in want.items():
            assert got[name].dtype == a.dtype and got[name].shape == a.shape, name
            assert got[name].tobytes() == a.tobytes(), name
            assert got[name].ctypes.data % a.dtype.itemsize == 0, name  # aligned
        assert mpi.bcast_arrays({} if w.rank == root else None, root=root) == {}
        msg = {"kind": 2, "texts": ["héllo", "wörld"], "n": (1, 2)}
        assert mpi.bcast_json(msg if w.rank == root else None, root=root) == \
            {"kind": 2, "texts": ["héllo", "wörld"], "n": [1, 2]}
        assert mpi.bcast_json(None) is None


def main():
    mpi.install_abort_handler()
    w = mpi.world()
    check(w)
    print(f"messages ok {w.rank}", flush=True)


if __name__ == "__main__":
    main()
