"""A long-lived MPI job that runs one collective per request from pytest.

Usage: mpirun -n N python collectives_worker.py PORT. Rank 0 connects to 127.0.0.1:PORT
and reads requests (`tests/mpi/wire.py` frames: header {op, k, axis, root} plus the
per-device inputs of the whole group, in group order); it sends each one to the other
ranks with `tpmax.parallel.mpi.bcast_json` / `bcast_arrays` (so those are exercised too); every rank
runs the collective on its own `k` devices through `mpi_communicator` (an `MpiCommunicator`),
twice, to check it is deterministic; rank 0 gathers the outputs and replies with them in
group order, or with the error every rank raised. `{"op": "messages"}` runs
`messages_worker.check` on every rank, `{"op": "factory", "devices": SPEC}` reports what
`mpi_communicator` says to a device list, `{"op": "agree", "per_rank": [...]}` what
`mpi_wire.agree` says to each rank's dict; `{"op": "quit"}` ends the job.
"""
import contextlib
import os
import socket
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import fake_gpu  # noqa: E402
import messages_worker  # noqa: E402
import wire  # noqa: E402

import tpmax  # noqa: E402
from tpmax.parallel import mpi  # noqa: E402
from tpmax.parallel import mpi_comm  # noqa: E402
from tpmax.parallel import mpi_wire  # noqa: E402
from tpmax.core.devices import device_context_factory  # noqa: E402


def run(comm, op, arrays, header):
    xs = [arrays[f"x{g}"] for g in comm.ranks]
    if op == "allreduce_sum":
        return comm.allreduce_sum(xs)
    if op == "allgather":
        return comm.allgather(xs, axis=header["axis"])
    if op == "reduce_scatter":
        return comm.reduce_scatter(xs, axis=header["axis"])
    if op == "mlp":  # a real layer on the communicator: inputs are [x]*tp + w13s + w2s
        w13s = [arrays[f"x{comm.tp + g}"] for g in comm.ranks]
        w2s = [arrays[f"x{2 * comm.tp + g}"] for g in comm.ranks]
        return tpmax.mlp(xs, w13s, w2s, comm)
    if op == "broadcast":
        root = header["root"]
        return comm.broadcast(arrays[f"x{root}"] if root in comm.ranks else None, root=root)
    raise ValueError(f"unknown op {op!r}")


def factory(w, header):
    """What `mpi_communicator` says to `header["devices"]`; with `header["gpus"]`
    ({"visible": V, "isolated": bool, "bind": "id"|"local"}) through fake GPUs: isolated,
    each rank sees one GPU of its own (per-rank CUDA_VISIBLE_DEVICES); else every rank
    sees the same V GPUs. `header["per_rank_devices"]` gives each rank its own list."""
    kind, ids = header.get("per_rank_devices", [header["devices"]] * w.size)[w.rank].split(":")
    devs = [tpmax.Device(kind, int(i)) for i in ids.split(",")]
    gpus = header.get("gpus")
    if gpus is None:
        return f"no error: {mpi.mpi_communicator(devs)!r}"
    cuda = fake_gpu.FakeCuda(gpus["visible"], (lambda i: f"0000:{w.rank + 1:02x}:00.0") if gpus["isolated"]
                             else (lambda i: f"0000:{i + 1:02x}:00.0"))
    nccl = fake_gpu.FakeNccl()
    os.environ[mpi.GPU_BIND_ENV] = gpus.get("bind", "id")
    try:
        with device_context_factory("gpu", lambda d: contextlib.nullcontext()):
            comm = mpi.mpi_communicator(devs, cuda=cuda, nccl=nccl)
    finally:
        del os.environ[mpi.GPU_BIND_ENV]
    return f"no error: {comm!r} bound {cuda.used} joined {nccl.joined}"


def one_request(w, header, arrays):
    if header["op"] == "factory":  # which communicator (or error) a device list gets here
        try:
            return ("error", factory(w, header))
        except Exception as e:
            return ("error", f"{type(e).__name__}: {e}")
    if header["op"] == "agree":  # each rank holds its own entry of header["per_rank"]
        try:
            mpi_wire.agree(w.comm, header["per_rank"][w.rank])
            return ("error", "no error")
        except Exception as e:
            return ("error", f"{type(e).__name__}: {e}")
    if header["op"] == "messages":
        try:
            messages_worker.check(w)
            return ("ok", [])
        except Exception as e:
            return ("error", f"{type(e).__name__}: {e}")
    devs = [tpmax.Device("cpu", i) for i in range(header["k"] * w.size)]
    try:
        comm = mpi.mpi_communicator(devs)
        assert isinstance(comm, mpi_comm.MpiCommunicator), comm
        out = run(comm, header["op"], arrays, header)
        again = run(comm, header["op"], arrays, header)
        if any(a.tobytes() != b.tobytes() for a, b in zip(out, again)):
            raise AssertionError("two calls gave different bytes")
        if any(np.shares_memory(a, b) for i, a in enumerate(out) for b in out[i + 1:]):
            raise AssertionError("two local devices share a result buffer")
        return ("ok", [(g, o) for g, o in zip(comm.ranks, out)])
    except Exception as e:  # reported to pytest, which checks every rank raised the same
        return ("error", f"{type(e).__name__}: {e}")


def main(port: int) -> None:
    mpi.install_abort_handler()
    w = mpi.world()
    sock = wire.no_delay(socket.create_connection(("127.0.0.1", port))) if w.rank == 0 else None
    while True:
        if w.rank == 0:
            header, xs = wire.recv(sock, tpmax.as_dtype)
            header.pop("arrays")
        header = mpi.bcast_json(header if w.rank == 0 else None, idle=True)  # idle ranks sleep meanwhile
        if header["op"] == "quit":
            break
        arrays = mpi.bcast_arrays({f"x{g}": x for g, x in enumerate(xs)} if w.rank == 0 else None)
        results = w.comm.gather(one_request(w, header, arrays), root=0)  # test harness: pickle is fine
        if w.rank == 0:
            errors = sorted({r[1] for r in results if r[0] == "error"})
            if errors:
                wire.send(sock, {"error": errors, "all_ranks": all(r[0] == "error" for r in results)})
            else:
                outs = [o for _, per_rank in results for _, o in sorted(per_rank, key=lambda t: t[0])]
                wire.send(sock, {"error": None}, outs)
    if sock is not None:
        sock.close()


if __name__ == "__main__":
    main(int(sys.argv[1]))
