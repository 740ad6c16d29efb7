"""gRPC adapter of ``SchedulerCore`` (rlfleet.v1.SchedulerService)."""

from __future__ import annotations

from rlfleet.scheduler.core import SchedulerCore
from rlfleet.scheduler.jobs import Job, StepRecord
from rlfleet.v1 import scheduler_pb2, scheduler_pb2_grpc


def job_to_proto(job: Job) -> scheduler_pb2.Job:
    return scheduler_pb2.Job(
        job_id=job.job_id,
        state=job.state.value,
        reason=job.reason,
        current_step=job.current_step,
        total_steps=job.total_steps,
        policy_version=job.policy_version,
        spec_json=job.spec_json,
        created_at=job.created_at,
        updated_at=job.updated_at,
        summary=job.summary,
    )


def step_to_proto(record: StepRecord) -> scheduler_pb2.StepRecord:
    return scheduler_pb2.StepRecord(
        step=record.step, metrics=record.metrics, finished_at=record.finished_at
    )


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServiceServicer):
    def __init__(self, core: SchedulerCore):
        self.core = core

    def SubmitJob(self, request, context):  # noqa: N802 - gRPC method names
        job = self.core.submit(request.spec_json, idempotency_key=request.idempotency_key)
        return job_to_proto(job)

    def GetJob(self, request, context):  # noqa: N802
        return job_to_proto(self.core.get(request.job_id))

    def ListJobs(self, request, context):  # noqa: N802
        jobs, token = self.core.list(
            state=request.state, page_size=request.page_size, page_token=request.page_token
        )
        return scheduler_pb2.ListJobsResponse(
            jobs=[job_to_proto(j) for j in jobs], next_page_token=token
        )

    def CancelJob(self, request, context):  # noqa: N802
        return job_to_proto(self.core.cancel(request.job_id))

    def GetSteps(self, request, context):  # noqa: N802
        records = self.core.steps(request.job_id, since_step=request.since_step)
        return scheduler_pb2.GetStepsResponse(steps=[step_to_proto(r) for r in records])
