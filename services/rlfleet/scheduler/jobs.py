"""The job record and its state machine.

Every state change goes through ``check_transition`` so there is one place that
says which moves are legal; the store calls it inside its Redis transaction.
"""

from __future__ import annotations

import enum
import math

from pydantic import BaseModel, Field, field_validator

from rlfleet.common.errors import FailedPrecondition, InvalidArgument


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})

# A running job stays running across a scheduler restart (it is resumed from its
# recorded step), so there is no running -> queued edge. queued -> failed covers
# a job whose spec no longer holds when it is picked up (model dir deleted).
_ALLOWED: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.CANCELLED, JobState.FAILED}),
    JobState.RUNNING: frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED}),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}


def parse_state(value: str, *, field: str = "state") -> JobState:
    """The JobState named by ``value``; InvalidArgument naming ``field`` otherwise."""
    try:
        return JobState(value)
    except ValueError:
        known = ", ".join(s.value for s in JobState)
        raise InvalidArgument(f"{field} {value!r} is not a job state; use one of {known}") from None


def check_transition(job_id: str, old: JobState, new: JobState) -> None:
    """Raises FailedPrecondition unless ``old -> new`` is a legal move."""
    if new not in _ALLOWED[old]:
        if old in TERMINAL_STATES:
            raise FailedPrecondition(
                f"job {job_id} is already {old.value}; it cannot become {new.value}"
            )
        raise FailedPrecondition(f"job {job_id} cannot go from {old.value} to {new.value}")


def finite_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Drops NaN/inf figures: JSON (Redis records, REST bodies) has no way to carry them."""
    return {k: v for k, v in metrics.items() if math.isfinite(v)}


class Job(BaseModel):
    """What the scheduler keeps per job (hash ``rlfleet:jobs``, one JSON value per id)."""

    job_id: str
    state: JobState = JobState.QUEUED
    reason: str = ""
    """Why the job failed or was cancelled."""
    current_step: int = 0
    """Steps completed; also the next step to run."""
    total_steps: int
    policy_version: int = 0
    spec_json: str
    created_at: float
    updated_at: float
    summary: dict[str, float] = Field(default_factory=dict)
    """The latest step's metrics."""
    seq: int = 0
    """Submission order: the FIFO queue and list pagination sort by it."""
    idempotency_key: str = ""

    _finite_summary = field_validator("summary")(finite_metrics)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES


class StepRecord(BaseModel):
    """One finished step (list ``rlfleet:job:<id>:steps``, index = step)."""

    step: int
    metrics: dict[str, float] = Field(default_factory=dict)
    finished_at: float

    _finite_metrics = field_validator("metrics")(finite_metrics)


class Interrupted(Exception):  # noqa: N818 - a signal, not an error
    """The step loop was told to stop (the job was cancelled, or the scheduler is shutting down)."""
