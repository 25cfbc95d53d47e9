"""tpmax: tensor-parallel transformer inference in plain Python (NumPy / CuPy + NCCL).

Layers of the package, bottom to top (dependencies point down):
devices / errors / files -> sharding -> comm (mpi) -> distributed -> layers / quant /
kv_cache -> attention -> config -> weights -> transformer -> executor -> tokenizer / hub ->
loader -> sampling / engine -> api -> serve -> cli.

Importing the package is cheap: each public name is imported from its module on first use
(so `tpmax --version` needs no NumPy).
"""
from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

# module -> the public names it provides (the package's whole API)
_EXPORTS = {
    "attention": ("AttentionConfig AttentionWeights MHAMaskVariant materialize_kv_from_hidden "
                  "tensor_parallel_attention_with_rope"),
    "comm": "Communicator InProcessCommunicator NcclCommunicator communicator nccl_available",
    "config": "ConfigError ModelConfig",
    "devices": "Device as_dtype asarray bfloat16 device_of devices gpu_count synchronize to_numpy xp_of",
    "errors": "ChatTemplateError LoadError",
    "distributed": "ShardableCallable distribute_value forward_sharded_layers per_device take",
    "kv_cache": "KVCacheFullError KVCacheParams PagedKVCache",
    "quant": "fp8_linear gptq_linear",
    "layers": ("DistributedGemmConfig Llama3Scaling LinearScaling RotaryEmbedding column_parallel_linear linear "
               "mlp rms_norm row_parallel_linear vocab_parallel_embedding"),
    "sharding": "LAYER_SHARDING MODEL_SHARDING head_shard split_bounds split_sizes",
    "transformer": ("ReturnHiddenStates ReturnLogits distributed_logits_postprocess distributed_transformer "
                    "distributed_transformer_block"),
    "weights": "DictSource LayerWeights WeightError Weights random_weights shard_weights",
    "executor": "Executor PassOptions Step",
    "loader": "Model load",
    "tokenizer": "StreamDecoder Tokenizer",
    "hub": "ModelFetchError default_model_path",
    "sampling": "SamplingParams",
    "engine": "Completion Engine Event Stats",
    "api": "generate logits perplexity",
}
_HOME = {name: module for module, names in _EXPORTS.items() for name in names.split()}
__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        try:  # a submodule, e.g. `tpmax.quant` after only `import tpmax`
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _Package(types.ModuleType):
    """`tpmax.devices` is a function named like its module: importing the module must not
    rebind the package attribute to it."""

    def __setattr__(self, name: str, value) -> None:
        if not (isinstance(value, types.ModuleType) and name in _HOME):
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
