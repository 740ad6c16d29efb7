"""C3PO++ as a rollout strategy of the step loop (``scheduling.mode = "c3po"``).

Each step runs one iteration of ``driver`` against the live replicas and
trains on the groups it released. The pool P lives in memory between steps and
in Redis after every rollout phase (``store``); a strategy built after a
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
from rlfleet.scheduler.c3po import metrics as c3po_metrics
from rlfleet.scheduler.c3po.driver import C3poSettings, IterationDriver
from rlfleet.scheduler.c3po.episodes import EpisodeBackend, EpisodeGroupSource
from rlfleet.scheduler.c3po.grpc_backend import GrpcBackend
from rlfleet.scheduler.c3po.pool import ENV_VERSION, Group, Rollout
from rlfleet.scheduler.c3po.store import C3poStore, SavedState
from rlfleet.scheduler.episodes import EnvTurns, close_episodes, episode_metrics
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
        ids = self.codec.prompt_ids(text, self.prompts.spec)
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
            sample = common_pb2.Sample(
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
            if m.episode is not None:  # the environment's reward; its tokens masked
                sample.reward = m.episode.reward
                sample.loss_mask.extend(v != ENV_VERSION for v in versions)
                sample.completion_text = codec.tokenizer.decode(
                    m.token_ids, skip_special_tokens=True
                )
            samples.append(sample)
    return samples


def episode_ids(groups: list[Group]) -> list[str]:
    return [m.episode.episode_id for g in groups for m in g.members if m.episode]


class C3poStrategy(RolloutStrategy):
    def __init__(self, pool: ReplicaPool, *, store: C3poStore, clients=None):
        super().__init__(pool)
        self.store = store
        self.clients = clients
        """The env service's client, for jobs with a ``task.environment`` (``episodes.py``)."""
        self._state: SavedState | None = None
        self._job = ""
        self._backend: GrpcBackend | None = None
        """Overlapped scheduling: the streams left generating while the step trains."""

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
            group_size = ctx.spec.algorithm.group_size
            turns = EnvTurns(ctx, self.clients) if ctx.spec.task.environment else None
            source = (
                EpisodeGroupSource(turns, group_size=group_size)
                if turns
                else PromptGroupSource(ctx.prompts, ctx.codec, group_size=group_size)
            )
            driver = IterationDriver(state.pool, source, settings)
            backend = episodes = None
            try:
                backend = self._backend_for(ctx, driver)
                if turns:
                    backend = episodes = EpisodeBackend(backend, turns)
                report = driver.run_c3po(backend, step=ctx.step, version=ctx.version, stop=ctx.stop)
            except BaseException:
                self._drop_backend()
                self._state = None  # memory may be half-updated: reload from Redis next time
                raise
            finally:
                if episodes is not None:
                    episodes.close()
            if turns:  # the episodes that left P are over in the env service too
                turns.close(episode_ids(report.released + report.purged + report.stale))
            if settings.overlap:
                self._backend = backend  # keeps generating while the step trains
            saved = self.store.save(ctx.job_id, state.pool, step=ctx.step, released=report.released)
            state.step, state.released = ctx.step, report.released
            extra = c3po_metrics.report_metrics(
                report, token_budget=settings.token_budget, pool_sequences=state.pool.unfinished
            )
            extra["c3po_state_bytes_written"] = float(saved)
            if episodes is not None:
                extra["env_episodes_restarted"] = float(episodes.restarted)
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
        if ctx.spec.task.environment:
            extra.update(episode_metrics([
                (m.episode.turns, m.episode.tool_calls, m.finish_reason, m.versions)
                for g in state.released for m in g.members if m.episode]))  # fmt: skip
        return RolloutResult(samples, {**rollout_metrics(samples, ctx), **extra})

    def _backend_for(self, ctx: StepContext, driver: IterationDriver) -> GrpcBackend:
        """The overlapped streams if they still run on exactly the replicas that hold
        this step's version; else (stopped first) a new backend over those replicas."""
        sampling = sampling_params(ctx.spec, ctx.step)
        limit = ctx.spec.resources.rollout_replicas
        kept = self._backend
        if kept is not None:
            self._backend = None
            ready = {r.address for r in self.pool.ready(ctx.job_id, ctx.version, limit=limit)}
            if ready == {r.address for r in kept.live_replicas()}:
                kept.sampling = sampling  # new sequences sample with this step's seed
                return kept
            driver.abort(kept)  # partials go back to P and resume below
        return GrpcBackend(
            self.pool, job_id=ctx.job_id, version=ctx.version, sampling=sampling, limit=limit
        )

    def _drop_backend(self) -> None:
        """Stops the overlapped streams (the job failed, was stopped or ended)."""
        backend, self._backend = self._backend, None
        if backend is not None:
            try:
                backend.abort()
            except Exception:  # noqa: BLE001 - the job is ending either way
                logger.warning("stopping the overlapped rollout streams failed", exc_info=True)

    def pause(self, job_id: str) -> None:
        self._drop_backend()

    def finish(self, job_id: str) -> None:
        """The job ended: rollouts still in P are dropped with its stored state."""
        self._drop_backend()
        if self._state is not None and self._job == job_id and len(self._state.pool):
            logger.info(
                "job %s ended with %d unfinished sequences in the C3PO++ pool; dropped",
                job_id,
                self._state.pool.unfinished,
            )
        if self._state is not None and self._job == job_id and self.clients is not None:
            close_episodes(self.clients, episode_ids(list(self._state.pool)), timeout_s=30.0)
        self.store.delete(job_id)
        self._state = None
