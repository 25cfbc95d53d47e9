"""Shared pieces of the benchmarks: what machine this is, timing with warm-up excluded,
the model's byte and FLOP counts, a table printer, and the JSON writer for `bench/results/`.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
PEERS = ("transformers", "llamacpp")

# ------------------------------------------------------------------------------------------
# The machine.


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_cores() -> int:
    """Cores this process may run on (the affinity mask, else os.cpu_count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def mem_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def cpu_flags() -> list[str]:
    """The SIMD flags that decide float32 matmul peak (avx2, fma, avx512f, ...)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return sorted(f for f in ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_tile")
                              if f in have)
    except OSError:
        pass
    return []


def blas_info() -> dict:
    """NumPy's BLAS as built (name, version, config) and the threads it will use."""
    out: dict = {}
    try:
        cfg = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        out = {k: cfg.get(k) for k in ("name", "version", "openblas configuration")}
    except Exception as e:  # numpy < 1.26 or an unusual build
        out = {"error": repr(e)}
    try:
        from threadpoolctl import threadpool_info
        out["threadpools"] = [{k: p.get(k) for k in ("internal_api", "num_threads", "version", "architecture")}
                              for p in threadpool_info()]
    except ImportError:
        out["threadpools"] = None
    out["env_threads"] = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
                          if k in os.environ}
    return out


def version_of(module: str) -> str | None:
    try:
        return importlib.import_module(module).__version__
    except Exception:
        return None


def gpu_info() -> list[dict]:
    import tpmax

    n = tpmax.gpu_count()
    if not n:
        return []
    cp = tpmax.devices("gpu")[0].xp
    out = []
    for i in range(n):
        p = cp.cuda.runtime.getDeviceProperties(i)
        out.append({"id": i, "name": p["name"].decode() if isinstance(p["name"], bytes) else p["name"],
                    "mem_gib": round(p["totalGlobalMem"] / 2**30, 1)})
    return out


def machine_info() -> dict:
    return {
        "cpu": cpu_model(),
        "cores": cpu_cores(),
        "cpu_flags": cpu_flags(),
        "mem_gib": mem_gib(),
        "gpus": gpu_info(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "blas": blas_info(),
        "versions": {m: version_of(m) for m in ("tpmax", "numpy", "cupy", "torch", "transformers", "llama_cpp")},
    }


def machine_tag() -> str:
    """A short file-name tag for this machine: `<cpu>-<cores>c` plus the first GPU's name."""
    slug = re.sub(r"[^a-z0-9]+", "-", cpu_model().lower())
    slug = re.sub(r"-(processor|cpu|with-radeon.*|\d+-core)$", "", slug).strip("-")[:32]
    tag = f"{slug}-{cpu_cores()}c"
    gpus = gpu_info()
    if gpus:
        tag += "-" + re.sub(r"[^a-z0-9]+", "-", gpus[0]["name"].lower()).strip("-") + f"x{len(gpus)}"
    return tag


# ------------------------------------------------------------------------------------------
# Timing.


@dataclasses.dataclass(frozen=True)
class Timing:
    """Seconds per repeat, warm-up already dropped."""

    times: tuple[float, ...]
    warmup: int

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def best(self) -> float:
        return min(self.times)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.times)

    def as_dict(self) -> dict:
        return {"median_s": self.median, "best_s": self.best, "mean_s": self.mean, "repeats": len(self.times),
                "warmup": self.warmup}


def timed(fn: Callable[[], object], *, warmup: int = 1, repeats: int = 5, sync: Callable[[], None] | None = None
          ) -> Timing:
    """Run `fn` warmup + repeats times; the warm-up runs are not timed.

    `sync` (e.g. a GPU synchronize) is called before each clock read.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if sync:
            sync()
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return Timing(tuple(times), warmup)


def step_timing(step_times: Sequence[float], warmup: int) -> Timing:
    """A Timing from per-step times of a stateful loop (decode): the first `warmup` dropped."""
    if len(step_times) <= warmup:
        raise ValueError(f"{len(step_times)} steps leave nothing after {warmup} warm-up steps")
    return Timing(tuple(step_times[warmup:]), warmup)


# ------------------------------------------------------------------------------------------
# What one forward pass moves and computes.


def weight_bytes(cfg, itemsize: int = 4) -> int:
    """Bytes of weights one decode step reads: every parameter once (the lm_head included,
    which for tied embeddings is the embedding table); an untied embedding table is left out,
    since the lookup reads only B of its rows (Llama-3-8B: 7 % of its parameters)."""
    embed = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.hidden_size
    return (cfg.n_params() - embed) * itemsize


def kv_bytes(cfg, context: int, itemsize: int = 4) -> int:
    """Bytes of K and V one sequence's decode step reads at `context` cached tokens."""
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * context * itemsize


def linear_params(cfg) -> tuple[int, int]:
    """(parameters of the per-token matmuls in the layers, parameters of the lm_head)."""
    D = cfg.hidden_size
    lm_head = cfg.vocab_size * D
    embed = cfg.vocab_size * D
    norms = cfg.n_layers * 2 * D + D
    layers = cfg.n_params() - norms - (embed if not cfg.tie_embeddings else 0) - lm_head
    return layers, lm_head


