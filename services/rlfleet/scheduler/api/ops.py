"""Operational endpoints: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from rlfleet.scheduler.api.deps import CanRead, Core
from rlfleet.scheduler.api.models import Health

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Health, summary="Liveness")
def healthz() -> Health:
    """200 while the process serves HTTP. Open without a token."""
    return Health(status="ok")


def _redis_ok(core) -> bool:
    try:
        return bool(core.store.r.ping())
    except Exception:  # noqa: BLE001 - any failure means not ready
        return False


@router.get(
    "/readyz",
    response_model=Health,
    summary="Readiness",
    responses={503: {"model": Health, "description": "Not ready; `checks` says what failed."}},
)
async def readyz(core: Core):
    """200 when Redis answers and the job worker runs; 503 otherwise. Open without a token."""
    checks = {"redis": await asyncio.to_thread(_redis_ok, core), "worker": core.running}
    if all(checks.values()):
        return Health(status="ok", checks=checks)
    failing = ", ".join(name for name, ok in checks.items() if not ok)
    return JSONResponse(
        status_code=503, content=Health(status=f"not ready: {failing}", checks=checks).model_dump()
    )


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}}},
    dependencies=[CanRead],
)
def metrics() -> Response:
    """The scheduler's metrics (the same as on its metrics port) in the Prometheus text format."""
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
