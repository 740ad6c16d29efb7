"""Unary calls from the step loop to the reward and trainer services.

Each call goes through ``grpc_client.call`` (retries only retryable codes); an
error that survives the retries is re-raised with the service and the call in
its message, because that message becomes the failed job's ``reason``.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlfleet.common.errors import FailedPrecondition, RlfleetError
from rlfleet.common.grpc_client import call, make_channel
from rlfleet.v1 import (
    common_pb2,
    env_pb2_grpc,
    reward_pb2,
    reward_pb2_grpc,
    trainer_pb2,
    trainer_pb2_grpc,
)


@dataclass(frozen=True)
class Timeouts:
    """Per-attempt timeouts (s) of each call, and the overall retry deadline."""

    init: float = 1800.0
    score: float = 600.0
    train: float = 3600.0
    retry_deadline: float = 120.0


def _described(service: str, what: str, exc: RlfleetError) -> RlfleetError:
    return type(exc)(f"{service}: {what} failed: {exc.message}")


class ServiceClients:
    def __init__(
        self,
        *,
        reward_address: str,
        trainer_address: str,
        timeouts: Timeouts | None = None,
        max_message_mb: int = 256,
        env_address: str = "",
    ):
        self.timeouts = timeouts or Timeouts()
        self.reward_address = reward_address
        self.trainer_address = trainer_address
        self.env_address = env_address
        self._env_channel = (
            make_channel(env_address, max_message_mb=max_message_mb) if env_address else None
        )
        self.env = env_pb2_grpc.EnvServiceStub(self._env_channel) if self._env_channel else None
        self._reward_channel = make_channel(reward_address, max_message_mb=max_message_mb)
        self._trainer_channel = make_channel(trainer_address, max_message_mb=max_message_mb)
        self.reward = reward_pb2_grpc.RewardServiceStub(self._reward_channel)
        self.trainer = trainer_pb2_grpc.TrainerServiceStub(self._trainer_channel)

    def _call(self, service: str, what: str, method, request, *, timeout: float):
        try:
            return call(
                method,
                request,
                timeout=timeout,
                deadline=max(self.timeouts.retry_deadline, 1.0),
            )
        except RlfleetError as exc:
            raise _described(service, what, exc) from None

    def init_job(self, job_id: str, spec_json: str) -> trainer_pb2.InitJobResponse:
        return self._call(
            "trainer",
            "InitJob",
            self.trainer.InitJob,
            trainer_pb2.InitJobRequest(job_id=job_id, spec_json=spec_json),
            timeout=self.timeouts.init,
        )

    def train_step(
        self, job_id: str, step: int, num_samples: int, *, background: bool = False
    ) -> trainer_pb2.TrainStepResponse:
        # Safe to retry: TrainStep is idempotent per (job, step).
        return self._call(
            "trainer",
            f"TrainStep(step={step})",
            self.trainer.TrainStep,
            trainer_pb2.TrainStepRequest(
                job_id=job_id, step=step, num_samples=num_samples, publish_in_background=background
            ),  # fmt: skip
            timeout=self.timeouts.train,
        )

    def open_weight_group(self, job_id: str, world_size: int,
                          backend: str = "") -> common_pb2.WeightGroupAddress:  # fmt: skip
        return self._call(
            "trainer",
            "OpenWeightGroup",
            self.trainer.OpenWeightGroup,
            trainer_pb2.OpenWeightGroupRequest(
                job_id=job_id, world_size=world_size, backend=backend
            ),
            timeout=self.timeouts.init,
        )

    def score(
        self,
        job_id: str,
        samples: list[common_pb2.Sample],
        *,
        verifier: str,
        verifier_config_json: str,
        write_to_buffer: bool = True,
    ) -> reward_pb2.ScoreResponse:
        # Safe to retry: the buffer writes each sample_id at most once.
        return self._call(
            "reward",
            f"Score({len(samples)} samples)",
            self.reward.Score,
            reward_pb2.ScoreRequest(
                job_id=job_id,
                verifier=verifier,
                verifier_config_json=verifier_config_json,
                samples=samples,
                write_to_buffer=write_to_buffer,
            ),
            timeout=self.timeouts.score,
        )

    def write(self, job_id: str, samples: list[common_pb2.Sample]) -> reward_pb2.WriteResponse:
        # Safe to retry: the buffer writes each sample_id at most once.
        return self._call(
            "reward",
            f"Write({len(samples)} samples)",
            self.reward.Write,
            reward_pb2.WriteRequest(job_id=job_id, samples=samples),
            timeout=self.timeouts.score,
        )

    def close(self) -> None:
        self._reward_channel.close()
        self._trainer_channel.close()
        if self._env_channel is not None:
            self._env_channel.close()

    def env_call(self, what: str, method: str, request, *, timeout: float):
        """A call to the environment service (Reset, Step, Close: each safe to repeat)."""
        if self.env is None:
            raise FailedPrecondition(
                "this job has a task.environment but the scheduler has no --env-address"
            )
        return self._call("env", what, getattr(self.env, method), request, timeout=timeout)
