"""tpmax: tensor-parallel transformer inference in plain Python (NumPy / CuPy + NCCL).

Subpackages, bottom to top (dependencies point down; docs/architecture.md):
core (devices, communicators, sharding) -> nn (layers, attention, the transformer) ->
kernels (the fused GPU decode step) -> parallel (steps and their executors, MPI) ->
text (tokenizers) -> checkpoint (loading) -> generation (sampling, the engine, the API) ->
serving (tpmax serve) -> cli.

Importing the package is cheap: each public name is imported from its module on first use
(so `tpmax --version` needs no NumPy).
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# module -> the public names it provides (the package's whole API)
_EXPORTS = {
    "core.devices": "Device as_dtype asarray bfloat16 device_of devices gpu_count synchronize to_numpy xp_of",
    "core.errors": "ChatTemplateError LoadError",
    "core.sharding": "LAYER_SHARDING MODEL_SHARDING head_shard split_bounds split_sizes",
    "core.comm": "Communicator InProcessCommunicator NcclCommunicator communicator nccl_available",
    "core.distributed": "ShardableCallable distribute_value forward_sharded_layers per_device take",
    "nn.layers": "DistributedGemmConfig Llama3Scaling LinearScaling RotaryEmbedding column_parallel_linear linear "
                 "mlp rms_norm row_parallel_linear vocab_parallel_embedding",
    "nn.quant": "fp8_linear gptq_linear",
    "nn.kv_cache": "KVCacheFullError KVCacheParams PagedKVCache",
    "nn.attention": "AttentionConfig AttentionWeights MHAMaskVariant materialize_kv_from_hidden "
                    "tensor_parallel_attention_with_rope",
    "nn.config": "ConfigError ModelConfig",
    "nn.weights": "DictSource LayerWeights WeightError Weights random_weights shard_weights",
    "nn.transformer": "ReturnHiddenStates ReturnLogits distributed_logits_postprocess distributed_transformer "
                      "distributed_transformer_block",
    "parallel.executor": "Executor PassOptions Step",
    "text.tokenizer": "StreamDecoder Tokenizer",
    "checkpoint.hub": "ModelFetchError default_model_path",
    "checkpoint.loader": "Model load",
    "generation.sampling": "SamplingParams",
    "generation.engine": "Completion Engine Event Stats",
    "generation.api": "generate logits perplexity",
}
_HOME = {name: module for module, names in _EXPORTS.items() for name in names.split()}
__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
