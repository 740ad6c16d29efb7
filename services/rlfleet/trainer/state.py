"""What the trainer keeps in Redis: step results (idempotency) and job specs.

``rlfleet:trainer:<job>:step:<s>`` holds the result of TrainStep(s) as JSON,
including the buffer entries it trained on. A repeated TrainStep returns it
without training again and re-acknowledges those entries, which closes the
window between storing a result and acknowledging its entries.

``rlfleet:trainer:<job>:settling`` holds the result of a step whose version was
broadcast to the weight group and is still on its way to weight-sync (the step
returned early, ``publish_in_background``): its entries are not acknowledged yet.
A trainer that restarts and finds it retrains that step from exactly those entries.

``rlfleet:trainer:<job>:spec`` holds the job's spec, so a trainer that
restarted can take a TrainStep for a job it has not seen since: it reloads the
spec and resumes from the job's newest checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import redis


@dataclass
class StepResult:
    step: int
    version: int
    """Policy version after the step (step + 1)."""
    metrics: dict[str, float]
    samples_trained: int
    checkpoint_path: str = ""
    entry_ids: list[str] = field(default_factory=list)
    """Buffer entries this step trained on (acknowledged after publishing)."""

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: str | bytes) -> StepResult:
        return cls.from_dict(json.loads(raw))

    @classmethod
    def from_dict(cls, data: dict) -> StepResult:
        return cls(
            step=int(data["step"]),
            version=int(data["version"]),
            metrics={k: float(v) for k, v in data["metrics"].items()},
            samples_trained=int(data["samples_trained"]),
            checkpoint_path=data.get("checkpoint_path", ""),
            entry_ids=list(data.get("entry_ids", [])),
        )


class TrainerStore:
    def __init__(self, client: redis.Redis, *, prefix: str = "rlfleet"):
        self.r = client
        self.prefix = prefix

    @classmethod
    def from_url(cls, url: str) -> TrainerStore:
        return cls(redis.Redis.from_url(url))

    def _step_key(self, job_id: str, step: int) -> str:
        return f"{self.prefix}:trainer:{job_id}:step:{step}"

    def _spec_key(self, job_id: str) -> str:
        return f"{self.prefix}:trainer:{job_id}:spec"

    def get_result(self, job_id: str, step: int) -> StepResult | None:
        raw = self.r.get(self._step_key(job_id, step))
        return StepResult.from_json(raw) if raw else None

    def put_result(self, job_id: str, result: StepResult) -> None:
        self.r.set(self._step_key(job_id, result.step), result.to_json())

    def _settling_key(self, job_id: str) -> str:
        return f"{self.prefix}:trainer:{job_id}:settling"

    def put_settling(self, job_id: str, result: StepResult) -> None:
        self.r.set(self._settling_key(job_id), result.to_json())

    def get_settling(self, job_id: str) -> StepResult | None:
        raw = self.r.get(self._settling_key(job_id))
        return StepResult.from_json(raw) if raw else None

    def clear_settling(self, job_id: str) -> None:
        self.r.delete(self._settling_key(job_id))

    def settled(self, job_id: str, result: StepResult) -> None:
        """Stores ``result`` and drops the settling mark, in one transaction."""
        pipe = self.r.pipeline(transaction=True)
        pipe.set(self._step_key(job_id, result.step), result.to_json())
        pipe.delete(self._settling_key(job_id))
        pipe.execute()

    def put_spec(self, job_id: str, spec_json: str) -> None:
        self.r.set(self._spec_key(job_id), spec_json)

    def get_spec(self, job_id: str) -> str | None:
        raw = self.r.get(self._spec_key(job_id))
        return raw.decode() if raw else None
