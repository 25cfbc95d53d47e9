"""Model parameters as plain data, and `shard_weights`, which builds them from any tensor
source by reading, for each device, only the slices the sharding table assigns to it.

A tensor source names weights by the table's names (`layers.3.q_proj`, `embed`, ...) and
answers `shape(name)` and `read(name, index)`; the loader provides sources for safetensors
and GGUF files, and `DictSource` serves in-memory arrays (tests, random models).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Protocol, Sequence

import numpy as np

from .attention import AttentionWeights
from .config import ModelConfig
from .errors import WeightError
from .devices import Array, Device, as_dtype, asarray
from .sharding import LAYER_SHARDING, MODEL_SHARDING, shard_pieces


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
    def read(self, name: str, index: tuple) -> np.ndarray: ...


class DictSource:
    """A tensor source over in-memory full (unsharded) arrays keyed by table names."""

    def __init__(self, tensors: dict[str, np.ndarray], name: str = "<memory>"):
        self.tensors, self.name = tensors, name

    def names(self):
        return set(self.tensors)

    def shape(self, name):
        return tuple(self.tensors[name].shape)

    def read(self, name, index):
        return np.asarray(self.tensors[name][index])


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Symbol -> size, for the symbolic shapes of the sharding table."""
    D, hd, F = cfg.hidden_size, cfg.head_dim, cfg.ffn_size
    return {"D": D, "V": cfg.vocab_size, "F": F, "2F": 2 * F, "hd": hd, "Hq*hd": cfg.n_heads * hd,
            "Hkv*hd": cfg.n_kv_heads * hd, "(Hq+2Hkv)*hd": (cfg.n_heads + 2 * cfg.n_kv_heads) * hd}


def _table_entry(name: str):
    base = name.split(".")[-1] if name.startswith("layers.") else name
    return base, (LAYER_SHARDING.get(base) or MODEL_SHARDING[base])


