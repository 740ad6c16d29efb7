"""The trainer service's core: its jobs, independent of gRPC.

One ``JobTrainer`` per job (its model, optimizer and step loop). InitJob
stores the job's spec in Redis, so after a trainer restart a TrainStep for a
job this process has not seen is served by reloading the spec and resuming
from the job's newest checkpoint, instead of failing the job.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import torch

from rlfleet.common.buffer import ExperienceBuffer
from rlfleet.common.errors import FailedPrecondition, InvalidArgument, NotFound
from rlfleet.common.job_ids import check_job_id
from rlfleet.common.jobspec import JobSpec
from rlfleet.common.weight_group import GroupAddress
from rlfleet.trainer.engine import RankMirror
from rlfleet.trainer.job import JobTrainer
from rlfleet.trainer.publish import GATHER_BUCKET_BYTES, WeightPublisher
from rlfleet.trainer.state import StepResult, TrainerStore

logger = logging.getLogger(__name__)

__all__ = ["JobTrainer", "TrainerCore", "check_job_id"]


class TrainerCore:
    def __init__(
        self,
        *,
        buffer: ExperienceBuffer,
        store: TrainerStore,
        publisher: WeightPublisher,
        checkpoint_dir: str | Path,
        consumer: str = "trainer-0",
        read_timeout_s: float = 60.0,
        reclaim_idle_s: float = 60.0,
        device: torch.device | None = None,
        mirror: RankMirror | None = None,
        gather_bucket_bytes: int = GATHER_BUCKET_BYTES,
        weight_group_host: str = "127.0.0.1",
    ):
        self.buffer = buffer
        self.gather_bucket_bytes = gather_bucket_bytes
        self.weight_group_host = weight_group_host
        self.store = store
        self.publisher = publisher
        self.checkpoint_dir = Path(checkpoint_dir)
        self.consumer = consumer
        self.read_timeout_s = read_timeout_s
        self.reclaim_idle_s = reclaim_idle_s
        self.device = device
        # Several ranks: every job's engine runs on each, driven from here (engine.py).
        self.mirror = mirror
        self.jobs: dict[str, JobTrainer] = {}
        self._lock = threading.Lock()
        self._job_locks: dict[str, threading.Lock] = {}

    def _job_lock(self, job_id: str) -> threading.Lock:
        with self._lock:
            return self._job_locks.setdefault(job_id, threading.Lock())

    def init_job(self, job_id: str, spec: JobSpec) -> tuple[int, bool]:
        """Loads (or resumes) the job and publishes its version; returns (version, resumed).

        Repeating InitJob for a job this process holds returns its current version.
        """
        check_job_id(job_id)
        try:
            spec.model.check_exists()
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        with self._job_lock(job_id):
            existing = self.jobs.get(job_id)
            if existing is not None:
                if existing.spec != spec:
                    raise FailedPrecondition(
                        f"job {job_id} is already initialised on this trainer with a different spec"
                    )
                existing.wait_published()  # the caller may pull the version next
                return existing.version, existing.version > 0
            self.store.put_spec(job_id, spec.model_dump_json())
            trainer = JobTrainer(
                job_id=job_id,
                spec=spec,
                buffer=self.buffer,
                store=self.store,
                publisher=self.publisher,
                checkpoint_dir=self.checkpoint_dir,
                consumer=self.consumer,
                read_timeout_s=self.read_timeout_s,
                reclaim_idle_s=self.reclaim_idle_s,
                device=self.device,
                mirror=self.mirror,
                gather_bucket_bytes=self.gather_bucket_bytes,
                weight_group_host=self.weight_group_host,
            )
            version, resumed = trainer.init_job()
            self.jobs[job_id] = trainer
            return version, resumed

    def train_step(
        self, job_id: str, step: int, num_samples: int, *, background: bool = False
    ) -> StepResult:
        check_job_id(job_id)
        trainer = self.jobs.get(job_id)
        if trainer is None:
            stored = self.store.get_result(job_id, step)
            if stored is not None:  # answered before a restart: no model needed
                self.buffer.ack(job_id, stored.entry_ids)
                return stored
            trainer = self._reload(job_id)
        return trainer.train_step(step, num_samples, background=background)

    def _reload(self, job_id: str) -> JobTrainer:
        """A job this process has not seen since a restart: its spec from Redis, resumed."""
        spec_json = self.store.get_spec(job_id)
        if spec_json is None:
            raise NotFound(f"job {job_id} was never initialised; call InitJob first")
        logger.info("resuming a job after a restart", extra={"job_id": job_id})
        self.init_job(job_id, JobSpec.model_validate_json(spec_json))
        return self.jobs[job_id]

    def open_weight_group(self, job_id: str, world_size: int,
                          backend: str = "") -> GroupAddress | None:  # fmt: skip
        check_job_id(job_id)
        trainer = self.jobs.get(job_id) or self._reload(job_id)
        return trainer.open_weight_group(world_size, backend)

    def status(self, job_id: str) -> tuple[int, int]:
        """(version, last_step) of a job this process holds."""
        check_job_id(job_id)
        trainer = self.jobs.get(job_id)
        if trainer is None:
            raise NotFound(f"job {job_id} is not loaded on this trainer")
        return trainer.version, trainer.last_step

    def close(self) -> None:
        for trainer in self.jobs.values():
            trainer.close()
        self.publisher.close()
        if self.mirror is not None:
            self.mirror.stop()
