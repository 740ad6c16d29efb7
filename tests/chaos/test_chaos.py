"""A job on the real local fleet survives kill -9 of every service type and a Redis
crash, with exact accounting (see chaos_driver.py); a rollout replica killed in
the middle of generating, or hung (SIGSTOP), has its sequences handed to the
other replica, and a replica that comes back pulls the current policy version.

``make test`` runs one round (each service type killed once). ``make chaos``
sets RLFLEET_CHAOS_ROUNDS (default there: 3) for a longer run and prints the
kills per service and the final books (run pytest with -s to see them).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import redis
from rlfleet.cli.fleet import Fleet, FleetOptions
from rlfleet.common.grpc_client import call, make_channel
from rlfleet.v1 import rollout_pb2, rollout_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))

from chaos_driver import (  # noqa: E402
    PASSWORD,
    SERVICE_TYPES,
    STEPS_PER_ROLLOUT_RESTART,
    ChaosDriver,
    account,
    read_job,
    wait_until,
)

pytestmark = pytest.mark.slow

ROUNDS = int(os.environ.get("RLFLEET_CHAOS_ROUNDS", "1"))


def _spec(model_dir: Path, steps: int) -> str:
    return json.dumps(
        {
            "model": {"path": str(model_dir)},
            "task": {"name": "basic_arithmetic", "size": 1000},
            "sampling": {"max_new_tokens": 16},
            "algorithm": {"group_size": 2, "prompts_per_step": 4},
            # every step checkpoints: a restarted trainer resumes weights and AdamW state
            "checkpoint": {"every_steps": 1, "keep": 2},
            "steps": steps,
        }
    )


def test_job_survives_kill_9_of_every_service(fleet, tiny_model_dir):
    # Room for the steps the job runs between two kills: on an idle machine a step of this
    # tiny job takes ~0.2 s and about 7 pass per kill (restart, then a step completed,
    # then a random moment), so 10 per kill leaves margin; plus room to run ahead while a
    # killed rollout replica restarts (all but the last round's).
    steps = ROUNDS * len(SERVICE_TYPES) * 10 + (ROUNDS - 1) * STEPS_PER_ROLLOUT_RESTART + 6
    client = redis.Redis(port=fleet.redis.port, password=PASSWORD)
    with make_channel(fleet.scheduler_address) as channel:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        job = stub.SubmitJob(
            scheduler_pb2.SubmitJobRequest(spec_json=_spec(tiny_model_dir, steps)), timeout=30
        )
    driver = ChaosDriver(fleet, client, job.job_id, rounds=ROUNDS, seed=ROUNDS).start()
    deadline = time.monotonic() + 240 * ROUNDS + 120
    try:
        while read_job(client, job.job_id)["state"] in ("queued", "running"):
            assert time.monotonic() < deadline, "the job did not finish in time"
            assert driver.error is None, f"the chaos driver failed: {driver.error!r}"
            time.sleep(0.5)
    finally:
        driver.stop()
    books = account(client, job.job_id)
    print(f"\nchaos: {ROUNDS} round(s); kills per service: {dict(driver.kills)}")
    for line in driver.log:
        print("  " + line)
    for line in books.lines():
        print("  " + line)
    assert driver.error is None, repr(driver.error)
    assert books.problems == [], "\n".join(books.lines())
    assert sum(driver.kills.values()) == ROUNDS * len(SERVICE_TYPES), driver.log

    # No service wrote the Redis password into its log.
    for name, proc in fleet.procs.items():
        assert PASSWORD not in proc.log_path.read_text(errors="replace"), name
    client.close()


def _status(proc) -> rollout_pb2.RolloutStatus:
    with make_channel(proc.address) as channel:
        return call(
            rollout_pb2_grpc.RolloutServiceStub(channel).GetStatus,
            rollout_pb2.RolloutStatusRequest(),
            timeout=10,
        )


def test_dead_and_hung_replicas_hand_over_and_rejoin(fleet, tiny_model_dir):
    client = redis.Redis(port=fleet.redis.port, password=PASSWORD)
    # Long enough to outlast a replica restart and a hang; cancelled at the end.
    spec = json.loads(_spec(tiny_model_dir, 500))
    spec["sampling"]["max_new_tokens"] = 48
    with make_channel(fleet.scheduler_address) as channel:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        job = stub.SubmitJob(scheduler_pb2.SubmitJobRequest(spec_json=json.dumps(spec)), timeout=30)
    job_id = job.job_id
    step = lambda: read_job(client, job_id)["current_step"]  # noqa: E731
    try:
        wait_until("the job has run a step", lambda: step() >= 1)
        # kill -9 rollout-0 while it is generating
        r0 = fleet.procs["rollout-0"]
        wait_until("rollout-0 is generating", lambda: _status(r0).running_sequences > 0, poll=0.01)
        r0.kill()
        killed_at = step()
        wait_until("the job moves on without rollout-0", lambda: step() >= killed_at + 2)
        # it comes back on its port and is brought up to the current version
        r0 = fleet.restart("rollout-0")
        wait_until(
            "the restarted rollout-0 holds the job's current version",
            lambda: (
                (s := _status(r0)).job_id == job_id
                and s.version == read_job(client, job_id)["policy_version"]
                and s.version > killed_at
            ),
        )
        # rollout-1 hangs (SIGSTOP keeps its sockets open: only a heartbeat sees it)
        r1 = fleet.procs["rollout-1"]
        wait_until("rollout-1 is generating", lambda: _status(r1).running_sequences > 0, poll=0.01)
        os.kill(r1.pid, signal.SIGSTOP)
        try:
            hung_at = step()
            wait_until("the job moves on without rollout-1", lambda: step() >= hung_at + 2)
        finally:
            os.kill(r1.pid, signal.SIGCONT)
        log = fleet.procs["scheduler"].log_path.read_text()
        assert "dropping rollout replica rollout-0" in log
        assert "rollout-1@" in log and "is hung" in log
        assert read_job(client, job_id)["state"] == "running"
    finally:
        with make_channel(fleet.scheduler_address) as channel:
            scheduler_pb2_grpc.SchedulerServiceStub(channel).CancelJob(
                scheduler_pb2.CancelJobRequest(job_id=job_id), timeout=30
            )
        client.close()


def _worker_ranks(trainer_pid: int) -> list[int]:
    """The trainer's worker ranks: the processes it started (Linux /proc)."""
    children = Path(f"/proc/{trainer_pid}/task/{trainer_pid}/children")
    return [int(pid) for pid in children.read_text().split()] if children.exists() else []


