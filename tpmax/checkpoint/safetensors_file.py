"""A safetensors file read through its header and a memory map: every dtype, F8_E4M3 and BF16
included (which NumPy's safetensors binding cannot read); a slice reads only the pages it
touches."""
from __future__ import annotations

import json

import numpy as np

from ..core.errors import LoadError

_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
              "I16": np.int16, "I8": np.int8, "U8": np.uint8, "U16": np.uint16, "U32": np.uint32,
              "U64": np.uint64, "BOOL": np.bool_}


def _st_dtype(name: str):
    import ml_dtypes

    extra = {"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}
    return np.dtype(_ST_DTYPES.get(name) or extra[name])


class SafetensorsFile:
    """A safetensors file read through its header and a memory map (every dtype, incl. F8_E4M3).

    `get_slice(key)` answers like safetensors' own: `get_shape()` and `[slices]` -> NumPy copy.
    """

    def __init__(self, path):
        self.path = str(path)
        try:
            with open(self.path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
            self._mm = np.memmap(self.path, np.uint8, "r")
            self._base = 8 + n
            self._meta = {k: v for k, v in header.items() if k != "__metadata__"}
        except Exception as e:
            raise LoadError(f"{self.path}: not a valid safetensors file ({e})") from None

    def keys(self):
        return list(self._meta)

    def get_slice(self, key: str) -> "_MappedTensor":
        m = self._meta[key]
        try:
            dt = _st_dtype(m["dtype"])
        except KeyError:
            raise LoadError(f"{self.path}: tensor {key} has unsupported dtype {m['dtype']}") from None
        a, b = m["data_offsets"]
        shape = tuple(m["shape"])
        if b - a != dt.itemsize * int(np.prod(shape, dtype=np.int64)) or self._base + b > self._mm.size:
            raise LoadError(f"{self.path}: tensor {key} has a data range that does not fit its shape or the file")
        return _MappedTensor(self._mm[self._base + a: self._base + b].view(dt).reshape(shape))


class _MappedTensor:
    def __init__(self, view: np.ndarray):
        self._view = view

    def get_shape(self):
        return list(self._view.shape)

    def get_dtype(self) -> str:
        return str(self._view.dtype)

    def __getitem__(self, index):
        return np.array(self._view[index])