def forward_flops(cfg, new_tokens: int, context_before: int = 0, logit_rows: int = 1) -> int:
    """FLOPs of one sequence's forward over `new_tokens` tokens after `context_before` cached.

    2 x (layer matmul params) x tokens + 2 x vocab x D x logit_rows + causal attention:
    QK^T and PV each 2 x n_heads x head_dim per (query, key) pair, keys <= query.
    """
    layers, lm_head = linear_params(cfg)
    T, S = new_tokens, context_before
    pairs = T * S + T * (T + 1) // 2  # (query, key) pairs under the causal mask
    attn = cfg.n_layers * 2 * 2 * cfg.n_heads * cfg.head_dim * pairs
    return 2 * layers * T + 2 * lm_head * logit_rows + attn


# ------------------------------------------------------------------------------------------
# Peers and models.


def peer_status(name: str) -> str | None:
    """None when the peer can run here, else why not."""
    mods = {"transformers": ("torch", "transformers"), "llamacpp": ("llama_cpp",)}[name]
    for m in mods:
        try:
            importlib.import_module(m)
        except Exception as e:
            return f"{m} is not importable ({type(e).__name__}: {e}); install it to compare with {name}"
    return None


def available_peers(peers: Sequence[str], skipped: dict):
    """Yield each installed peer; say why a missing one is skipped and record it in `skipped`."""
    for peer in peers:
        why = peer_status(peer)
        if why:
            print(f"\nskipping {peer}: {why}")
            skipped[peer] = why
            continue
        print(f"\nloading {peer} ...", flush=True)
        yield peer


def model_path(arg: str | None) -> Path:
    import tpmax

    return Path(arg) if arg else tpmax.default_model_path()


# Every list option of every benchmark takes its items as separate words, e.g.
# `--devices cpu:0,1 cpu --batches 1 4 16 --peers transformers` (a device spec keeps its own
# commas: `cpu:0,1` is one spec, two devices).


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" for options whose default is a value (not None or False); lists as words."""

    def _get_help_string(self, action):
        d = action.default
        if d is None or d is False or d is argparse.SUPPRESS or "(default" in (action.help or ""):
            return action.help
        if isinstance(d, Path):
            d = os.path.relpath(d)
        shown = " ".join(map(str, d)) if isinstance(d, (list, tuple)) else str(d)
        return f"{action.help} (default: {shown or 'none'})".replace("%", "%%")


def arg_parser(doc: str) -> argparse.ArgumentParser:
    """The parser of a benchmark script: its docstring's first paragraph, defaults in --help."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=_HelpFormatter)


def add_out_arg(ap) -> None:
    ap.add_argument("--out", type=Path, default=RESULTS, metavar="DIR", help="where the JSON results go")


def add_model_args(ap) -> None:
    """The arguments every tpmax-vs-peers benchmark takes: devices, model, peers, roofline, out."""
    ap.add_argument("--devices", nargs="+", default=["cpu:0,1", "cpu"], metavar="SPEC",
                    help="tpmax device specs, one per word (the default is TP 2 then TP 1)")
    ap.add_argument("--model", default=None, help="GGUF file (default: tpmax's default model)")
    ap.add_argument("--peers", nargs="*", default=list(PEERS), choices=PEERS, metavar="PEER",
                    help=f"peers to compare, from {', '.join(PEERS)}; none with a bare --peers")
    ap.add_argument("--quick-roofline", action="store_true", help="fewer roofline repeats")
    add_out_arg(ap)


def set_torch_threads():
    """Give torch the same cores NumPy's BLAS uses."""
    import torch

    torch.set_num_threads(cpu_cores())
    return torch


# ------------------------------------------------------------------------------------------
# Output.


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 100:
            return f"{v:,.0f}"
        if abs(v) >= 1:
            return f"{v:.2f}"
        return f"{v:.3f}"
    return str(v)


def print_table(rows: Sequence[dict], columns: Sequence[str], *, title: str | None = None) -> None:
    """Rows of dicts as an aligned text table (missing values as '-')."""
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    if title:
        print(f"\n{title}")
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))
    sys.stdout.flush()


def save_json(doc: dict, path: Path) -> Path:
    """Write a result document as indented JSON to `path` (folders made as needed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, default=_json_default) + "\n")
    print(f"\nwrote {path}")
    return path


def write_json(name: str, *, backend: str, devices, model: str | None, dtype: str | None, figures,
               roofline: dict | None = None, out: Path = RESULTS, **extra) -> Path:
    """Write `<out>/<name>-<machine-tag>.json` (`out` defaults to bench/results) and return its path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}-{machine_tag()}.json"
    doc = {
        "benchmark": name,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "backend": backend,
        "devices": devices,
        "model": model,
        "dtype": dtype,
        "roofline": roofline,
        **extra,
        "figures": figures,
    }
    path.write_text(json.dumps(doc, indent=2, default=_json_default) + "\n")
    print(f"\nwrote {path}")
    return path


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
