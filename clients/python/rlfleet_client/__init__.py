"""Typed SDK for the rlfleet REST API (httpx)."""

from rlfleet_client.client import RlfleetClient
from rlfleet_client.errors import (
    ApiError,
    Conflict,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    ServerError,
    TooManyRequests,
    Unauthorized,
    Unreachable,
    ValidationFailed,
)
from rlfleet_client.models import Checkpoint, Event, Job, JobPage, StepRecord

__all__ = [
    "ApiError",
    "Checkpoint",
    "Conflict",
    "Event",
    "Forbidden",
    "Job",
    "JobPage",
    "NotFound",
    "PayloadTooLarge",
    "RlfleetClient",
    "ServerError",
    "StepRecord",
    "TooManyRequests",
    "Unauthorized",
    "Unreachable",
    "ValidationFailed",
]
