"""`ModelConfig`: the hyper-parameters of a Llama-family model, from a Hugging Face
`config.json` (transformers 4.x and 5.x spellings), from GGUF metadata, or from an
exact-name preset. Per-device sizes are never stored here: they come from `sharding`.
"""
from __future__ import annotations

import dataclasses
import functools

from .attention import AttentionConfig, MHAMaskVariant
from .errors import ConfigError
from .layers import ACTIVATIONS, Llama3Scaling, LinearScaling, RotaryEmbedding
from .sharding import HeadShard, Layout, head_shard

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "granite")

_HF_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
                   "gelu_new": "gelu_tanh", "relu": "relu", "tanh": "tanh", "sigmoid": "sigmoid"}


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
    clip_qkv: float | None = None

    def __post_init__(self):
        for f in ("vocab_size", "hidden_size", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_size"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) <= 0:
                raise ConfigError(f"{f} must be a positive integer, got {getattr(self, f)!r}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"unknown activation {self.activation!r}")

    # -- derived pieces -----------------------------------------------------------------------

    @functools.cache
    def attention(self) -> AttentionConfig:
        window = self.sliding_window
        return AttentionConfig(
            n_heads=self.n_heads, n_kv_heads=self.n_kv_heads, head_dim=self.head_dim,
            scale=self.attention_scale,
            mask=MHAMaskVariant.SLIDING_WINDOW_CAUSAL_MASK if window else MHAMaskVariant.CAUSAL_MASK,
            sliding_window=window, qk_norm_eps=self.norm_eps if self.qk_norm else None,
            interleaved=self.rope_interleaved)

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
        """From a Hugging Face `config.json` dict (transformers 4.x or 5.x spelling)."""
        arch = c.get("model_type")
        if arch not in ARCHITECTURES:
            raise ConfigError(f"{source}: unsupported model_type {arch!r}; supported: {', '.join(ARCHITECTURES)}")

        def need(key):
            if key not in c:
                raise ConfigError(f"{source}: missing required key {key!r}")
            return c[key]

        if c.get("attention_bias") and arch in ("llama", "mistral", "granite"):
            raise ConfigError(f"{source}: attention_bias=true (bias on o_proj) is not supported")
        if c.get("mlp_bias"):
            raise ConfigError(f"{source}: mlp_bias=true is not supported")
        act = c.get("hidden_act", "silu")
        if act not in _HF_ACTIVATIONS:
            raise ConfigError(f"{source}: unsupported hidden_act {act!r}")
        n_heads = need("num_attention_heads")
        hidden = need("hidden_size")
        theta, scaling = _hf_rope(c, source)
        window = None
        if arch == "mistral":
            window = c.get("sliding_window")
        elif arch in ("qwen2", "qwen3") and c.get("use_sliding_window"):
            raise ConfigError(f"{source}: use_sliding_window=true (per-layer windows) is not supported")
        return cls(
            arch=arch, vocab_size=need("vocab_size"), hidden_size=hidden, n_layers=need("num_hidden_layers"),
            n_heads=n_heads, n_kv_heads=c.get("num_key_value_heads") or n_heads,
            head_dim=c.get("head_dim") or hidden // n_heads, ffn_size=need("intermediate_size"),
            norm_eps=float(c.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
            max_seq_len=int(c.get("max_position_embeddings", 4096)), activation=_HF_ACTIVATIONS[act],
            qkv_bias=arch == "qwen2" or bool(c.get("attention_bias", False)), qk_norm=arch == "qwen3",
            sliding_window=window,
            attention_scale=c.get("attention_multiplier") if arch == "granite" else None,
            embedding_multiplier=float(c.get("embedding_multiplier", 1.0)) if arch == "granite" else 1.0,
            residual_multiplier=float(c.get("residual_multiplier", 1.0)) if arch == "granite" else 1.0,
            logits_scaling=float(c.get("logits_scaling", 1.0)) if arch == "granite" else 1.0,
            tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        )

    @classmethod
    def from_gguf(cls, meta: dict, *, source: str = "model.gguf", has_output: bool = True) -> "ModelConfig":
        """From GGUF metadata (`{key: value}`); only the `llama` architecture.

        `has_output`: whether the file stores `output.weight` (otherwise tied embeddings).
        """
        arch = meta.get("general.architecture")
        if arch != "llama":
            raise ConfigError(f"{source}: unsupported GGUF architecture {arch!r}; supported: llama")

        def need(key):
            if f"llama.{key}" not in meta:
                raise ConfigError(f"{source}: missing metadata key 'llama.{key}'")
            return meta[f"llama.{key}"]

        hidden, n_heads = int(need("embedding_length")), int(need("attention.head_count"))
        vocab = meta.get("llama.vocab_size") or len(meta.get("tokenizer.ggml.tokens", ()))
        if not vocab:
            raise ConfigError(f"{source}: cannot tell the vocabulary size")
        scaling = None
        if meta.get("llama.rope.scaling.type") == "linear":
            scaling = LinearScaling(float(meta["llama.rope.scaling.factor"]))
        elif meta.get("llama.rope.scaling.type") not in (None, "none"):
            raise ConfigError(f"{source}: unsupported rope scaling {meta['llama.rope.scaling.type']!r}")
        head_dim = int(meta.get("llama.attention.key_length") or hidden // n_heads)
        return cls(
            arch="llama", vocab_size=int(vocab), hidden_size=hidden, n_layers=int(need("block_count")),
            n_heads=n_heads, n_kv_heads=int(meta.get("llama.attention.head_count_kv") or n_heads),
            head_dim=head_dim, ffn_size=int(need("feed_forward_length")),
            norm_eps=float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(meta.get("llama.rope.freq_base", 10000.0)), rope_scaling=scaling,
            rope_interleaved=True, max_seq_len=int(meta.get("llama.context_length", 4096)),
            tie_embeddings=not has_output)

    @classmethod
    def preset(cls, name: str) -> "ModelConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
        return PRESETS[name]


def _hf_rope(c: dict, source: str):
    """(theta, scaling) from `rope_theta`/`rope_scaling` (4.x) or `rope_parameters` (5.x)."""
    params = c.get("rope_parameters")
    if isinstance(params, dict) and "sliding_attention" in params:
        raise ConfigError(f"{source}: per-layer-type rope_parameters are not supported")
    scaling = params if params is not None else c.get("rope_scaling")
    theta = (params or {}).get("rope_theta", c.get("rope_theta", 10000.0))
    if not scaling:
        return float(theta), None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return float(theta), None
    if kind == "linear":
        return float(theta), LinearScaling(float(scaling["factor"]))
    if kind == "llama3":
        try:
            return float(theta), Llama3Scaling(
                float(scaling["factor"]), float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"]),
                int(scaling["original_max_position_embeddings"]))
        except KeyError as e:
            raise ConfigError(f"{source}: llama3 rope scaling lacks {e.args[0]!r}") from None
    raise ConfigError(f"{source}: unsupported rope scaling type {kind!r} (supported: default, linear, llama3)")


PRESETS = {
    "smollm2-135m": ModelConfig(arch="llama", vocab_size=49152, hidden_size=576, n_layers=30, n_heads=9,
                                n_kv_heads=3, head_dim=64, ffn_size=1536, norm_eps=1e-5, rope_theta=100000.0,
                                max_seq_len=8192, tie_embeddings=True),
    "llama-3-8b": ModelConfig(arch="llama", vocab_size=128256, hidden_size=4096, n_layers=32, n_heads=32,
                              n_kv_heads=8, head_dim=128, ffn_size=14336, norm_eps=1e-5, rope_theta=500000.0,
                              rope_scaling=Llama3Scaling(8.0, 1.0, 4.0, 8192), max_seq_len=8192),
}
