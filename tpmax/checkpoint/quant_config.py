"""HF `quantization_config` (GPTQ, compressed-tensors, block FP8) -> `QuantConfig`: how a
checkpoint's linears are quantized, validated value by value (a wrong type or range is a
ConfigError naming the file and the key)."""
from __future__ import annotations

import dataclasses

from ..core.errors import ConfigError
from ..nn.quant import PACKED_BITS


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How a checkpoint's linears are quantized.

    method: "gptq", "compressed-tensors" or "fp8"; format: "gptq", "pack-quantized",
    "float-quantized" or "fp8-block"; bits; group_size (-1: one group over `in`);
    sym; desc_act (g_idx permuted); zero_offset: added to stored GPTQ zeros (1 for the v1
    format); strategy: "tensor", "channel", "group" or "block"; block: `(bo, bi)`;
    ignore: module names (or "re:" patterns) left unquantized.
    """

    method: str
    format: str
    bits: int
    group_size: int = -1
    sym: bool = True
    desc_act: bool = False
    zero_offset: int = 0
    strategy: str = "group"
    block: tuple[int, int] | None = None
    ignore: tuple[str, ...] = ()

    @property
    def suffixes(self) -> tuple[str, ...]:
        """The tensors each quantized linear stores beside its name (required ones)."""
        if self.format == "gptq":
            return ("qweight", "qzeros", "scales")
        if self.format == "pack-quantized":
            return ("weight_packed", "weight_scale", "weight_shape") + (() if self.sym else ("weight_zero_point",))
        if self.format == "fp8-block":
            return ("weight", "weight_scale_inv")
        return ("weight", "weight_scale")

    @property
    def optional_suffixes(self) -> tuple[str, ...]:
        return {"gptq": ("g_idx",), "pack-quantized": ("weight_g_idx",)}.get(self.format, ())

    def describe(self) -> str:
        """One line for `tpmax info`."""
        if self.format == "gptq":
            return (f"gptq {self.bits}-bit, group {self.group_size}, {'sym' if self.sym else 'asym'}"
                    + (", desc_act" if self.desc_act else ""))
        if self.format == "pack-quantized":
            return f"compressed-tensors pack-quantized int{self.bits}, {self.strategy}" + (
                f" {self.group_size}" if self.strategy == "group" else "") + (", asym" if not self.sym else "")
        if self.format == "fp8-block":
            return f"fp8 e4m3, block {self.block[0]}x{self.block[1]} scales"
        return f"compressed-tensors float-quantized fp8 e4m3, per-{self.strategy} scale"

    def quantizes(self, module: str) -> bool:
        """Whether the linear `module` (HF name without `.weight`) is quantized."""
        import re

        for pat in self.ignore:
            if pat.startswith("re:"):
                if re.match(pat[3:], module):
                    return False
            elif module == pat or module.endswith("." + pat) or pat.endswith("." + module):
                return False
        return True


def quant_config_from_hf(config: dict, *, source: str) -> QuantConfig | None:
    """The `quantization_config` of a HF config.json as a `QuantConfig` (None: not quantized).

    Raises:
        ConfigError: a value of the wrong type, an unsupported quant_method, format, bit width
            or option, naming `source` and the key.
    """
    qc = config.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise ConfigError(f"{source}: quantization_config must be an object, got {_short(qc)}")
    method = _field(qc, "quant_method", str, "quantization_config", source)
    if method == "gptq":
        return _gptq_config(qc, source)
    if method == "compressed-tensors":
        return _compressed_tensors_config(qc, source)
    if method == "fp8":
        return _fp8_block_config(qc, source)
    raise ConfigError(f"{source}: unsupported quant_method {method!r}; supported: gptq, compressed-tensors, fp8")


# Each JSON value is read with its type checked: (what the message says, the check).
_KINDS = {
    int: ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    bool: ("true or false", lambda v: isinstance(v, bool)),
    str: ("a string", lambda v: isinstance(v, str)),
    dict: ("an object", lambda v: isinstance(v, dict)),
    list: ("a list of strings", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v)),
}


def _short(v) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def _field(obj: dict, key: str, kind: type, where: str, source: str, default=None):
    """`obj[key]` checked to be of `kind` (`_KINDS`); absent or null: `default`.

    Raises:
        ConfigError: naming `source` and the key as `where.key`.
    """
    v = obj.get(key)
    if v is None:
        return default
    what, ok = _KINDS[kind]
    if not ok(v):
        raise ConfigError(f"{source}: {where}.{key} must be {what}, got {_short(v)}")
    return v


def _block(obj: dict, key: str, where: str, source: str) -> tuple[int, int] | None:
    """A `[rows, cols]` block of two positive integers (absent or null: None)."""
    v = obj.get(key)
    if v is None:
        return None
    if not (isinstance(v, list) and len(v) == 2 and all(_KINDS[int][1](b) and b > 0 for b in v)):
        raise ConfigError(f"{source}: {where}.{key} must be [rows, cols] of two positive integers, got {_short(v)}")
    return tuple(v)


def _gptq_config(qc: dict, source: str) -> QuantConfig:
    at = "quantization_config"
    bits = _field(qc, "bits", int, at, source)
    if bits not in PACKED_BITS:
        raise ConfigError(f"{source}: GPTQ bits={bits!r} unsupported; supported: {', '.join(map(str, PACKED_BITS))}")
    group = _field(qc, "group_size", int, at, source, 128)
    if group <= 0 and group != -1:
        raise ConfigError(f"{source}: GPTQ group_size={group!r} must be a positive int or -1")
    fmt = _field(qc, "checkpoint_format", str, at, source) or _field(qc, "format", str, at, source, "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise ConfigError(f"{source}: GPTQ checkpoint_format {fmt!r} unsupported; supported: gptq, gptq_v2")
    if qc.get("dynamic"):
        raise ConfigError(f"{source}: GPTQ per-module overrides (dynamic) are unsupported")
    ignore = tuple(_field(qc, "modules_to_not_convert", list, at, source, [])) + (
        () if _field(qc, "lm_head", bool, at, source, False) else ("lm_head",))
    return QuantConfig("gptq", "gptq", bits, group, _field(qc, "sym", bool, at, source, True),
                       _field(qc, "desc_act", bool, at, source, False), 1 if fmt == "gptq" else 0,
                       "group" if group != -1 else "channel", None, ignore)


def _compressed_tensors_config(qc: dict, source: str) -> QuantConfig:
    at = "quantization_config"
    groups = _field(qc, "config_groups", dict, at, source, {})
    if len(groups) != 1:
        raise ConfigError(f"{source}: compressed-tensors with {len(groups)} config_groups unsupported (need exactly 1)")
    (gname, _), = groups.items()
    group = _field(groups, gname, dict, f"{at}.config_groups", source)
    g_at = f"{at}.config_groups.{gname}"
    fmt = _field(group, "format", str, g_at, source) or _field(qc, "format", str, at, source)
    w = _field(group, "weights", dict, g_at, source, {})
    if group.get("input_activations") or group.get("output_activations"):
        raise ConfigError(f"{source}: compressed-tensors activation quantization ({gname}) unsupported; "
                          "only weight-only schemes load")
    targets = _field(group, "targets", list, g_at, source, [])
    if targets and "Linear" not in targets:
        raise ConfigError(f"{source}: compressed-tensors targets {targets} unsupported (need 'Linear')")
    w_at = f"{g_at}.weights"
    typ, bits = _field(w, "type", str, w_at, source), _field(w, "num_bits", int, w_at, source)
    strategy, sym = _field(w, "strategy", str, w_at, source), _field(w, "symmetric", bool, w_at, source, True)
    ignore = tuple(_field(qc, "ignore", list, at, source, []))
    if fmt == "float-quantized":
        if typ != "float" or bits != 8:
            raise ConfigError(f"{source}: float-quantized weights type={typ!r} num_bits={bits!r} unsupported "
                              "(need float 8 = e4m3)")
        if strategy not in ("tensor", "channel", "block"):
            raise ConfigError(f"{source}: float-quantized strategy {strategy!r} unsupported; "
                              "supported: tensor, channel, block")
        if not sym:
            raise ConfigError(f"{source}: asymmetric FP8 weights unsupported")
        block = _block(w, "block_structure", w_at, source)
        if strategy == "block" and block is None:
            raise ConfigError(f"{source}: block strategy needs block_structure [rows, cols]")
        return QuantConfig("compressed-tensors", "float-quantized", 8, -1, True, False, 0, strategy, block, ignore)
    if fmt == "pack-quantized":
        if typ != "int" or bits not in (4, 8):
            raise ConfigError(f"{source}: pack-quantized weights type={typ!r} num_bits={bits!r} unsupported "
                              "(need int 4 or 8)")
        if strategy not in ("channel", "group"):
            raise ConfigError(f"{source}: pack-quantized strategy {strategy!r} unsupported; supported: channel, group")
        gs = _field(w, "group_size", int, w_at, source) if strategy == "group" else -1
        if strategy == "group" and (gs is None or gs <= 0):
            raise ConfigError(f"{source}: pack-quantized group strategy needs a positive group_size, got {gs!r}")
        actorder = w.get("actorder")
        if not isinstance(actorder, (type(None), bool, str)):
            raise ConfigError(f"{source}: {w_at}.actorder must be null, true, false or a string, "
                              f"got {_short(actorder)}")
        return QuantConfig("compressed-tensors", "pack-quantized", bits, gs, sym, actorder in ("group", True), 0,
                           strategy, None, ignore)
    raise ConfigError(f"{source}: compressed-tensors format {fmt!r} unsupported; "
                      "supported: float-quantized, pack-quantized")


def _fp8_block_config(qc: dict, source: str) -> QuantConfig:
    at = "quantization_config"
    fmt = _field(qc, "fmt", str, at, source, "e4m3")
    if fmt != "e4m3":
        raise ConfigError(f"{source}: fp8 fmt {fmt!r} unsupported (need e4m3)")
    scheme = _field(qc, "activation_scheme", str, at, source, "dynamic")
    if scheme != "dynamic":
        raise ConfigError(f"{source}: fp8 activation_scheme {scheme!r} unsupported (need dynamic: weights only)")
    block = _block(qc, "weight_block_size", at, source)
    if block is None:
        raise ConfigError(f"{source}: fp8 needs weight_block_size [rows, cols], got None")
    return QuantConfig("fp8", "fp8-block", 8, -1, True, False, 0, "block", block,
                       tuple(_field(qc, "modules_to_not_convert", list, at, source, [])) or ("lm_head",))
