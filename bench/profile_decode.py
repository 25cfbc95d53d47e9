"""cProfile of tpmax decode steps (after prefill and warm-up), sorted by cumulative time.

cProfile sees the main thread only: work that `per_device` runs on its worker threads
(TP > 1) shows up as the main thread waiting in `ThreadPoolExecutor.map` / `lock.acquire`.
Profile `--devices cpu` to see every NumPy call by name.

    python bench/profile_decode.py [--devices cpu:0,1] [--batch 1] [--steps 20] [--top 25]
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import decode  # noqa: E402


def main(argv=None) -> int:
    import tpmax

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", default="cpu:0,1")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--sort", default="cumtime", help="pstats sort key (cumtime, tottime, ...)")
    ap.add_argument("--model", default=None)
    args = ap.parse_args(argv)
    model = tpmax.load(common.model_path(args.model), devices=args.devices, progress=False)
    B, P = args.batch, args.prompt
    ex = model.executor
    cache = ex.new_cache(B * (P + args.steps + 20))
    seqs = list(range(B))
    for s in seqs:
        cache.add(s)
    prompts = decode.prompts_for(B, P, model.cfg.vocab_size)
    (last,) = ex.run(cache, ex.step(seqs, prompts))
    nxt = np.asarray(last).argmax(-1)

    def steps(n):
        nonlocal nxt
        for _ in range(n):
            (lg,) = ex.run(cache, ex.step(seqs, nxt[:, None]))
            nxt = np.asarray(lg).argmax(-1)

    steps(3)  # warm-up
    prof = cProfile.Profile()
    prof.runcall(steps, args.steps)
    st = pstats.Stats(prof)
    print(f"tpmax decode, devices {args.devices}, batch {B}, {args.steps} steps: "
          f"{st.total_tt:.2f} s profiled ({args.steps / st.total_tt:.1f} steps/s under the profiler)")
    st.sort_stats(args.sort).print_stats(args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
