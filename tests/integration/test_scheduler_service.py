"""The scheduler as a real process (``python -m rlfleet.scheduler``) over gRPC.

Its peers are the scripted servers of tests/unit/scheduler (real gRPC, scripted
behaviour), so the test can stop the trainer in the middle of a step, kill the
scheduler there (kill -9) and check that a new scheduler process resumes the job
from Redis.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from rlfleet.common.grpc_client import make_channel
from rlfleet.v1 import scheduler_pb2, scheduler_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit" / "scheduler"))

from scheduler_fakes import ScriptedFleet, write_tokenizer_model  # noqa: E402

pytestmark = pytest.mark.slow

# Calls to the scheduler process answer at once; the timeout only bounds a hang, and is
# generous because on a loaded 2-core machine an answer can take seconds.
RPC_S = 30


@pytest.fixture
def scripted(tmp_path):
    fleet = ScriptedFleet(write_tokenizer_model(tmp_path / "model"))
    yield fleet
    fleet.close()


def _start_scheduler(service_factory, redis_url: str, fleet: ScriptedFleet, name: str):
    return service_factory(
        name,
        "rlfleet.scheduler",
        [
            "--redis-url", redis_url,
            "--rollout-addresses", ",".join(fleet.replica_addresses),
            "--reward-address", fleet.reward_address,
            "--trainer-address", fleet.trainer_address,
            "--retry-deadline-s", "1",
            "--poll-interval-s", "0.1",
            "--log-format", "text",
        ],
    )  # fmt: skip


def _spec(fleet: ScriptedFleet, **top) -> str:
    return json.dumps(
        {
            "model": {"path": str(fleet.model_dir)},
            "task": {"name": "basic_arithmetic", "size": 50},
            "sampling": {"max_new_tokens": 8},
            "algorithm": {"group_size": 2, "prompts_per_step": 2},
            "steps": 3,
            **top,
        }
    )


def _wait_state(stub, job_id: str, states: set[str], timeout: float = 180.0):
    """Polls the job until it is in one of ``states``; the deadline only bounds a hang."""
    end = time.monotonic() + timeout
    while True:
        job = stub.GetJob(scheduler_pb2.GetJobRequest(job_id=job_id), timeout=RPC_S)
        if job.state in states:
            return job
        assert time.monotonic() < end, f"job stayed {job.state}"
        time.sleep(0.05)


def test_job_api_over_grpc(service_factory, redis_url, scripted):
    proc = _start_scheduler(service_factory, redis_url, scripted, "scheduler")
    with make_channel(proc.address) as channel:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)

        with pytest.raises(grpc.RpcError) as info:
            stub.SubmitJob(
                scheduler_pb2.SubmitJobRequest(
                    spec_json=_spec(scripted, algorithm={"group_size": 0})
                ),
                timeout=RPC_S,
            )
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "algorithm.group_size" in info.value.details()

        with pytest.raises(grpc.RpcError) as info:
            stub.GetJob(scheduler_pb2.GetJobRequest(job_id="job-missing"), timeout=RPC_S)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND

        request = scheduler_pb2.SubmitJobRequest(spec_json=_spec(scripted), idempotency_key="k")
        job = stub.SubmitJob(request, timeout=RPC_S)
        assert stub.SubmitJob(request, timeout=RPC_S).job_id == job.job_id
        assert job.total_steps == 3

        done = _wait_state(stub, job.job_id, {"succeeded", "failed"})
        assert done.state == "succeeded", done.reason
        assert done.current_step == 3 and done.policy_version == 3
        assert done.summary["reward_mean"] == 1.0

        steps = stub.GetSteps(scheduler_pb2.GetStepsRequest(job_id=job.job_id), timeout=RPC_S).steps
        assert [s.step for s in steps] == [0, 1, 2]
        later = stub.GetSteps(
            scheduler_pb2.GetStepsRequest(job_id=job.job_id, since_step=2), timeout=RPC_S
        ).steps
        assert [s.step for s in later] == [2]

        with pytest.raises(grpc.RpcError) as info:
            stub.CancelJob(scheduler_pb2.CancelJobRequest(job_id=job.job_id), timeout=RPC_S)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION

        second = stub.SubmitJob(
            scheduler_pb2.SubmitJobRequest(spec_json=_spec(scripted, steps=1)), timeout=RPC_S
        )
        _wait_state(stub, second.job_id, {"succeeded"})
        page = stub.ListJobs(scheduler_pb2.ListJobsRequest(page_size=1), timeout=RPC_S)
        assert [j.job_id for j in page.jobs] == [second.job_id] and page.next_page_token
        rest = stub.ListJobs(
            scheduler_pb2.ListJobsRequest(page_size=1, page_token=page.next_page_token),
            timeout=RPC_S,
        )
        assert [j.job_id for j in rest.jobs] == [job.job_id] and not rest.next_page_token
        failed = stub.ListJobs(scheduler_pb2.ListJobsRequest(state="failed"), timeout=RPC_S)
        assert list(failed.jobs) == []
        with pytest.raises(grpc.RpcError) as info:
            stub.ListJobs(scheduler_pb2.ListJobsRequest(state="paused"), timeout=RPC_S)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    metrics_url = f"http://127.0.0.1:{proc.info['metrics_port']}/metrics"
    text = urllib.request.urlopen(metrics_url, timeout=RPC_S).read().decode()
    assert "rlfleet_scheduler_steps_completed_total 4.0" in text
    assert 'rlfleet_scheduler_jobs{state="succeeded"} 2.0' in text
    assert "rlfleet_scheduler_replicas_healthy 2.0" in text
    assert 'rlfleet_scheduler_step_phase_seconds_count{phase="train"} 4.0' in text
    assert "rlfleet_scheduler_tokens_generated_total" in text


def test_killed_scheduler_resumes_the_running_job(service_factory, redis_url, scripted):
    scripted.trainer.block_at_step = 1
    first = _start_scheduler(service_factory, redis_url, scripted, "scheduler-1")
    with make_channel(first.address) as channel:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        job = stub.SubmitJob(
            scheduler_pb2.SubmitJobRequest(spec_json=_spec(scripted)), timeout=RPC_S
        )
    assert scripted.trainer.at_block.wait(180), "the job never reached TrainStep(1)"
    first.kill()  # kill -9 in the middle of step 1
    scripted.trainer.block_at_step = None
    scripted.trainer.release.set()

    second = _start_scheduler(service_factory, redis_url, scripted, "scheduler-2")
    with make_channel(second.address) as channel:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        done = _wait_state(stub, job.job_id, {"succeeded", "failed"})
        assert done.state == "succeeded", done.reason
        steps = stub.GetSteps(scheduler_pb2.GetStepsRequest(job_id=job.job_id), timeout=RPC_S).steps
    assert [s.step for s in steps] == [0, 1, 2]
    assert scripted.trainer.inits == [job.job_id, job.job_id]
    trained = [step for _, step, _ in scripted.trainer.steps]
    assert trained.count(0) == 1 and trained[-1] == 2
    # Step 1 was redone with the same prompts, so the same sample ids.
    step1 = [
        sorted(s.sample_id for s in req.samples if s.step == 1)
        for req in scripted.reward.requests
        if any(s.step == 1 for s in req.samples)
    ]
    assert len(step1) >= 2 and all(ids == step1[0] for ids in step1)
