"""A client of weight-sync that moves versions the fastest way the service offers.

The trainer pushes and the rollout replicas pull through this one class. It
asks weight-sync where its data plane listens (``GetDataPlane``) and moves
payloads over it (``rlfleet.common.weight_transport``); where there is none
(turned off, TLS on, an older weight-sync) or it cannot be reached, it uses
PushVersion / PullVersion with serialised frames instead. Either way the
payload is verified against its checksum before it is returned.

Transient failures (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, a
broken connection) are retried until ``deadline_s``: a push of the same
version and payload is idempotent, and a pull has no side effect.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import grpc
from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_exponential_jitter

from rlfleet.common import weight_transport
from rlfleet.common.errors import Unavailable, from_rpc_error
from rlfleet.common.grpc_client import RETRYABLE, make_channel
from rlfleet.common.security import client_tls
from rlfleet.common.weight_transport import BufferPool, Pulled
from rlfleet.common.weights import (
    Buffer,
    assemble_frames,
    encode_frames,
    pull_frames,
    push_frames,
)
from rlfleet.v1 import weightsync_pb2, weightsync_pb2_grpc

logger = logging.getLogger(__name__)
R = TypeVar("R")
# After the data plane could not be reached, use gRPC this long before trying it again.
DATA_PLANE_BACKOFF_S = 60.0


def _host(address: str) -> str:
    host = address.rpartition(":")[0] or address
    return host.strip("[]")


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, grpc.RpcError):
        return exc.code() in RETRYABLE
    return isinstance(exc, Unavailable)


class WeightSyncClient:
    def __init__(
        self,
        address: str,
        *,
        timeout_s: float = 300.0,
        deadline_s: float | None = None,
        max_message_mb: int = 256,
        use_data_plane: bool = True,
    ):
        self.address = address
        self.timeout_s = timeout_s
        self.deadline_s = deadline_s if deadline_s is not None else timeout_s
        self.channel = make_channel(address, max_message_mb=max_message_mb)
        self.stub = weightsync_pb2_grpc.WeightSyncServiceStub(self.channel)
        # The data plane is plaintext: a client that dials TLS never uses it.
        self.use_data_plane = use_data_plane and not client_tls().dials_tls
        self._data_port: int | None = None  # None: not asked yet
        # The buffer of a version the caller has released receives the next pull.
        self.buffers = BufferPool(keep=1)
        self._avoid_data_plane_until = 0.0

    # -- transport choice -----------------------------------------------------------

    def data_plane(self) -> tuple[str, int] | None:
        """(host, port) of weight-sync's data plane, or None to use gRPC streams."""
        if not self.use_data_plane or time.monotonic() < self._avoid_data_plane_until:
            return None
        if self._data_port is None:
            try:
                reply = self.stub.GetDataPlane(
                    weightsync_pb2.GetDataPlaneRequest(), timeout=min(self.timeout_s, 10.0)
                )
                self._data_port = reply.port
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                    raise
                self._data_port = 0  # a weight-sync from before the data plane
        return (_host(self.address), self._data_port) if self._data_port else None

    def _over_data_plane(self, fn: Callable[[tuple[str, int]], R]) -> R:
        address = self.data_plane()
        assert address is not None
        try:
            return fn(address)
        except Unavailable as exc:
            # Ask again next time (a restarted weight-sync may listen elsewhere); meanwhile
            # gRPC, in case only the data plane is unreachable (a network policy, say).
            self._data_port = None
            self._avoid_data_plane_until = time.monotonic() + DATA_PLANE_BACKOFF_S
            logger.warning("weight data plane failed (%s); using gRPC streams for a while", exc)
            raise

    def _retrying(self, fn: Callable[[], R]) -> R:
        retrying = Retrying(
            retry=retry_if_exception(_retryable),
            stop=stop_after_delay(self.deadline_s),
            wait=wait_exponential_jitter(multiplier=0.1, max=2.0),
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    return fn()
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        raise AssertionError("unreachable")

    # -- operations -----------------------------------------------------------------

    def push(self, *, job_id: str, version: int, payload: Buffer, checksum: str) -> str:
        """Publishes ``payload`` as ``version`` of ``job_id``; returns the checksum weight-sync holds."""

        def attempt() -> str:
            if self.data_plane() is not None:
                reply = self._over_data_plane(
                    lambda address: weight_transport.push(
                        address,
                        job_id=job_id,
                        version=version,
                        parts=[payload],
                        checksum=checksum,
                        timeout=self.timeout_s,
                    )
                )
                return str(reply["checksum"])
            frames = encode_frames(payload, job_id=job_id, version=version, checksum=checksum)
            return push_frames(self.channel, frames, timeout=self.timeout_s).checksum

        return self._retrying(attempt)

    def pull(self, *, job_id: str, version: int, replica_id: str = "") -> Pulled:
        """Version ``version`` of ``job_id`` (0 = the current one), verified."""

        def attempt() -> Pulled:
            if self.data_plane() is not None:
                return self._over_data_plane(
                    lambda address: weight_transport.pull(
                        address,
                        job_id=job_id,
                        version=version,
                        replica_id=replica_id,
                        timeout=self.timeout_s,
                        buffers=self.buffers,
                    )
                )
            request = weightsync_pb2.PullVersionRequest(
                job_id=job_id, version=version, replica_id=replica_id
            )
            frames = pull_frames(self.channel, request, timeout=self.timeout_s)
            return Pulled(*assemble_frames(frames))

        return self._retrying(attempt)

    def release(self, got: Pulled) -> None:
        """Promises that nothing reads ``got.payload`` any more (tensors decoded from it
        in place included): the next pull may receive into it."""
        if not isinstance(got.payload, bytes):
            self.buffers.give(got.payload)

    def report_held(self, *, replica_id: str, job_id: str, version: int, address: str) -> None:
        request = weightsync_pb2.ReportHeldRequest(
            replica_id=replica_id, job_id=job_id, version=version, address=address
        )
        self._retrying(lambda: self.stub.ReportHeld(request, timeout=min(self.timeout_s, 10.0)))

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> WeightSyncClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
