"""Length-prefixed frames between pytest and rank 0 of a long-lived MPI job: a JSON header
frame, then one frame with the arrays' raw bytes laid back to back (dtype and shape in the
header, so bfloat16 travels exactly)."""
import json
import socket
import struct

import numpy as np


def send(sock, header: dict, arrays=()) -> None:
    header = dict(header, arrays=[[a.dtype.name, list(a.shape)] for a in arrays])
    frames = [json.dumps(header).encode(), b"".join(np.ascontiguousarray(a).tobytes() for a in arrays)]
    sock.sendall(b"".join(struct.pack("!Q", len(f)) + f for f in frames))  # one write: no Nagle stall


def no_delay(sock):
    """Small request/reply frames: turn Nagle's algorithm off (else ~40 ms per reply)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _recv_exact(sock, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ConnectionError("the other side closed the connection")
        buf += chunk
    return bytes(buf)


def _frame(sock) -> bytes:
    (n,) = struct.unpack("!Q", _recv_exact(sock, 8))
    return _recv_exact(sock, n)


def recv(sock, as_dtype):
    """`(header, arrays)`; `as_dtype` maps a dtype name to a dtype (tpmax.as_dtype-like)."""
    header = json.loads(_frame(sock))
    data, offset, arrays = _frame(sock), 0, []
    for name, shape in header["arrays"]:
        dtype = as_dtype(name)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        arrays.append(np.frombuffer(data[offset:offset + nbytes], dtype).reshape(shape).copy())
        offset += nbytes
    return header, arrays