def test_kill_9_of_one_trainer_rank_mid_step_the_job_resumes_with_exact_books(
    tmp_path, tiny_model_dir
):
    """Two trainer ranks (FSDP2 over gloo): rank 1 is killed while the step's samples are
    read and unacknowledged. Rank 0's next collective fails, it exits (the process group
    cannot be mended), it is restarted (here by the test, as `rlfleet up` or Kubernetes
    would), joins two fresh ranks and resumes; the books stay exact."""
    from chaos_driver import ChaosDriver

    fleet = Fleet(FleetOptions(run_dir=tmp_path / "run", rollout_replicas=1, trainer_ranks=2,
                               extra_env={"MKL_NUM_THREADS": "1"}, redis_password=PASSWORD))  # fmt: skip
    fleet.start()
    try:
        client = redis.Redis(port=fleet.redis.port, password=PASSWORD)
        with make_channel(fleet.scheduler_address) as channel:
            stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
            job = stub.SubmitJob(
                scheduler_pb2.SubmitJobRequest(spec_json=_spec(tiny_model_dir, 12)), timeout=30
            )
        step = lambda: read_job(client, job.job_id)["current_step"]  # noqa: E731
        wait_until("the job has run two steps", lambda: step() >= 2)
        trainer = fleet.procs["trainer"]
        [worker] = wait_until("the trainer's worker rank", lambda: _worker_ranks(trainer.pid))
        # mid-step: the trainer has read the step's samples and not acknowledged them
        ChaosDriver(fleet, client, job.job_id)._wait_for_work("trainer", "trainer")
        killed_at = step()
        os.kill(worker, signal.SIGKILL)
        wait_until(
            "rank 0 leaves once its group is broken", lambda: not trainer.alive(), timeout=60
        )
        assert "a trainer rank is gone" in trainer.log_path.read_text(errors="replace")
        fleet.restart("trainer")
        wait_until("the job finishes", lambda: read_job(client, job.job_id)["state"] != "running",
              timeout=300)  # fmt: skip
        assert read_job(client, job.job_id)["state"] == "succeeded"
        assert killed_at < 12
        books = account(client, job.job_id)
        assert books.problems == [], "\n".join(books.lines())
        client.close()
    finally:
        fleet.stop()


