"""The REST API in process (FastAPI TestClient) over a real SchedulerCore, a real
Redis and the scripted rollout/reward/trainer servers: every endpoint, the
error mapping (422 naming the field, 404, 409, 413, 503, a generic 500),
pagination, the state filter, checkpoints and the event stream.
"""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from rlfleet.scheduler.api import ApiSettings, build_app
from rlfleet.scheduler.api.checkpoints import checkpoint_steps
from rlfleet.trainer.state import StepResult, TrainerStore


@pytest.fixture
def api(fleet_core):
    app = build_app(fleet_core, ApiSettings(events_poll_s=0.02, max_request_bytes=64 * 1024))
    with TestClient(app, raise_server_exceptions=False) as client:
        client.core = fleet_core
        yield client


def _spec(spec_of, **overrides) -> dict:
    return json.loads(spec_of(**overrides))


def _wait_done(api, job_id: str) -> dict:
    # The event stream returns once the job is finished; its last event is the final job.
    with api.stream("GET", f"/v1/jobs/{job_id}/events") as resp:
        assert resp.status_code == 200
        lines = list(resp.iter_lines())
    return json.loads([ln for ln in lines if ln.startswith("data:")][-1][5:])


def _submit(api, spec: dict, **headers) -> dict:
    resp = api.post("/v1/jobs", json=spec, headers=headers)
    assert resp.status_code == 201, resp.text
    return resp.json()


def test_submit_run_and_inspect(api, spec_of):
    api.core.start()
    job = _submit(api, _spec(spec_of, name="first"), **{"Idempotency-Key": "k1"})
    assert job["id"].startswith("job-") and job["state"] in ("queued", "running")
    assert job["name"] == "first" and job["total_steps"] == 2
    assert job["spec"]["algorithm"]["group_size"] == 2  # defaults filled in
    assert job["spec"]["correction"]["kind"] == "icepop"

    # The same key and spec: the same job; the same key, another spec: 409.
    again = _submit(api, _spec(spec_of, name="first"), **{"Idempotency-Key": "k1"})
    assert again["id"] == job["id"]
    clash = api.post("/v1/jobs", json=_spec(spec_of, name="x"), headers={"Idempotency-Key": "k1"})
    assert clash.status_code == 409 and "idempotency_key" in clash.json()["detail"]

    final = _wait_done(api, job["id"])
    assert final["state"] == "succeeded" and final["current_step"] == 2
    got = api.get(f"/v1/jobs/{job['id']}").json()
    assert got["state"] == "succeeded" and got["policy_version"] == 2
    assert got["summary"]["reward_mean"] == 1.0 and got["updated_at"] >= got["created_at"]

    steps = api.get(f"/v1/jobs/{job['id']}/steps").json()["steps"]
    assert [s["step"] for s in steps] == [0, 1]
    assert steps[0]["metrics"]["loss"] == 0.25 and steps[0]["finished_at"] > 0
    later = api.get(f"/v1/jobs/{job['id']}/steps", params={"since_step": 1}).json()
    assert [s["step"] for s in later["steps"]] == [1] and later["next_since_step"] is None
    page = api.get(f"/v1/jobs/{job['id']}/steps", params={"limit": 1}).json()
    assert [s["step"] for s in page["steps"]] == [0] and page["next_since_step"] == 1
    too_many = api.get(f"/v1/jobs/{job['id']}/steps", params={"limit": 10_001})
    assert too_many.status_code == 422 and "limit" in too_many.text

    done = api.post(f"/v1/jobs/{job['id']}:cancel")
    assert done.status_code == 409 and "already succeeded" in done.json()["detail"]


def test_cancel_a_queued_job_and_unknown_jobs(api, spec_of):
    job = _submit(api, _spec(spec_of))  # the worker is not started: it stays queued
    resp = api.post(f"/v1/jobs/{job['id']}:cancel")
    assert resp.status_code == 200
    assert resp.json()["state"] == "cancelled" and resp.json()["reason"] == "cancelled by request"
    assert api.get(f"/v1/jobs/{job['id']}").json()["state"] == "cancelled"

    for method, path in [
        ("GET", "/v1/jobs/job-missing"),
        ("GET", "/v1/jobs/job-missing/steps"),
        ("GET", "/v1/jobs/job-missing/checkpoints"),
        ("GET", "/v1/jobs/job-missing/events"),
        ("POST", "/v1/jobs/job-missing:cancel"),
    ]:
        resp = api.request(method, path)
        assert resp.status_code == 404, (method, path)
        assert resp.json() == {"detail": "job 'job-missing' does not exist", "errors": []}


