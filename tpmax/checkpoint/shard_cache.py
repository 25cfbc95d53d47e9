"""The GGUF shard cache: a GGUF in tpmax's model cache (the default model) is dequantized once
per dtype and device split, and each device's tensors are kept as one safetensors file under
`cache_dir()/shards`, so the next load skips the dequantization (seconds) and the GGUF parse.

Nothing read back is trusted unchecked: each device file carries, in its safetensors metadata,
the sha256 of its tensors (names, dtypes, shapes and bytes), the layout it was cut for and its
device index; `header.json` (the decoded GGUF metadata: config, tokenizer, chat template)
carries the sha256 of its content. Any mismatch prints one warning line, removes the entry and
the load rebuilds it from the GGUF. The checksums catch damage and mix-ups (a truncated or
edited file, swapped device files, NaN written into a shard); whoever can write the cache can
as well replace the GGUF beside it, so they are not a defence against that.

Writing never fails a load: files are written to temporaries and renamed into place, and any
OSError or SafetensorError (a full or read-only disk) skips the cache with one warning line.
Layout: `shards/<stem>-<path id>-<file key>-<dtype>-tp<N>/{header.json, device<r>.safetensors}`;
the file key hashes the GGUF's size, mtime and first/middle/last MiB, so entries of an older
version of the file are stale and removed when a new one is written. The whole shard cache is
bounded by `$TPMAX_CACHE_MAX_BYTES` (default 2 GiB; 0 turns the cache off): the least recently
used entries are evicted.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from ..core.comm import Communicator
from ..nn.config import ModelConfig
from ..core.devices import asarray
from ..nn.weights import Weights, assemble

MAX_BYTES_ENV = "TPMAX_CACHE_MAX_BYTES"
DEFAULT_MAX_BYTES = 2 << 30
FORMAT = 1  # bumped when what an entry holds changes: older entries then read as damaged
_META_KEY = "tpmax_shard"


def max_bytes() -> int:
    """The shard cache's size bound: `$TPMAX_CACHE_MAX_BYTES` (bytes), else 2 GiB; 0 = off."""
    text = os.environ.get(MAX_BYTES_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_BYTES
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"{MAX_BYTES_ENV}={text!r}: expected a whole number of bytes >= 0 (0 turns the "
                         "shard cache off)")
    return value


def root() -> Path:
    from .hub import cache_dir

    return cache_dir() / "shards"


