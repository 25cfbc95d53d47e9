import numpy as np
import pytest

import tpmax
from tpmax import Device
from conftest import requires_gpu


@pytest.mark.parametrize("spec, expected", [
    ("cpu", [Device("cpu", 0)]),
    ("cpu:0,1,2,3", [Device("cpu", i) for i in range(4)]),
    (" cpu:3 ", [Device("cpu", 3)]),
])
def test_parse_cpu_specs(spec, expected):
    assert tpmax.devices(spec) == expected


@pytest.mark.parametrize("spec, match", [
    ("", "empty"), ("   ", "empty"), ("tpu:0", "kind"), ("gpu:x", "not a non-negative integer"),
    ("cpu:-1", "not a non-negative integer"), ("cpu:0,,1", "not a non-negative integer"),
    ("cpu:0,0", "distinct"),
])
def test_bad_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        tpmax.devices(spec)


@pytest.mark.skipif(tpmax.gpu_count() > 0, reason="GPU present")
def test_gpu_without_gpu_says_what_is_available():
    with pytest.raises(RuntimeError, match="CuPy|GPU"):
        tpmax.devices("gpu:0")


def test_device_validation():
    with pytest.raises(ValueError):
        Device("tpu", 0)
    with pytest.raises(ValueError):
        Device("cpu", -2)
    assert str(Device("gpu", 3)) == "gpu:3"


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int32", "int64"])
def test_asarray_roundtrip_cpu(dtype):
    d = Device("cpu", 1)
    a = np.arange(12).reshape(3, 4)
    x = tpmax.asarray(a, d, dtype=dtype)
    assert x.dtype == tpmax.as_dtype(dtype) and tpmax.device_of(x).kind == "cpu"
    np.testing.assert_array_equal(tpmax.to_numpy(x).astype(np.float64), a)
    assert tpmax.asarray(x, d, copy=True) is not x


def test_asarray_copy_never_shares_memory():
    class Sub(np.ndarray):
        pass
    for a in (np.arange(6.0), np.arange(6.0).view(Sub), np.arange(12.0)[::2]):
        x = tpmax.asarray(a, Device("cpu", 0), copy=True)
        assert not np.shares_memory(x, a)
        np.testing.assert_array_equal(x, a)


def test_bad_dtype_name():
    with pytest.raises(ValueError, match="unsupported dtype"):
        tpmax.as_dtype("float7")


def test_import_without_cupy_in_subprocess():
    import subprocess, sys
    code = "import sys; sys.modules['cupy'] = None; import tpmax; print(tpmax.gpu_count())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0"


@requires_gpu
def test_gpu_placement_and_moves():
    import cupy as cp
    g = tpmax.devices("gpu:0")[0]
    x = tpmax.asarray(np.ones((2, 3), np.float32), g, dtype="bfloat16")
    assert isinstance(x, cp.ndarray) and tpmax.device_of(x) == g
    back = tpmax.asarray(x, Device("cpu", 0))
    assert isinstance(back, np.ndarray) and back.dtype == tpmax.bfloat16
    np.testing.assert_array_equal(back.astype(np.float32), 1)