def test_pagination_and_state_filter(api, spec_of):
    ids = [_submit(api, _spec(spec_of, name=f"j{i}"))["id"] for i in range(5)]
    api.post(f"/v1/jobs/{ids[1]}:cancel")

    seen, token = [], ""
    while True:
        params = {"page_size": 2, **({"page_token": token} if token else {})}
        page = api.get("/v1/jobs", params=params).json()
        assert len(page["jobs"]) <= 2
        seen += [j["id"] for j in page["jobs"]]
        token = page["next_page_token"]
        if not token:
            break
    assert seen == ids[::-1]  # newest first, each once

    cancelled = api.get("/v1/jobs", params={"state": "cancelled"}).json()
    assert [j["id"] for j in cancelled["jobs"]] == [ids[1]]
    queued = api.get("/v1/jobs", params={"state": "queued"}).json()["jobs"]
    assert [j["id"] for j in queued] == [ids[4], ids[3], ids[2], ids[0]]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"state": "paused"}, "state"),
        ({"page_size": 0}, "page_size"),
        ({"page_size": 100000}, "page_size"),
        ({"page_token": "abc"}, "page_token"),
    ],
)
def test_bad_list_parameters_are_named(api, params, field):
    resp = api.get("/v1/jobs", params=params)
    assert resp.status_code == 422
    assert field in resp.json()["detail"]


def test_bad_step_parameter_is_named(api, spec_of):
    job = _submit(api, _spec(spec_of))
    resp = api.get(f"/v1/jobs/{job['id']}/steps", params={"since_step": -1})
    assert resp.status_code == 422
    assert resp.json()["errors"][0]["field"] == "since_step"


@pytest.mark.parametrize(
    ("change", "field", "reason"),
    [
        ({"algorithm": {"group_size": 0}}, "algorithm.group_size", "greater than or equal to 2"),
        ({"steps": "many"}, "steps", "valid integer"),
        ({"task": {"name": "no_such_task"}}, "task.name", "unknown task"),
        ({"reward": {"verifier": "regex"}}, "reward", "reward.pattern is required"),
        ({"reward": {"verifier": "telepathy"}}, "reward.verifier", "Input should be"),
        ({"sampling": {"top_p": 0}}, "sampling.top_p", "greater than 0"),
        ({"correction": {"alpha": 9.0}}, "correction", "must not exceed"),
        ({"colour": "blue"}, "colour", "Extra inputs are not permitted"),
    ],
)
def test_bad_specs_get_422_naming_the_field(api, spec_of, change, field, reason):
    resp = api.post("/v1/jobs", json=_spec(spec_of, **change))
    assert resp.status_code == 422, resp.text
    body = resp.json()
    assert body["detail"].startswith("invalid job spec: ")
    assert any(e["field"] == field and reason in e["reason"] for e in body["errors"]), body


def test_spec_checks_beyond_the_schema_get_422(api, spec_of, tmp_path):
    missing = _spec(spec_of, model={"path": str(tmp_path / "nowhere")})
    resp = api.post("/v1/jobs", json=missing)
    assert resp.status_code == 422 and "model.path" in resp.json()["detail"]

    no_body = api.post("/v1/jobs")
    assert no_body.status_code == 422 and no_body.json()["errors"][0]["field"] == "body"

    broken = api.post(
        "/v1/jobs", content=b'{"model": ', headers={"content-type": "application/json"}
    )
    assert broken.status_code == 422 and "not valid JSON" in broken.json()["detail"]

    long_key = api.post("/v1/jobs", json=_spec(spec_of), headers={"Idempotency-Key": "k" * 300})
    assert long_key.status_code == 422 and "idempotency-key" in long_key.json()["detail"]


