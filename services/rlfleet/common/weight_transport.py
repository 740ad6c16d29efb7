"""The weight data plane: policy versions over a plain TCP connection.

gRPC carries a version as a stream of protobuf messages; every byte then passes
through HTTP/2 framing and several user-space copies, and on a CPU-bound host
that, not the socket, sets the rate (bench/weightsync.py: well under a fifth of
raw loopback TCP). Here a version crosses as one header and the raw payload,
written with ``sendall`` from where it lies and read with ``recv_into`` into a
buffer allocated once: the kernel's copies and one checksum pass are all the
work there is. gRPC stays the control plane (``GetDataPlane`` says where this
listens); PushVersion / PullVersion remain for clients that cannot reach it.

One request per connection::

    request  = MAGIC, header            then, for a push, num_bytes of payload
    response = MAGIC, header            then, for a pull that succeeds, num_bytes of payload
    header   = u32 big-endian length, JSON object

Request headers: ``{"op": "push", "job_id", "version", "num_bytes", "checksum"}``
or ``{"op": "pull", "job_id", "version", "replica_id"}``. Response headers:
``{"ok": true, "job_id", "version", "checksum", "num_bytes"}`` or
``{"ok": false, "code": "<gRPC status name>", "message": "..."}``, so errors are
the same domain errors (``rlfleet.common.errors``) as over gRPC. A push is
answered twice: first ``{"ok": true, "send": true}`` (or an error, or the held
version's header when it is a repeat), and only then is the payload sent, so
a refused push costs one round trip instead of gigabytes.
"""

from __future__ import annotations

import json
import mmap
import socket
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from rlfleet.common.errors import DataLoss, InvalidArgument, Unavailable, from_code_name
from rlfleet.common.weights import checksum_algorithm, verify_checksum

MAGIC = b"RLFW\x01"
MAX_HEADER_BYTES = 64 * 1024
# recv_into slices: large enough that Python overhead vanishes, small enough to
# keep each syscall's buffer in the cache hierarchy's reach.
RECV_SLICE = 4 * 1024 * 1024
_LEN = struct.Struct(">I")


# ----------------------------------------------------------------------------- buffers
def alloc_buffer(num_bytes: int) -> mmap.mmap | bytearray:
    """Writable memory for ``num_bytes``, its pages mapped up front (MAP_POPULATE).

    ``bytearray(n)`` zero-fills page by page, and on a virtual machine each first
    touch of a page is a costly fault: measured here, allocating 1 GB that way
    takes longer than sending it over loopback. One populating mmap is ~2.5x cheaper;
    reusing memory (``BufferPool``) costs nothing.
    """
    if num_bytes == 0:
        return bytearray()
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
    return mmap.mmap(-1, num_bytes, flags=flags)


class BufferPool:
    """Receive buffers kept for the next transfer of the same size.

    A policy's versions all have the same size, so the buffer of the version a
    receiver is done with is exactly what the next one needs. Whoever gives a
    buffer back promises that nothing reads it any more.
    """

    def __init__(self, keep: int = 2):
        self.keep = keep
        self._free: list[mmap.mmap | bytearray] = []
        self._lock = threading.Lock()

    def take(self, num_bytes: int) -> mmap.mmap | bytearray:
        with self._lock:
            for i, buf in enumerate(self._free):
                if len(buf) == num_bytes:
                    return self._free.pop(i)
        return alloc_buffer(num_bytes)

    def give(self, buf: mmap.mmap | bytearray) -> None:
        with self._lock:
            self._free.append(buf)
            del self._free[: -self.keep]  # the oldest go first


# ----------------------------------------------------------------------------- framing
def send_header(sock: socket.socket, header: dict) -> None:
    body = json.dumps(header, separators=(",", ":")).encode()
    sock.sendall(MAGIC + _LEN.pack(len(body)) + body)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    recv_into_all(sock, memoryview(buf))
    return bytes(buf)


def recv_into_all(sock: socket.socket, view: memoryview) -> None:
    """Fills ``view`` from the socket.

    A connection that ends early raises ConnectionResetError: the peer went away (a
    restart, a kill), which clients retry as UNAVAILABLE; nothing half-received is used.
    """
    got, total = 0, len(view)
    while got < total:
        n = sock.recv_into(view[got:], min(total - got, RECV_SLICE))
        if n == 0:
            raise ConnectionResetError(f"the connection closed after {got} of {total} bytes")
        got += n


