"""Loading real checkpoints, sharded: Hugging Face safetensors directories and GGUF files.

Each format becomes a tensor source that speaks the sharding table's names (its HF / GGUF
columns give the checkpoint names); `shard_weights` then reads, per device, only that
device's slices (safetensors `get_slice`; GGUF rows of the memory-mapped blocks), so host
memory stays near one copy of the model. Nothing is ever unpickled, and every file a
checkpoint names must be a regular file inside its directory. Dequantized GGUF shards of a
model in tpmax's cache are kept, checked, in the shard cache (`shard_cache.py`), so a second
load skips the dequantization.
`load` returns a `Model`: config, per-device weights, communicator, tokenizer.
"""
from __future__ import annotations

import dataclasses
import functools
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from ..core.comm import Communicator, communicator
from ..nn.config import ModelConfig
from ..core.devices import Device, as_dtype, bfloat16, devices as parse_devices
from ..core.distributed import set_threads
from ..core.errors import LoadError
from ..core.files import inside, read_json, regular_file
from ..parallel.executor import Executor, executor_for
from ..core.progress import Progress
from .quant_config import QuantConfig, quant_config_from_hf
from .quant_read import group_quantized, quantized_shape, read_quantized
from .safetensors_file import SafetensorsFile
from .shard_cache import entry as shard_cache_entry, read_header, read_weights, store as store_shards
from ..core.sharding import LAYER_PARAMS, MODEL_PARAMS, base_name, ceil_div
from ..text.tokenizer import gguf_metadata
from ..nn.weights import Weights, assemble, device_tensors, n_device_tensors

# ------------------------------------------------------------------------------------------
# Checkpoint names -> table names, from the table's HF and GGUF columns.

HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
HF_NAMES = {p.hf: p.name for p in MODEL_PARAMS}
HF_LAYER_NAMES = {p.hf: p.name for p in LAYER_PARAMS}
HF_IGNORED = re.compile(r"rotary_emb\.inv_freq$")  # a buffer some exports carry; recomputed

GGUF_LAYER = re.compile(r"^blk\.(\d+)\.(.+)$")
GGUF_NAMES = {p.gguf: p.name for p in MODEL_PARAMS if p.gguf}
GGUF_LAYER_NAMES = {p.gguf: p.name for p in LAYER_PARAMS if p.gguf}
GGUF_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0")

# Table rows a quantized checkpoint may store quantized (linears; embeddings and norms never).
QUANTIZABLE = {p.name for p in LAYER_PARAMS + MODEL_PARAMS if p.name.endswith("_proj")} | {"lm_head"}
_QUANTIZED_SUFFIXES = {"qweight", "qzeros", "scales", "g_idx", "weight_packed", "weight_scale", "weight_shape",
                       "weight_zero_point", "weight_scale_inv"}

_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": bfloat16,
                       "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
                       "BOOL": np.bool_}


def _table_name(name: str, top: dict, layer_re: re.Pattern, layer_names: dict, source: str) -> str:
    if name in top:
        return top[name]
    m = layer_re.match(name)
    if m and m.group(2) in layer_names:
        return f"layers.{int(m.group(1))}.{layer_names[m.group(2)]}"
    raise LoadError(f"{source}: unexpected tensor {name!r} (not part of a supported architecture)")


# ------------------------------------------------------------------------------------------
# Safetensors.


