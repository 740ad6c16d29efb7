"""``/v1/jobs``: submit, list, inspect, cancel; step history and checkpoints.

Thin: each handler validates its parameters (FastAPI), calls ``SchedulerCore``
and maps the record to a response model. Handlers are plain ``def`` because the
core talks to Redis synchronously; FastAPI runs them in its thread pool.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Path, Query

from rlfleet.common.jobspec import JobSpec
from rlfleet.scheduler.api.checkpoints import CheckpointLister
from rlfleet.scheduler.api.deps import CanRead, CanWrite, Core
from rlfleet.scheduler.api.models import (
    CheckpointList,
    ErrorBody,
    JobOut,
    JobPage,
    StepList,
    job_out,
    step_out,
)
from rlfleet.scheduler.core import MAX_IDEMPOTENCY_KEY
from rlfleet.scheduler.jobs import JobState
from rlfleet.scheduler.store import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE

JobId = Annotated[str, Path(min_length=1, max_length=128, description="The job id (job-<hex>).")]

_errors = {
    401: {"model": ErrorBody, "description": "No or an unknown API token."},
    403: {"model": ErrorBody, "description": "The token's role may not do this."},
    422: {"model": ErrorBody, "description": "A parameter is invalid; `errors` names it."},
}
_not_found = {404: {"model": ErrorBody, "description": "No such job."}}

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=_errors)


@router.post(
    "",
    status_code=201,
    response_model=JobOut,
    summary="Submit a job",
    responses={
        409: {"model": ErrorBody, "description": "Idempotency key used for another spec."},
        413: {"model": ErrorBody, "description": "The body is too large."},
    },
    dependencies=[CanWrite],
)
def submit_job(
    spec: JobSpec,
    core: Core,
    idempotency_key: Annotated[
        str,
        Header(
            max_length=MAX_IDEMPOTENCY_KEY,
            description="Makes a retried submit return the job it already created.",
        ),
    ] = "",
) -> JobOut:
    """Queues a job. The body is a JobSpec (the same as `rlfleet submit job.toml` sends).

    A repeat with the same `Idempotency-Key` and spec returns the first job.
    """
    return job_out(core.submit(spec.model_dump_json(), idempotency_key=idempotency_key))


@router.get("", response_model=JobPage, summary="List jobs", dependencies=[CanRead])
def list_jobs(
    core: Core,
    page_size: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = DEFAULT_PAGE_SIZE,
    page_token: Annotated[
        str, Query(max_length=32, description="next_page_token of the previous page.")
    ] = "",
    state: Annotated[JobState | None, Query(description="Only jobs in this state.")] = None,
) -> JobPage:
    """Jobs, newest first, a page at a time."""
    jobs, token = core.list(
        state=state.value if state else "", page_size=page_size, page_token=page_token
    )
    return JobPage(jobs=[job_out(j) for j in jobs], next_page_token=token)


@router.get(
    "/{job_id}", response_model=JobOut, summary="Get a job", responses=_not_found,
    dependencies=[CanRead],
)  # fmt: skip
def get_job(job_id: JobId, core: Core) -> JobOut:
    """State, current step, policy version and the latest step's metrics."""
    return job_out(core.get(job_id))


@router.get(
    "/{job_id}/steps", response_model=StepList, summary="Step history", responses=_not_found,
    dependencies=[CanRead],
)  # fmt: skip
def get_steps(
    job_id: JobId,
    core: Core,
    since_step: Annotated[int, Query(ge=0, description="First step to return.")] = 0,
    limit: Annotated[int, Query(ge=1, le=10_000, description="Most steps per page.")] = 1000,
) -> StepList:
    """Recorded steps from `since_step` on with their metrics, a page at a time."""
    records = core.steps(job_id, since_step=since_step, limit=limit + 1)  # one more: is there?
    more = len(records) > limit
    return StepList(
        steps=[step_out(r) for r in records[:limit]],
        next_since_step=since_step + limit if more else None,
    )


@router.post(
    "/{job_id}:cancel",
    response_model=JobOut,
    summary="Cancel a job",
    responses={**_not_found, 409: {"model": ErrorBody, "description": "The job is finished."}},
    dependencies=[CanWrite],
)
def cancel_job(job_id: JobId, core: Core) -> JobOut:
    """Cancels a queued or running job (generation in flight is aborted)."""
    return job_out(core.cancel(job_id))


@router.get(
    "/{job_id}/checkpoints",
    response_model=CheckpointList,
    summary="Checkpoints",
    responses=_not_found,
    dependencies=[CanRead],
)
def get_checkpoints(job_id: JobId, core: Core) -> CheckpointList:
    """The Hugging Face checkpoints the trainer keeps for the job (loadable with transformers)."""
    return CheckpointList(checkpoints=CheckpointLister(core).list(job_id))