def recv_header(sock: socket.socket) -> dict:
    """Reads one header; InvalidArgument if the peer does not speak this protocol."""
    head = _recv_exact(sock, len(MAGIC) + _LEN.size)
    if head[: len(MAGIC)] != MAGIC:
        raise InvalidArgument("not an rlfleet weight data-plane message (bad magic)")
    (length,) = _LEN.unpack(head[len(MAGIC) :])
    if length > MAX_HEADER_BYTES:
        raise InvalidArgument(f"header of {length} bytes is over the limit of {MAX_HEADER_BYTES}")
    try:
        header = json.loads(_recv_exact(sock, length))
    except ValueError as exc:
        raise InvalidArgument(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise InvalidArgument("header is not a JSON object")
    return header


def _raise_if_error(header: dict) -> None:
    if not header.get("ok"):
        raise from_code_name(str(header.get("code", "UNKNOWN")), str(header.get("message", "")))


# ----------------------------------------------------------------------------- client
@dataclass(frozen=True)
class Pulled:
    """A verified version: a pool buffer from the data plane, bytes from gRPC streams."""

    job_id: str
    version: int
    payload: mmap.mmap | bytearray | bytes
    checksum: str


def _connect(address: tuple[str, int], timeout: float) -> socket.socket:
    try:
        sock = socket.create_connection(address, timeout=timeout)
    except OSError as exc:
        raise Unavailable(f"weight data plane at {address[0]}:{address[1]}: {exc}") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def push(
    address: tuple[str, int],
    *,
    job_id: str,
    version: int,
    parts: Sequence[bytes | memoryview],
    checksum: str,
    timeout: float,
) -> dict:
    """Sends a version (its payload as ``parts``, in order); returns the accepting header.

    Raises Unavailable when the connection fails (the caller may retry: a push
    of the same payload is idempotent), else the error weight-sync answered.
    """
    checksum_algorithm(checksum)  # refuse a malformed checksum before sending gigabytes
    num_bytes = sum(len(p) for p in parts)
    sock = _connect(address, timeout)
    try:
        send_header(
            sock,
            {"op": "push", "job_id": job_id, "version": version, "num_bytes": num_bytes,
             "checksum": checksum},
        )  # fmt: skip
        reply = recv_header(sock)
        if reply.get("ok") and reply.get("send"):
            for part in parts:
                sock.sendall(part)
            reply = recv_header(sock)
    except (ConnectionError, TimeoutError) as exc:
        raise Unavailable(f"weight data plane push of version {version} broke off: {exc}") from None
    finally:
        sock.close()
    _raise_if_error(reply)
    return reply


def pull(
    address: tuple[str, int],
    *,
    job_id: str,
    version: int,
    replica_id: str,
    timeout: float,
    buffers: BufferPool | None = None,
) -> Pulled:
    """Receives a version (0 = the current one) and verifies its checksum.

    The payload lands in a buffer taken from ``buffers`` (when given), which the
    caller gives back once it is done with the version."""
    sock = _connect(address, timeout)
    try:
        send_header(
            sock, {"op": "pull", "job_id": job_id, "version": version, "replica_id": replica_id}
        )
        reply = recv_header(sock)
        _raise_if_error(reply)
        try:
            num_bytes, got_job = int(reply["num_bytes"]), str(reply["job_id"])
            got_version, checksum = int(reply["version"]), str(reply["checksum"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DataLoss(f"weight-sync answered a malformed pull header: {exc!r}") from None
        payload = buffers.take(num_bytes) if buffers else alloc_buffer(num_bytes)
        try:
            recv_into_all(sock, memoryview(payload))
            verify_checksum(payload, checksum, what=f"version {got_version} of job {got_job!r}")
        except BaseException:
            if buffers:
                buffers.give(payload)
            raise
    except (ConnectionError, TimeoutError) as exc:
        raise Unavailable(f"weight data plane pull of version {version} broke off: {exc}") from None
    finally:
        sock.close()
    return Pulled(got_job, got_version, payload, checksum)
