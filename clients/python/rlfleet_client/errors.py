"""Errors the SDK raises: one class per meaningful HTTP status.

Every error carries the server's one-line ``detail`` as ``message``; a 422 also
carries ``errors``, a list of ``{"field": ..., "reason": ...}``.
"""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    status_code: int = 0

    def __init__(self, status_code: int, message: str, errors: list[dict[str, Any]] | None = None):
        super().__init__(f"{status_code}: {message}" if status_code else message)
        self.status_code = status_code
        self.message = message
        self.errors = errors or []


class Unreachable(ApiError):
    """The server could not be reached (connection refused, timed out, dropped)."""


class Unauthorized(ApiError):
    """401: no or unknown API token."""


class Forbidden(ApiError):
    """403: the token may not do this."""


class NotFound(ApiError):
    """404: no such job."""


class Conflict(ApiError):
    """409: the job is not in a state that allows this (or an idempotency key was reused)."""


class PayloadTooLarge(ApiError):
    """413: the request body is larger than the server accepts."""


class ValidationFailed(ApiError):
    """422: the request names a bad field (see ``errors``)."""


class TooManyRequests(ApiError):
    """429: the server is applying backpressure; retry later."""


class ServerError(ApiError):
    """5xx: the server failed; reads are retried before this is raised."""


_BY_STATUS = {
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    422: ValidationFailed,
    429: TooManyRequests,
}


def error_for(
    status_code: int, message: str, errors: list[dict[str, Any]] | None = None
) -> ApiError:
    cls = _BY_STATUS.get(status_code) or (ServerError if status_code >= 500 else ApiError)
    return cls(status_code, message, errors)
