"""tpmax: tensor-parallel transformer inference in plain Python (NumPy / CuPy + NCCL).

Layers of the package, bottom to top (dependencies point down):
devices / errors / files -> sharding -> comm (mpi) -> distributed -> layers / quant /
kv_cache -> attention -> config -> weights -> transformer -> executor -> tokenizer / hub ->
loader -> sampling / engine -> api -> serve -> cli.
"""
from .attention import (AttentionConfig, AttentionWeights, MHAMaskVariant, materialize_kv_from_hidden,
                        tensor_parallel_attention_with_rope)
from .comm import Communicator, InProcessCommunicator, NcclCommunicator, communicator, nccl_available
from .config import ConfigError, ModelConfig
from .devices import (Device, as_dtype, asarray, bfloat16, device_of, devices, gpu_count, synchronize,
                      to_numpy, xp_of)
from .errors import ChatTemplateError, LoadError
from .distributed import ShardableCallable, distribute_value, forward_sharded_layers, per_device, take
from .kv_cache import KVCacheFullError, KVCacheParams, PagedKVCache
from .quant import fp8_linear, gptq_linear
from .layers import (DistributedGemmConfig, Llama3Scaling, LinearScaling, RotaryEmbedding, column_parallel_linear,
                     linear, mlp, rms_norm, row_parallel_linear, vocab_parallel_embedding)
from .sharding import LAYER_SHARDING, MODEL_SHARDING, head_shard, split_bounds, split_sizes
from .transformer import (ReturnHiddenStates, ReturnLogits, distributed_logits_postprocess,
                          distributed_transformer, distributed_transformer_block)
from .weights import DictSource, LayerWeights, WeightError, Weights, random_weights, shard_weights
from .executor import Executor, PassOptions, Step
from .loader import Model, load
from .tokenizer import StreamDecoder, Tokenizer
from .hub import ModelFetchError, default_model_path
from .sampling import SamplingParams
from .engine import Completion, Engine, Event, Stats
from .api import generate, logits, perplexity

__version__ = "0.1.0"

__all__ = [
    "AttentionConfig",
    "AttentionWeights",
    "ChatTemplateError",
    "Communicator",
    "Completion",
    "ConfigError",
    "Device",
    "DictSource",
    "DistributedGemmConfig",
    "Engine",
    "Event",
    "Executor",
    "InProcessCommunicator",
    "KVCacheFullError",
    "KVCacheParams",
    "LAYER_SHARDING",
    "LayerWeights",
    "LinearScaling",
    "Llama3Scaling",
    "LoadError",
    "MHAMaskVariant",
    "MODEL_SHARDING",
    "Model",
    "ModelConfig",
    "ModelFetchError",
    "NcclCommunicator",
    "PagedKVCache",
    "PassOptions",
    "ReturnHiddenStates",
    "ReturnLogits",
    "RotaryEmbedding",
    "SamplingParams",
    "ShardableCallable",
    "Stats",
    "Step",
    "StreamDecoder",
    "Tokenizer",
    "WeightError",
    "Weights",
    "as_dtype",
    "asarray",
    "bfloat16",
    "column_parallel_linear",
    "communicator",
    "default_model_path",
    "device_of",
    "devices",
    "distribute_value",
    "distributed_logits_postprocess",
    "distributed_transformer",
    "distributed_transformer_block",
    "forward_sharded_layers",
    "fp8_linear",
    "generate",
    "gpu_count",
    "gptq_linear",
    "head_shard",
    "linear",
    "load",
    "logits",
    "materialize_kv_from_hidden",
    "mlp",
    "nccl_available",
    "per_device",
    "perplexity",
    "random_weights",
    "rms_norm",
    "row_parallel_linear",
    "shard_weights",
    "split_bounds",
    "split_sizes",
    "synchronize",
    "take",
    "tensor_parallel_attention_with_rope",
    "to_numpy",
    "vocab_parallel_embedding",
    "xp_of",
]
