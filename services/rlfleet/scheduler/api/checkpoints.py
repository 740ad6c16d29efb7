"""Which Hugging Face checkpoints a job has, for ``GET /v1/jobs/{id}/checkpoints``.

The trainer is the authority: it writes ``<checkpoint_dir>/<job>/step-<s>/`` and
stores each step's result, with its ``checkpoint_path``, in Redis
(rlfleet.trainer.state). The scheduler reads those results instead of keeping a
copy. Which steps to read follows from the spec (``checkpoint.every_steps``, the
last step always, the newest ``checkpoint.keep`` retained), so a listing costs
``keep`` lookups however long the job ran.
"""

from __future__ import annotations

import json

from rlfleet.scheduler.api.models import CheckpointOut
from rlfleet.scheduler.core import SchedulerCore
from rlfleet.trainer.state import TrainerStore


def checkpoint_steps(*, done: int, total: int, every: int, keep: int) -> list[int]:
    """Steps among the first ``done`` that carry a retained checkpoint, oldest first."""
    due = set()
    if every > 0:
        due.update(range(every - 1, done, every))
    if done >= total:
        due.add(total - 1)
    return sorted(due)[-keep:] if keep > 0 else []


class CheckpointLister:
    def __init__(self, core: SchedulerCore):
        self.core = core
        self.trainer = TrainerStore(core.store.r)

    def list(self, job_id: str) -> list[CheckpointOut]:
        job = self.core.get(job_id)  # NotFound for an unknown job
        try:
            ckpt = json.loads(job.spec_json).get("checkpoint", {})
        except (ValueError, AttributeError):
            ckpt = {}
        steps = checkpoint_steps(
            done=job.current_step,
            total=job.total_steps,
            every=int(ckpt.get("every_steps", 0)),
            keep=int(ckpt.get("keep", 2)),
        )
        if not steps:
            return []
        finished = {r.step: r.finished_at for r in self.core.steps(job_id, since_step=steps[0])}
        out = []
        for step in steps:
            result = self.trainer.get_result(job_id, step)
            if result is None or not result.checkpoint_path:
                continue  # a trainer that did not (or not yet) write one
            out.append(
                CheckpointOut(
                    step=step,
                    version=result.version,
                    path=result.checkpoint_path,
                    created_at=finished.get(step, 0.0),
                )
            )
        return out
