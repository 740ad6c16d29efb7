"""``build_app``: the scheduler's REST API as a FastAPI application.

Routers are thin adapters over ``SchedulerCore`` (the same core the gRPC servicer
wraps); the app holds the core and its settings on ``app.state``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from rlfleet.scheduler.api import events, jobs, ops
from rlfleet.scheduler.api.deps import ApiSettings
from rlfleet.scheduler.api.errors import install_error_handlers
from rlfleet.scheduler.api.middleware import ApiMiddleware
from rlfleet.scheduler.core import SchedulerCore

logger = logging.getLogger(__name__)

DESCRIPTION = """\
Submit, follow and manage RL post-training jobs.

A job is a JobSpec (model, task, reward, sampling, algorithm, correction,
scheduling, checkpoint, resources, steps). Every error body is
`{"detail": "...", "errors": [{"field": ..., "reason": ...}]}`.
With `auth = token`, send `Authorization: Bearer <token>`; `read` tokens may
only look, `write` tokens may also submit and cancel.
"""


def build_app(core: SchedulerCore, settings: ApiSettings | None = None) -> FastAPI:
    settings = settings or ApiSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.core = core
        app.state.settings = settings
        logger.info("REST API started (auth %s)", settings.auth)
        yield
        app.state.stopping.set()  # open event streams end; clients reconnect elsewhere

    app = FastAPI(
        title="rlfleet scheduler API",
        version="v1",
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    # Set before the lifespan runs, so that HttpServer.stop can end streams first.
    app.state.stopping = threading.Event()
    app.add_middleware(ApiMiddleware, max_body_bytes=settings.max_request_bytes)
    install_error_handlers(app)
    app.include_router(jobs.router)
    app.include_router(events.router)
    app.include_router(ops.router)
    return app
