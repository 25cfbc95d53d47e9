"""The math: one-device layers, quantized weights, the paged KV cache, attention, the model config, weights
as data, and the distributed transformer (MAX's `distributed_transformer`).
"""
