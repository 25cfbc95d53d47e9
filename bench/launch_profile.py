"""Launch-count profile of one tpmax decode step: per layer, how many array operations
(kernel launches on a GPU), collectives and host syncs it makes.

The step is cut into segments at its collectives, which the forward pass makes in a fixed
order: the embedding's all-reduce, then two all-reduces per layer (after o_proj, after
down_proj), then the lm_head's allgather. Layer i is the two segments ending at its two
all-reduces. The residual add that follows an all-reduce falls into the next segment, so
layer 0 carries the embedding's scaling (if any) and the head carries the last layer's add;
middle layers are exact.

- CPU (`--devices cpu...`): the weights, KV pages and collective outputs are wrapped in an
  ndarray subclass that counts every ufunc (operators, matmul, reductions), every array
  function that does not return a view, `astype`/`copy` that copy, fancy indexing and item
  assignment - one count per operation, as each would be one kernel on CuPy - and every
  read of a value back into Python (`bool()`, `float()`, `.item()`, ...: a host sync on a
  GPU). NumPy array creations (`zeros`, `empty`, ...) are counted through `sys.setprofile`.
  Host-to-device uploads are not seen (on CPU they are no-ops).
- GPU: CUDA runtime calls through CUPTI (`torch.profiler`, when torch is installed):
  kernel launches, memcpys and synchronizations, attributed to the same segments through
  `record_function` ranges; each segment is also an NVTX range (`cupyx.profiler.time_range`)
  for Nsight Systems.

    python bench/launch_profile.py [--devices cpu:0,1] [--layers 2] [--batch 1] [--small]

Writes JSON (`--out`, default `bench/results/launch_profile-<devices>.json`) and prints a table.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import datetime
import sys
import threading
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import gpu_decode  # noqa: E402

CREATIONS = {"zeros": True, "ones": True, "full": True, "empty": False, "zeros_like": True, "empty_like": False,
             "ones_like": True, "full_like": True}  # name -> fills (a kernel on GPU)


# ------------------------------------------------------------------------------------------
# Segments: cut at each collective.


class Segments:
    """Counters per segment; a new segment starts after every collective.

    `on_cut(i)` (optional) is called when segment `i` starts (GPU mode opens its ranges there).
    """

    def __init__(self, on_cut=None):
        self.rows: list[collections.Counter] = [collections.Counter()]
        self.kinds: list[str] = []  # the collective that ended each segment
        self.on_cut = on_cut
        self._lock = threading.Lock()

    def reset(self) -> None:
        """Forget everything counted so far (the prefill and warm-up before the profiled step)."""
        with self._lock:
            self.rows, self.kinds = [collections.Counter()], []

    def count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.rows[-1][key] += n

    def cut(self, collective: str) -> None:
        with self._lock:
            self.kinds.append(collective)
            self.rows.append(collections.Counter())
        if self.on_cut is not None:
            self.on_cut(len(self.rows) - 1)


class CountingComm:
    """Wraps a communicator: each collective ends the current segment. On CPU its outputs
    are re-wrapped as counted arrays so work on them is counted too."""

    def __init__(self, comm, segments: Segments, wrap):
        self.inner, self.segments, self.wrap = comm, segments, wrap
        self.devices, self.ranks, self.tp = comm.devices, comm.ranks, comm.tp

    def _done(self, name, outs):
        self.segments.count(f"collective.{name}")
        self.segments.cut(name)
        return [self.wrap(o) for o in outs]

    def allreduce_sum(self, xs):
        return self._done("allreduce_sum", self.inner.allreduce_sum(xs))

    def allgather(self, xs, axis=-1):
        return self._done("allgather", self.inner.allgather(xs, axis))

    def broadcast(self, x, *, root=0):
        return self._done("broadcast", self.inner.broadcast(x, root=root))

    def reduce_scatter(self, xs, axis=0):
        return self._done("reduce_scatter", self.inner.reduce_scatter(xs, axis))


# ------------------------------------------------------------------------------------------
# CPU: count NumPy operations.


def counted_class(segments: Segments):
    """An ndarray subclass whose operations count into `segments`."""

    def base(x):
        return x.view(np.ndarray) if isinstance(x, Counted) else x

    class Counted(np.ndarray):
        def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
            segments.count("op." + ufunc.__name__ + ("" if method == "__call__" else "." + method))
            outs = kwargs.get("out")
            if outs:
                kwargs["out"] = tuple(base(o) for o in outs)
            res = getattr(ufunc, method)(*[base(x) for x in inputs], **kwargs)
            if outs:
                return outs[0] if len(outs) == 1 else outs
            return res.view(Counted) if isinstance(res, np.ndarray) else res

        def __array_function__(self, func, types, args, kwargs):
            flat = [a for a in args if isinstance(a, np.ndarray)]
            flat += [a for a in args if isinstance(a, (list, tuple)) for a in a if isinstance(a, np.ndarray)]
            res = func(*[base(a) if not isinstance(a, (list, tuple)) else type(a)(base(x) for x in a)
                         for a in args], **kwargs)
            if isinstance(res, np.ndarray):
                if not any(np.may_share_memory(res, a) for a in flat):  # a view launches nothing
                    segments.count("op." + func.__name__)
                return res.view(Counted)
            return res

        def __getitem__(self, idx):
            res = np.ndarray.__getitem__(self, idx)
            if isinstance(res, np.ndarray):
                if not np.may_share_memory(res, self):  # fancy indexing: a gather kernel
                    segments.count("op.getitem")
                return res.view(Counted)
            segments.count("sync.item")  # a scalar read back
            return res

        def __setitem__(self, idx, value):
            segments.count("op.setitem")
            np.ndarray.__setitem__(self.view(np.ndarray), idx, base(value))

        def astype(self, dtype, *args, **kwargs):
            res = np.ndarray.astype(self.view(np.ndarray), dtype, *args, **kwargs)
            if res is not self.view(np.ndarray) and not np.may_share_memory(res, self):
                segments.count("op.astype")
            return res.view(Counted)

        def copy(self, *args, **kwargs):
            segments.count("op.copy")
            return np.ndarray.copy(self, *args, **kwargs)

        def _sync(self, kind):
            segments.count("sync." + kind)

        def __bool__(self):
            self._sync("bool")
            return bool(self.view(np.ndarray))

        def __float__(self):
            self._sync("float")
            return float(self.view(np.ndarray))

        def __int__(self):
            self._sync("int")
            return int(self.view(np.ndarray))

        def __index__(self):
            self._sync("index")
            return self.view(np.ndarray).__index__()

        def item(self, *args):
            self._sync("item")
            return self.view(np.ndarray).item(*args)

        def tolist(self):
            self._sync("tolist")
            return self.view(np.ndarray).tolist()

    return Counted


def map_arrays(obj, fn):
    """`obj` (Weights, tuples, dataclasses) with every ndarray leaf replaced by `fn(leaf)`."""
    if isinstance(obj, np.ndarray):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(map_arrays(x, fn) for x in obj)
    if isinstance(obj, list):
        return [map_arrays(x, fn) for x in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: map_arrays(getattr(obj, f.name), fn)
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


@contextlib.contextmanager
def counting_creations(segments: Segments):
    """Count NumPy array creations made from Python on this thread (`sys.setprofile`)."""
    def hook(frame, event, arg):
        if event == "c_call" and getattr(arg, "__module__", None) == "numpy" and arg.__name__ in CREATIONS:
            segments.count("alloc." + arg.__name__)
            if CREATIONS[arg.__name__]:
                segments.count("op.fill")
    sys.setprofile(hook)
    try:
        yield
    finally:
        sys.setprofile(None)


# ------------------------------------------------------------------------------------------
# GPU: count CUDA runtime calls (CUPTI via torch.profiler).


def gpu_runtime_counts(run_step, segments: Segments) -> str:
    """Profile `run_step(mark)` where `mark(i)` opens segment i's range; fills `segments`
    from the CUDA runtime calls inside each range. Returns how it counted, or why not."""
    try:
        from torch.profiler import ProfilerActivity, profile, record_function
    except Exception as e:
        return f"no kernel counts: torch is not importable ({type(e).__name__}); collectives only"
    from cupyx.profiler import time_range

    open_ranges: list = []

    def mark(i: int):
        for r in reversed(open_ranges):
            r.__exit__(None, None, None)
        open_ranges.clear()
        for r in (record_function(f"seg:{i:04d}"), time_range(f"tpmax seg {i}")):
            r.__enter__()
            open_ranges.append(r)

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run_step(mark)
        mark(-1)
        for r in reversed(open_ranges):
            r.__exit__(None, None, None)
    attribute([(e.name, e.time_range.start, e.time_range.end) for e in prof.events()], segments)
    return "CUDA runtime calls via CUPTI (torch.profiler); segments as record_function / NVTX ranges"


def attribute(events, segments: Segments) -> None:
    """Count CUDA API calls into the segment range (`seg:NNNN`) each one starts in.

    Args:
        events: `(name, start_us, end_us)` of every profiled event, ranges included.
    """
    ranges = sorted((a, b, int(name[4:])) for name, a, b in events
                    if name.startswith("seg:") and name[4:].isdigit())
    for name, start, _ in events:
        if "Launch" in name and name.startswith(("cuda", "cu")):
            key = "op.kernel"
        elif name.startswith(("cudaMemcpy", "cuMemcpy")):
            key = "copy." + name
        elif name.endswith("Synchronize"):
            key = "sync." + name
        else:
            continue
        seg = next((i for a, b, i in ranges if a <= start <= b), None)
        if seg is not None and seg < len(segments.rows):
            segments.rows[seg][key] += 1


# ------------------------------------------------------------------------------------------
# Main.


def summarize(segments: Segments, n_layers: int) -> dict:
    """Per-layer and total rows from the segment counters."""
    rows = segments.rows

    def totals(counters) -> dict:
        c = sum(counters, collections.Counter())
        return {"array_ops": sum(v for k, v in c.items() if k.startswith("op.")),
                "collectives": sum(v for k, v in c.items() if k.startswith("collective.")),
                "host_syncs": sum(v for k, v in c.items() if k.startswith("sync.")),
                "allocs": sum(v for k, v in c.items() if k.startswith("alloc.")),
                "copies": sum(v for k, v in c.items() if k.startswith("copy.")),
                "detail": dict(sorted(c.items()))}

    expected = 1 + 2 * n_layers + 1
    if len(segments.kinds) != expected:
        raise RuntimeError(f"expected {expected} collectives (embedding, 2 per layer, lm_head), "
                           f"saw {len(segments.kinds)}: {segments.kinds}")
    per_layer = []
    for i in range(n_layers):
        attn, mlp = rows[1 + 2 * i], rows[2 + 2 * i]
        row = {"layer": i, **totals([attn, mlp])}
        row["attn_ops"] = totals([attn])["array_ops"]
        row["mlp_ops"] = totals([mlp])["array_ops"]
        per_layer.append(row)
    return {"embedding": totals([rows[0]]), "per_layer": per_layer, "head": totals([rows[-2]]),
            "after_last_collective": totals([rows[-1]]), "total": totals(rows)}


def main(argv=None) -> int:
    import tpmax

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", default="cpu:0,1")
    ap.add_argument("--layers", type=int, default=2, help="model layers (Llama-3-8B shapes cut to N)")
    ap.add_argument("--small", action="store_true", help="scaled-down widths (counts do not depend on them)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", default=None, help="default bfloat16 on GPU, float32 on CPU")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    devices = tpmax.devices(args.devices)
    gpu = devices[0].kind == "gpu"
    dtype = args.dtype or ("bfloat16" if gpu else "float32")
    cfg = gpu_decode.bench_config(args.layers, args.small)
    B, P = args.batch, gpu_decode.PROMPT
    segments = Segments()
    if gpu:
        wrap = lambda a: a  # noqa: E731
        weights = gpu_decode.random_weights_on_devices(cfg, devices, dtype)
    else:
        Counted = counted_class(segments)
        wrap = lambda a: a.view(Counted) if isinstance(a, np.ndarray) else a  # noqa: E731
        weights = map_arrays(gpu_decode.random_weights_on_devices(cfg, devices, dtype), wrap)
    comm = tpmax.communicator(devices)
    cache = gpu_decode.new_cache(cfg, devices, dtype, B, P + 2)
    seqs = list(range(B))
    for s in seqs:
        cache.add(s)
    prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, size=B * P)
    nxt = gpu_decode.greedy(gpu_decode.forward(weights, cfg, prompts, np.arange(0, B * P + 1, P), cache, seqs, comm))
    nxt = gpu_decode.greedy(gpu_decode.forward(weights, cfg, nxt, np.arange(B + 1), cache, seqs, comm))  # warm-up
    cache.pages[:] = [wrap(p) for p in cache.pages]
    counting = CountingComm(comm, segments, wrap)
    offs = np.arange(B + 1)
    segments.reset()

    if gpu:
        def run_step(mark):
            segments.on_cut = mark
            mark(0)
            gpu_decode.forward(weights, cfg, nxt, offs, cache, seqs, counting)
            segments.on_cut = None
        method = gpu_runtime_counts(run_step, segments)
    else:
        with counting_creations(segments):
            gpu_decode.forward(weights, cfg, nxt, offs, cache, seqs, counting)
        method = "NumPy operations on counted arrays (ndarray subclass) + array creations (sys.setprofile)"

    figures = summarize(segments, cfg.n_layers)
    rows = [{"part": "embedding", **figures["embedding"]}]
    rows += [{"part": f"layer {r['layer']}", **r} for r in figures["per_layer"]]
    rows += [{"part": "final norm + lm_head", **figures["head"]},
             {"part": "after lm_head allgather", **figures["after_last_collective"]},
             {"part": "total", **figures["total"]}]
    common.print_table(rows, ["part", "array_ops", "attn_ops", "mlp_ops", "collectives", "host_syncs", "allocs",
                              "copies"], title=f"one decode step, batch {B}, {args.devices}, {cfg.n_layers} layers "
                                               f"({method})")
    doc = {
        "benchmark": "launch_profile",
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "devices": args.devices, "batch": B, "dtype": dtype, "method": method,
        "model": {"preset": "llama-3-8b", "small": args.small, "n_layers": cfg.n_layers},
        "machine": common.machine_info(),
        "figures": figures,
    }
    tag = args.devices.replace(":", "").replace(",", "-")
    out = Path(args.out) if args.out else common.RESULTS / f"launch_profile-{tag}.json"
    common.save_json(doc, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
