"""Run every benchmark once, in order, each as its own process, then draw the plot.

    python bench/run_all.py [--quick]

`--quick` shortens every run (for a smoke test; the figures are then noisy).
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

FULL = [["roofline.py"], ["decode.py"], ["prefill.py"], ["tp_scaling.py"], ["plot.py"]]
QUICK = [["roofline.py", "--quick"],
         ["decode.py", "--batches", "1,4", "--steps", "8", "--quick-roofline"],
         ["prefill.py", "--lengths", "128", "--repeats", "2", "--quick-roofline"],
         ["tp_scaling.py", "--steps", "8", "--repeats", "2", "--quick-roofline"],
         ["plot.py"]]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    failed = []
    for cmd in QUICK if "--quick" in argv else FULL:
        print(f"\n=== {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call([sys.executable, str(HERE / cmd[0]), *cmd[1:]])
        print(f"=== {cmd[0]}: exit {rc} after {time.perf_counter() - t0:.0f} s", flush=True)
        if rc:
            failed.append(cmd[0])
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
