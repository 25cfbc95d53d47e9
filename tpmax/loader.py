"""Loading real checkpoints, sharded: Hugging Face safetensors directories and GGUF files.

Each format becomes a tensor source that speaks the sharding table's names; `shard_weights`
then reads, per device, only that device's slices (safetensors `get_slice`; GGUF rows of the
memory-mapped blocks), so host memory stays near one copy of the model. Nothing is ever
unpickled. `load` returns a `Model`: config, per-device weights, communicator, tokenizer.
"""
from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path
from typing import Sequence


from .comm import Communicator, communicator
from .config import ModelConfig
from .devices import Device, as_dtype, devices as parse_devices
from .errors import LoadError
from .kv_cache import KVCacheParams, PagedKVCache
from .weights import Weights, n_tensor_groups, shard_weights

# ------------------------------------------------------------------------------------------
# Name maps: checkpoint name -> table name. Layer names are relative to the layer prefix.

HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
HF_NAMES = {
    "model.embed_tokens.weight": "embed",
    "model.norm.weight": "norm",
    "lm_head.weight": "lm_head",
}
HF_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm",
    "self_attn.q_proj.weight": "q_proj",
    "self_attn.k_proj.weight": "k_proj",
    "self_attn.v_proj.weight": "v_proj",
    "self_attn.qkv_proj.weight": "qkv_proj",
    "self_attn.q_proj.bias": "q_bias",
    "self_attn.k_proj.bias": "k_bias",
    "self_attn.v_proj.bias": "v_bias",
    "self_attn.q_norm.weight": "q_norm",
    "self_attn.k_norm.weight": "k_norm",
    "self_attn.o_proj.weight": "o_proj",
    "post_attention_layernorm.weight": "mlp_norm",
    "mlp.gate_proj.weight": "gate_proj",
    "mlp.up_proj.weight": "up_proj",
    "mlp.gate_up_proj.weight": "gate_up_proj",
    "mlp.down_proj.weight": "down_proj",
}
HF_IGNORED = re.compile(r"rotary_emb\.inv_freq$")  # a buffer some exports carry; recomputed

GGUF_LAYER = re.compile(r"^blk\.(\d+)\.(.+)$")
GGUF_NAMES = {"token_embd.weight": "embed", "output_norm.weight": "norm", "output.weight": "lm_head"}
GGUF_LAYER_NAMES = {
    "attn_norm.weight": "attn_norm",
    "attn_q.weight": "q_proj",
    "attn_k.weight": "k_proj",
    "attn_v.weight": "v_proj",
    "attn_q.bias": "q_bias",
    "attn_k.bias": "k_bias",
    "attn_v.bias": "v_bias",
    "attn_output.weight": "o_proj",
    "ffn_norm.weight": "mlp_norm",
    "ffn_gate.weight": "gate_proj",
    "ffn_up.weight": "up_proj",
    "ffn_down.weight": "down_proj",
}
GGUF_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0")


def _table_name(name: str, top: dict, layer_re: re.Pattern, layer_names: dict, source: str) -> str:
    if name in top:
        return top[name]
    m = layer_re.match(name)
    if m and m.group(2) in layer_names:
        return f"layers.{m.group(1)}.{layer_names[m.group(2)]}"
    raise LoadError(f"{source}: unexpected tensor {name!r} (not part of a supported architecture)")


# ------------------------------------------------------------------------------------------
# Safetensors.


class SafetensorsSource:
    """The tensors of a HF directory: one `model.safetensors`, or shards with an index."""

    def __init__(self, directory: Path):
        from safetensors import safe_open

        self.name = str(directory)
        index = directory / "model.safetensors.index.json"
        if index.exists():
            files = sorted(set(_read_json(index).get("weight_map", {}).values()))
            if not files:
                raise LoadError(f"{index}: no weight_map")
        elif (directory / "model.safetensors").exists():
            files = ["model.safetensors"]
        else:
            files = sorted(p.name for p in directory.glob("model*.safetensors"))
        if not files:
            raise LoadError(f"{directory}: no model*.safetensors weights (pickled .bin checkpoints are not loaded)")
        self._where: dict[str, tuple] = {}
        for fname in files:
            path = directory / fname
            if not path.exists():
                raise LoadError(f"{path}: listed in the index but missing")
            try:
                handle = safe_open(str(path), framework="numpy")
                keys = list(handle.keys())
            except Exception as e:  # truncated, bad header, ...
                raise LoadError(f"{path}: not a valid safetensors file ({e})") from None
            for key in keys:
                if HF_IGNORED.search(key):
                    continue
                name = _table_name(key, HF_NAMES, HF_LAYER, HF_LAYER_NAMES, str(path))
                self._where[name] = (handle, key, path)

    def names(self):
        return set(self._where)

    def shape(self, name):
        handle, key, _ = self._where[name]
        return tuple(handle.get_slice(key).get_shape())

    def read(self, name, index):
        handle, key, path = self._where[name]
        try:
            return handle.get_slice(key)[index]
        except Exception as e:
            raise LoadError(f"{path}: cannot read tensor {key!r} ({e})") from None


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise LoadError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise LoadError(f"{path}: expected a JSON object")
    return data


# ------------------------------------------------------------------------------------------
# GGUF.


