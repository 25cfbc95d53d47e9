"""Model parameters as plain data, and `shard_weights`, which builds them from any tensor
source by reading, for each device, only the slices the sharding table assigns to it.

A tensor source names weights by the table's names (`layers.3.q_proj`, `embed`, ...) and
answers `shape(name)`, `dtype(name)` and `read(name, index)`; the loader provides sources for
safetensors and GGUF files, and `DictSource` serves in-memory arrays (tests, random models).
Which tensors a model has, how each is split and which device tensor it is fused into all
come from the rows of the sharding table (`tpmax.sharding.LAYER_PARAMS` / `MODEL_PARAMS`).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Protocol, Sequence

import numpy as np

from .attention import AttentionWeights
from .config import ModelConfig
from ..core.devices import Device, as_dtype, asarray, bfloat16
from ..core.errors import WeightError
from .quant import concat_out, is_quantized
from ..core.sharding import LAYER_PARAMS, MODEL_PARAMS, PRESENCE, Param, shard_pieces


@dataclasses.dataclass(frozen=True)
class LayerWeights:
    """One transformer layer; every field is a tuple with one entry per device.

    attn_norm, mlp_norm: `[D]` (replicated)
    attn: `AttentionWeights` of the device's heads
    w13: `[2*F_r, D]` (`[gate_r; up_r]`); w2: `[D, F_r]`
    """

    attn_norm: tuple
    attn: tuple
    mlp_norm: tuple
    w13: tuple
    w2: tuple


@dataclasses.dataclass(frozen=True)
class Weights:
    """The whole model. embed, lm_head: `[V_r, D]` per device (the same arrays when tied);
    norm: `[D]` per device."""

    embed: tuple
    layers: tuple
    norm: tuple
    lm_head: tuple


class TensorSource(Protocol):
    name: str  # file or description, for error messages

    def names(self) -> set[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def dtype(self, name: str) -> np.dtype: ...
    def read(self, name: str, index: tuple) -> np.ndarray: ...


class DictSource:
    """A tensor source over in-memory full (unsharded) arrays keyed by table names."""

    def __init__(self, tensors: dict[str, np.ndarray], name: str = "<memory>"):
        self.tensors, self.name = tensors, name

    def names(self):
        return set(self.tensors)

    def shape(self, name):
        return tuple(self.tensors[name].shape)

    def dtype(self, name):
        return np.asarray(self.tensors[name]).dtype

    def read(self, name, index):
        return np.asarray(self.tensors[name][index])


# ------------------------------------------------------------------------------------------
# What a checkpoint must hold, from the sharding table.


def expected_shapes(cfg: ModelConfig) -> dict[str, int]:
    """Symbol -> size, for the symbolic shapes of the sharding table."""
    D, hd, F = cfg.hidden_size, cfg.head_dim, cfg.ffn_size
    return {"D": D, "V": cfg.vocab_size, "F": F, "2F": 2 * F, "hd": hd, "Hq*hd": cfg.n_heads * hd,
            "Hkv*hd": cfg.n_kv_heads * hd, "(Hq+2Hkv)*hd": (cfg.n_heads + 2 * cfg.n_kv_heads) * hd}


def layer_params(cfg: ModelConfig, *, stacked: Sequence[str] = ()) -> list[Param]:
    """The rows one layer of `cfg` has, in table order; `stacked` names the device tensors
    (`wqkv`, `w13`) a checkpoint stores in their stacked form."""
    return [p for p in LAYER_PARAMS if PRESENCE[p.when](cfg) and p.stacked == (p.into in stacked)]


def model_params(cfg: ModelConfig) -> list[Param]:
    """The model-level rows of `cfg` (embedding, final norm, and lm_head unless tied)."""
    return [p for p in MODEL_PARAMS if PRESENCE[p.when](cfg)]


def stacked_forms(have: set[str]) -> set[str]:
    """The device tensors a checkpoint (table names `have`) stores stacked."""
    return {p.into for p in LAYER_PARAMS if p.stacked and any(n.endswith("." + p.name) for n in have)}


def check_source(src: TensorSource, cfg: ModelConfig) -> dict[str, Param]:
    """Every tensor the config needs is present, of a float dtype, with the right shape, and
    nothing unknown is left over. Returns `{weight name: its row}` of what will be read.

    The layer count is checked against the checkpoint first, so a config claiming 10^9
    layers fails at once instead of listing 10^9 layers' names.
    """
    have = src.names()
    layer_ids = {int(n.split(".")[1]) for n in have if n.startswith("layers.")}
    held = max(layer_ids) + 1 if layer_ids else 0
    if cfg.n_layers != held:
        raise WeightError(f"{src.name}: the config has {cfg.n_layers} layers, the checkpoint holds {held}")
    stacked = stacked_forms(have)
    needed = {p.name: p for p in model_params(cfg)}
    for i in range(cfg.n_layers):
        needed.update({f"layers.{i}.{p.name}": p for p in layer_params(cfg, stacked=stacked)})
    ignored = {"lm_head"} if cfg.tie_embeddings else set()
    missing = sorted(set(needed) - have)
    if missing:
        raise WeightError(f"{src.name}: missing tensor(s) {', '.join(missing[:5])}"
                          + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    extra = sorted(have - set(needed) - ignored)
    if extra:
        raise WeightError(f"{src.name}: unexpected tensor(s) {', '.join(extra[:5])}"
                          + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
                          + f" for a {cfg.arch} config (qkv_bias={cfg.qkv_bias}, qk_norm={cfg.qk_norm})")
    sizes = expected_shapes(cfg)
    for name, p in needed.items():
        want = tuple(sizes[s] for s in p.shape)
        if src.shape(name) != want:
            raise WeightError(f"{src.name}: tensor {name} has shape {src.shape(name)}, expected {want}")
        dt = np.dtype(src.dtype(name))
        if dt.kind != "f" and dt not in (bfloat16,):
            raise WeightError(f"{src.name}: tensor {name} has dtype {dt}; weights must be floating point")
    return needed


def n_device_tensors(cfg: ModelConfig) -> int:
    """How many device tensors `shard_weights` builds (the progress count)."""
    per_layer = len({p.into for p in layer_params(cfg)})
    return cfg.n_layers * per_layer + len({p.into for p in model_params(cfg)})


# ------------------------------------------------------------------------------------------
# Building every device's weights.


def shard_weights(src: TensorSource, cfg: ModelConfig, devices: Sequence[Device], dtype="float32", *,
                  ranks: Sequence[int] | None = None, tp: int | None = None,
                  progress: Callable[[int], None] | None = None) -> Weights:
    """Build the weights of `devices`, reading only each device's slices from `src`.

    `device_tensors` with the same arguments, put together by `assemble`.
    """
    layers, top = device_tensors(src, cfg, devices, dtype, ranks=ranks, tp=tp, progress=progress)
    return assemble(layers, top, len(devices))


def device_tensors(src: TensorSource, cfg: ModelConfig, devices: Sequence[Device], dtype="float32", *,
                   ranks: Sequence[int] | None = None, tp: int | None = None,
                   progress: Callable[[int], None] | None = None) -> tuple[list[dict], dict]:
    """Every device tensor of `devices`, read slice by slice from `src`: one dict per layer
    and one for the model, `{into name: tuple with one array per device}` (see `assemble`).

    Args:
        devices: the devices this process drives; ranks: their indices in the whole group
            (default 0..n-1); tp: the group's size (default len(devices)). Under MPI each
            process passes its own devices and `comm.ranks` / `comm.tp`.
        progress: called with the number of device tensors done after each one.
    Raises:
        WeightError: missing, extra, misshapen or non-float tensors, or NaN/inf values.
        ConfigError: the model cannot be split over this many devices.
    """
    ranks = list(range(len(devices)) if ranks is None else ranks)
    tp = len(devices) if tp is None else tp
    cfg.check_tp(tp)
    rows = check_source(src, cfg)
    dt = as_dtype(dtype)
    layouts = [cfg.layout(tp, r) for r in ranks]
    done = 0

    def read(name: str, i: int):
        """Local device i's shard of `name` as a float32 host array (pieces stacked on axis 0),
        or, for a quantized linear, as a quantized weight (`tpmax.quant`) that stays quantized."""
        pieces = [src.read(name, idx) for idx in shard_pieces(name, src.shape(name), layouts[i])]
        if any(is_quantized(a) for a in pieces):
            return concat_out(pieces)  # scales are checked finite by the quantized readers
        a = np.asarray(pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=0), np.float32)
        if not np.isfinite(a).all():
            raise WeightError(f"{src.name}: tensor {name} contains NaN or inf")
        return a

    def place(names: Sequence[str], i: int, d: Device):
        parts = [read(n, i) for n in names]
        if any(is_quantized(a) for a in parts):
            return concat_out(parts).to(d)  # quantized: kept as stored, whatever `dtype`
        return asarray(np.concatenate(parts, axis=0) if len(parts) > 1 else parts[0], d, dtype=dt)

    def build(names: Sequence[str]) -> tuple:
        """One device tensor from its rows' shards, for every local device."""
        nonlocal done
        out = tuple(place(names, i, d) for i, d in enumerate(devices))
        done += 1
        if progress:
            progress(done)
        return out

    def tensors(prefix: str, params) -> dict[str, tuple]:
        """`{device tensor: per-device arrays}` for the rows under `prefix` (fused in table order)."""
        by_into: dict[str, list[str]] = {}
        for name, p in params:
            by_into.setdefault(p.into, []).append(name)
        return {into: build(names) for into, names in by_into.items()}

    layers = []
    for i in range(cfg.n_layers):
        prefix = f"layers.{i}."
        layers.append(tensors(prefix, [(n, p) for n, p in rows.items() if n.startswith(prefix)]))
    top = tensors("", [(n, p) for n, p in rows.items() if not n.startswith("layers.")])
    return layers, top


