"""Response models of the REST API (the server's OpenAPI schema is the reference)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})


class Job(BaseModel):
    id: str
    state: JobState
    reason: str = ""
    current_step: int = 0
    total_steps: int = 0
    policy_version: int = 0
    spec: dict[str, Any] = Field(default_factory=dict)
    created_at: float = 0.0
    updated_at: float = 0.0
    summary: dict[str, float] = Field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.state in TERMINAL_STATES


class JobPage(BaseModel):
    jobs: list[Job]
    next_page_token: str = ""


class StepRecord(BaseModel):
    step: int
    metrics: dict[str, float] = Field(default_factory=dict)
    finished_at: float = 0.0


class Checkpoint(BaseModel):
    step: int
    path: str
    created_at: float = 0.0


class Event(BaseModel):
    """One server-sent event of a job's progress stream: "step", "state" or "end"."""

    event: str
    data: dict[str, Any]
