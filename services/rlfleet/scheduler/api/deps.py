"""Dependencies of the routers: the core, the settings and the caller's role.

``authorize(Role.READ)`` guards reads, ``authorize(Role.WRITE)`` submit and cancel.
With ``auth = local`` (a fleet on loopback) every caller may do everything;
with ``auth = token`` a bearer token must hash to a stored hash (scheduler.auth).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from rlfleet.common.errors import PermissionDenied, Unauthenticated
from rlfleet.scheduler.auth import Principal, Role, TokenTable
from rlfleet.scheduler.core import SchedulerCore

logger = logging.getLogger(__name__)

LOCAL = Principal(role=Role.WRITE, label="local")

_bearer = HTTPBearer(
    auto_error=False,
    description="An API token (`rlfleet token create`); not needed when the scheduler runs "
    "with auth = local.",
)


@dataclass(frozen=True)
class ApiSettings:
    """What the REST layer needs beyond the core (built from SchedulerConfig)."""

    auth: Literal["local", "token"] = "local"
    tokens: TokenTable | None = None
    max_request_bytes: int = 1_048_576
    events_poll_s: float = 0.5

    def __post_init__(self) -> None:
        if self.auth == "token" and self.tokens is None:
            raise ValueError("auth = token needs a TokenTable")

    @classmethod
    def from_config(cls, cfg) -> ApiSettings:
        tokens = TokenTable.from_environment(cfg.api_tokens_file) if cfg.auth == "token" else None
        return cls(
            auth=cfg.auth,
            tokens=tokens,
            max_request_bytes=cfg.max_request_bytes,
            events_poll_s=cfg.events_poll_s,
        )


def get_core(request: Request) -> SchedulerCore:
    return request.app.state.core


def get_settings(request: Request) -> ApiSettings:
    return request.app.state.settings


Core = Annotated[SchedulerCore, Depends(get_core)]
Settings = Annotated[ApiSettings, Depends(get_settings)]


def authorize(needed: Role):
    """A dependency that lets the request through only for a caller with ``needed``."""

    def check(
        request: Request,
        settings: Settings,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> Principal:
        if settings.auth == "local":
            return LOCAL
        assert settings.tokens is not None
        if credentials is None:
            raise Unauthenticated("missing API token: send 'Authorization: Bearer <token>'")
        principal = settings.tokens.lookup(credentials.credentials)
        if principal is None:
            raise Unauthenticated("unknown API token")
        if not principal.role.allows(needed):
            raise PermissionDenied(
                f"this token has the {principal.role.value!r} role, which may not "
                f"{request.method} {request.url.path}; it needs {needed.value!r}"
            )
        request.state.principal = principal
        return principal

    return check


CanRead = Depends(authorize(Role.READ))
CanWrite = Depends(authorize(Role.WRITE))
