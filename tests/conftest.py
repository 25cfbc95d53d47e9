"""Shared test helpers: device groups, hypothesis profile."""

import pytest
from hypothesis import settings

import tpmax

settings.register_profile("ci", deadline=None, print_blob=True)
settings.load_profile("ci")

requires_gpu = pytest.mark.skipif(tpmax.gpu_count() == 0, reason="no CUDA GPU (CuPy missing or no device)")


def cpu_group(n):
    return tpmax.devices("cpu:" + ",".join(map(str, range(n))))
