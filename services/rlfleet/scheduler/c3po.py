"""C3PO++ as a rollout strategy of the step loop (``scheduling.mode = "c3po"``).

Each step runs one iteration of ``c3po_driver`` against the live replicas and
trains on the groups it released. The pool P lives in memory between steps and
in Redis after every rollout phase (``c3po_store``); a strategy built after a
scheduler restart starts from what Redis holds:

- saved state of an earlier step: run the next iteration from it;
- saved state of this very step (the scheduler died after the rollout phase,
  before the step was recorded): return the groups it released, unchanged, so
  the redone step scores and trains exactly what the first attempt produced.

Prompt serials come from the job's counter in P (not from the step number as in
``sync``), so sample ids stay unique across steps and restarts.
"""

from __future__ import annotations

import logging

from rlfleet.common.errors import RlfleetError
from rlfleet.common.tasks import PromptSource, entry_to_json
from rlfleet.scheduler import c3po_metrics
from rlfleet.scheduler.c3po_driver import C3poSettings, IterationDriver
from rlfleet.scheduler.c3po_grpc import GrpcBackend
from rlfleet.scheduler.c3po_pool import Group, Rollout
from rlfleet.scheduler.c3po_store import C3poStore, SavedState
from rlfleet.scheduler.pool import ReplicaPool
from rlfleet.scheduler.samples import TextCodec, sample_id
from rlfleet.scheduler.strategy import (
    RolloutResult,
    RolloutStrategy,
    StepContext,
    rollout_metrics,
    sampling_params,
)
from rlfleet.v1 import common_pb2

logger = logging.getLogger(__name__)


class PromptGroupSource:
    """New groups from the job's prompts, tokenised like the synchronous path."""

    def __init__(self, prompts: PromptSource, codec: TextCodec, *, group_size: int):
        self.prompts = prompts
        self.codec = codec
        self.group_size = group_size

    def draw(self, serial: int, *, step: int) -> Group:
        text, entry = self.prompts.get(serial)
        ids = self.codec.encode(text)
        if not ids:
            raise RlfleetError(f"prompt {serial} tokenises to nothing: {text!r}")
        return Group(
            serial=serial,
            prompt_len=len(ids),
            members=[
                Rollout(seq_id=sample_id(serial, m), member=m) for m in range(self.group_size)
            ],
            entered_step=step,
            prompt_ids=ids,
            task_json=entry_to_json(entry),
        )


def group_samples(
    groups: list[Group], codec: TextCodec, *, job_id: str, step: int
) -> list[common_pb2.Sample]:
    """A ``Sample`` per member of the released groups, in release order."""
    samples = []
    for group in groups:
        for m in group.members:
            versions = m.versions
            if not (len(m.token_ids) == len(m.logprobs) == len(versions)):
                raise RlfleetError(
                    f"C3PO++: sequence {m.seq_id} holds {len(m.token_ids)} tokens but "
                    f"{len(m.logprobs)} log-probs and {len(versions)} versions"
                )
            samples.append(
                common_pb2.Sample(
                    job_id=job_id,
                    sample_id=m.seq_id,
                    group_id=group.group_id,
                    step=step,
                    prompt_token_ids=group.prompt_ids,
                    completion_token_ids=m.token_ids,
                    inference_logprobs=m.logprobs,
                    token_versions=versions,
                    finish_reason=m.finish_reason,
                    completion_text=codec.completion_text(m.token_ids),
                    task_json=group.task_json,
                    retention=m.retention,
                )
            )
    return samples


class C3poStrategy(RolloutStrategy):
    def __init__(self, pool: ReplicaPool, *, store: C3poStore):
        super().__init__(pool)
        self.store = store
        self._state: SavedState | None = None
        self._job = ""

    def _load(self, job_id: str) -> SavedState:
        if self._state is None or self._job != job_id:
            self._state, self._job = self.store.load(job_id), job_id
            if self._state.step >= 0:
                logger.info(
                    "C3PO++ pool of job %s restored: %d groups after step %d",
                    job_id,
                    len(self._state.pool),
                    self._state.step,
                    extra={"job_id": job_id},
                )
        return self._state

    def rollout(self, ctx: StepContext) -> RolloutResult:
        settings = C3poSettings.from_spec(ctx.spec)
        state = self._load(ctx.job_id)
        redo = state.step == ctx.step and bool(state.released)
        extra: dict[str, float] = {}
        if redo:
            logger.info(
                "step %d of job %s: reusing the %d groups its rollout phase released",
                ctx.step,
                ctx.job_id,
                len(state.released),
            )
        else:
            if state.step > ctx.step:
                logger.warning(
                    "C3PO++ state of job %s is at step %d, the job at step %d; continuing",
                    ctx.job_id,
                    state.step,
                    ctx.step,
                )
            source = PromptGroupSource(
                ctx.prompts, ctx.codec, group_size=ctx.spec.algorithm.group_size
            )
            driver = IterationDriver(state.pool, source, settings)
            try:
                backend = GrpcBackend(
                    self.pool,
                    job_id=ctx.job_id,
                    version=ctx.version,
                    sampling=sampling_params(ctx.spec, ctx.step),
                    limit=ctx.spec.resources.rollout_replicas,
                )
                report = driver.run_c3po(backend, step=ctx.step, stop=ctx.stop)
            except BaseException:
                self._state = None  # memory may be half-updated: reload from Redis next time
                raise
            saved = self.store.save(ctx.job_id, state.pool, step=ctx.step, released=report.released)
            state.step, state.released = ctx.step, report.released
            extra = c3po_metrics.report_metrics(
                report, token_budget=settings.token_budget, pool_sequences=state.pool.unfinished
            )
            extra["c3po_state_bytes_written"] = float(saved)
            logger.info(
                "C3PO++ step %d: released %d groups (C = %d of Φ = %d), carried %d, purged %d",
                ctx.step,
                len(report.released),
                report.budget_used,
                settings.token_budget,
                report.carried,
                len(report.purged),
                extra={"job_id": ctx.job_id, "step": ctx.step},
            )
        samples = group_samples(state.released, ctx.codec, job_id=ctx.job_id, step=ctx.step)
        return RolloutResult(samples, {**rollout_metrics(samples, ctx), **extra})

    def finish(self, job_id: str) -> None:
        """The job ended: rollouts still in P are dropped with its stored state."""
        if self._state is not None and self._job == job_id and len(self._state.pool):
            logger.info(
                "job %s ended with %d unfinished sequences in the C3PO++ pool; dropped",
                job_id,
                self._state.pool.unfinished,
            )
        self.store.delete(job_id)
        self._state = None