CHAT_TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)


def test_kill_9_of_the_env_service_and_the_scheduler_mid_episode(fleet, tiny_model_dir, tmp_path):
    """A C3PO++ job of multi-turn `retry` episodes, carried over between steps: kill -9 of
    the env service while its episodes are half played (it comes back on its port, with
    no episodes), then of the scheduler (it resumes from the pool saved at the last step,
    which the env service may be past). The lost episodes are started again from their
    prompts (the scheduler logs each), the job succeeds, and the books are exact: every
    sample written once, in a whole group, and trained in exactly one step."""
    model = tmp_path / "chat-model"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(
        json.dumps({**config, "chat_template": CHAT_TEMPLATE})
    )
    spec = {
        "model": {"path": str(model)},
        "task": {"name": "basic_arithmetic", "size": 1000,
                 "environment": {"name": "retry", "max_turns": 3,
                                 "options": {"max_turns": 3, "feedback": "No; again."}}},
        "sampling": {"max_new_tokens": 8},
        "algorithm": {"group_size": 2, "prompts_per_step": 4},
        # A budget below a step's work: every step leaves episodes carried over in P.
        "scheduling": {"mode": "c3po", "token_budget": 24, "pool_capacity": 8,
                       "retention_limit": 6},
        "steps": 24,
    }  # fmt: skip
    client = redis.Redis(port=fleet.redis.port, password=PASSWORD)
    scheduler_log = fleet.procs["scheduler"].log_path
    with make_channel(fleet.scheduler_address) as channel:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        job = stub.SubmitJob(scheduler_pb2.SubmitJobRequest(spec_json=json.dumps(spec)), timeout=30)
    step = lambda: read_job(client, job.job_id)["current_step"]  # noqa: E731
    try:
        wait_until("the job has run two steps", lambda: step() >= 2)
        fleet.procs["env"].kill()
        killed_env_at = step()
        time.sleep(0.5)  # Step calls fail (UNAVAILABLE, retried) while it is down
        fleet.restart("env")
        wait_until("the job moves on", lambda: step() >= killed_env_at + 3, timeout=180)
        fleet.procs["scheduler"].kill()
        killed_scheduler_at = step()
        fleet.restart("scheduler")
        wait_until("the job finishes", lambda: read_job(client, job.job_id)["state"] != "running",
              timeout=300)  # fmt: skip
    finally:
        if read_job(client, job.job_id)["state"] == "running":
            with make_channel(fleet.scheduler_address) as channel:
                scheduler_pb2_grpc.SchedulerServiceStub(channel).CancelJob(
                    scheduler_pb2.CancelJobRequest(job_id=job.job_id), timeout=30
                )
    books = account(client, job.job_id)
    print(f"\nenv killed in step {killed_env_at}, scheduler in step {killed_scheduler_at}")
    for line in books.lines():
        print("  " + line)
    assert books.problems == [], "\n".join(books.lines())
    log = scheduler_log.read_text(errors="replace")
    assert "started again from its prompt" in log, "no episode was started again"
    records = [json.loads(r) for r in client.lrange(f"rlfleet:job:{job.job_id}:steps", 0, -1)]
    assert sum(r["metrics"].get("env_episodes_restarted", 0) for r in records) > 0
    client.close()
