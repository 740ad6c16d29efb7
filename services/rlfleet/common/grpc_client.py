"""gRPC client side: channels, deadlines, and retries on retryable codes only.

Each attempt has its own timeout; the whole call has an overall deadline.
Only UNAVAILABLE, DEADLINE_EXCEEDED and RESOURCE_EXHAUSTED (backpressure) are
retried; anything else is raised at once as the matching domain error.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tenacity import (
    Retrying,
    retry_if_exception,
    stop_after_delay,
    wait_exponential_jitter,
)

from rlfleet.common.errors import Unavailable, from_rpc_error
from rlfleet.common.grpc_server import message_options
from rlfleet.common.security import TlsFiles, channel_credentials, channel_options, client_tls

logger = logging.getLogger(__name__)

RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
R = TypeVar("R")


def make_channel(
    address: str, *, max_message_mb: int = 256, tls: TlsFiles | None = None
) -> grpc.Channel:
    """A channel to ``address``: TLS when ``tls`` (default: this process's client TLS,
    see ``security.set_client_tls``) names a CA, else plaintext."""
    tls = client_tls() if tls is None else tls
    options = message_options(max_message_mb) + channel_options(tls)
    credentials = channel_credentials(tls)
    if credentials is None:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, credentials, options=options)


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, grpc.RpcError) and exc.code() in RETRYABLE


def call(
    method: Callable[..., R],
    request,
    *,
    timeout: float = 30.0,
    deadline: float = 120.0,
    retry: bool = True,
) -> R:
    """Calls a unary stub method with a per-attempt ``timeout`` and an overall ``deadline``.

    Raises the domain error that matches the final status.
    """
    if not retry:
        try:
            return method(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
    retrying = Retrying(
        retry=retry_if_exception(_retryable),
        stop=stop_after_delay(deadline),
        wait=wait_exponential_jitter(multiplier=0.1, max=2.0),
        reraise=True,
    )
    try:
        for attempt in retrying:
            with attempt:
                return method(request, timeout=timeout)
    except grpc.RpcError as exc:
        raise from_rpc_error(exc) from None
    raise AssertionError("unreachable")


def wait_healthy(
    address: str, *, timeout: float = 60.0, service: str = "", tls: TlsFiles | None = None
) -> None:
    """Polls the standard health service until it reports SERVING."""
    end = time.monotonic() + timeout
    with make_channel(address, tls=tls) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > end:
                raise Unavailable(f"{address} did not become healthy within {timeout:.0f}s")
            time.sleep(0.1)
