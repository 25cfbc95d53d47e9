"""Tokenizers (Hugging Face and GGUF) and chat templates rendered in a resource-limited sandbox.
"""
