"""End to end, as a user runs it: `rlfleet up` starts every service as its own
process, `rlfleet submit` sends a job over the REST API, `rlfleet logs -f`
follows its event stream to the end, `rlfleet cancel` stops a second one.
Then the accounting: rewards computed, every experience consumed and
acknowledged, every rollout replica at each new policy version.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from rlfleet.common.grpc_client import make_channel
from rlfleet.v1 import weightsync_pb2, weightsync_pb2_grpc
from rlfleet_client import RlfleetClient
from rlfleet_client.errors import ApiError

pytestmark = pytest.mark.slow

RLFLEET = [sys.executable, "-m", "rlfleet.cli.main"]


def _job_spec(model_dir, steps: int) -> dict:
    return {
        "name": "e2e",
        "model": {"path": str(model_dir)},
        "task": {
            "name": "basic_arithmetic",
            "params": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
        },
        "sampling": {"temperature": 1.0, "max_new_tokens": 6},
        "algorithm": {"group_size": 2, "prompts_per_step": 3, "lr": 1e-4},
        "steps": steps,
    }


def test_job_runs_through_the_whole_fleet(fleet, tiny_model_dir, tmp_path):
    run_dir, info = fleet
    steps = 3
    spec_file = tmp_path / "job.json"
    spec_file.write_text(json.dumps(_job_spec(tiny_model_dir, steps)))
    env = {**os.environ, "COLUMNS": "200"}
    out = subprocess.run(
        [*RLFLEET, "--run-dir", str(run_dir), "submit", str(spec_file)],
        capture_output=True, text=True, check=True, env=env,
    ).stdout  # fmt: skip
    job_id = out.split("submitted job ", 1)[1].split()[0]

    follow = subprocess.run(
        [*RLFLEET, "--run-dir", str(run_dir), "logs", "-f", job_id],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert follow.returncode == 0, follow.stdout + follow.stderr
    assert "succeeded" in follow.stdout and f"{steps}/{steps}" in follow.stdout

    client = RlfleetClient(info["url"])
    job = client.get_job(job_id)
    assert job.state == "succeeded", job.reason
    records = client.steps(job_id)
    assert [r.step for r in records] == list(range(steps))
    for rec in records:
        assert "reward_mean" in rec.metrics
        assert 0.0 <= rec.metrics["reward_mean"] <= 1.0
    assert job.policy_version == steps
    # The last step is always checkpointed, in Hugging Face format.
    [ckpt] = client.checkpoints(job_id)
    assert ckpt.step == steps - 1 and (Path(ckpt.path) / "config.json").is_file()

    # Every experience was consumed and acknowledged.
    r = redis.Redis.from_url(info["redis_url"])
    assert r.xlen(f"rlfleet:exp:{job_id}") == 0
    assert r.xpending(f"rlfleet:exp:{job_id}", "trainer")["pending"] == 0
    assert r.scard(f"rlfleet:exp:{job_id}:ids") == steps * 3 * 2

    # Every rollout replica holds the final policy version.
    with make_channel(info["services"]["weightsync"]) as channel:
        stub = weightsync_pb2_grpc.WeightSyncServiceStub(channel)
        replicas = stub.ListReplicas(
            weightsync_pb2.ListReplicasRequest(job_id=job_id), timeout=10
        ).replicas
    held = {rep.replica_id: rep.version for rep in replicas}
    assert held == {"rollout-0": steps, "rollout-1": steps}

    # A second job, cancelled from the CLI while queued or running.
    second = client.submit(_job_spec(tiny_model_dir, 50))
    cancel = subprocess.run(
        [*RLFLEET, "--run-dir", str(run_dir), "cancel", second.id],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert cancel.returncode == 0 and "cancelled" in cancel.stdout, cancel.stderr
    listing = subprocess.run(
        [*RLFLEET, "--run-dir", str(run_dir), "jobs"],
        capture_output=True, text=True, check=True, env=env,
    ).stdout  # fmt: skip
    assert job_id in listing and second.id in listing

    # A job whose prompts come from the user's own JSONL file (task.kind = "dataset"),
    # scored by math-verify against the mapped answer column.
    rows = tmp_path / "arith.jsonl"
    rows.write_text("".join(
        json.dumps({"problem": f"{a} + {b} =", "gold": str(a + b), "source": "mine"}) + "\n"
        for a in range(5) for b in range(5)
    ))  # fmt: skip
    dataset_job = {**_job_spec(tiny_model_dir, 2), "reward": {"verifier": "math"},
                   "task": {"kind": "dataset", "dataset": {
                       "path": str(rows), "prompt_column": "problem", "answer_column": "gold"}}}  # fmt: skip
    third = client.wait(client.submit(dataset_job).id, timeout=600)
    assert third.state == "succeeded", third.reason
    assert [r.step for r in client.steps(third.id)] == [0, 1]
    dataset_job["task"]["dataset"]["answer_column"] = "answer"
    with pytest.raises(ApiError) as refused:  # a column the file lacks: 422, named
        client.submit(dataset_job)
    assert refused.value.status_code == 422
    assert "task.dataset.answer_column 'answer' is not a column of" in refused.value.message
    client.close()