def open_gguf(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # bad magic, truncated data, ...
        raise LoadError(f"{path}: not a valid GGUF file ({type(e).__name__}: {e})") from None


def gguf_metadata(reader) -> dict:
    """Scalar and string metadata as `{key: value}` (large arrays are left out)."""
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key not in ("tokenizer.ggml.model", "tokenizer.ggml.pre") \
                and len(field.data) > 1:
            continue
        try:
            meta[key] = field.contents()
        except Exception:
            continue
    return meta


class GGUFSource:
    """The tensors of a GGUF file, dequantized row block by row block as they are read."""

    def __init__(self, path: Path, reader):
        self.name = str(path)
        self._tensors = {}
        for t in reader.tensors:
            if t.name == "rope_freqs.weight":
                raise LoadError(f"{path}: per-frequency RoPE factors (rope_freqs) are not supported")
            if t.tensor_type.name not in GGUF_TYPES:
                raise LoadError(f"{path}: tensor {t.name} has unsupported type {t.tensor_type.name}; "
                                f"supported: {', '.join(GGUF_TYPES)}")
            self._tensors[_table_name(t.name, GGUF_NAMES, GGUF_LAYER, GGUF_LAYER_NAMES, str(path))] = t

    def names(self):
        return set(self._tensors)

    def shape(self, name):
        return tuple(int(n) for n in reversed(self._tensors[name].shape))  # GGUF lists ne0 first

    def read(self, name, index):
        import gguf

        t = self._tensors[name]
        rows, rest = index[0], index[1:]
        data = t.data.reshape(self.shape(name)[0], -1)[rows]  # only these rows' blocks
        try:
            dense = gguf.quants.dequantize(data, t.tensor_type)
        except Exception as e:
            raise LoadError(f"{self.name}: cannot dequantize {t.name} ({e})") from None
        dense = dense.reshape(dense.shape[0], *self.shape(name)[1:])
        return dense[(slice(None),) + rest] if rest else dense


# ------------------------------------------------------------------------------------------
# The model.


@dataclasses.dataclass(frozen=True)
class Model:
    """A loaded model: everything generation needs, as plain data."""

    cfg: ModelConfig
    weights: Weights
    devices: tuple[Device, ...]
    comm: Communicator
    tokenizer: object | None
    eos_token_ids: tuple[int, ...]
    dtype: str
    path: str

    def new_cache(self, num_tokens: int, *, page_size: int = 16) -> PagedKVCache:
        """A paged KV cache with room for `num_tokens` tokens in all (rounded up to pages)."""
        params = KVCacheParams(self.dtype, self.cfg.n_kv_heads, self.cfg.head_dim, page_size, self.cfg.n_layers,
                               self.devices, n_heads=self.cfg.n_heads)
        return PagedKVCache(params, max(1, -(-num_tokens // page_size)), ranks=self.comm.ranks)


def load(path: str | Path | None = None, devices: Sequence[Device] | str | None = None, dtype: str = "float32", *,
         progress: bool = True) -> Model:
    """Load a model, sharded over `devices`.

    Args:
        path: a HF directory (config.json + *.safetensors), a `.gguf` file, or None for the
            default model (SmolLM2-135M-Instruct, fetched once into the cache).
        devices: a list of `Device`, a spec like "cpu:0,1", or None for "cpu".
        dtype: weight dtype on the devices ("float32", "bfloat16", "float16").
        progress: show a progress bar on stderr.
    """
    if path is None:
        from .hub import default_model_path
        path = default_model_path()
    path = Path(path)
    devs = tuple(parse_devices(devices or "cpu") if isinstance(devices, (str, type(None))) else devices)
    as_dtype(dtype)
    if not path.exists():
        raise LoadError(f"{path}: no such file or directory")
    if path.is_dir():
        cfg_path = path / "config.json"
        if not cfg_path.exists():
            raise LoadError(f"{path}: not a model directory (no config.json)")
        cfg = ModelConfig.from_hf_config(_read_json(cfg_path), source=str(cfg_path))
        src = SafetensorsSource(path)
        tokenizer, eos = _hf_tokenizer(path, cfg_path)
    elif path.suffix == ".gguf":
        reader = open_gguf(path)
        src = GGUFSource(path, reader)
        cfg = ModelConfig.from_gguf(gguf_metadata(reader), source=str(path), has_output="lm_head" in src.names())
        tokenizer, eos = _gguf_tokenizer(reader, path)
    else:
        raise LoadError(f"{path}: expected a model directory or a .gguf file")
    weights = _shard_with_progress(src, cfg, devs, dtype, progress, path.name)
    return Model(cfg, weights, devs, communicator(devs), tokenizer, eos, dtype, str(path))


def _shard_with_progress(src, cfg, devs, dtype, progress, label):
    if not progress:
        return shard_weights(src, cfg, devs, dtype)
    from tqdm import tqdm

    with tqdm(total=n_tensor_groups(cfg), desc=f"loading {label} on {len(devs)} device(s)", unit="tensor",
              file=sys.stderr, leave=False, disable=None) as bar:
        return shard_weights(src, cfg, devs, dtype, progress=lambda n: bar.update(n - bar.n))


def _hf_tokenizer(path: Path, cfg_path: Path):
    eos = _read_json(cfg_path).get("eos_token_id")
    gen = path / "generation_config.json"
    if gen.exists():
        eos = _read_json(gen).get("eos_token_id", eos)
    tok = None
    if (path / "tokenizer.json").exists():
        from .tokenizer import Tokenizer
        tok = Tokenizer.from_hf_dir(path)
        eos = eos if eos is not None else list(tok.eos_token_ids)
    return tok, _id_tuple(eos)


def _gguf_tokenizer(reader, path: Path):
    from .tokenizer import Tokenizer

    if "tokenizer.ggml.tokens" not in reader.fields:
        return None, ()
    tok = Tokenizer.from_gguf(reader)
    return tok, tuple(tok.eos_token_ids)


def _id_tuple(v) -> tuple[int, ...]:
    if v is None:
        return ()
    return tuple(int(i) for i in (v if isinstance(v, (list, tuple)) else [v]))
