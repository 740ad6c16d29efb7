"""``GET /v1/jobs/{id}/events``: a job's progress as server-sent events.

Events: ``state`` (the job, sent first and again on every state change),
``step`` (one per recorded step, ``id`` = the step number) and ``end`` (the
final job; the stream closes). The stream polls Redis, so it follows a job
whichever scheduler process runs it; a client that lost the connection (e.g. a
scheduler restart) reconnects with ``Last-Event-ID`` or ``since_step`` and gets
only the steps it has not seen. FastAPI sends keep-alive comments while idle.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.sse import EventSourceResponse, ServerSentEvent

from rlfleet.scheduler.api.deps import CanRead, Core, Settings
from rlfleet.scheduler.api.jobs import JobId
from rlfleet.scheduler.api.models import job_out, step_out
from rlfleet.scheduler.jobs import Job

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

RETRY_MS = 2000
"""How long a browser's EventSource waits before reconnecting."""


def _json_error(description: str) -> dict:
    # Spelled out: with a model, FastAPI would document the error under text/event-stream.
    ref = {"$ref": "#/components/schemas/ErrorBody"}
    return {"description": description, "content": {"application/json": {"schema": ref}}}


def existing_job(job_id: JobId, core: Core) -> Job:
    # A dependency, so an unknown job is a 404 before the 200 of the stream is sent.
    return core.get(job_id)


def _resume_from(since_step: int, last_event_id: str | None) -> int:
    if last_event_id and last_event_id.strip().isdigit():
        return max(since_step, int(last_event_id) + 1)
    return since_step


@router.get(
    "/{job_id}/events",
    response_class=EventSourceResponse,
    summary="Follow a job (server-sent events)",
    responses={
        401: _json_error("No or an unknown API token."),
        403: _json_error("The token's role may not do this."),
        404: _json_error("No such job."),
        422: _json_error("A parameter is invalid; `errors` names it."),
    },
    dependencies=[CanRead],
)
async def job_events(
    request: Request,
    core: Core,
    settings: Settings,
    job: Annotated[Job, Depends(existing_job)],
    since_step: Annotated[int, Query(ge=0, description="First step to send.")] = 0,
    last_event_id: Annotated[
        str | None, Header(max_length=32, description="Set by reconnecting EventSource clients.")
    ] = None,
) -> AsyncIterator[ServerSentEvent]:
    """A `state` event, a `step` event per recorded step, `end` when the job is finished."""
    job_id = job.job_id
    next_step = _resume_from(since_step, last_event_id)
    stopping = request.app.state.stopping
    yield ServerSentEvent(event="state", data=job_out(job).model_dump(), retry=RETRY_MS)
    state = job.state
    while True:
        # The job first, then its steps: once the job reads finished, the steps read
        # after it are complete.
        job = await asyncio.to_thread(core.get, job_id)
        records = await asyncio.to_thread(core.steps, job_id, since_step=next_step)
        for record in records:
            yield ServerSentEvent(
                event="step", data=step_out(record).model_dump(), id=str(record.step)
            )
            next_step = record.step + 1
        if job.state != state:
            state = job.state
            yield ServerSentEvent(event="state", data=job_out(job).model_dump())
        if job.terminal:
            yield ServerSentEvent(event="end", data=job_out(job).model_dump())
            return
        if stopping.is_set():
            return  # the server is going down: the client reconnects to the next one
        await asyncio.sleep(settings.events_poll_s)
