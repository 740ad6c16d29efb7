"""API tokens: hashes from a file and the environment, roles, 401/403, open
health endpoints, local mode, and the settings that require tokens."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from rlfleet.common.config import load_config
from rlfleet.scheduler.api import ApiSettings, build_app
from rlfleet.scheduler.auth import (
    TOKENS_ENV,
    Role,
    TokenTable,
    hash_token,
    new_token,
    parse_tokens_env,
    parse_tokens_file,
)
from rlfleet.scheduler.config import SchedulerConfig

ADDRESSES = ["--reward-address", "r:1", "--trainer-address", "t:1", "--rollout-addresses", "a:1"]


@pytest.fixture
def tokens(tmp_path):
    write, read, env = new_token(), new_token(), new_token()
    path = tmp_path / "tokens"
    path.write_text(
        f"# rlfleet API tokens\n{hash_token(write)} write ci bot\n\n{hash_token(read)} read  # grafana\n"
    )
    table = TokenTable(tokens_file=path, env_value=f"{hash_token(env)}:read")
    return {"write": write, "read": read, "env": env, "table": table, "path": path}


@pytest.fixture
def secured(make_core, fleet, tokens):
    core = make_core(replica_addresses=fleet.replica_addresses)
    app = build_app(core, ApiSettings(auth="token", tokens=tokens["table"]))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_token_table_parsing(tokens):
    table = tokens["table"]
    assert table.lookup(tokens["write"]).role is Role.WRITE
    assert table.lookup(tokens["write"]).label == "ci bot"
    assert table.lookup(tokens["read"]).role is Role.READ
    assert table.lookup(tokens["env"]).role is Role.READ
    assert table.lookup("rlf_guess") is None and table.lookup("") is None
    assert len(table) == 3

    with pytest.raises(ValueError, match="line 2: role 'admin' is not one of read, write"):
        parse_tokens_file(f"# c\n{'a' * 64} admin\n")
    with pytest.raises(ValueError, match="not a sha256 hex digest"):
        parse_tokens_file("rlf_plaintext-token read\n")
    with pytest.raises(ValueError, match=f"{TOKENS_ENV} entry 2"):
        parse_tokens_env(f"{'b' * 64}, nothex:read")
    with pytest.raises(ValueError, match="no API tokens configured"):
        TokenTable(env_value="")


def test_tokens_file_is_reread_when_it_changes(tokens):
    import os

    newer = new_token()
    path = tokens["path"]
    path.write_text(f"{hash_token(newer)} read\n")
    stat = path.stat()
    os.utime(path, (stat.st_atime, stat.st_mtime + 5))
    table = tokens["table"]
    assert table.lookup(newer).role is Role.READ
    assert table.lookup(tokens["write"]) is None  # revoked by removing its line
    path.write_text("garbage\n")  # a broken file keeps the tokens we had
    os.utime(path, (stat.st_atime, stat.st_mtime + 10))
    assert table.lookup(newer) is not None


def test_requests_need_a_known_token(secured):
    missing = secured.get("/v1/jobs")
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer"
    assert "missing API token" in missing.json()["detail"]
    unknown = secured.get("/v1/jobs", headers=_auth("rlf_not-a-token"))
    assert unknown.status_code == 401 and unknown.json()["detail"] == "unknown API token"
    basic = secured.get("/v1/jobs", headers={"Authorization": "Basic dXNlcjpwdw=="})
    assert basic.status_code == 401
    for path in ("/v1/jobs/job-x", "/v1/jobs/job-x/steps", "/v1/jobs/job-x/events", "/metrics"):
        assert secured.get(path).status_code == 401, path
    assert secured.post("/v1/jobs/job-x:cancel").status_code == 401
    # Liveness and readiness stay open for probes.
    assert secured.get("/healthz").status_code == 200
    assert secured.get("/readyz").status_code in (200, 503)


def test_roles(secured, tokens, spec_of):
    spec = json.loads(spec_of())
    # read: may look, may not submit or cancel.
    assert secured.get("/v1/jobs", headers=_auth(tokens["read"])).status_code == 200
    assert secured.get("/metrics", headers=_auth(tokens["env"])).status_code == 200
    denied = secured.post("/v1/jobs", json=spec, headers=_auth(tokens["read"]))
    assert denied.status_code == 403
    assert "'read' role" in denied.json()["detail"] and "'write'" in denied.json()["detail"]
    # write: may do everything.
    job = secured.post("/v1/jobs", json=spec, headers=_auth(tokens["write"]))
    assert job.status_code == 201
    job_id = job.json()["id"]
    assert (
        secured.post(f"/v1/jobs/{job_id}:cancel", headers=_auth(tokens["read"])).status_code == 403
    )
    assert secured.get(f"/v1/jobs/{job_id}", headers=_auth(tokens["read"])).status_code == 200
    cancelled = secured.post(f"/v1/jobs/{job_id}:cancel", headers=_auth(tokens["write"]))
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"


def test_local_mode_needs_no_token(make_core, fleet):
    core = make_core(replica_addresses=fleet.replica_addresses)
    with TestClient(build_app(core, ApiSettings(auth="local"))) as client:
        assert client.get("/v1/jobs").status_code == 200
        assert client.get("/v1/jobs", headers=_auth("anything")).status_code == 200


def test_settings_require_tokens_for_token_auth(monkeypatch, tmp_path):
    monkeypatch.delenv(TOKENS_ENV, raising=False)
    with pytest.raises(SystemExit, match="auth = token needs API token hashes"):
        load_config(SchedulerConfig, [*ADDRESSES, "--auth", "token"])
    with pytest.raises(SystemExit, match="api_tokens_file .* does not exist"):
        load_config(SchedulerConfig, [*ADDRESSES, "--api-tokens-file", str(tmp_path / "none")])
    monkeypatch.setenv(TOKENS_ENV, hash_token("t"))
    cfg = load_config(SchedulerConfig, [*ADDRESSES, "--auth", "token", "--http-port", "8123"])
    assert cfg.auth == "token" and cfg.http_port == 8123
    settings = ApiSettings.from_config(cfg)
    assert settings.tokens is not None and settings.tokens.lookup("t").role is Role.WRITE
    with pytest.raises(SystemExit, match="http_port"):
        load_config(SchedulerConfig, [*ADDRESSES, "--http-port", "70000"])


def test_token_commands(capsys):
    from rlfleet.cli.main import main

    main(["token", "create", "--role", "read", "--label", "dashboards"])
    out = capsys.readouterr().out
    token = out.split("token: ", 1)[1].split()[0]
    digest = out.split("hash:  ", 1)[1].split()[0]
    assert digest == hash_token(token) and f"{digest} read dashboards" in out
    assert parse_tokens_file(f"{digest} read dashboards")[digest].role is Role.READ
    main(["token", "hash", token])
    assert capsys.readouterr().out.strip() == digest
