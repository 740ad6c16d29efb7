"""gRPC server bootstrap shared by every service.

One place sets up: the thread pool, message size limits, the standard health
service, the error interceptor (domain errors -> status codes, no tracebacks to
callers), per-call latency metrics, the /metrics endpoint and graceful shutdown.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass

import grpc
import redis
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from pydantic import ValidationError

from rlfleet.common.config import ServiceConfig
from rlfleet.common.errors import InvalidArgument, RlfleetError
from rlfleet.common.metrics import RPC_ERRORS, RPC_LATENCY, start_metrics_server
from rlfleet.common.security import server_credentials, tls_of

logger = logging.getLogger(__name__)


def describe_validation_error(exc: ValidationError) -> str:
    """A one-line sentence naming each bad field, for INVALID_ARGUMENT / 422."""
    parts = [f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors()]
    return "invalid request: " + "; ".join(parts)


def _status_of(exc: BaseException, method: str) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, RlfleetError):
        return exc.grpc_code, exc.message
    if isinstance(exc, ValidationError):
        return grpc.StatusCode.INVALID_ARGUMENT, describe_validation_error(exc)
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
        # Redis restarting (or still loading its append-only file): a transient outage
        # the caller retries (every call that writes to Redis is idempotent), not a bug.
        logger.warning("Redis unreachable in %s: %s", method, exc)
        return grpc.StatusCode.UNAVAILABLE, f"Redis is unreachable ({exc}); retry the call"
    logger.exception("unhandled error in %s", method)
    return grpc.StatusCode.INTERNAL, f"internal error in {method}; see the service log"


class _Malformed:
    """Stands in for a request whose bytes did not parse (grpc would answer INTERNAL)."""

    def __init__(self, message: str):
        self.message = message


def _tolerant(deserializer):
    """A request deserializer that returns ``_Malformed`` instead of raising, so a
    malformed request becomes INVALID_ARGUMENT rather than grpc's own INTERNAL."""
    if deserializer is None:
        return None

    def load(raw: bytes):
        try:
            return deserializer(raw)
        except Exception as exc:  # noqa: BLE001 - DecodeError and whatever else parsing raises
            return _Malformed(f"the request is not a valid protobuf message ({type(exc).__name__})")

    return load


def _checked(requests: Iterator) -> Iterator:
    """A request stream that raises InvalidArgument at the first malformed message."""
    for request in requests:
        if isinstance(request, _Malformed):
            raise InvalidArgument(request.message)
        yield request


def _aborted(context: grpc.ServicerContext) -> bool:
    code = context.code()
    return code is not None and code != grpc.StatusCode.OK


class ErrorInterceptor(grpc.ServerInterceptor):
    """Maps exceptions to status codes once, for every method, and times each call."""

    def __init__(self, service: str):
        self.service = service

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method.rsplit("/", 1)[-1]
        service = self.service

        def finish(start: float, code: grpc.StatusCode) -> None:
            RPC_LATENCY.labels(service, method, code.name).observe(time.perf_counter() - start)
            if code != grpc.StatusCode.OK:
                RPC_ERRORS.labels(service, method, code.name).inc()

        def unary(behavior):
            def wrapped(request, context):
                start = time.perf_counter()
                try:
                    request = _valid(request)
                    response = behavior(request, context)
                except Exception as exc:  # noqa: BLE001 - mapped, never leaked
                    if _aborted(context):
                        raise  # the servicer called context.abort(): keep its status
                    code, msg = _status_of(exc, method)
                    finish(start, code)
                    context.abort(code, msg)
                finish(start, context.code() or grpc.StatusCode.OK)
                return response

            return wrapped

        def streaming(behavior):
            def wrapped(request, context) -> Iterator:
                start = time.perf_counter()
                try:
                    request = _valid(request)
                    yield from behavior(request, context)
                except Exception as exc:  # noqa: BLE001
                    if _aborted(context):
                        raise
                    code, msg = _status_of(exc, method)
                    finish(start, code)
                    context.abort(code, msg)
                finish(start, grpc.StatusCode.OK)

            return wrapped

        def _valid(request):
            if handler.request_streaming:
                return _checked(request)
            if isinstance(request, _Malformed):
                raise InvalidArgument(request.message)
            return request

        wrap = streaming if handler.response_streaming else unary
        load = _tolerant(handler.request_deserializer)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                wrap(handler.unary_unary), load, handler.response_serializer
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                wrap(handler.unary_stream),
                load,
                handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                wrap(handler.stream_unary),
                load,
                handler.response_serializer,
            )
        return grpc.stream_stream_rpc_method_handler(
            wrap(handler.stream_stream), load, handler.response_serializer
        )


@dataclass
class RunningServer:
    server: grpc.Server
    port: int
    metrics_port: int
    health: health.HealthServicer

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, grace: float = 2.0) -> None:
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()


def message_options(max_message_mb: int) -> list[tuple[str, int]]:
    size = max_message_mb * 1024 * 1024
    return [("grpc.max_send_message_length", size), ("grpc.max_receive_message_length", size)]


def start_server(
    config: ServiceConfig,
    register: Callable[[grpc.Server], None],
    *,
    service_names: list[str],
    max_workers: int = 32,
    metrics: bool = True,
    ready_info: dict | None = None,
) -> RunningServer:
    """Starts a gRPC server with health checking; ``register`` adds the servicers.

    ``ready_info`` adds entries to the ready file (e.g. the scheduler's ``http_port``).
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers),
        interceptors=[ErrorInterceptor(config.service_name)],
        options=message_options(config.max_message_mb),
    )
    register(server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    credentials = server_credentials(tls_of(config))
    address = f"{config.host}:{config.port}"
    if credentials is None:  # the default: plaintext, meant for loopback
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    if port == 0:
        raise RuntimeError(f"could not bind {config.host}:{config.port}")
    server.start()
    for name in ["", *service_names]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    metrics_port = start_metrics_server(config.metrics_port, host=config.host) if metrics else 0
    running = RunningServer(server, port, metrics_port, health_servicer)
    logger.info(
        "serving",
        extra={"port": port, "metrics_port": metrics_port, "tls": credentials is not None},
    )
    if config.ready_file:
        tmp = config.ready_file + ".tmp"
        with open(tmp, "w") as fh:
            info = {"port": port, "metrics_port": metrics_port, "pid": os.getpid()}
            json.dump({**(ready_info or {}), **info}, fh)
        os.replace(tmp, config.ready_file)  # atomic: the launcher never reads half a file
    return running


def serve_forever(running: RunningServer, on_stop: Callable[[], None] | None = None) -> None:
    """Blocks until SIGTERM/SIGINT, then stops gracefully."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    logger.info("shutting down")
    if on_stop:
        on_stop()
    running.stop()