def _warn(msg: str) -> None:
    print(f"tpmax: shard cache: {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------
# One entry: (GGUF file, dtype, device split).


@dataclasses.dataclass(frozen=True)
class Entry:
    """The cache folder of one (GGUF file, dtype, device split)."""

    folder: Path
    file: str  # "<stem>-<path id>-": the prefix of every entry of this GGUF file
    layout: str  # the folder's name, also written into every file of the entry

    def device_file(self, r: int) -> Path:
        return self.folder / f"device{r}.safetensors"


def entry(path: Path, dtype: str, comm: Communicator) -> Entry | None:
    """The shard cache entry of GGUF `path` loaded as `dtype` over `comm`; None when `path` is not
    inside the model cache or the cache is off (`$TPMAX_CACHE_MAX_BYTES=0`)."""
    from .hub import cache_dir

    base = cache_dir().resolve()
    real = path.resolve()
    if base not in real.parents or max_bytes() == 0:
        return None
    st = real.stat()
    key = hashlib.blake2b(f"{st.st_size} {st.st_mtime_ns}".encode(), digest_size=8)
    with open(real, "rb") as f:
        for at in (0, st.st_size // 2, max(0, st.st_size - (1 << 20))):
            f.seek(at)
            key.update(f.read(1 << 20))
    path_id = hashlib.blake2b(str(real.relative_to(base)).encode(), digest_size=4).hexdigest()
    file = f"{real.stem}-{path_id}-"
    layout = f"{file}{key.hexdigest()}-{dtype}-tp{comm.tp}"
    return Entry(root() / layout, file, layout)


def _damaged(e: Entry, why: str) -> None:
    """Warn once and remove the entry, so this load rebuilds it."""
    _warn(f"{e.folder} failed its check ({why}); rebuilding it from the GGUF")
    shutil.rmtree(e.folder, ignore_errors=True)


def _header_digest(header: dict) -> str:
    return hashlib.sha256(json.dumps(header, sort_keys=True).encode()).hexdigest()


def read_header(e: Entry) -> dict | None:
    """The GGUF's decoded metadata `{"metadata", "has_output"}` saved in the entry, checked;
    None when absent or damaged (then the entry is removed, with one warning)."""
    try:
        text = (e.folder / "header.json").read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        return _damaged(e, f"header.json unreadable: {err}")
    try:
        saved = json.loads(text)
        header, ok = saved["header"], (saved["format"], saved["layout"]) == (FORMAT, e.layout)
        ok = ok and saved["sha256"] == _header_digest(header) and {"metadata", "has_output"} <= set(header)
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        return _damaged(e, "header.json does not match its checksum or this file")
    _touch(e)
    return header


def _tensor_digest(flat: dict[str, np.ndarray]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(flat):
        a = flat[name]
        h.update(json.dumps([name, a.dtype.str, list(a.shape)]).encode())
        h.update(np.ascontiguousarray(a).reshape(-1).view(np.uint8))  # (bfloat16 has no buffer format)
    return h.hexdigest()


def read_weights(e: Entry, cfg: ModelConfig, comm: Communicator, dt: np.dtype) -> Weights | None:
    """The weights saved in the entry for this process's devices, each file checked against its
    checksum, layout and device index; None when a file is missing, or damaged (then the entry is
    removed, with one warning)."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    per_device = []
    for r in comm.ranks:
        f = e.device_file(r)
        if not f.is_file():
            return None
        try:
            with safe_open(str(f), framework="numpy") as handle:
                meta = json.loads((handle.metadata() or {}).get(_META_KEY, "null"))
            flat = load_file(str(f))
        except Exception as err:  # truncated, bad header, unreadable: safetensors raises several kinds
            return _damaged(e, f"{f.name} unreadable: {err}")
        want = {"format": FORMAT, "layout": e.layout, "device": r, "sha256": _tensor_digest(flat)}
        if meta != want:
            return _damaged(e, f"{f.name} does not match its checksum, layout or device")
        if any(a.dtype != dt for a in flat.values()):
            return _damaged(e, f"{f.name} holds another dtype than {dt}")
        per_device.append(flat)
    names = per_device[0].keys()
    if any(t.keys() != names for t in per_device):
        return _damaged(e, "the device files hold different tensors")

    def tensors(prefix):
        keys = [k for k in names if k.startswith(prefix) and "." not in k[len(prefix):]]
        return {k[len(prefix):]: tuple(asarray(t[k], d) for t, d in zip(per_device, comm.devices)) for k in keys}

    layers = [tensors(f"layers.{i}.") for i in range(cfg.n_layers)]
    if any(not t for t in layers):
        return _damaged(e, f"a layer of the {cfg.n_layers} is missing")
    _touch(e)
    return assemble(layers, tensors(""), len(comm.devices))


# ------------------------------------------------------------------------------------------
# Writing, best effort.


def store(e: Entry, layers: list[dict], top: dict, comm: Communicator, header: dict) -> None:
    """Save this process's devices' tensors and the decoded metadata into the entry, then remove
    stale entries of the same file and evict the least recently used ones past the bound. Never
    raises for the disk: a failure skips the cache with one warning line."""
    from safetensors import SafetensorError
    from safetensors.numpy import save_file

    flats = []
    for i, r in enumerate(comm.ranks):
        flat = {f"layers.{n}.{k}": v[i] for n, t in enumerate(layers) for k, v in t.items()}
        flat.update({k: v[i] for k, v in top.items()})
        if any(not isinstance(a, np.ndarray) for a in flat.values()):
            return  # only host arrays are cached
        flats.append((r, {k: np.ascontiguousarray(a) for k, a in flat.items()}))
    size = sum(a.nbytes for _, flat in flats for a in flat.values())
    if size > max_bytes():
        _warn(f"not written: {size / 2**30:.2f} GiB is over {MAX_BYTES_ENV}={max_bytes()}")
        return
    tmps = []
    try:
        e.folder.mkdir(parents=True, exist_ok=True)
        tmps.append(e.folder / f".header.{os.getpid()}.tmp")
        saved = {"format": FORMAT, "layout": e.layout, "sha256": _header_digest(header), "header": header}
        tmps[-1].write_text(json.dumps(saved), encoding="utf-8")
        os.replace(tmps[-1], e.folder / "header.json")
        for r, flat in flats:
            meta = {"format": FORMAT, "layout": e.layout, "device": r, "sha256": _tensor_digest(flat)}
            tmps.append(e.folder / f".device{r}.{os.getpid()}.tmp")
            save_file(flat, str(tmps[-1]), metadata={_META_KEY: json.dumps(meta)})
            os.replace(tmps[-1], e.device_file(r))
    except (OSError, SafetensorError) as err:
        _warn(f"not written ({err}); the model loaded, the next load dequantizes it again")
        for t in tmps:
            t.unlink(missing_ok=True)
        return
    try:
        tidy(keep=e)
    except OSError as err:  # another process tidying at the same time, a read-only folder
        _warn(f"could not tidy {root()} ({err})")


def _touch(e: Entry) -> None:
    """Mark the entry used now (its folder's mtime orders the eviction)."""
    try:
        os.utime(e.folder)
    except OSError:
        pass  # a read-only cache is used, never evicted


# ------------------------------------------------------------------------------------------
# Listing, bounding, clearing.


def entries() -> list[tuple[Path, int, float]]:
    """Every entry as `(folder, bytes, last used)`, least recently used first."""
    out = []
    for folder in root().glob("*"):
        try:
            if folder.is_dir() and not folder.is_symlink():
                size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
                out.append((folder, size, folder.stat().st_mtime))
        except OSError:
            continue  # removed meanwhile by another process
    return sorted(out, key=lambda t: t[2])


def tidy(*, keep: Entry) -> None:
    """Remove the entries of older versions of `keep`'s GGUF file (another size, mtime or
    content), then the least recently used entries while the cache is over `max_bytes()`."""
    current = keep.layout[: keep.layout.index("-", len(keep.file)) + 1]  # "<stem>-<path id>-<file key>-"
    for folder in root().iterdir():
        if folder.name.startswith(keep.file) and not folder.name.startswith(current):
            shutil.rmtree(folder, ignore_errors=True)
    listed = entries()
    total = sum(size for _, size, _ in listed)
    for folder, size, _ in listed:
        if total <= max_bytes():
            break
        if folder != keep.folder:
            shutil.rmtree(folder, ignore_errors=True)
            total -= size


def summary() -> dict:
    """What `tpmax info` shows: the cache folder, its models, and the shard cache's size."""
    from .hub import cache_dir

    base = cache_dir()
    models = sorted(p.name for p in base.glob("*.gguf")) if base.is_dir() else []
    listed = entries() if root().is_dir() else []
    model_bytes = sum((base / m).stat().st_size for m in models)
    return {"path": str(base), "models": models, "model_bytes": model_bytes, "shard_entries": len(listed),
            "shard_bytes": sum(size for _, size, _ in listed), "max_bytes": max_bytes()}


def describe() -> str:
    """One line for `tpmax info`."""
    s = summary()
    return (f"{s['path']}: {len(s['models'])} model(s) {s['model_bytes'] / 2**20:.0f} MiB, "
            f"{s['shard_entries']} shard cache entr{'y' if s['shard_entries'] == 1 else 'ies'} "
            f"{s['shard_bytes'] / 2**20:.0f} MiB (bound {s['max_bytes'] / 2**20:.0f} MiB, {MAX_BYTES_ENV})")


def clear() -> int:
    """Delete the whole shard cache (the models stay); returns the bytes freed."""
    freed = sum(size for _, size, _ in entries()) if root().is_dir() else 0
    shutil.rmtree(root(), ignore_errors=True)
    return freed
