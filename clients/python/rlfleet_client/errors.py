"""Errors the SDK raises: one class per meaningful HTTP status."""

from __future__ import annotations


class ApiError(Exception):
    status_code: int = 0

    def __init__(self, status_code: int, message: str):
        super().__init__(f"{status_code}: {message}")
        self.status_code = status_code
        self.message = message


class Unauthorized(ApiError):
    """401: no or unknown API token."""


class Forbidden(ApiError):
    """403: the token may not do this."""


class NotFound(ApiError):
    """404: no such job."""


class Conflict(ApiError):
    """409: the job is not in a state that allows this."""


class ValidationFailed(ApiError):
    """422: the request names a bad field."""


class TooManyRequests(ApiError):
    """429: the server is applying backpressure; retry later."""


_BY_STATUS = {
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    422: ValidationFailed,
    429: TooManyRequests,
}


def error_for(status_code: int, message: str) -> ApiError:
    return _BY_STATUS.get(status_code, ApiError)(status_code, message)
