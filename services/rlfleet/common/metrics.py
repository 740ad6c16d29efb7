"""Prometheus metrics: one ``/metrics`` HTTP endpoint per service process."""

from __future__ import annotations

import logging

from prometheus_client import Counter, Histogram, start_http_server

logger = logging.getLogger(__name__)

RPC_LATENCY = Histogram(
    "rlfleet_rpc_server_seconds",
    "Time spent serving one gRPC call.",
    ["service", "method", "code"],
    buckets=(0.001, 0.005, 0.02, 0.1, 0.5, 1, 2, 5, 15, 60, 300),
)
RPC_ERRORS = Counter(
    "rlfleet_rpc_server_errors_total",
    "gRPC calls that ended in an error.",
    ["service", "method", "code"],
)


def start_metrics_server(port: int, *, host: str = "127.0.0.1") -> int:
    """Serves /metrics on ``port`` (0 picks a free one) and returns the bound port."""
    server, _thread = start_http_server(port, addr=host)
    bound = server.server_address[1]
    logger.info("metrics endpoint up", extra={"metrics_port": bound})
    return bound
