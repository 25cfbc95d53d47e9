"""Fused CUDA kernels for the decode step (`.cu` sources beside this file), their NumPy twins
(`twins`), a decode step built from them (`step.fused_decode_step`), the NVRTC compile check
(`compile`) and the CuPy launchers (`gpu_ops`, imported on demand).

`available` is True when CuPy and a CUDA device are present, so the kernels can run; importing
this package never needs CUDA. The twins run everywhere.
"""
from __future__ import annotations

from ..core.devices import gpu_count
from .step import fused_decode_step, fused_decode_sample

available: bool = gpu_count() > 0

__all__ = ["available", "fused_decode_sample", "fused_decode_step"]
