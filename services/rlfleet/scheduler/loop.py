"""The step loop of one job (docs/DESIGN.md, "Flow of one synchronous step").

Per step: bring lagging replicas up to date, roll out (the job's strategy),
score and write to the buffer (reward), train (trainer), load the new version
on every replica, record the step. The loop starts at the job's recorded
``current_step``, so a job resumed after a scheduler restart redoes at most the
step it was in; that is safe because sample ids are deterministic (the buffer
keeps one copy) and TrainStep is idempotent per step.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import threading
import time
from collections.abc import Iterator

from rlfleet.common.errors import NotFound, RlfleetError
from rlfleet.common.jobspec import JobSpec
from rlfleet.common.tasks import PromptSource
from rlfleet.scheduler import metrics
from rlfleet.scheduler.clients import ServiceClients
from rlfleet.scheduler.evaluation import Evaluator
from rlfleet.scheduler.jobs import Interrupted, Job, JobState
from rlfleet.scheduler.pool import ReplicaPool
from rlfleet.scheduler.samples import load_codec
from rlfleet.scheduler.store import JobStore
from rlfleet.scheduler.strategy import RolloutStrategy, StepContext, setup_strategy
from rlfleet.scheduler.tracking import Tracker, open_trackers
from rlfleet.scheduler.weight_groups import WeightGroups
from rlfleet.v1 import common_pb2

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _phase(name: str, timings: dict[str, float]) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        elapsed = time.perf_counter() - start
        timings[f"{name}_seconds"] = elapsed
        metrics.STEP_PHASE_SECONDS.labels(name).observe(elapsed)


class JobRunner:
    """Runs jobs' step loops against the replica pool, reward and trainer."""

    def __init__(
        self,
        *,
        store: JobStore,
        pool: ReplicaPool,
        clients: ServiceClients,
        score_batch_size: int = 256,
        tracking_dir: str = "runs/tracking",
        mlflow_tracking_uri: str = "",
    ):
        self.store = store
        self.pool = pool
        self.clients = clients
        self.weight_groups = WeightGroups(pool, clients)
        self._publishing: dict[str, int | None] = {}
        """Per job: the step whose version the trainer is publishing in the background."""
        self.score_batch_size = score_batch_size
        self.tracking_dir = tracking_dir
        self.mlflow_tracking_uri = mlflow_tracking_uri

    def run(self, job_id: str, stop: threading.Event) -> Job:
        """Runs a running job from its recorded step to the end and marks it succeeded.

        Raises Interrupted when ``stop`` is set or the job stops being running
        (cancelled), and RlfleetError when a service fails for good.
        """
        job = self.store.get(job_id)
        spec = JobSpec.model_validate_json(job.spec_json)
        strategy = setup_strategy(
            spec.scheduling.mode,
            algorithm=spec.algorithm.kind,
            episodes=spec.task.environment is not None,
            clients=self.clients,
            pool=self.pool,
            redis_client=self.store.r,
            prefix=self.store.prefix,
        )
        if job.current_step >= spec.steps:  # died after its last step was recorded
            strategy.finish(job_id)
            return self.store.transition(job_id, JobState.SUCCEEDED)
        codec = load_codec(spec.model.path)
        prompts = PromptSource(spec.task)
        evaluator = None
        if spec.eval is not None:
            evaluator = Evaluator(
                spec=spec,
                pool=self.pool,
                clients=self.clients,
                codec=codec,
                score_batch_size=self.score_batch_size,
            )
        tracker = open_trackers(
            job_id=job_id,
            job_name=spec.name,
            spec=spec.tracking,
            root=self.tracking_dir,
            mlflow_uri=self.mlflow_tracking_uri,
        )
        try:
            version = self._init(job, spec)
            for step in range(job.current_step, spec.steps):
                self._check(job_id, stop)
                ctx = StepContext(job_id, spec, step, version, codec, prompts, stop)
                version = self._step(ctx, strategy, evaluator, tracker)
        except (Interrupted, RlfleetError) as exc:
            # A failed or cancelled job is never resumed: drop what the strategy kept
            # for it. One stopped by a shutdown stays running and keeps it.
            strategy.pause(job_id)
            outcome = None
            with contextlib.suppress(Exception):
                if isinstance(exc, RlfleetError) or self.store.get(job_id).terminal:
                    strategy.finish(job_id)
                    outcome = "failed" if isinstance(exc, RlfleetError) else "cancelled"
            tracker.close(outcome=outcome)
            raise
        except BaseException:
            tracker.close(outcome=None)
            raise
        finally:
            self.weight_groups.forget(job_id)
            self._publishing.pop(job_id, None)
        strategy.finish(job_id)
        tracker.close(outcome="succeeded")
        return self.store.transition(job_id, JobState.SUCCEEDED)

    def _check(self, job_id: str, stop: threading.Event) -> None:
        if stop.is_set():
            raise Interrupted("stop requested")
        state = self.store.get(job_id).state
        if state != JobState.RUNNING:
            raise Interrupted(f"job is {state.value}")

    def _init(self, job: Job, spec: JobSpec) -> int:
        """InitJob on the trainer (version 0, or where it resumes), then load it everywhere."""
        timings: dict[str, float] = {}
        with _phase("init", timings):
            reply = self.clients.init_job(job.job_id, job.spec_json)
            if reply.version != job.current_step:
                logger.warning(
                    "trainer starts job %s at version %d but the job has completed %d steps",
                    job.job_id,
                    reply.version,
                    job.current_step,
                )
            self.store.set_version(job.job_id, reply.version)
            self.pool.refresh()
            self.pool.ensure_version(
                job_id=job.job_id,
                version=reply.version,
                model_path=spec.model.path,
                limit=spec.resources.rollout_replicas,
            )
        logger.info(
            "job %s starts at step %d, version %d (resumed: %s)",
            job.job_id,
            job.current_step,
            reply.version,
            reply.resumed,
        )
        return reply.version

    def _step(
        self,
        ctx: StepContext,
        strategy: RolloutStrategy,
        evaluator: Evaluator | None,
        tracker: Tracker,
    ) -> int:
        job_id, spec, step = ctx.job_id, ctx.spec, ctx.step
        timings: dict[str, float] = {}
        with _phase("step", timings):
            # Late joiners and restarted replicas catch up before they get work.
            self.pool.refresh()
            self._ensure_version(job_id, spec, ctx.version)
            with _phase("rollout", timings):
                rollout = strategy.rollout(ctx)
            self._check(job_id, ctx.stop)
            with _phase("reward", timings):
                if spec.algorithm.kind == "sft":  # demonstrations: written unscored
                    rewards, written, terms = None, self._write(job_id, rollout.samples), {}
                elif spec.task.environment is not None:  # the environment's rewards
                    rewards = [s.reward for s in rollout.samples]
                    written, terms = self._write(job_id, rollout.samples), {}
                else:
                    rewards, written, terms = self._score(job_id, spec, rollout.samples)
            self._check(job_id, ctx.stop)
            with _phase("train", timings):
                self.weight_groups.ensure(job_id, spec)
                background = spec.weights.publish_in_background and self.weight_groups.covers(
                    job_id, spec
                )
                trained = self.clients.train_step(job_id, step, len(rollout.samples),
                                                  background=background)  # fmt: skip
                self.weight_groups.after_step(job_id, dict(trained.metrics))
                self._publishing[job_id] = step if background else None
            with _phase("sync", timings):
                synced = self._ensure_version(job_id, spec, trained.version)
            evaluated = {}
            if evaluator is not None and evaluator.due(step):
                self._check(job_id, ctx.stop)
                with _phase("eval", timings):
                    evaluated = evaluator.run(
                        job_id=job_id, step=step, version=trained.version, stop=ctx.stop
                    )
        step_metrics = {
            **dict(trained.metrics),
            **rollout.metrics,
            **timings,
            **(_reward_metrics(rewards, terms) if rewards is not None else {}),
            **evaluated,
            "samples": float(len(rollout.samples)),
            "samples_written": float(written),
            "samples_trained": float(trained.samples_trained),
            "policy_version": float(trained.version),
            "replicas_via_weight_group": float(sum(r.loaded_via == "weight-group" for r in synced)),
        }
        self.store.record_step(job_id, step, step_metrics, policy_version=trained.version)
        tracker.log_step(step, step_metrics)
        metrics.STEPS_COMPLETED.inc()
        logger.info(
            "job %s step %d done: reward %.3f, version %d, %.2fs",
            job_id,
            step,
            step_metrics.get("reward_mean", 0.0),
            trained.version,
            timings["step_seconds"],
            extra={"job_id": job_id, "step": step},
        )
        return trained.version

    def _ensure_version(self, job_id: str, spec: JobSpec, version: int) -> list:
        """``pool.ensure_version``; a replica that must pull a version the trainer is still
        publishing in the background (a late joiner, one restarted since the broadcast)
        finds it missing in weight-sync: wait for the publish (a repeated TrainStep), then
        load again."""
        load = functools.partial(self.pool.ensure_version, job_id=job_id, version=version,
                                 model_path=spec.model.path,
                                 limit=spec.resources.rollout_replicas)  # fmt: skip
        try:
            return load()
        except NotFound:
            step = self._publishing.pop(job_id, None)
            if step is None or step + 1 != version:
                raise
            self.clients.train_step(job_id, step, 1)  # returns once weight-sync holds it
            return load()

    def _write(self, job_id: str, samples: list[common_pb2.Sample]) -> int:
        """SFT: has reward append the demonstrations unscored; returns the samples written."""
        written = 0
        for i in range(0, len(samples), self.score_batch_size):
            written += self.clients.write(job_id, samples[i : i + self.score_batch_size]).written
        return written

    def _score(
        self, job_id: str, spec: JobSpec, samples: list[common_pb2.Sample]
    ) -> tuple[list[float], int, dict[str, list[float]]]:
        """Scores the samples in batches and has reward write them to the buffer; returns
        the rewards, the samples written and (combined verifiers) each term's scores."""
        rewards: list[float] = []
        written = 0
        terms: dict[str, list[float]] = {}
        for i in range(0, len(samples), self.score_batch_size):
            batch = samples[i : i + self.score_batch_size]
            reply = self.clients.score(
                job_id,
                batch,
                verifier=spec.reward.verifier,
                verifier_config_json=spec.reward.model_dump_json(),
            )
            if len(reply.rewards) != len(batch):
                raise RlfleetError(
                    f"reward: Score returned {len(reply.rewards)} rewards for {len(batch)} samples"
                )
            rewards += reply.rewards
            written += reply.written
            for name, term in reply.terms.items():
                terms.setdefault(name, []).extend(term.scores)
        return rewards, written, terms


def _reward_metrics(rewards: list[float], terms: dict[str, list[float]]) -> dict[str, float]:
    """The step record's reward figures: mean, std and (combined verifiers) each term's mean."""
    mean = sum(rewards) / len(rewards) if rewards else 0.0
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / len(rewards)) if rewards else 0.0
    return {
        "reward_mean": mean,
        "reward_std": std,
        **{f"reward_{name}_mean": sum(v) / len(v) for name, v in terms.items() if v},
    }