class SafetensorsSource:
    """The tensors of a HF directory: one `model.safetensors`, or shards with an index.

    With a `QuantConfig`, each quantized linear (its `qweight`/`qzeros`/`scales`/`g_idx`, or
    `weight`/`weight_scale`, ... — `quant_read.group_quantized`) is one tensor under the table name
    of its `.weight`: `shape` is its logical `[out, in]` and `read` returns the device's piece
    still quantized (`quant_read.read_quantized`).
    """

    def __init__(self, directory: Path, quant: QuantConfig | None = None):
        from safetensors import safe_open

        self.name = str(directory)
        self.quant = quant
        self.bytes_read = 0  # what `read` returned so far (the slices, packed when quantized)
        self.files = self._files(directory)
        self._where: dict[str, tuple] = {}
        located: dict[str, tuple] = {}  # checkpoint key -> (handle, path)
        for path in self.files:
            try:
                handle = safe_open(str(path), framework="numpy")
                keys = list(handle.keys())
            except Exception as e:  # truncated, bad header, ...
                raise LoadError(f"{path}: not a valid safetensors file ({e})") from None
            for key in keys:
                if key in located:
                    raise LoadError(f"{path}: tensor {key!r} is also in {located[key][1]}")
                located[key] = (handle, path)
        self._quant: dict[str, tuple[str, dict[str, tuple[Path, str]]]] = {}
        qkeys: set[str] = set()
        if quant is not None:
            is_fp8 = lambda k: located[k][0].get_slice(k).get_dtype() == "F8_E4M3"  # noqa: E731
            for module, by_suffix in group_quantized(located, quant, source=self.name, is_fp8=is_fp8).items():
                name = _table_name(module + ".weight", HF_NAMES, HF_LAYER, HF_LAYER_NAMES, self.name)
                if base_name(name) not in QUANTIZABLE:
                    raise LoadError(f"{self.name}: {module} is quantized; tpmax reads quantized linears only "
                                    f"({', '.join(sorted(QUANTIZABLE))})")
                self._quant[name] = (module, {sfx: (located[k][1], k) for sfx, k in by_suffix.items()})
                qkeys |= set(by_suffix.values())
        self._mapped: dict[Path, SafetensorsFile] = {}
        for key, (handle, path) in located.items():
            if key in qkeys or HF_IGNORED.search(key):
                continue
            try:
                name = _table_name(key, HF_NAMES, HF_LAYER, HF_LAYER_NAMES, str(path))
            except LoadError as e:
                if quant is None and key.rsplit(".", 1)[-1] in _QUANTIZED_SUFFIXES:
                    raise LoadError(f"{e}; it looks quantized but config.json has no quantization_config") from None
                raise
            if name in self._where or name in self._quant:
                raise LoadError(f"{path}: tensor {key!r} maps to {name}, which another tensor already provides")
            self._where[name] = (handle, key, path)

    @staticmethod
    def _files(directory: Path) -> list[Path]:
        index = directory / "model.safetensors.index.json"
        if index.exists():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise LoadError(f"{index}: weight_map must be a non-empty mapping of tensor -> file")
            names = set()
            for key, fname in weight_map.items():
                if not isinstance(fname, str):
                    raise LoadError(f"{index}: weight_map[{key!r}] must be a file name, got {fname!r}")
                names.add(fname)
            files = []
            for fname in sorted(names):
                if not (directory / fname).exists():
                    raise LoadError(f"{directory / fname}: listed in the index but missing")
                files.append(inside(directory, fname))
            return files
        if (directory / "model.safetensors").exists():
            return [inside(directory, "model.safetensors")]
        files = [inside(directory, p.name) for p in sorted(directory.glob("model*.safetensors"))]
        if not files:
            raise LoadError(f"{directory}: no model*.safetensors weights (pickled .bin checkpoints are not loaded)")
        return files

    def names(self):
        return set(self._where) | set(self._quant)

    def _reader(self, name):
        """`suffix -> slice-like` over the memory-mapped files of quantized linear `name`."""
        module, by_suffix = self._quant[name]

        def reader(suffix):
            if suffix not in by_suffix:
                return None
            path, key = by_suffix[suffix]
            if path not in self._mapped:
                self._mapped[path] = SafetensorsFile(path)
            return self._mapped[path].get_slice(key)
        return module, reader

    def shape(self, name):
        if name in self._quant:
            module, reader = self._reader(name)
            return quantized_shape(reader, self.quant, name=module, source=self.name)
        handle, key, _ = self._where[name]
        return tuple(handle.get_slice(key).get_shape())

    def dtype(self, name):
        if name in self._quant:
            return np.dtype(np.float32)  # what a quantized linear computes in
        handle, key, path = self._where[name]
        code = handle.get_slice(key).get_dtype()
        if code not in _SAFETENSORS_DTYPES:
            raise LoadError(f"{path}: tensor {key!r} has unsupported dtype {code}")
        return np.dtype(_SAFETENSORS_DTYPES[code])

    def read(self, name, index):
        if name in self._quant:
            module, reader = self._reader(name)
            out = read_quantized(reader, self.quant, index, name=module, source=self.name)
            self.bytes_read += out.nbytes
            return out
        handle, key, path = self._where[name]
        try:
            out = handle.get_slice(key)[index]
        except Exception as e:
            raise LoadError(f"{path}: cannot read tensor {key!r} ({e})") from None
        self.bytes_read += out.nbytes
        return out


