"""Run under mpirun by tests/test_executor.py: one forward step per set of pass options
(`tests/test_executor.py::OPTION_CASES`), each through `model.executor` on every rank; every
rank writes what its call returned to OUT.rank<r>.json.

Usage: mpirun -n R python executor_worker.py DEVICES OUT
"""
import json
import sys
from pathlib import Path

import numpy as np

import tpmax
from tpmax.core.devices import to_numpy

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from test_executor import FIXTURE, OPTION_CASES, SEQS, options_of  # noqa: E402


def one_step(model, options: dict) -> list:
    """Prefill SEQS with `options`; every output of the pass as nested lists."""
    ex = model.executor

    def body():
        cache = ex.new_cache(64)
        for i in range(len(SEQS)):
            cache.add(i)
        try:
            out = ex.run(cache, ex.step(list(range(len(SEQS))), SEQS, **options_of(options)))
        finally:
            ex.free_cache(cache)
        return [np.asarray(to_numpy(o)).tolist() for o in out]

    return ex.call(body, receive=lambda _, out: [np.asarray(to_numpy(o)).tolist() for o in out])


def main(devices, out):
    model = tpmax.load(FIXTURE, devices=devices, progress=False)
    got = [one_step(model, case) for case in OPTION_CASES]
    rank = model.comm.mpi.Get_rank()
    Path(f"{out}.rank{rank}.json").write_text(json.dumps(got))


if __name__ == "__main__":
    main(*sys.argv[1:])
