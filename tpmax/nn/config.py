"""`ModelConfig`: the hyper-parameters of a Llama-family model, from a Hugging Face
`config.json` (transformers 4.x and 5.x spellings), from GGUF metadata, or from an
exact-name preset. Per-device sizes are never stored here: they come from `sharding`.
"""
from __future__ import annotations

import dataclasses
import functools
import math

from .attention import AttentionConfig, MHAMaskVariant
from ..core.errors import ConfigError
from .layers import ACTIVATIONS, Llama3Scaling, LinearScaling, RotaryEmbedding
from ..core.sharding import HeadShard, Layout, check_heads, head_shard

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "granite")

_HF_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
                   "gelu_new": "gelu_tanh", "relu": "relu", "tanh": "tanh", "sigmoid": "sigmoid"}


_MAX_DIM = 1 << 24  # no dimension of a real model comes near this; bigger is a broken config
_MAX_LAYERS = 1 << 12


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    arch: str
    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_size: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Llama3Scaling | LinearScaling | None = None
    rope_interleaved: bool = False  # True for GGUF (llama.cpp layout)
    max_seq_len: int = 4096
    activation: str = "silu"
    qkv_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    attention_scale: float | None = None  # None: 1/sqrt(head_dim)
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0
    tie_embeddings: bool = False

    def __post_init__(self):
        for f in ("vocab_size", "hidden_size", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_size",
                  "max_seq_len"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or not 0 < v <= (_MAX_LAYERS if f == "n_layers" else _MAX_DIM << 8):
                raise ConfigError(f"{f} must be a positive integer (at most {_MAX_LAYERS if f == 'n_layers' else _MAX_DIM << 8}), "
                                  f"got {v!r}")
        try:
            check_heads(self.n_heads, self.n_kv_heads)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"unknown activation {self.activation!r}")
        for f in ("norm_eps", "rope_theta", "embedding_multiplier", "residual_multiplier", "logits_scaling"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
                raise ConfigError(f"{f} must be a positive finite float, got {v!r}")
        if self.attention_scale is not None and not (math.isfinite(self.attention_scale) and self.attention_scale > 0):
            raise ConfigError(f"attention_scale must be positive, got {self.attention_scale!r}")
        if self.sliding_window is not None and not (isinstance(self.sliding_window, int) and self.sliding_window > 0):
            raise ConfigError(f"sliding_window must be a positive integer, got {self.sliding_window!r}")
        s = self.rope_scaling
        if s is not None and not all(math.isfinite(v) and v > 0 for v in dataclasses.astuple(s)):
            raise ConfigError(f"rope scaling values must be positive, got {s}")
        if isinstance(s, Llama3Scaling) and s.high_freq_factor <= s.low_freq_factor:
            raise ConfigError(f"llama3 rope scaling needs high_freq_factor > low_freq_factor, got {s}")

    # -- derived pieces -----------------------------------------------------------------------

    @functools.cache
    def attention(self) -> AttentionConfig:
        window = self.sliding_window
        return AttentionConfig(
            n_heads=self.n_heads, n_kv_heads=self.n_kv_heads, head_dim=self.head_dim,
            scale=self.attention_scale,
            mask=MHAMaskVariant.SLIDING_WINDOW_CAUSAL_MASK if window else MHAMaskVariant.CAUSAL_MASK,
            sliding_window=window, qk_norm_eps=self.norm_eps if self.qk_norm else None)

    @functools.cache
    def rope(self) -> RotaryEmbedding:
        return RotaryEmbedding(dim=self.hidden_size, n_heads=self.n_heads, theta=self.rope_theta,
                               max_seq_len=self.max_seq_len, head_dim=self.head_dim,
                               interleaved=self.rope_interleaved, scaling=self.rope_scaling)

    def heads(self, tp: int, rank: int) -> HeadShard:
        return head_shard(self.n_heads, self.n_kv_heads, tp, rank)

    def layout(self, tp: int, rank: int) -> Layout:
        return Layout(tp, rank, self.heads(tp, rank), self.head_dim)

    def check_tp(self, tp: int) -> None:
        """Raise if the model cannot be split over `tp` devices."""
        if tp > self.n_heads:
            raise ConfigError(f"cannot split {self.n_heads} attention heads over {tp} devices")
        if tp > min(self.ffn_size, self.vocab_size):
            raise ConfigError(f"cannot split ffn_size={self.ffn_size} / vocab={self.vocab_size} over {tp} devices")

    def n_params(self) -> int:
        D, F, hd = self.hidden_size, self.ffn_size, self.head_dim
        attn = D * (self.n_heads + 2 * self.n_kv_heads) * hd + self.n_heads * hd * D
        layer = attn + 3 * D * F + 2 * D
        return self.n_layers * layer + self.vocab_size * D * (1 if self.tie_embeddings else 2) + D

    # -- constructors -------------------------------------------------------------------------

    @classmethod
    def from_hf_config(cls, c: dict, *, source: str = "config.json") -> "ModelConfig":
        """From a Hugging Face `config.json` dict (transformers 4.x or 5.x spelling); every
        value is type- and range-checked, errors name the file and the key."""
        if not isinstance(c, dict):
            raise ConfigError(f"{source}: expected a JSON object")
        get = _Getter(c, source)
        arch = c.get("model_type")
        if arch not in ARCHITECTURES:
            raise ConfigError(f"{source}: unsupported model_type {arch!r}; supported: {', '.join(ARCHITECTURES)}")
        if get.bool("attention_bias", False) and arch in ("llama", "mistral", "granite"):
            raise ConfigError(f"{source}: attention_bias=true (bias on o_proj) is not supported")
        if get.bool("mlp_bias", False):
            raise ConfigError(f"{source}: mlp_bias=true is not supported")
        act = get.str("hidden_act", "silu")
        if act not in _HF_ACTIVATIONS:
            raise ConfigError(f"{source}: unsupported hidden_act {act!r}")
        n_heads = get.int("num_attention_heads")
        hidden = get.int("hidden_size")
        theta, scaling = _hf_rope(c, get, source)
        window = None
        if arch == "mistral":
            window = get.int("sliding_window", None)
        elif arch in ("qwen2", "qwen3") and get.bool("use_sliding_window", False):
            raise ConfigError(f"{source}: use_sliding_window=true (per-layer windows) is not supported")
        granite = arch == "granite"
        return _checked(source, lambda: cls(
            arch=arch, vocab_size=get.int("vocab_size"), hidden_size=hidden, n_layers=get.int("num_hidden_layers"),
            n_heads=n_heads, n_kv_heads=get.int("num_key_value_heads", None) or n_heads,
            head_dim=get.int("head_dim", None) or hidden // n_heads, ffn_size=get.int("intermediate_size"),
            norm_eps=get.float("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
            max_seq_len=get.int("max_position_embeddings", 4096), activation=_HF_ACTIVATIONS[act],
            qkv_bias=arch == "qwen2" or get.bool("attention_bias", False), qk_norm=arch == "qwen3",
            sliding_window=window,
            attention_scale=get.float("attention_multiplier", None) if granite else None,
            embedding_multiplier=get.float("embedding_multiplier", 1.0) if granite else 1.0,
            residual_multiplier=get.float("residual_multiplier", 1.0) if granite else 1.0,
            logits_scaling=get.float("logits_scaling", 1.0) if granite else 1.0,
            tie_embeddings=get.bool("tie_word_embeddings", False),
        ))

    @classmethod
    def from_gguf(cls, meta: dict, *, source: str = "model.gguf", has_output: bool = True) -> "ModelConfig":
        """From decoded GGUF metadata (`{key: value}`); only the `llama` architecture.

        `has_output`: whether the file stores `output.weight` (otherwise tied embeddings).
        """
        arch = meta.get("general.architecture")
        if arch != "llama":
            raise ConfigError(f"{source}: unsupported GGUF architecture {arch!r}; supported: llama")
        get = _Getter({k[len("llama."):]: v for k, v in meta.items() if k.startswith("llama.")}, source,
                      prefix="llama.")
        hidden, n_heads = get.int("embedding_length"), get.int("attention.head_count")
        tokens = meta.get("tokenizer.ggml.tokens")
        vocab = get.int("vocab_size", None) or (len(tokens) if isinstance(tokens, list) else None)
        if not vocab:
            raise ConfigError(f"{source}: cannot tell the vocabulary size (no llama.vocab_size, no tokenizer tokens)")
        scaling = None
        kind = get.str("rope.scaling.type", "none")
        if kind == "linear":
            scaling = LinearScaling(get.float("rope.scaling.factor"))
        elif kind != "none":
            raise ConfigError(f"{source}: unsupported rope scaling {kind!r}")
        return _checked(source, lambda: cls(
            arch="llama", vocab_size=vocab, hidden_size=hidden, n_layers=get.int("block_count"),
            n_heads=n_heads, n_kv_heads=get.int("attention.head_count_kv", None) or n_heads,
            head_dim=get.int("attention.key_length", None) or hidden // n_heads,
            ffn_size=get.int("feed_forward_length"),
            norm_eps=get.float("attention.layer_norm_rms_epsilon", 1e-5),
            rope_theta=get.float("rope.freq_base", 10000.0), rope_scaling=scaling,
            rope_interleaved=True, max_seq_len=get.int("context_length", 4096), tie_embeddings=not has_output))

    @classmethod
    def preset(cls, name: str) -> "ModelConfig":
        """An exact-name preset (the shapes benchmarks build random models of)."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
        return PRESETS[name]


def _checked(source: str, make):
    """Build the config; a value the dataclass rejects names the file."""
    try:
        return make()
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


class _Getter:
    """Typed, range-checked reads of config values; every error names the file and the key."""

    _MISSING = object()

    def __init__(self, c: dict, source: str, prefix: str = ""):
        self.c, self.source, self.prefix = c, source, prefix

    def _get(self, key, default):
        if key not in self.c or self.c[key] is None:
            if default is self._MISSING:
                raise ConfigError(f"{self.source}: missing required key {self.prefix + key!r}")
            return default
        return self.c[key]

    def _bad(self, key, v, what):
        return ConfigError(f"{self.source}: {self.prefix + key} must be {what}, got {v!r}")

    def int(self, key, default=_MISSING):
        v = self._get(key, default)
        if v is default:
            return v
        if isinstance(v, bool) or not isinstance(v, int):
            raise self._bad(key, v, "an integer")
        if v <= 0:
            raise self._bad(key, v, "positive")
        return v

    def float(self, key, default=_MISSING):
        v = self._get(key, default)
        if v is default:
            return v
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise self._bad(key, v, "a finite number")
        if v <= 0:
            raise self._bad(key, v, "positive")
        return float(v)

    def bool(self, key, default=_MISSING):
        v = self._get(key, default)
        if not isinstance(v, bool):
            raise self._bad(key, v, "true or false")
        return v

    def str(self, key, default=_MISSING):
        v = self._get(key, default)
        if not isinstance(v, str):
            raise self._bad(key, v, "a string")
        return v


def _hf_rope(c: dict, get: _Getter, source: str):
    """(theta, scaling) from `rope_theta`/`rope_scaling` (4.x) or `rope_parameters` (5.x)."""
    params = c.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        raise ConfigError(f"{source}: rope_parameters must be a mapping, got {type(params).__name__}")
    if params is not None and "sliding_attention" in params:
        raise ConfigError(f"{source}: per-layer-type rope_parameters are not supported")
    scaling = params if params is not None else c.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, dict):
        raise ConfigError(f"{source}: rope_scaling must be a mapping, got {type(scaling).__name__}")
    theta = _Getter(params, source, "rope_parameters.").float("rope_theta", None) if params else None
    theta = theta or get.float("rope_theta", 10000.0)
    if not scaling:
        return theta, None
    sget = _Getter(scaling, source, "rope_parameters." if params is not None else "rope_scaling.")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind == "linear":
        return theta, LinearScaling(sget.float("factor"))
    if kind == "llama3":
        return theta, Llama3Scaling(sget.float("factor"), sget.float("low_freq_factor"),
                                    sget.float("high_freq_factor"), sget.int("original_max_position_embeddings"))
    raise ConfigError(f"{source}: unsupported rope scaling type {kind!r} (supported: default, linear, llama3)")


PRESETS = {
    "llama-3-8b": ModelConfig(arch="llama", vocab_size=128256, hidden_size=4096, n_layers=32, n_heads=32,
                              n_kv_heads=8, head_dim=128, ffn_size=14336, norm_eps=1e-5, rope_theta=500000.0,
                              rope_scaling=Llama3Scaling(8.0, 1.0, 4.0, 8192), max_seq_len=8192),
}