# ------------------------------------------------------------------------------------------
# GGUF.


def open_gguf(path: Path):
    import gguf

    regular_file(path)
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # bad magic, truncated data, ...
        raise LoadError(f"{path}: not a valid GGUF file ({type(e).__name__}: {e})") from None


class GGUFSource:
    """The tensors of a GGUF file, dequantized row block by row block as they are read."""

    def __init__(self, path: Path, reader):
        self.name = str(path)
        self.path, self.reader = path, reader
        self.bytes_read = 0  # stored (quantized) bytes of the rows read so far
        self._tensors = {}
        for t in reader.tensors:
            if t.name == "rope_freqs.weight":
                raise LoadError(f"{path}: per-frequency RoPE factors (rope_freqs) are not supported")
            if t.tensor_type.name not in GGUF_TYPES:
                raise LoadError(f"{path}: tensor {t.name} has unsupported type {t.tensor_type.name}; "
                                f"supported: {', '.join(GGUF_TYPES)}")
            name = _table_name(t.name, GGUF_NAMES, GGUF_LAYER, GGUF_LAYER_NAMES, str(path))
            if name in self._tensors:
                raise LoadError(f"{path}: tensor {t.name} appears twice")
            self._tensors[name] = t

    def names(self):
        return set(self._tensors)

    def shape(self, name):
        return tuple(int(n) for n in reversed(self._tensors[name].shape))  # GGUF lists ne0 first

    def dtype(self, name):
        return np.dtype(np.float32)  # every supported type (GGUF_TYPES) dequantizes to floats

    def read(self, name, index):
        """Rows `index[0]` (and columns `index[1]`) of a tensor, dequantized: only the stored
        blocks covering them are read (GGUF quantizes each row in blocks along its columns)."""
        import gguf

        t = self._tensors[name]
        shape = self.shape(name)
        rows, cols = index[0], (index[1] if len(index) > 1 else slice(None))
        data = t.data.reshape(shape[0], -1)[rows]  # [rows, stored elements per row]
        a, b = 0, int(np.prod(shape[1:], dtype=np.int64))
        if len(shape) == 2 and cols != slice(None):  # only the blocks holding these columns
            a, b, _ = cols.indices(shape[1])
            block, block_bytes = gguf.GGML_QUANT_SIZES[t.tensor_type]
            per_block = block_bytes // data.dtype.itemsize  # stored elements per block
            a0, b0 = a // block, ceil_div(b, block)  # covering blocks
            data = data[:, a0 * per_block:b0 * per_block]
            a, b = a - a0 * block, b - a0 * block
        self.bytes_read += data.nbytes
        try:
            dense = gguf.quants.dequantize(np.ascontiguousarray(data), t.tensor_type)
        except Exception as e:
            raise LoadError(f"{self.name}: cannot dequantize {t.name} ({e})") from None
        dense = dense.reshape(dense.shape[0], -1)[:, a:b]
        return dense.reshape(dense.shape[0], *shape[1:]) if len(shape) != 2 else dense


# ------------------------------------------------------------------------------------------
# The model.


