"""The scheduler driving the real fleet: weight-sync, reward, trainer and two
rollout replicas, each its own process, with a real Redis and the tiny model.

A 2-step job must succeed with rewards recorded per step, leave nothing in the
experience buffer (every sample trained and acknowledged), and end with every
replica holding the final policy version.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from rlfleet.common.buffer import RedisStreamBuffer
from rlfleet.common.grpc_client import make_channel
from rlfleet.v1 import scheduler_pb2, scheduler_pb2_grpc, weightsync_pb2, weightsync_pb2_grpc

pytestmark = pytest.mark.slow

# Two cores are shared by everything here: one torch thread per process.
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture
def real_fleet(service_factory, redis_url, tmp_path):
    common = ["--redis-url", redis_url, "--log-format", "text"]

    def start(name: str, module: str, args: list[str]):
        return service_factory(name, module, common + args, env=ENV)

    # Independent services start side by side: most of the time is imports.
    with ThreadPoolExecutor(max_workers=4) as pool:
        ws_future = pool.submit(start, "weightsync", "rlfleet.weightsync", [])
        reward_future = pool.submit(start, "reward", "rlfleet.reward", [])
        ws = ws_future.result()
        trainer_future = pool.submit(
            start,
            "trainer",
            "rlfleet.trainer",
            [
                "--weightsync-address", ws.address,
                "--checkpoint-dir", str(tmp_path / "checkpoints"),
                "--torch-threads", "1",
                "--device", "cpu",
            ],
        )  # fmt: skip
        rollout_futures = [
            pool.submit(
                start,
                f"rollout-{i}",
                "rlfleet.rollout",
                [
                    "--replica-id",
                    f"rollout-{i}",
                    "--weightsync-address",
                    ws.address,
                    "--torch-threads",
                    "1",
                    "--device",
                    "cpu",
                ],
            )  # fmt: skip
            for i in range(2)
        ]
        reward, trainer = reward_future.result(), trainer_future.result()
        rollouts = [f.result() for f in rollout_futures]
    scheduler = start(
        "scheduler",
        "rlfleet.scheduler",
        [
            "--rollout-addresses", ",".join(r.address for r in rollouts),
            "--reward-address", reward.address,
            "--trainer-address", trainer.address,
            "--weightsync-address", ws.address,
            "--poll-interval-s", "0.2",
        ],
    )  # fmt: skip
    return {"scheduler": scheduler, "weightsync": ws, "rollouts": rollouts}


def test_two_step_job_on_the_real_fleet(real_fleet, redis_url, tiny_model_dir):
    spec = {
        "name": "fleet",
        "model": {"path": str(tiny_model_dir)},
        "task": {
            "name": "basic_arithmetic",
            "params": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
        },
        "sampling": {"temperature": 1.0, "max_new_tokens": 8},
        "algorithm": {"group_size": 2, "prompts_per_step": 2, "lr": 1e-4},
        "steps": 2,
    }
    with make_channel(real_fleet["scheduler"].address) as channel:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        job = stub.SubmitJob(scheduler_pb2.SubmitJobRequest(spec_json=json.dumps(spec)), timeout=30)
        end = time.monotonic() + 400
        while job.state not in ("succeeded", "failed", "cancelled"):
            assert time.monotonic() < end, f"job still {job.state} at step {job.current_step}"
            time.sleep(0.5)
            job = stub.GetJob(scheduler_pb2.GetJobRequest(job_id=job.job_id), timeout=10)
        assert job.state == "succeeded", job.reason
        assert job.current_step == 2 and job.policy_version == 2
        steps = stub.GetSteps(scheduler_pb2.GetStepsRequest(job_id=job.job_id), timeout=10).steps

    assert [s.step for s in steps] == [0, 1]
    for record in steps:
        m = record.metrics
        assert 0.0 <= m["reward_mean"] <= 1.0
        assert m["samples"] == 4 and m["samples_trained"] == 4
        assert m["policy_version"] == record.step + 1
        assert 0 < m["response_length_mean"] <= 8
        assert m["tokens_generated"] > 0

    buffer = RedisStreamBuffer.from_url(redis_url)
    assert buffer.length(job.job_id) == 0  # every sample trained and acknowledged
    assert buffer.pending(job.job_id) == 0

    with make_channel(real_fleet["weightsync"].address) as channel:
        ws = weightsync_pb2_grpc.WeightSyncServiceStub(channel)
        held = ws.ListReplicas(weightsync_pb2.ListReplicasRequest(job_id=job.job_id), timeout=10)
    versions = {r.replica_id: r.version for r in held.replicas}
    assert versions == {"rollout-0": 2, "rollout-1": 2}
