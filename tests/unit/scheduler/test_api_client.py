"""The Python SDK (clients/python) and the job commands of the CLI against the REST
API served by uvicorn in a thread, exactly as in the scheduler process."""

from __future__ import annotations

import json

import pytest
from rlfleet.cli.main import main as cli
from rlfleet.common.procs import free_port
from rlfleet.scheduler.api import ApiSettings, build_app
from rlfleet.scheduler.api.server import HttpServer
from rlfleet.scheduler.auth import TokenTable, hash_token
from rlfleet_client import (
    Conflict,
    Forbidden,
    NotFound,
    RlfleetClient,
    Unauthorized,
    Unreachable,
    ValidationFailed,
)


@pytest.fixture
def served(fleet_core):
    tokens = TokenTable(env_value=f"{hash_token('w')}:write,{hash_token('r')}:read")
    app = build_app(fleet_core, ApiSettings(auth="token", tokens=tokens, events_poll_s=0.02))
    server = HttpServer(app, host="127.0.0.1", port=0).start()
    yield server
    server.stop()


@pytest.fixture
def client(served):
    with RlfleetClient(served.url, token="w", retries=1) as c:
        yield c


def test_sdk_round_trip(client, fleet_core, spec_of):
    spec = json.loads(spec_of(name="sdk"))
    job = client.submit(spec, idempotency_key="sdk-1")
    assert client.submit(spec, idempotency_key="sdk-1").id == job.id
    with pytest.raises(Conflict):
        client.submit({**spec, "name": "other"}, idempotency_key="sdk-1")
    assert job.name == "sdk" and not job.done

    fleet_core.start()
    events = list(client.events(job.id))
    assert events[0].event == "state" and events[-1].event == "end"
    assert [e.step.step for e in events if e.event == "step"] == [0, 1]
    final = events[-1].job
    assert final.state == "succeeded" and final.done and final.summary["reward_mean"] == 1.0

    assert client.get_job(job.id).policy_version == 2
    assert [s.step for s in client.steps(job.id, since_step=1)] == [1]
    assert client.checkpoints(job.id) == []  # the scripted trainer writes none
    assert client.wait(job.id, timeout=5).state == "succeeded"
    assert client.ready()

    fleet_core.stop()  # the second job stays queued, so the cancel cannot race its run
    second = client.submit(spec)
    assert client.cancel(second.id).state == "cancelled"
    ids = [j.id for j in client.iter_jobs(page_size=1)]
    assert ids == [second.id, job.id]
    assert [j.id for j in client.list_jobs(state="succeeded").jobs] == [job.id]


def test_sdk_errors(client, served, spec_of):
    with pytest.raises(ValidationFailed) as info:
        client.submit(json.loads(spec_of(algorithm={"group_size": 1})))
    assert info.value.status_code == 422
    assert info.value.errors[0]["field"] == "algorithm.group_size"
    assert "algorithm.group_size" in info.value.message
    with pytest.raises(NotFound):
        client.get_job("job-nope")
    with pytest.raises(NotFound):
        list(client.events("job-nope"))
    with RlfleetClient(served.url, token="r") as reader:
        with pytest.raises(Forbidden):
            reader.submit(json.loads(spec_of()))
        assert reader.list_jobs().jobs == []
    with RlfleetClient(served.url, token="") as anonymous, pytest.raises(Unauthorized):
        anonymous.list_jobs()
    with RlfleetClient(f"http://127.0.0.1:{free_port()}", retries=1) as nowhere:
        with pytest.raises(Unreachable, match="cannot reach the rlfleet API"):
            nowhere.list_jobs()
        assert not nowhere.ready()


def _run(capsys, *argv: str) -> str:
    cli(list(argv))
    return capsys.readouterr().out


def test_cli_job_commands(served, fleet_core, spec_of, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setenv("RLFLEET_URL", served.url)
    monkeypatch.setenv("RLFLEET_TOKEN", "w")
    spec_file = tmp_path / "job.toml"
    spec = json.loads(spec_of(name="cli"))
    model = spec.pop("model")["path"]
    spec_file.write_text(
        'name = "cli"\nsteps = 2\n[model]\npath = "placeholder"\n'
        '[task]\nname = "basic_arithmetic"\nsize = 50\n'
        "[sampling]\nmax_new_tokens = 8\n[algorithm]\ngroup_size = 2\nprompts_per_step = 3\n"
    )
    out = _run(capsys, "submit", str(spec_file), "--model", model)
    job_id = out.split("submitted job ", 1)[1].split()[0]

    fleet_core.start()
    out = _run(capsys, "logs", "-f", job_id)
    assert "succeeded" in out and "steps" in out and "1.000" in out
    out = _run(capsys, "status", job_id)
    assert job_id in out and "succeeded" in out and "2/2" in out
    assert json.loads(_run(capsys, "status", job_id, "--json"))["id"] == job_id
    out = _run(capsys, "jobs", "--state", "succeeded")
    assert job_id in out and "cli" in out
    assert "no checkpoints" in _run(capsys, "checkpoints", job_id)
    out = _run(capsys, "logs", job_id)
    assert out.count("1.000") >= 2

    # 4xx answers are one line on stderr, never a traceback.
    with pytest.raises(SystemExit) as info:
        _run(capsys, "cancel", job_id)
    assert (
        str(info.value) == f"error: job {job_id} is already succeeded; it cannot become cancelled"
    )
    with pytest.raises(SystemExit) as info:
        _run(capsys, "status", "job-nope")
    assert str(info.value) == "error: job 'job-nope' does not exist"
    with pytest.raises(SystemExit) as info:
        _run(capsys, "--token", "r", "submit", str(spec_file), "--model", model)
    assert "'read' role" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(SystemExit) as info:
        _run(capsys, "--token", "bad", "jobs")
    assert str(info.value) == "error: unknown API token (pass --token or set RLFLEET_TOKEN)"
    with pytest.raises(SystemExit) as info:
        _run(capsys, "submit", str(spec_file), "--model", str(tmp_path))
    assert "model.path" in str(info.value) and "config.json" in str(info.value)
    with pytest.raises(SystemExit) as info:
        _run(capsys, "--url", f"http://127.0.0.1:{free_port()}", "jobs")
    assert "cannot reach the rlfleet API" in str(info.value)


def test_cli_cancel_and_fleet_file(served, spec_of, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RLFLEET_URL", raising=False)
    monkeypatch.setenv("RLFLEET_TOKEN", "w")
    run_dir = tmp_path / "fleet"
    run_dir.mkdir()
    (run_dir / "fleet.json").write_text(json.dumps({"url": served.url}))
    spec_file = tmp_path / "job.json"
    spec_file.write_text(spec_of(name="to-cancel"))
    out = _run(capsys, "--run-dir", str(run_dir), "submit", str(spec_file))
    job_id = out.split("submitted job ", 1)[1].split()[0]
    out = _run(capsys, "--run-dir", str(run_dir), "cancel", job_id)
    assert f"job {job_id}: cancelled" in out
