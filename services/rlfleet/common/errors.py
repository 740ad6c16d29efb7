"""Domain errors, defined once and mapped once per transport.

Services raise these; the gRPC interceptor (``grpc_server``) and the FastAPI
handlers turn them into status codes. Anything else becomes a generic INTERNAL /
500 with no traceback sent to the caller.
"""

from __future__ import annotations

import grpc


class RlfleetError(Exception):
    """Base of every error that is safe to show to a caller."""

    grpc_code = grpc.StatusCode.INTERNAL
    http_status = 500

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidArgument(RlfleetError):
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    http_status = 422


class NotFound(RlfleetError):
    grpc_code = grpc.StatusCode.NOT_FOUND
    http_status = 404


class AlreadyExists(RlfleetError):
    grpc_code = grpc.StatusCode.ALREADY_EXISTS
    http_status = 409


class Unauthenticated(RlfleetError):
    """No or an unknown credential (REST: 401 with WWW-Authenticate)."""

    grpc_code = grpc.StatusCode.UNAUTHENTICATED
    http_status = 401


class PermissionDenied(RlfleetError):
    """A known credential whose role may not do this."""

    grpc_code = grpc.StatusCode.PERMISSION_DENIED
    http_status = 403


class FailedPrecondition(RlfleetError):
    grpc_code = grpc.StatusCode.FAILED_PRECONDITION
    http_status = 409


class ResourceExhausted(RlfleetError):
    """Backpressure: the buffer or a queue is full; the caller should retry later."""

    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 429


class Unavailable(RlfleetError):
    grpc_code = grpc.StatusCode.UNAVAILABLE
    http_status = 503


class Aborted(RlfleetError):
    grpc_code = grpc.StatusCode.ABORTED
    http_status = 409


class DataLoss(RlfleetError):
    """A payload failed its checksum (torn or corrupted weights)."""

    grpc_code = grpc.StatusCode.DATA_LOSS
    http_status = 500


_BY_CODE = {
    cls.grpc_code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        Unauthenticated,
        PermissionDenied,
        FailedPrecondition,
        ResourceExhausted,
        Unavailable,
        Aborted,
        DataLoss,
    )
}


def from_rpc_error(err: grpc.RpcError) -> RlfleetError:
    """Turns a gRPC error received from another service back into a domain error."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    cls = _BY_CODE.get(code)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        cls = Unavailable
    return (cls or RlfleetError)(details or code.name)


def from_code_name(name: str, message: str) -> RlfleetError:
    """A domain error from a status code's name ("DATA_LOSS"), as the weight data plane sends it."""
    code = getattr(grpc.StatusCode, name, grpc.StatusCode.UNKNOWN)
    return _BY_CODE.get(code, RlfleetError)(message)
