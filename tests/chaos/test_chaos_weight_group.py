"""A collective job (``weights.transport = "collective"``) on a real local fleet survives
kill -9 of a member of its weight group in the middle of a broadcast (issue #16):

1. a rollout replica is killed while the trainer broadcasts a version to the group: the
   trainer's broadcast fails, the step carries on (the version goes to weight-sync), the
   replica is restarted and catches up from weight-sync, and the scheduler forms a new
   group that broadcasts to both replicas again;
2. later the trainer is killed while it broadcasts: the replicas drop the version cut
   short, the restarted trainer redoes the step, the version reaches the replicas from
   weight-sync, and a new group forms with the new trainer.

The trainer runs with ``RLFLEET_WEIGHT_GROUP_PAUSE_S`` (``common/weight_group.py``), which
holds every version between its first range (the header) and the next for a moment: the
kill lands then, the moment the trainer logs that pause (``chaos_driver.kill_mid_broadcast``),
while the replicas hold the start of the version and not its end. Then:

- the books are exact (``chaos_driver.account``: every sample trained once, nothing lost,
  each step recorded once, versions 1..N in order);
- ``weights_broadcast`` is 0 for each version a kill cut short, and 1 again afterwards
  with both replicas loading the version from the group (``replicas_via_weight_group``);
- no replica ever served a half-loaded version: float32 on both sides, the log-probs the
  replicas recorded while sampling equal the trainer's at θ_old on every step
  (``train_infer_kl_k1``, ``max_abs_dp``), as tests/integration/test_weight_group_fleet.py
  checks without faults; and no replica logs receiving a version a kill cut short.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest
import redis
from rlfleet.cli.fleet import Fleet, FleetOptions
from rlfleet.common.grpc_client import make_channel
from rlfleet.common.weight_group import PAUSE_ENV
from rlfleet.v1 import weightsync_pb2, weightsync_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))

from chaos_driver import (  # noqa: E402
    PASSWORD,
    BroadcastKill,
    account,
    kill_mid_broadcast,
    read_job,
    step_records,
    submit_job,
    trainer_lines,
    wait_until,
)

pytestmark = pytest.mark.slow

STEPS = 20
PAUSE_S = 1.0  # every version waits this long after its header: the kills land there
REPLICAS = ("rollout-0", "rollout-1")


def _spec(model_dir: Path) -> str:
    return json.dumps(
        {
            "name": "chaos-weight-group",
            "model": {"path": str(model_dir)},  # float32 (the default): KL at θ_old ~ 0
            "task": {"name": "basic_arithmetic", "size": 1000},
            "sampling": {"temperature": 1.0, "max_new_tokens": 12},
            "algorithm": {"group_size": 2, "prompts_per_step": 4},
            # every step checkpoints: a restarted trainer resumes weights and AdamW state
            "checkpoint": {"every_steps": 1, "keep": 2},
            # a member that never joins (killed as it was asked to) costs at most this
            "weights": {"transport": "collective", "group_timeout_s": 20},
            "steps": STEPS,
        }
    )


def _via_group_again(client: redis.Redis, job_id: str, after_step: int) -> dict | None:
    """The first step after ``after_step`` whose version went by broadcast to both replicas."""
    job = read_job(client, job_id)
    assert job["state"] == "running", f"the job ended {job['state']}: {job.get('reason')}"
    for rec in step_records(client, job_id):
        m = rec["metrics"]
        via = m.get("replicas_via_weight_group")
        if rec["step"] > after_step and m.get("weights_broadcast") == 1.0 and via == 2.0:
            return rec
    return None


def test_kill_9_of_a_replica_and_the_trainer_mid_broadcast(tmp_path, tiny_model_dir):
    fleet = Fleet(FleetOptions(run_dir=tmp_path / "run", rollout_replicas=len(REPLICAS),
                               log_format="json", redis_password=PASSWORD,
                               extra_env={"MKL_NUM_THREADS": "1",
                                          PAUSE_ENV: str(PAUSE_S)}))  # fmt: skip
    started = time.monotonic()
    fleet.start()
    client = redis.Redis(port=fleet.redis.port, password=PASSWORD)
    try:
        job_id = submit_job(fleet, _spec(tiny_model_dir))
        replica_logs = {n: fleet.procs[n].log_path.stat().st_size for n in REPLICAS}

        # 1. A replica, while version 3 or later goes out (two broadcasts went well first).
        kills: list[BroadcastKill] = []
        kills.append(kill_mid_broadcast(fleet, client, job_id, "rollout-0", min_version=3))
        recovered = wait_until("both replicas get a version from a new group again",
                          lambda: _via_group_again(client, job_id, kills[0].version - 1),
                          timeout=240)  # fmt: skip
        # 2. The trainer, while the next version after that goes out.
        version = int(recovered["metrics"]["policy_version"])
        assert version + 3 < STEPS, f"too few steps left to see the trainer's kill ({version})"
        kills.append(kill_mid_broadcast(fleet, client, job_id, "trainer",
                                        min_version=version + 1))  # fmt: skip
        wait_until("the job finishes", lambda: read_job(client, job_id)["state"] != "running",
              timeout=300)  # fmt: skip
        wall_s = time.monotonic() - started

        books = account(client, job_id)
        records = step_records(client, job_id)
        print(f"\nchaos (weight group): {wall_s:.0f} s with the fleet's start")
        for kill in kills:
            print("  " + kill.line())
        for rec in records:
            m = rec["metrics"]
            print(f"  step {rec['step']:2d}: version {m['policy_version']:.0f}, "
                  f"broadcast {m.get('weights_broadcast', 'none')}, via group "
                  f"{m.get('replicas_via_weight_group')}, kl_k1 {m['train_infer_kl_k1']:.2e}, "
                  f"max|dp| {m['max_abs_dp']:.1e}")  # fmt: skip
        for line in books.lines():
            print("  " + line)

        # The books are exact; the versions are 1..STEPS in order.
        assert books.problems == [], "\n".join(books.lines())
        assert [r["metrics"]["policy_version"] for r in records] == [
            float(s + 1) for s in range(STEPS)
        ]
        by_version = {int(r["metrics"]["policy_version"]): r["metrics"] for r in records}

        # Each kill cut its version short (checked on the outcome, not on how fast the
        # kill followed the log line: no timing assertion).
        for kill in kills:
            cut = by_version[kill.version]
            # the trainer killed: its restarted self redid the step without a group
            assert cut.get("weights_broadcast", 0.0) == 0.0, (kill.line(), cut)
            assert cut["replicas_via_weight_group"] == 0.0, (kill.line(), cut)
        replica_kill, trainer_kill = kills
        # The replica: the trainer's next range failed, before the step was trained.
        after = [line.get("msg", "") for line in trainer_lines(fleet, replica_kill.marker_offset)]
        broken = f"weight group {replica_kill.generation} broken: send failed"
        firsts = [m for m in after if m.startswith(broken) or m == "step trained"]
        assert firsts and firsts[0].startswith(broken), firsts[:2]
        # The trainer: it never finished the step it was broadcasting.
        died = trainer_lines(fleet, trainer_kill.marker_offset, trainer_kill.killed_offset)
        assert not [line for line in died if line.get("msg") == "step trained"], died

        # Before the first kill every version went by broadcast to both replicas; after
        # each kill a new group formed and did so again, the last version included.
        for v in range(1, replica_kill.version):
            assert by_version[v]["weights_broadcast"] == 1.0, (v, by_version[v])
            assert by_version[v]["replicas_via_weight_group"] == 2.0, (v, by_version[v])
        for kill in kills:
            later = [v for v in by_version if v > kill.version
                     and by_version[v].get("weights_broadcast") == 1.0
                     and by_version[v]["replicas_via_weight_group"] == 2.0]  # fmt: skip
            assert later, f"no version after {kill.version} went by broadcast to both replicas"
        assert by_version[STEPS]["replicas_via_weight_group"] == 2.0, by_version[STEPS]

        # No half-loaded version ever served: every step's samples were drawn with θ_old.
        for rec in records:
            m = rec["metrics"]
            assert abs(m["train_infer_kl_k1"]) < 1e-3 and m["max_abs_dp"] < 1e-2, (rec["step"], m)
        # ... and no replica took in a version a kill cut short.
        for name, offset in replica_logs.items():
            log = fleet.procs[name].log_path.read_text(errors="replace")[offset:]
            for kill in kills:
                received = re.compile(rf'"version {kill.version} received over the weight group"')
                assert not received.search(log), (name, kill.line())
        # Weight-sync's books: both replicas hold the last version.
        with make_channel(fleet.procs["weightsync"].address) as channel:
            held = weightsync_pb2_grpc.WeightSyncServiceStub(channel).ListReplicas(
                weightsync_pb2.ListReplicasRequest(job_id=job_id), timeout=10).replicas  # fmt: skip
        assert {r.replica_id: r.version for r in held} == {n: STEPS for n in REPLICAS}
    finally:
        client.close()
        fleet.stop()
