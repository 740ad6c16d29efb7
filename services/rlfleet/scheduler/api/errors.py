"""Exception handlers: every error leaves the REST API as ``ErrorBody`` JSON.

Mapped once here, as the gRPC interceptor does for the other transport: domain
errors carry their own status (rlfleet.common.errors), request validation
becomes 422 naming each field, a Redis outage 503, and anything unexpected a
generic 500 whose traceback goes only to the scheduler's log.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from rlfleet.common.errors import RlfleetError, Unauthenticated
from rlfleet.scheduler.api.models import ErrorBody, FieldError

logger = logging.getLogger(__name__)

# Where FastAPI found a bad value; "body" is dropped so a spec field reads as in the spec.
_SOURCES = ("body", "query", "path", "header", "cookie")


def _reason(err: dict[str, Any]) -> str:
    return str(err.get("msg", "is invalid")).removeprefix("Value error, ")


def field_errors(errors: Sequence[Any]) -> list[FieldError]:
    out = []
    for err in errors:
        if err.get("type") == "json_invalid":
            error = (err.get("ctx") or {}).get("error", "")
            out.append(
                FieldError(field="body", reason=f"is not valid JSON ({error})".replace(" ()", ""))
            )
            continue
        loc = [str(p) for p in err.get("loc", ())]
        if loc and loc[0] in _SOURCES:
            loc = loc[1:]
        out.append(FieldError(field=".".join(loc) or "body", reason=_reason(err)))
    return out


def _body(status: int, detail: str, errors: list[FieldError] | None = None, **headers: str):
    content = ErrorBody(detail=detail, errors=errors or []).model_dump()
    return JSONResponse(status_code=status, content=content, headers=headers or None)


def _validation_response(errors: list[FieldError], *, body: bool) -> JSONResponse:
    what = "invalid job spec" if body else "invalid request"
    detail = what + ": " + "; ".join(f"{e.field}: {e.reason}" for e in errors)
    return _body(422, detail, errors)


async def _request_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    raw = list(exc.errors())
    in_body = bool(raw) and all(str(e.get("loc", ("",))[0]) == "body" for e in raw)
    return _validation_response(field_errors(raw), body=in_body and request.method == "POST")


async def _pydantic_validation(request: Request, exc: ValidationError) -> JSONResponse:
    return _validation_response(field_errors(exc.errors()), body=False)


async def _domain(request: Request, exc: RlfleetError) -> JSONResponse:
    if isinstance(exc, Unauthenticated):
        return _body(exc.http_status, exc.message, **{"WWW-Authenticate": "Bearer"})
    if exc.http_status >= 500:
        logger.error("%s %s failed: %s", request.method, request.url.path, exc.message)
    return _body(exc.http_status, exc.message)


async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 413:
        limit = getattr(request.app.state.settings, "max_request_bytes", 0)
        return _body(413, f"request body is larger than the {limit} bytes this server accepts")
    detail = exc.detail if isinstance(exc.detail, str) else "request failed"
    if exc.status_code == 404 and detail == "Not Found":
        detail = f"no such endpoint: {request.method} {request.url.path} (see /docs)"
    return _body(exc.status_code, detail, **(exc.headers or {}))


async def _redis_down(request: Request, exc: redis.RedisError) -> JSONResponse:
    logger.error("Redis error serving %s %s: %s", request.method, request.url.path, exc)
    return _body(503, "the job store (Redis) is unavailable; retry later", **{"Retry-After": "5"})


async def _unknown(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error serving %s %s", request.method, request.url.path)
    return _body(500, "internal error in the scheduler; see its log")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _request_validation)
    app.add_exception_handler(ValidationError, _pydantic_validation)
    app.add_exception_handler(RlfleetError, _domain)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(redis.RedisError, _redis_down)
    app.add_exception_handler(Exception, _unknown)
