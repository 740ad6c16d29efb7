"""The scheduler's REST API (FastAPI): jobs, their steps, events and checkpoints."""

from rlfleet.scheduler.api.app import build_app
from rlfleet.scheduler.api.deps import ApiSettings

__all__ = ["ApiSettings", "build_app"]