def test_oversized_bodies_get_413(api, spec_of):
    big = _spec(spec_of, name="x" * 100)
    big["task"]["params"] = {"padding": "x" * 100_000}
    resp = api.post("/v1/jobs", json=big)
    assert resp.status_code == 413
    assert "larger than the 65536 bytes" in resp.json()["detail"]

    def chunks():  # no Content-Length: counted as it arrives
        yield b'{"name": "'
        for _ in range(40):
            yield b"x" * 4096
        yield b'"}'

    streamed = api.post("/v1/jobs", content=chunks(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413


def test_events_stream(api, spec_of):
    job = _submit(api, _spec(spec_of, steps=3))
    api.core.start()
    with api.stream("GET", f"/v1/jobs/{job['id']}/events") as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        raw = "\n".join(resp.iter_lines())
    events = []
    for block in raw.split("\n\n"):
        fields = dict(
            line.split(": ", 1) for line in block.splitlines() if line and not line.startswith(":")
        )
        if "event" in fields:
            events.append((fields["event"], json.loads(fields["data"]), fields.get("id")))
    kinds = [e[0] for e in events]
    assert kinds[0] == "state" and kinds[-1] == "end"
    assert [e[1]["step"] for e in events if e[0] == "step"] == [0, 1, 2]
    assert [e[2] for e in events if e[0] == "step"] == ["0", "1", "2"]
    assert events[-1][1]["state"] == "succeeded"
    assert "succeeded" in [e[1]["state"] for e in events if e[0] == "state"]

    # A reconnecting client gets only the steps after the last one it saw.
    with api.stream("GET", f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": "1"}) as resp:
        text = "\n".join(resp.iter_lines())
    assert text.count("event: step") == 1 and '"step": 2' in text
    with api.stream("GET", f"/v1/jobs/{job['id']}/events", params={"since_step": 3}) as resp:
        text = "\n".join(resp.iter_lines())
    assert "event: step" not in text and "event: end" in text


def test_checkpoints_come_from_the_trainer_results(api, spec_of):
    api.core.start()
    spec = _spec(spec_of, steps=3, checkpoint={"every_steps": 1, "keep": 2})
    job = _submit(api, spec)
    _wait_done(api, job["id"])
    # The scripted trainer does not write results; store what the real one would.
    trainer = TrainerStore(api.core.store.r)
    for step in range(3):
        path = f"/ckpt/{job['id']}/step-{step}"
        trainer.put_result(job["id"], StepResult(step, step + 1, {}, 6, checkpoint_path=path))
    found = api.get(f"/v1/jobs/{job['id']}/checkpoints").json()["checkpoints"]
    assert [(c["step"], c["version"], c["path"]) for c in found] == [
        (1, 2, f"/ckpt/{job['id']}/step-1"),
        (2, 3, f"/ckpt/{job['id']}/step-2"),
    ]
    assert all(c["created_at"] > 0 for c in found)


def test_checkpoint_steps_follow_the_spec():
    assert checkpoint_steps(done=10, total=10, every=0, keep=2) == [9]
    assert checkpoint_steps(done=5, total=10, every=0, keep=2) == []
    assert checkpoint_steps(done=7, total=10, every=2, keep=2) == [3, 5]
    assert checkpoint_steps(done=10, total=10, every=4, keep=5) == [3, 7, 9]


def test_health_readiness_metrics_and_docs(api, spec_of):
    assert api.get("/healthz").json()["status"] == "ok"
    not_ready = api.get("/readyz")  # the worker has not started
    assert not_ready.status_code == 503
    assert not_ready.json()["checks"] == {"redis": True, "worker": False}
    api.core.start()
    assert api.get("/readyz").status_code == 200

    api.get("/v1/jobs/job-missing")
    text = api.get("/metrics").text
    assert (
        'rlfleet_scheduler_http_requests_total{method="GET",route="/v1/jobs/{job_id}",status="404"}'
        in text
    )
    schema = api.get("/openapi.json").json()
    assert {"/v1/jobs", "/v1/jobs/{job_id}:cancel", "/v1/jobs/{job_id}/events"} <= set(
        schema["paths"]
    )
    assert api.get("/docs").status_code == 200
    assert api.get("/v2/nothing").status_code == 404


def test_unknown_errors_are_a_generic_500(api, monkeypatch):
    def boom(job_id):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(api.core, "get", boom)
    resp = api.get("/v1/jobs/job-x")
    assert resp.status_code == 500
    assert resp.json() == {"detail": "internal error in the scheduler; see its log", "errors": []}
    assert "secret" not in resp.text and "Traceback" not in resp.text


def test_redis_down_is_503(make_core):
    from rlfleet.common.procs import free_port
    from rlfleet.scheduler.store import JobStore

    core = make_core(replica_addresses=["127.0.0.1:1"])
    core.store = JobStore.from_url(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens
    with TestClient(build_app(core), raise_server_exceptions=False) as client:
        resp = client.get("/v1/jobs")
        assert resp.status_code == 503 and "Redis" in resp.json()["detail"]
        assert client.get("/readyz").json()["checks"]["redis"] is False