@dataclasses.dataclass(frozen=True, repr=False)
class Model:
    """A loaded model: everything generation needs, as plain data.

    `devices` are the devices this process drives (all of them in one process; its own block
    under MPI, see `comm.ranks`).
    """

    cfg: ModelConfig
    weights: Weights
    devices: tuple[Device, ...]
    comm: Communicator
    tokenizer: object | None
    eos_token_ids: tuple[int, ...]
    dtype: str
    path: str
    quant: QuantConfig | None = None  # how the checkpoint's linears are quantized (kept so on the devices)
    bytes_read: int = 0  # checkpoint bytes this process read to build its devices' weights

    def __repr__(self):
        c = self.cfg
        return (f"Model({c.arch}, {c.n_params() / 1e6:.1f}M parameters, {c.n_layers} layers, "
                f"devices={','.join(map(str, self.devices))}, tp={self.comm.tp}, dtype={self.dtype}, "
                f"quantization={self.quant.describe() if self.quant else 'none'}, path={self.path!r})")

    @functools.cached_property
    def executor(self) -> Executor:
        """What runs this model's forward steps: in this process, or as rank 0 / a follower
        of an MPI job (`tpmax.executor`)."""
        return executor_for(self.weights, self.cfg, self.comm, self.dtype)


def load(path: str | Path | None = None, devices: Sequence[Device] | str | None = None, dtype: str = "float32", *,
         progress: bool = True, comm: Communicator | None = None, cache_shards: bool = True,
         threads: int | None = None) -> Model:
    """Load a model, sharded over `devices`.

    Args:
        path: a HF directory (config.json + *.safetensors), a `.gguf` file, or None for the
            default model (SmolLM2-135M-Instruct, fetched once into the cache).
        devices: a list of `Device`, a spec like "cpu:0,1", or None for "cpu".
        dtype: weight dtype on the devices ("float32", "bfloat16", "float16"). On CPU the
            half types are slower than float32 (NumPy has no half-precision BLAS): a warning
            says so.
        progress: one line of load progress on stderr.
        comm: the communicator to shard for; it decides which of the group's devices this
            process holds. Default: `communicator(devices)` in one process; under an MPI
            launcher (`mpirun -n R`), an MPI communicator over which each rank drives its own
            block of `devices` (see `tpmax.mpi`), with the job aborted on any rank's uncaught
            error.
        cache_shards: for a GGUF file in tpmax's model cache (the default model), keep its
            dequantized per-device shards in the shard cache (`shard_cache.py`: keyed by the
            file, dtype and device split, checksummed, bounded by $TPMAX_CACHE_MAX_BYTES) so
            the next load skips dequantizing.
        threads: BLAS threads of this process (`distributed.set_threads`; None: the cores it
            may use, shared among the MPI ranks on this host).
    """
    t0 = time.perf_counter()
    set_threads(threads)
    devs = tuple(parse_devices("cpu" if devices is None else devices) if isinstance(devices, (str, type(None)))
                 else devices)
    comm = comm if comm is not None else _communicator(devs)
    if path is not None:
        return _load(Path(path), comm, dtype, progress=progress, cache_shards=cache_shards, t0=t0)
    try:
        return _load(_default_model(comm), comm, dtype, progress=progress, cache_shards=cache_shards, t0=t0)
    except LoadError:
        if getattr(comm, "mpi", None) is not None:
            raise
        # The cached default model is hashed in full only when its inode/size/mtime/ctime changed;
        # when it fails to load, check it fully (fetching it again if it is damaged) and retry.
        from .hub import default_model_path

        path = default_model_path(full_check=True)
        return _load(path, comm, dtype, progress=progress, cache_shards=False, t0=t0)


