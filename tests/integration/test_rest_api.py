"""The REST API of the real scheduler process (``python -m rlfleet.scheduler``),
with the scripted rollout/reward/trainer servers as its peers.

The restart test kills the scheduler (kill -9) while the trainer holds step 1,
starts a new process on the same REST port, and checks through the SDK that the
job continues from its step and that an event stream opened before the crash
follows it to the end (it reconnects) with every step exactly once.
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import httpx
import pytest
from rlfleet.scheduler.auth import TOKENS_ENV, hash_token
from rlfleet_client import RlfleetClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit" / "scheduler"))

from scheduler_fakes import ScriptedFleet, write_tokenizer_model  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture
def scripted(tmp_path):
    fleet = ScriptedFleet(write_tokenizer_model(tmp_path / "model"))
    yield fleet
    fleet.close()


def _start(service_factory, redis_url, fleet, name, *extra, env=None):
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
            "--events-poll-s", "0.1",
            "--log-format", "text",
            *extra,
        ],
        env=env,
    )  # fmt: skip


def _spec(fleet, steps: int = 3) -> dict:
    return {
        "name": "rest",
        "model": {"path": str(fleet.model_dir)},
        "task": {"name": "basic_arithmetic", "size": 50},
        "sampling": {"max_new_tokens": 8},
        "algorithm": {"group_size": 2, "prompts_per_step": 2},
        "steps": steps,
    }


def test_killed_scheduler_resumes_and_the_stream_follows(service_factory, redis_url, scripted):
    scripted.trainer.block_at_step = 1
    first = _start(service_factory, redis_url, scripted, "scheduler-1")
    http_port = first.info["http_port"]
    assert first.info["url"] == f"http://127.0.0.1:{http_port}"
    client = RlfleetClient(first.info["url"], retries=8)
    assert client.ready()
    job = client.submit(_spec(scripted), idempotency_key="restart-1")

    events = []
    follower = threading.Thread(
        target=lambda: events.extend(client.events(job.id, reconnect_for=300)), daemon=True
    )
    follower.start()
    assert scripted.trainer.at_block.wait(180), "the job never reached TrainStep(1)"
    running = client.get_job(job.id)
    assert running.state == "running" and running.current_step == 1
    first.kill()  # kill -9 in the middle of step 1
    scripted.trainer.block_at_step = None
    scripted.trainer.release.set()

    _start(service_factory, redis_url, scripted, "scheduler-2", "--http-port", str(http_port))
    follower.join(300)  # returns when the stream ends; long only for a loaded machine
    assert not follower.is_alive(), "the event stream did not reach the end"
    final = client.get_job(job.id)
    assert final.state == "succeeded", final.reason
    assert final.current_step == 3 and final.policy_version == 3
    assert [s.step for s in client.steps(job.id)] == [0, 1, 2]
    assert [s.step for s in client.steps(job.id, page_size=2)] == [0, 1, 2]  # two pages
    # The job continued from step 1: step 0 was trained once, under the first process.
    trained = [step for _, step, _ in scripted.trainer.steps]
    assert trained.count(0) == 1 and trained[-1] == 2
    # The stream, across the restart: each step once, in order, then "end".
    assert [e.step.step for e in events if e.event == "step"] == [0, 1, 2]
    assert events[-1].event == "end" and events[-1].job.state == "succeeded"
    # The job (and its idempotency key) survived in Redis.
    assert client.submit(_spec(scripted), idempotency_key="restart-1").id == job.id
    client.close()


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_token_auth_in_the_process(service_factory, redis_url, scripted, tmp_path):
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text(f"{hash_token('reader')} read\n")
    proc = _start(
        service_factory, redis_url, scripted, "scheduler",
        "--auth", "token", "--api-tokens-file", str(tokens_file),
        env={TOKENS_ENV: f"{hash_token('writer')}:write"},
    )  # fmt: skip
    url = proc.info["url"]
    http = httpx.Client(base_url=url, timeout=60)
    assert http.get("/healthz").status_code == 200
    assert http.get("/readyz").status_code == 200
    assert http.get("/v1/jobs").status_code == 401
    spec = json.dumps(_spec(scripted, steps=1))
    headers = {"Content-Type": "application/json"}
    as_reader = http.post("/v1/jobs", content=spec, headers={**headers, **_bearer("reader")})
    assert as_reader.status_code == 403
    as_writer = http.post("/v1/jobs", content=spec, headers={**headers, **_bearer("writer")})
    assert as_writer.status_code == 201
    http.close()
    with RlfleetClient(url, token="reader") as client:
        assert client.wait(as_writer.json()["id"], timeout=300, poll_s=0.1).state == "succeeded"
