"""Stand-ins for `cupy.cuda` and `cupy.cuda.nccl` in the GPU setup across MPI ranks
(`tpmax.parallel.mpi.bind_gpu`, `tpmax.parallel.mpi_comm.NcclRankCommunicator`), so the checks, the binding
and the NCCL id broadcast run on a machine without GPUs."""
import hashlib
import os


class FakeCuda:
    """`visible` GPUs; GPU i's PCI bus id is `bus(i)`; `used` records `Device(i).use()`."""

    def __init__(self, visible, bus):
        self.used = None
        fake = self

        class Runtime:
            @staticmethod
            def getDeviceCount():  # noqa: N802 - CuPy's name
                return visible

        class Device:
            def __init__(self, i):
                if not 0 <= i < visible:
                    raise RuntimeError(f"cudaErrorInvalidDevice: {i}")
                self.id, self.pci_bus_id = i, bus(i)

            def use(self):
                fake.used = self.id

        self.runtime, self.Device = Runtime, Device


class FakeNccl:
    """CuPy 14's NCCL surface: `get_unique_id()` returns 128 bytes, `NcclCommunicator`
    takes them; `joined` records what each communicator was given."""

    NCCL_SUM, NCCL_UINT8, NCCL_FLOAT32 = 0, 1, 7

    def __init__(self):
        self.joined = []
        fake = self

        class NcclCommunicator:
            def __init__(self, n, uid, rank):
                if not isinstance(uid, bytes) or len(uid) != 128:
                    raise TypeError(f"NcclCommunicator: uid must be 128 bytes, got {type(uid).__name__}")
                fake.joined.append((n, hashlib.sha256(uid).hexdigest()[:12], rank))

        self.NcclCommunicator = NcclCommunicator

    @staticmethod
    def get_unique_id():
        return os.urandom(128)