def _load(path: Path, comm: Communicator, dtype: str, *, progress: bool, cache_shards: bool, t0: float) -> Model:
    dt = as_dtype(dtype)
    if dt.kind != "f" and dt != bfloat16:
        raise ValueError(f"dtype {dtype!r}: model weights must be float32, bfloat16 or float16")
    if dt != np.float32 and any(d.kind == "cpu" for d in comm.devices):
        warnings.warn(f"dtype {dtype} on CPU runs slower than float32 (NumPy has no half-precision matmul: "
                      f"it converts every weight on every use); use float32 on CPU", stacklevel=3)
    if not path.exists():
        raise LoadError(f"{path}: no such file or directory")
    shard_cache, quant = None, None
    if path.is_dir():
        cfg_path = path / "config.json"
        if not cfg_path.exists():
            raise LoadError(f"{path}: not a model directory (no config.json)")
        hf_config = read_json(cfg_path)
        cfg = ModelConfig.from_hf_config(hf_config, source=str(cfg_path))
        quant = quant_config_from_hf(hf_config, source=str(cfg_path))
        src = SafetensorsSource(path, quant)
        tokenizer, eos = _hf_tokenizer(path)
    elif path.suffix == ".gguf":
        shard_cache = shard_cache_entry(path, dtype, comm) if cache_shards else None
        header = read_header(shard_cache) if shard_cache else None  # parsing the file takes seconds
        src = None if header else GGUFSource(path, open_gguf(path))
        if header is None:  # metadata decoded once, for the config and the tokenizer
            header = {"metadata": gguf_metadata(src.reader, source=str(path)), "has_output": "lm_head" in src.names()}
        meta = header["metadata"]
        cfg = ModelConfig.from_gguf(meta, source=str(path), has_output=header["has_output"])
        tokenizer, eos = _gguf_tokenizer(meta, path)
    else:
        raise LoadError(f"{path}: expected a model directory or a .gguf file")
    from ..parallel.mpi import agree_on_model  # across MPI ranks: same config, dtype and checkpoint, or stop

    agree_on_model(comm, config=cfg, dtype=dt, path=path)
    bar = Progress(sys.stderr, label=f"loading {path.name} on {len(comm.devices)} device(s)") if progress else None
    total = n_device_tensors(cfg)

    def done(how: str) -> None:
        if bar:
            bar.close(f"done in {time.perf_counter() - t0:.1f} s ({how})")

    # The cached shards, when the header came from the cache too (src is None).
    weights = read_weights(shard_cache, cfg, comm, dt) if shard_cache and src is None else None
    if weights is None:
        src = src or GGUFSource(path, open_gguf(path))
        layers, top = device_tensors(src, cfg, comm.devices, dtype, ranks=comm.ranks, tp=comm.tp,
                                     progress=bar and (lambda n: bar.show(f"{n}/{total} tensors")))
        if shard_cache:
            store_shards(shard_cache, layers, top, comm, header)
        weights = assemble(layers, top, len(comm.devices))
        read = src.bytes_read
        done(f"read {read / 2**20:.1f} MiB of the checkpoint's {_checkpoint_bytes(path) / 2**20:.1f} MiB")
    else:
        read = 0
        done("from the shard cache")
    return Model(cfg, weights, tuple(comm.devices), comm, tokenizer, eos, dtype, str(path), quant, read)


def _checkpoint_bytes(path: Path) -> int:
    """Size of a GGUF file, or of a directory's safetensors files."""
    files = [path] if path.is_file() else list(path.glob("*.safetensors"))
    return sum(f.stat().st_size for f in files)


def _communicator(devs: Sequence[Device]) -> Communicator:
    """In-process, or across MPI ranks when an MPI launcher started this process."""
    from ..parallel.mpi import install_abort_handler, launched_by_mpi, mpi_communicator, world

    if launched_by_mpi() and world().size > 1:
        install_abort_handler()
        return mpi_communicator(devs)
    return communicator(devs)


def _default_model(comm: Communicator) -> Path:
    """The default model's path; across MPI ranks, rank 0 fetches it before the others look."""
    from .hub import default_model_path

    mpi = getattr(comm, "mpi", None)
    if mpi is None or mpi.Get_size() == 1:
        return default_model_path()
    if mpi.Get_rank() == 0:
        path = default_model_path()
        mpi.Barrier()
        return path
    mpi.Barrier()
    return default_model_path()


# ------------------------------------------------------------------------------------------
# Tokenizers.


def _hf_tokenizer(path: Path):
    """The tokenizer (if the directory has one) and the EOS ids, resolved in one place."""
    from ..text.tokenizer import Tokenizer, hf_eos_token_ids

    if (path / "tokenizer.json").exists():
        tok = Tokenizer.from_hf_dir(path)
        return tok, tuple(tok.eos_token_ids)
    return None, hf_eos_token_ids(path)


def _gguf_tokenizer(meta: dict, path: Path):
    from ..text.tokenizer import Tokenizer

    if "tokenizer.ggml.tokens" not in meta:
        return None, ()
    tok = Tokenizer.from_gguf(meta, source=str(path))
    return tok, tuple(tok.eos_token_ids)
