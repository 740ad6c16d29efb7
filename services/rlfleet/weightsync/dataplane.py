"""Weight-sync's data plane: pushes and pulls over plain TCP (``rlfleet.common.weight_transport``).

A thread per connection, as gRPC's server has per stream. A push is admitted
before its payload is read (``VersionStore.begin_push``): a stale version is
refused, a repeat acknowledged without a byte sent, a version too large for
weight-sync's memory or spool disk refused with a sentence, and room is made for
it (``keep_versions`` counts the one arriving); then the payload is received
straight into where it is kept (a file of the spool, mapped; or, without a
spool, one buffer), verified and stored by the same rules as PushVersion. A pull
sends the held payload with ``sendall`` straight from that mapping or buffer.
Errors answer with the same status names and sentences as the gRPC service.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import threading

from rlfleet.common.errors import InvalidArgument, RlfleetError
from rlfleet.common.weight_transport import recv_header, recv_into_all, send_header
from rlfleet.weightsync.store import VersionInfo, VersionStore

logger = logging.getLogger(__name__)

# A peer that sends nothing for this long is dropped (headers, a push's payload), so a
# stalled or hostile client cannot hold a thread forever.
IDLE_TIMEOUT_S = 60.0
# Sending a pull gets at least this rate's worth of time (``sendall``'s timeout covers
# the whole send), then the puller is dropped and the version may be evicted again.
MIN_PULL_BYTES_PER_S = 50e6


def _info(info: VersionInfo) -> dict:
    return {"ok": True, "job_id": info.job_id, "version": info.version,
            "checksum": info.checksum, "num_bytes": info.num_bytes}  # fmt: skip


def _field(header: dict, name: str, kind: type):
    value = header.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise InvalidArgument(f"header field {name!r} must be a {kind.__name__}, got {value!r}")
    return value


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(self.server.idle_timeout_s)
        try:
            header = recv_header(sock)
            op = header.get("op")
            if op == "push":
                self._push(sock, header)
            elif op == "pull":
                self._pull(sock, header)
            else:
                raise InvalidArgument(f"unknown op {op!r}; expected 'push' or 'pull'")
        except RlfleetError as exc:
            self._answer(sock, {"ok": False, "code": exc.grpc_code.name, "message": exc.message})
        except OSError as exc:  # the peer went away; nothing was stored
            logger.info("a data-plane connection broke off: %s", exc)
        except Exception:  # a bug of ours: say so without a traceback to the peer
            logger.exception("data-plane request failed")
            self._answer(
                sock, {"ok": False, "code": "INTERNAL", "message": "internal error in weight-sync"}
            )

    @staticmethod
    def _answer(sock: socket.socket, header: dict) -> None:
        try:
            send_header(sock, header)
        except OSError:
            pass  # the peer is gone; it will see a broken connection

    def _push(self, sock: socket.socket, header: dict) -> None:
        store = self.server.store
        job_id = _field(header, "job_id", str)
        version = _field(header, "version", int)
        num_bytes = _field(header, "num_bytes", int)
        checksum = _field(header, "checksum", str)
        if not 0 <= num_bytes <= self.server.max_version_bytes:
            raise InvalidArgument(
                f"a version of {num_bytes} bytes is outside 0..{self.server.max_version_bytes} "
                "(weight-sync's max_version_mb)"
            )
        arrival = store.begin_push(job_id, version, checksum, num_bytes)
        if isinstance(arrival, VersionInfo):  # a repeat: nothing to send
            send_header(sock, _info(arrival))
            return
        try:
            send_header(sock, {"ok": True, "send": True})
            for window in arrival.windows():
                recv_into_all(sock, window)
        except BaseException:
            store.abort_push(arrival)
            raise
        send_header(sock, _info(store.finish_push(arrival)))

    def _pull(self, sock: socket.socket, header: dict) -> None:
        job_id = _field(header, "job_id", str)
        version = _field(header, "version", int)
        with self.server.store.reading_views(job_id, version) as (info, views):
            sock.settimeout(max(self.server.idle_timeout_s, info.num_bytes / MIN_PULL_BYTES_PER_S))
            send_header(sock, _info(info))
            for view in views:
                sock.sendall(view)
        logger.debug(
            "served a version",
            extra={
                "job_id": job_id,
                "version": info.version,
                "replica_id": header.get("replica_id"),
            },
        )


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address, store: VersionStore, max_version_bytes: int, idle_timeout_s: float):
        self.store = store
        self.max_version_bytes = max_version_bytes
        self.idle_timeout_s = idle_timeout_s
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, _Handler)


class DataPlane:
    """The listening data plane; ``port`` is where it is bound."""

    def __init__(
        self,
        store: VersionStore,
        *,
        host: str,
        port: int,
        max_version_bytes: int,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
    ):
        self._server = _Server((host, port), store, max_version_bytes, idle_timeout_s)
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="weight-data-plane", daemon=True
        )

    def start(self) -> DataPlane:
        self._thread.start()
        logger.info("weight data plane listening", extra={"port": self.port})
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
