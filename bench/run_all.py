"""Run every benchmark once, in order, each as its own process, then draw the plot.

    python bench/run_all.py [--quick] [--out DIR]

A full run writes its JSON and the plot to bench/results/ (the committed figures).
`--quick` shortens every run for a smoke test; its figures are noisy, so they go to a fresh
temporary directory (printed at the end) unless `--out` says where.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent

FULL = [["roofline.py"], ["decode.py"], ["prefill.py"], ["tp_scaling.py"], ["quant_decode.py"], ["serve.py"],
        ["plot.py"]]
QUICK = [["roofline.py", "--quick"],
         ["decode.py", "--batches", "1", "4", "--steps", "8", "--quick-roofline"],
         ["prefill.py", "--lengths", "128", "--repeats", "2", "--quick-roofline"],
         ["tp_scaling.py", "--steps", "8", "--repeats", "2", "--quick-roofline"],
         ["quant_decode.py", "--batches", "1", "--steps", "4", "--layers", "2"],
         ["serve.py", "--clients", "1", "2", "--requests", "1", "--max-tokens", "8"],
         ["plot.py"]]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short runs for a smoke test (noisy figures)")
    ap.add_argument("--out", type=Path, default=None, metavar="DIR",
                    help="where the JSON and the plot go (default: bench/results; with --quick a new temp dir)")
    return ap


def main(argv=None, *, run: Callable[[list[str]], int] = subprocess.call) -> int:
    """Run the benchmarks `argv` asks for; returns 1 if any failed, else 0.

    Args:
        run: runs one command (a list of arguments) and returns its exit status.
    """
    args = parser().parse_args(argv)
    out = args.out or (Path(tempfile.mkdtemp(prefix="tpmax-bench-quick-")) if args.quick else HERE / "results")
    failed = []
    for cmd in QUICK if args.quick else FULL:
        cmd = [*cmd, "--out", str(out)]
        print(f"\n=== {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        rc = run([sys.executable, str(HERE / cmd[0]), *cmd[1:]])
        print(f"=== {cmd[0]}: exit {rc} after {time.perf_counter() - t0:.0f} s", flush=True)
        if rc:
            failed.append(cmd[0])
    print(f"\nresults in {out}")
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