def check_source(src: TensorSource, cfg: ModelConfig) -> None:
    """Every needed tensor present with the right shape, and nothing unknown left over."""
    have = src.names()
    sizes = expected_shapes(cfg)
    needed = {"embed", "norm"} | ({"lm_head"} if not cfg.tie_embeddings else set())
    optional = {"lm_head"} if cfg.tie_embeddings else set()
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        needed |= {p + n for n in ("attn_norm", "o_proj", "mlp_norm", "down_proj")}
        needed |= {p + "qkv_proj"} if p + "qkv_proj" in have else {p + n for n in ("q_proj", "k_proj", "v_proj")}
        needed |= {p + "gate_up_proj"} if p + "gate_up_proj" in have else {p + "gate_proj", p + "up_proj"}
        if cfg.qkv_bias:
            needed |= {p + n for n in ("q_bias", "k_bias", "v_bias")}
        if cfg.qk_norm:
            needed |= {p + "q_norm", p + "k_norm"}
    missing = sorted(needed - have)
    if missing:
        raise WeightError(f"{src.name}: missing tensor(s) {', '.join(missing[:5])}"
                          + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    extra = sorted(have - needed - optional)
    if extra:
        raise WeightError(f"{src.name}: unexpected tensor(s) {', '.join(extra[:5])}"
                          + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
                          + f" for a {cfg.arch} config (qkv_bias={cfg.qkv_bias}, qk_norm={cfg.qk_norm})")
    for name in sorted(needed | (optional & have)):
        want = tuple(sizes[s] for s in _table_entry(name)[1][0])
        if src.shape(name) != want:
            raise WeightError(f"{src.name}: tensor {name} has shape {src.shape(name)}, expected {want}")


def shard_weights(src: TensorSource, cfg: ModelConfig, devices: Sequence[Device], dtype="float32", *,
                  progress: Callable[[int], None] | None = None) -> Weights:
    """Build every device's weights, reading only its slices from `src`.

    Args:
        progress: called with the number of tensors done after each one (for a progress bar).
    Raises:
        WeightError: missing, extra or misshapen tensors, or NaN/inf values.
        ConfigError: the model cannot be split over this many devices.
    """
    tp = len(devices)
    cfg.check_tp(tp)
    check_source(src, cfg)
    dt = as_dtype(dtype)
    have = src.names()
    layouts = [cfg.layout(tp, r) for r in range(tp)]

    def read(name: str, r: int) -> np.ndarray:
        """Device r's shard of `name` as a float32 host array (pieces stacked on axis 0)."""
        base, _ = _table_entry(name)
        pieces = [src.read(name, idx) for idx in shard_pieces(base, src.shape(name), layouts[r])]
        a = pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=0)
        a = np.asarray(a, np.float32)
        if not np.isfinite(a).all():
            raise WeightError(f"{src.name}: tensor {name} contains NaN or inf")
        return a

    def fused(names: Sequence[str], r: int) -> np.ndarray:
        return np.concatenate([read(n, r) for n in names], axis=0)

    def place(a: np.ndarray, r: int) -> Array:
        return asarray(a, devices[r], dtype=dt)

    done = 0

    def tick():
        nonlocal done
        done += 1
        if progress:
            progress(done)

    def each_device(build: Callable[[int], object]) -> tuple:
        out = tuple(build(r) for r in range(tp))
        tick()
        return out

    layers = []
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        qkv = [p + "qkv_proj"] if p + "qkv_proj" in have else [p + "q_proj", p + "k_proj", p + "v_proj"]
        gu = [p + "gate_up_proj"] if p + "gate_up_proj" in have else [p + "gate_proj", p + "up_proj"]

        def attn(r):
            wqkv = fused(qkv, r)
            if cfg.clip_qkv is not None:
                wqkv = np.clip(wqkv, -cfg.clip_qkv, cfg.clip_qkv)
            opt = lambda n: place(read(p + n, r), r) if cfg.qk_norm else None  # noqa: E731
            return AttentionWeights(
                wqkv=place(wqkv, r), wo=place(read(p + "o_proj", r), r),
                bqkv=place(fused([p + "q_bias", p + "k_bias", p + "v_bias"], r), r) if cfg.qkv_bias else None,
                q_norm=opt("q_norm"), k_norm=opt("k_norm"))

        layers.append(LayerWeights(
            attn_norm=each_device(lambda r: place(read(p + "attn_norm", r), r)),
            attn=each_device(attn),
            mlp_norm=each_device(lambda r: place(read(p + "mlp_norm", r), r)),
            w13=each_device(lambda r: place(fused(gu, r), r)),
            w2=each_device(lambda r: place(read(p + "down_proj", r), r)),
        ))
    embed = each_device(lambda r: place(read("embed", r), r))
    head = "embed" if cfg.tie_embeddings else "lm_head"
    lm_head = embed if head == "embed" else each_device(lambda r: place(read(head, r), r))
    norm = each_device(lambda r: place(read("norm", r), r))
    return Weights(embed=embed, layers=tuple(layers), norm=norm, lm_head=lm_head)


def n_tensor_groups(cfg: ModelConfig) -> int:
    """How many progress ticks `shard_weights` makes (for a progress bar's total)."""
    return 5 * cfg.n_layers + 2 + (0 if cfg.tie_embeddings else 1)


def random_weights(cfg: ModelConfig, *, seed: int = 0, std: float = 0.02) -> dict[str, np.ndarray]:
    """Full (unsharded) float32 weights with random values, keyed by table names (separate
    q/k/v and gate/up). For tests and benchmarks; norms are near 1."""
    rng = np.random.default_rng(seed)
    sizes = expected_shapes(cfg)

    def make(name):
        base, (shape, _, _) = _table_entry(name)
        shape = tuple(sizes[s] for s in shape)
        if base.endswith("norm"):
            return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        return (std * rng.standard_normal(shape)).astype(np.float32)

    names = ["embed", "norm"] + ([] if cfg.tie_embeddings else ["lm_head"])
    for i in range(cfg.n_layers):
        layer = ["attn_norm", "q_proj", "k_proj", "v_proj", "o_proj", "mlp_norm", "gate_proj", "up_proj", "down_proj"]
        layer += ["q_bias", "k_bias", "v_bias"] if cfg.qkv_bias else []
        layer += ["q_norm", "k_norm"] if cfg.qk_norm else []
        names += [f"layers.{i}.{n}" for n in layer]
    return {n: make(n) for n in names}
