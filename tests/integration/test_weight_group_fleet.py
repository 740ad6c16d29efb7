"""Versions broadcast over a job's weight group (``weights.transport = "collective"``),
through the real fleet: weight-sync, reward, a trainer of 2 FSDP2 ranks, 2 torch
replicas and 1 vLLM replica (from .venv-vllm), each its own process, gloo on loopback.

- After every step each replica loaded the new version from the group, not from
  weight-sync (``replicas_via_weight_group``), and holds it (weight-sync's books).
- The weights the replicas serve are the trainer's: the log-probs each replica recorded
  while sampling equal the trainer's at θ_old (float32 on both sides), a check a stale
  or half-loaded version fails by orders of magnitude.
- A replica that joins late (stopped until step 2) catches up from weight-sync, then the
  scheduler forms a new group with it and it receives the next versions by broadcast.
- While the group reaches every replica in use, weight-sync receives the versions in the
  background (``weights_published_in_background``).
"""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from rlfleet.cli.fleet import vllm_python
from rlfleet.common.grpc_client import make_channel
from rlfleet.v1 import scheduler_pb2, scheduler_pb2_grpc, weightsync_pb2, weightsync_pb2_grpc

pytestmark = pytest.mark.slow

ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "RLFLEET_ROLLOUT_KV_CACHE_GIB": "0.0625", "VLLM_LOGGING_LEVEL": "WARNING"}  # fmt: skip
STEPS = 6


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from rlfleet.common.tinymodel import build_tiny_model

    # vLLM's CPU attention takes head sizes from 32 up: 2 heads of 32.
    return build_tiny_model(tmp_path_factory.mktemp("tiny-group"), num_heads=2, seed=0)


def test_versions_reach_torch_and_vllm_replicas_over_the_weight_group(
    service_factory, redis_url, tmp_path, model_dir, request
):
    try:
        python = vllm_python()  # None: this interpreter has vLLM itself
    except RuntimeError as exc:
        pytest.skip(f"no vLLM to run the vLLM replica with: {exc}")
    common = ["--redis-url", redis_url, "--log-format", "text"]

    def start(name, module, args, **kw):
        return service_factory(name, module, common + args, env=ENV, ready_timeout=300, **kw)

    def rollout(i: int, ws, **kw):
        return start(f"rollout-{i}", "rlfleet.rollout",
                     ["--replica-id", f"rollout-{i}", "--weightsync-address", ws.address,
                      "--torch-threads", "1", "--device", "cpu", *kw.pop("args", [])], **kw)  # fmt: skip

    ws = start("weightsync", "rlfleet.weightsync", [])
    with ThreadPoolExecutor(max_workers=5) as pool:
        reward = pool.submit(start, "reward", "rlfleet.reward", [])
        trainer = pool.submit(start, "trainer", "rlfleet.trainer",
                              ["--weightsync-address", ws.address, "--ranks", "2",
                               "--checkpoint-dir", str(tmp_path / "ckpt"), "--device", "cpu"])  # fmt: skip
        torch_replicas = [pool.submit(rollout, i, ws) for i in range(2)]
        vllm_replica = pool.submit(rollout, 2, ws, args=["--engine", "vllm"], python=python)
        reward, trainer = reward.result(), trainer.result()
        replicas = [f.result() for f in torch_replicas] + [vllm_replica.result()]
    # The late joiner: listed from the start but stopped (SIGSTOP) until step 2, so the
    # scheduler finds it unanswering, then up mid-job.
    late = rollout(3, ws)
    os.kill(late.pid, signal.SIGSTOP)
    request.addfinalizer(lambda: os.kill(late.pid, signal.SIGCONT))  # so it can be stopped
    scheduler = start("scheduler", "rlfleet.scheduler", [
        "--rollout-addresses", ",".join(r.address for r in [*replicas, late]),
        "--reward-address", reward.address, "--trainer-address", trainer.address,
        "--weightsync-address", ws.address, "--poll-interval-s", "0.2"])  # fmt: skip

    spec = {
        "name": "weight-group",
        "model": {"path": str(model_dir)},
        "task": {"name": "basic_arithmetic",
                 "params": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}},
        "sampling": {"temperature": 1.0, "max_new_tokens": 6},
        "algorithm": {"group_size": 2, "prompts_per_step": 3, "lr": 1e-3},
        "weights": {"transport": "collective", "group_timeout_s": 60},
        "steps": STEPS,
    }  # fmt: skip
    resumed = False
    with make_channel(scheduler.address) as channel:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        job = stub.SubmitJob(scheduler_pb2.SubmitJobRequest(spec_json=json.dumps(spec)), timeout=30)
        end = time.monotonic() + 900
        while job.state not in ("succeeded", "failed", "cancelled"):
            assert time.monotonic() < end, f"job still {job.state} at step {job.current_step}"
            if not resumed and job.current_step >= 2:  # two steps with three replicas
                os.kill(late.pid, signal.SIGCONT)
                resumed = True
            time.sleep(0.5)
            job = stub.GetJob(scheduler_pb2.GetJobRequest(job_id=job.job_id), timeout=10)
        assert job.state == "succeeded", job.reason
        steps = stub.GetSteps(scheduler_pb2.GetStepsRequest(job_id=job.job_id), timeout=10).steps

    assert [s.step for s in steps] == list(range(STEPS))
    for record in steps:
        m = record.metrics
        assert m["weights_broadcast"] == 1.0, (record.step, dict(m))
        # float32 everywhere: what the replicas sampled with is the trainer's θ_old.
        assert abs(m["train_infer_kl_k1"]) < 1e-3 and m["max_abs_dp"] < 1e-2, dict(m)
    # The group reached every replica the scheduler used: weight-sync got those versions
    # in the background, off the steps' path (docs/WEIGHTS.md).
    assert sum(r.metrics.get("weights_published_in_background", 0.0) for r in steps) >= 1
    # Steps 0-1: the three first replicas got each version by broadcast.
    assert [steps[i].metrics["replicas_via_weight_group"] for i in (0, 1)] == [3.0, 3.0]
    # The late joiner caught up from weight-sync, then joined a new group: the last step's
    # version reached all four by broadcast.
    assert steps[-1].metrics["replicas_via_weight_group"] == 4.0
    with make_channel(ws.address) as channel:
        held = weightsync_pb2_grpc.WeightSyncServiceStub(channel).ListReplicas(
            weightsync_pb2.ListReplicasRequest(job_id=job.job_id), timeout=10).replicas  # fmt: skip
    assert {r.replica_id: r.version for r in held} == {f"rollout-{i}": STEPS for i in range(4)}