def assemble(layers: Sequence[dict[str, tuple]], top: dict[str, tuple], n_devices: int) -> Weights:
    """`Weights` from device tensors keyed by the table's `into` names: one dict per layer
    (`wqkv`, `wo`, `w13`, ...) and one for the model (`embed`, `norm`, `lm_head`), each value
    a tuple with one array per device."""
    out = []
    for t in layers:
        attn = tuple(AttentionWeights(**{f: t[f][r] for f in _ATTENTION_FIELDS if f in t}) for r in range(n_devices))
        out.append(LayerWeights(attn=attn, **{f: t[f] for f in _LAYER_FIELDS}))
    return Weights(embed=top["embed"], layers=tuple(out), norm=top["norm"], lm_head=top.get("lm_head", top["embed"]))


_ATTENTION_FIELDS = tuple(f.name for f in dataclasses.fields(AttentionWeights))
_LAYER_FIELDS = tuple(f.name for f in dataclasses.fields(LayerWeights) if f.name != "attn")


def random_weights(cfg: ModelConfig, *, seed: int = 0, std: float = 0.02) -> dict[str, np.ndarray]:
    """Full (unsharded) float32 weights with random values, keyed by table names (the
    separate q/k/v and gate/up rows). For tests and benchmarks; norms are near 1."""
    rng = np.random.default_rng(seed)
    sizes = expected_shapes(cfg)

    def make(p: Param):
        shape = tuple(sizes[s] for s in p.shape)
        if p.name.endswith("norm"):
            return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        return (std * rng.standard_normal(shape)).astype(np.float32)

    out = {p.name: make(p) for p in model_params(cfg)}
    for i in range(cfg.n_layers):
        out.update({f"layers.{i}.{p.name}": make(p) for p in layer_params(cfg)})
    return out
