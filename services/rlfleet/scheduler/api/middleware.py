"""ASGI middleware of the REST API: request metrics, the body-size limit and the
last-resort error guard.

Pure ASGI (not BaseHTTPMiddleware) so the event streams pass through unbuffered.
"""

from __future__ import annotations

import logging
import time

from fastapi.responses import JSONResponse
from prometheus_client import Counter, Histogram
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rlfleet.scheduler.api.models import ErrorBody

logger = logging.getLogger(__name__)

HTTP_REQUESTS = Counter(
    "rlfleet_scheduler_http_requests_total",
    "REST API requests by route template and status code.",
    ["method", "route", "status"],
)
HTTP_SECONDS = Histogram(
    "rlfleet_scheduler_http_request_seconds",
    "Time to serve a REST API request (an event stream counts until it closes).",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60, 600),
)


class _TooLarge(HTTPException):  # noqa: N818
    """An HTTPException so that FastAPI's body parsing re-raises it as is (413)."""

    def __init__(self) -> None:
        super().__init__(status_code=413)


def _error(status: int, detail: str) -> JSONResponse:
    return JSONResponse(status_code=status, content=ErrorBody(detail=detail).model_dump())


class ApiMiddleware:
    """Counts and times each request, answers 413 past ``max_body_bytes`` and turns an
    exception that escaped every handler into a generic 500 (never a traceback)."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int):
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        started = False
        seen = 0
        limit = self.max_body_bytes

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _TooLarge
            return message

        async def observed_send(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
            await send(message)

        too_large = f"request body is larger than the {limit} bytes this server accepts"
        try:
            if _content_length(scope) > limit:
                await _error(413, too_large)(scope, receive, observed_send)
            else:
                await self.app(scope, limited_receive, observed_send)
        except _TooLarge:
            if started:
                raise
            await _error(413, too_large)(scope, receive, observed_send)
        except Exception:
            logger.exception("unhandled error serving %s %s", scope["method"], scope["path"])
            if started:
                raise  # too late for a status: the server drops the connection
            await _error(500, "internal error in the scheduler; see its log")(
                scope, receive, observed_send
            )
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            HTTP_REQUESTS.labels(scope["method"], route, str(status)).inc()
            HTTP_SECONDS.labels(scope["method"], route).observe(time.perf_counter() - start)


def _content_length(scope: Scope) -> int:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0
    return 0
