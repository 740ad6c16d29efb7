"""A small client of the scheduler's gRPC API for the CLI, the demo and tests."""

from __future__ import annotations

import json
import os
from pathlib import Path

from google.protobuf.json_format import MessageToDict

from rlfleet.common.grpc_client import call, make_channel
from rlfleet.v1 import scheduler_pb2, scheduler_pb2_grpc

TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})


def resolve_scheduler_address(explicit: str | None, run_dir: Path) -> str:
    """--scheduler flag > RLFLEET_SCHEDULER > the fleet.json that `rlfleet up` wrote."""
    if explicit:
        return explicit
    if os.environ.get("RLFLEET_SCHEDULER"):
        return os.environ["RLFLEET_SCHEDULER"]
    fleet_file = run_dir / "fleet.json"
    if fleet_file.is_file():
        return json.loads(fleet_file.read_text())["scheduler"]
    raise SystemExit(
        "error: no scheduler address: start a fleet with `rlfleet up`, or pass --scheduler HOST:PORT"
    )


def job_to_dict(job: scheduler_pb2.Job) -> dict:
    return MessageToDict(
        job, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


class SchedulerClient:
    def __init__(self, address: str):
        self.channel = make_channel(address)
        self.stub = scheduler_pb2_grpc.SchedulerServiceStub(self.channel)

    def submit(self, spec: dict, *, idempotency_key: str = "") -> scheduler_pb2.Job:
        request = scheduler_pb2.SubmitJobRequest(
            spec_json=json.dumps(spec), idempotency_key=idempotency_key
        )
        return call(self.stub.SubmitJob, request)

    def get(self, job_id: str) -> scheduler_pb2.Job:
        return call(self.stub.GetJob, scheduler_pb2.GetJobRequest(job_id=job_id))

    def list(self, *, state: str = "", page_size: int = 50) -> list[scheduler_pb2.Job]:
        reply = call(
            self.stub.ListJobs, scheduler_pb2.ListJobsRequest(state=state, page_size=page_size)
        )
        return list(reply.jobs)

    def cancel(self, job_id: str) -> scheduler_pb2.Job:
        return call(self.stub.CancelJob, scheduler_pb2.CancelJobRequest(job_id=job_id))

    def steps(self, job_id: str, *, since_step: int = 0) -> list[scheduler_pb2.StepRecord]:
        reply = call(
            self.stub.GetSteps, scheduler_pb2.GetStepsRequest(job_id=job_id, since_step=since_step)
        )
        return list(reply.steps)

    def close(self) -> None:
        self.channel.close()
