"""Reading checkpoints sharded (safetensors directories, GGUF files, quantized formats), the default
model's fetch and the model cache.
"""
