"""tpmax: tensor-parallel transformer inference in plain Python (NumPy / CuPy + NCCL).

Layers of the package, bottom to top (dependencies point down):
devices -> sharding -> comm -> distributed -> layers / attention / kv_cache -> transformer
-> config / loader -> generate -> cli.
"""
from .comm import Communicator, InProcessCommunicator, NcclCommunicator, communicator, nccl_available
from .devices import (Device, asarray, as_dtype, bfloat16, device_of, devices, gpu_count, synchronize,
                      to_numpy, xp_of)
from .distributed import ShardableCallable, distribute_value, forward_sharded_layers, per_device, take
from .sharding import split_bounds, split_sizes

__version__ = "0.1.0"
