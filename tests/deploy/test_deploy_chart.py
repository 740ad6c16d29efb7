"""The Helm chart: lints, renders with every shipped values set, and every object it renders
is a valid Kubernetes object (strict schemas, so a misspelt field fails) that follows the
chart's promises: non-root, read-only root filesystems, gRPC probes, GPUs from values,
namespaced RBAC, no hard-coded namespace, and flags the services actually accept; the env
service (multi-turn episodes) runs as one pod that the scheduler reaches at --env-address.
"""

from __future__ import annotations

import os
import re
import tomllib

import pytest
import yaml
from deploy_helpers import (
    CHART,
    DASHBOARDS,
    RULES,
    SERVICES,
    VALUE_SETS,
    _helm,
    by_kind,
    config_class,
    find,
    load_values,
    notes,
    pod_specs,
    render,
    run_promtool,
    strip_meta,
)

# The oldest Kubernetes the chart supports (native gRPC probes are GA there) and the newest
# schema kubernetes-validate ships.
KUBE_VERSIONS = ("1.27.0", "latest")
# Custom resources of prometheus-operator: kubernetes-validate has no schema for them; they
# are checked by the tests below instead.
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}

SETS = list(VALUE_SETS)
# Every workload the chart runs: the services that use Redis, and the env service (no Redis).
COMPONENTS = (*SERVICES, "env")


@pytest.fixture(scope="module", params=SETS)
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, render(load_values(request.param))


@pytest.mark.parametrize("name", SETS)
def test_chart_lints_clean(name):
    helm = _helm()
    report = helm.lint(str(CHART), load_values(name), strict=True, namespace="rl")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"] and not problems, report


def test_chart_metadata_is_helm3():
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert meta["apiVersion"] == "v2"
    assert meta["type"] == "application"


@pytest.mark.parametrize("kube", KUBE_VERSIONS)
def test_every_object_validates_against_kubernetes_schema(rendered, kube):
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    version = kv.latest_version() if kube == "latest" else kube
    name, objects = rendered
    assert objects, f"{name}: nothing rendered"
    for obj in objects:
        if obj["kind"] in CRD_KINDS:
            continue
        try:
            kv.validate(strip_meta(obj), version, strict=True)
        except kv.ValidationError as exc:
            pytest.fail(
                f"{name}: {obj['kind']} {obj['metadata']['name']} ({obj['_template']}) is not "
                f"a valid Kubernetes {version} object: {exc}"
            )


def test_every_object_has_chart_labels_and_release_namespace(rendered):
    name, objects = rendered
    values = load_values(name)
    dashboard_ns = values.get("dashboards", {}).get("namespace") or "rl"
    for obj in objects:
        meta = obj["metadata"]
        labels = meta.get("labels", {})
        assert labels.get("app.kubernetes.io/instance") == "rlfleet", (obj["kind"], meta["name"])
        assert labels.get("app.kubernetes.io/managed-by") == "Helm"
        expected = (
            dashboard_ns
            if obj["_template"].endswith("configmap.yaml") and ("grafana_dashboard" in labels)
            else "rl"
        )
        assert meta.get("namespace") == expected, (obj["kind"], meta["name"])


def test_no_namespace_is_hard_coded():
    # The same values in two namespaces differ only where the namespace appears (and in the
    # Redis password, random per render offline).
    a = yaml.safe_dump_all([strip_meta(o) for o in render(namespace="team-a")])
    b = yaml.safe_dump_all([strip_meta(o) for o in render(namespace="team-b")])
    assert "team-b" not in a and "team-a" not in b
    password = re.compile(r"redis-password: .*")
    assert password.sub("", a.replace("team-a", "NS")) == password.sub(
        "", b.replace("team-b", "NS")
    )


def test_pods_run_non_root_with_read_only_root_and_no_capabilities(rendered):
    name, objects = rendered
    for workload, spec in pod_specs(objects):
        where = f"{name}: {workload['kind']} {workload['metadata']['name']}"
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", where
        assert spec.get("enableServiceLinks") is False, where
        for container in spec["containers"] + spec.get("initContainers", []):
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert not sc["capabilities"].get("add"), where


def test_only_the_scheduler_gets_an_api_token(rendered):
    _name, objects = rendered
    for workload, spec in pod_specs(objects):
        component = workload["metadata"]["labels"]["app.kubernetes.io/component"]
        assert spec["automountServiceAccountToken"] is (component == "scheduler"), component


def test_services_have_native_grpc_probes(rendered):
    _name, objects = rendered
    seen = set()
    for workload, spec in pod_specs(objects):
        component = workload["metadata"]["labels"]["app.kubernetes.io/component"]
        if component == "redis":
            continue
        seen.add(component)
        container = spec["containers"][0]
        grpc_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert container[probe]["grpc"]["port"] == grpc_port, (component, probe)
    assert seen == set(COMPONENTS)


def _container(objects, component) -> dict:
    for workload, spec in pod_specs(objects):
        if workload["metadata"]["labels"]["app.kubernetes.io/component"] == component:
            return spec["containers"][0]
    raise AssertionError(f"no workload for {component}")


def test_gpus_come_from_values():
    objects = render()
    for component in ("rollout", "trainer"):
        res = _container(objects, component)["resources"]
        assert res["requests"]["nvidia.com/gpu"] == 1
        assert res["limits"]["nvidia.com/gpu"] == 1
        assert _container(objects, component)["image"].endswith("-cuda")
    for component in ("scheduler", "reward", "env", "weightsync"):
        res = _container(objects, component)["resources"]
        assert "nvidia.com/gpu" not in res.get("limits", {})
        assert not _container(objects, component)["image"].endswith("-cuda")

    objects = render({"rollout": {"gpu": {"count": 4}}, "trainer": {"gpu": {"count": 0}}})
    assert _container(objects, "rollout")["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert "nvidia.com/gpu" not in _container(objects, "trainer")["resources"]["limits"]

    cpu_only = render(load_values("ci-values"))
    for workload, spec in pod_specs(cpu_only):
        for container in spec["containers"]:
            assert "nvidia.com/gpu" not in str(container.get("resources")), workload


def test_rbac_lets_only_the_scheduler_read_pods_in_its_namespace():
    objects = render(namespace="ml")
    assert not by_kind(objects, "ClusterRole") and not by_kind(objects, "ClusterRoleBinding")
    (role,) = by_kind(objects, "Role")
    resources = {r for rule in role["rules"] for r in rule["resources"]}
    verbs = {v for rule in role["rules"] for v in rule["verbs"]}
    assert {"pods", "endpoints"} <= resources
    assert verbs == {"get", "list", "watch"}
    (binding,) = by_kind(objects, "RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    (subject,) = binding["subjects"]
    assert subject["namespace"] == "ml"
    scheduler = find(objects, "Deployment", "rlfleet-scheduler")
    assert scheduler["spec"]["template"]["spec"]["serviceAccountName"] == subject["name"]


def test_bundled_redis_is_persistent_with_a_password_secret():
    objects = render()
    redis = find(objects, "StatefulSet", "rlfleet-redis")
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "8Gi"
    conf = find(objects, "ConfigMap", "rlfleet-redis")["data"]["redis.conf"]
    assert "appendonly yes" in conf and "maxmemory-policy noeviction" in conf
    secret = find(objects, "Secret", "rlfleet-redis")
    assert secret["data"]["redis-password"]
    env = {e["name"]: e for e in _container(objects, "trainer")["env"]}
    assert env["RLFLEET_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "rlfleet-redis"
    url = env["RLFLEET_TRAINER_REDIS_URL"]["value"]
    assert url == "redis://:$(RLFLEET_REDIS_PASSWORD)@rlfleet-redis.rl.svc:6379/0"
    # Kubernetes expands $(VAR) only from variables defined earlier in the list.
    names = [e["name"] for e in _container(objects, "trainer")["env"]]
    assert names.index("RLFLEET_REDIS_PASSWORD") < names.index("RLFLEET_TRAINER_REDIS_URL")


def test_external_redis_by_url_or_existing_secret():
    objects = render(load_values("ci-values"))
    assert not [o for o in objects if o["metadata"]["name"].endswith("-redis")]
    secret = find(objects, "Secret", "ci-fleet-redis-url")
    assert "redis-url" in secret["data"]
    for service in SERVICES:
        env = {e["name"]: e for e in _container(objects, service)["env"]}
        ref = env[f"RLFLEET_{service.upper()}_REDIS_URL"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "ci-fleet-redis-url", "key": "redis-url"}

    objects = render(
        {
            "redis": {
                "enabled": False,
                "external": {"existingSecret": "mine", "existingSecretKey": "u"},
            }
        }
    )
    assert not by_kind(objects, "Secret")
    env = {e["name"]: e for e in _container(objects, "reward")["env"]}
    assert env["RLFLEET_REWARD_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "mine",
        "key": "u",
    }


def test_render_fails_with_a_sentence_on_impossible_values():
    helm = _helm()
    with pytest.raises(helm.HelmError, match="redis.external.url"):
        render({"redis": {"enabled": False}})
    with pytest.raises(helm.HelmError, match="rolloutDiscovery"):
        render({"rollout": {"autoscaling": {"enabled": True}}})


def test_rollout_is_a_statefulset_with_a_headless_service_and_stable_addresses():
    objects = render()
    sts = find(objects, "StatefulSet", "rlfleet-rollout")
    svc = find(objects, "Service", "rlfleet-rollout")
    assert svc["spec"]["clusterIP"] == "None"
    assert sts["spec"]["serviceName"] == "rlfleet-rollout"
    assert sts["spec"]["replicas"] == 2
    args = _container(objects, "scheduler")["args"]
    addresses = args[args.index("--rollout-addresses") + 1].split(",")
    assert addresses == [
        "rlfleet-rollout-0.rlfleet-rollout.rl.svc:50051",
        "rlfleet-rollout-1.rlfleet-rollout.rl.svc:50051",
    ]


def test_autoscaling_values_render_an_hpa_on_the_rollout_statefulset():
    objects = render(load_values("autoscaling-values"))
    (hpa,) = by_kind(objects, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "name": "rlfleet-rollout",
    }
    assert "replicas" not in find(objects, "StatefulSet", "rlfleet-rollout")["spec"]
    assert "--rollout-addresses" not in _container(objects, "scheduler")["args"]


def test_pod_disruption_budgets_follow_values():
    default = {p["metadata"]["name"] for p in by_kind(render(), "PodDisruptionBudget")}
    assert default == {"rlfleet-rollout", "rlfleet-reward"}
    ci = {
        p["metadata"]["name"]
        for p in by_kind(render(load_values("ci-values")), "PodDisruptionBudget")
    }
    assert ci == {f"ci-fleet-{s}" for s in ("scheduler", "rollout", "reward", "trainer")}


def _ingress_sources(policy: dict, port: str) -> list[str | None]:
    """Components allowed in on a named port; None stands for "anyone"."""
    out: list[str | None] = []
    for rule in policy["spec"]["ingress"]:
        if port not in [p["port"] for p in rule["ports"]]:
            continue
        if not rule.get("from"):
            out.append(None)
        for peer in rule.get("from", []):
            labels = peer.get("podSelector", {}).get("matchLabels", {})
            out.append(labels.get("app.kubernetes.io/component", "other"))
    return out


def test_network_policies_admit_only_the_callers():
    objects = render()
    policies = {p["metadata"]["name"]: p for p in by_kind(objects, "NetworkPolicy")}
    assert _ingress_sources(policies["rlfleet-rollout"], "grpc") == ["scheduler"]
    assert _ingress_sources(policies["rlfleet-reward"], "grpc") == ["scheduler"]
    assert _ingress_sources(policies["rlfleet-trainer"], "grpc") == ["scheduler"]
    assert _ingress_sources(policies["rlfleet-env"], "grpc") == ["scheduler"]
    assert sorted(_ingress_sources(policies["rlfleet-weightsync"], "grpc")) == [
        "rollout",
        "scheduler",
        "trainer",
    ]
    assert _ingress_sources(policies["rlfleet-scheduler"], "grpc") == [None]
    # Weight sync's data plane: the trainer pushes, rollout replicas pull; nobody else.
    assert sorted(_ingress_sources(policies["rlfleet-weightsync"], "data")) == [
        "rollout",
        "trainer",
    ]
    for name, policy in policies.items():
        if name != "rlfleet-weightsync":
            assert _ingress_sources(policy, "data") == [], name
    (redis_rule,) = policies["rlfleet-redis"]["spec"]["ingress"]
    (peer,) = redis_rule["from"]
    assert peer["podSelector"]["matchExpressions"][0]["values"] == list(
        ("scheduler", "rollout", "reward", "trainer", "weightsync")
    )


def test_scheduler_serves_the_rest_api_next_to_grpc():
    """Port http (8080) on the container and the Service, open to the same peers as gRPC."""
    for name, values, fullname in (
        ("default", {}, "rlfleet"),
        ("ci-values", load_values("ci-values"), "ci-fleet"),
    ):
        objects = render(values)
        scheduler = f"{fullname}-scheduler"
        container = _container(objects, "scheduler")
        assert {"name": "http", "containerPort": 8080, "protocol": "TCP"} in container["ports"]
        args = container["args"]
        assert args[args.index("--http-port") + 1] == "8080"
        ports = {p["name"]: p for p in find(objects, "Service", scheduler)["spec"]["ports"]}
        assert ports["http"]["targetPort"] == "http", name
        assert ports["http"]["port"] == (80 if name == "ci-values" else 8080)
        (api_rule, _metrics_rule) = find(objects, "NetworkPolicy", scheduler)["spec"]["ingress"]
        assert [p["port"] for p in api_rule["ports"]] == ["grpc", "http"]
        assert api_rule.get("from", []) == values.get("networkPolicy", {}).get("apiIngressFrom", [])
        for service in ("rollout", "reward", "env", "trainer", "weightsync"):
            assert "http" not in [p["name"] for p in _container(objects, service)["ports"]]
    # Token auth: the hashes Secret is mounted as a directory (rotations reach the pod).
    spec = next(
        s
        for w, s in pod_specs(render(load_values("ci-values")))
        if w["metadata"]["name"] == "ci-fleet-scheduler"
    )
    (volume,) = [v for v in spec["volumes"] if v["name"] == "api-tokens"]
    assert volume["secret"]["secretName"] == "rlfleet-api-tokens"
    (mount,) = [m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "api-tokens"]
    assert "subPath" not in mount and mount["readOnly"]


def _egress_ports_to(policy: dict, component: str) -> set[int]:
    return {
        p["port"]
        for rule in policy["spec"].get("egress", [])
        for peer in rule.get("to", [])
        if peer.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/component")
        == component
        for p in rule["ports"]
    }


def test_weightsync_serves_its_data_plane_on_a_fixed_port():
    """Port data (50052) on the container, the flag and the Service, with the same number
    (clients dial the port weight sync reports on the Service's address); trainer and rollout
    may reach it, in and out."""
    for values, fullname in ((None, "rlfleet"), (load_values("ci-values"), "ci-fleet")):
        objects = render(values)
        container = _container(objects, "weightsync")
        assert {"name": "data", "containerPort": 50052, "protocol": "TCP"} in container["ports"]
        args = container["args"]
        assert args[args.index("--data-port") + 1] == "50052"
        ports = {
            p["name"]: p
            for p in find(objects, "Service", f"{fullname}-weightsync")["spec"]["ports"]
        }
        assert ports["data"]["port"] == 50052 and ports["data"]["targetPort"] == "data"
        assert ports["data"]["protocol"] == "TCP"
        for service in ("scheduler", "rollout", "reward", "env", "trainer"):
            assert "data" not in [p["name"] for p in _container(objects, service)["ports"]]
            svc = find(objects, "Service", f"{fullname}-{service}")
            assert "data" not in [p["name"] for p in svc["spec"]["ports"]]
    # Egress (ci-values restricts it): trainer and rollout reach weight sync's gRPC and data
    # ports; the scheduler only its gRPC port.
    policies = {
        p["metadata"]["name"]: p for p in by_kind(render(load_values("ci-values")), "NetworkPolicy")
    }
    for caller in ("trainer", "rollout"):
        assert _egress_ports_to(policies[f"ci-fleet-{caller}"], "weightsync") == {50051, 50052}
    assert _egress_ports_to(policies["ci-fleet-scheduler"], "weightsync") == {50051}

    # Another port: the container, the flag, the Service and the egress rules follow.
    objects = render(
        {"weightsync": {"dataPort": 6000}, "networkPolicy": {"egress": {"enabled": True}}}
    )
    container = _container(objects, "weightsync")
    assert {"name": "data", "containerPort": 6000, "protocol": "TCP"} in container["ports"]
    assert container["args"][container["args"].index("--data-port") + 1] == "6000"
    ports = {p["name"]: p for p in find(objects, "Service", "rlfleet-weightsync")["spec"]["ports"]}
    assert ports["data"]["port"] == 6000
    trainer = find(objects, "NetworkPolicy", "rlfleet-trainer")
    assert _egress_ports_to(trainer, "weightsync") == {50051, 6000}

    # -1: off everywhere (clients use gRPC streams); weight sync is told so.
    objects = render(
        {"weightsync": {"dataPort": -1}, "networkPolicy": {"egress": {"enabled": True}}}
    )
    container = _container(objects, "weightsync")
    assert container["args"][container["args"].index("--data-port") + 1] == "-1"
    assert "data" not in [p["name"] for p in container["ports"]]
    svc = find(objects, "Service", "rlfleet-weightsync")
    assert "data" not in [p["name"] for p in svc["spec"]["ports"]]
    policies = {p["metadata"]["name"]: p for p in by_kind(objects, "NetworkPolicy")}
    assert _ingress_sources(policies["rlfleet-weightsync"], "data") == []
    assert _egress_ports_to(policies["rlfleet-trainer"], "weightsync") == {50051}


def test_data_port_clashing_with_another_port_is_refused():
    helm = _helm()
    with pytest.raises(helm.HelmError, match="weightsync.dataPort"):
        render({"weightsync": {"dataPort": 50051}})
    with pytest.raises(helm.HelmError, match="weightsync.dataPort"):
        render({"weightsync": {"dataPort": 9400}})


def test_token_auth_without_token_hashes_is_refused():
    with pytest.raises(Exception, match="scheduler.api.tokensSecret"):
        render({"scheduler": {"api": {"auth": "token"}}})


def test_ci_values_restrict_egress_to_peers_dns_and_the_api_server():
    objects = render(load_values("ci-values"))
    policies = {p["metadata"]["name"]: p for p in by_kind(objects, "NetworkPolicy")}
    scheduler = policies["ci-fleet-scheduler"]["spec"]
    assert "Egress" in scheduler["policyTypes"]
    assert any(
        peer.get("ipBlock", {}).get("cidr") == "10.0.0.1/32"
        for rule in scheduler["egress"]
        for peer in rule.get("to", [])
    )
    reward = policies["ci-fleet-reward"]["spec"]["egress"]
    callees = {
        peer.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/component")
        for rule in reward
        for peer in rule.get("to", [])
    }
    assert callees == {None}  # DNS and the external Redis only, no rlfleet service


def test_service_monitor_scrapes_every_service_as_rlfleet_jobs():
    objects = render(load_values("ci-values"))
    (sm,) = by_kind(objects, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    selected = sm["spec"]["selector"]["matchExpressions"][0]["values"]
    assert sorted(selected) == sorted(COMPONENTS)
    (endpoint,) = sm["spec"]["endpoints"]
    relabel = endpoint["relabelings"][0]
    assert relabel["targetLabel"] == "job" and relabel["replacement"] == "rlfleet-$1"
    scraped = set()
    for service in by_kind(objects, "Service"):
        if service["metadata"]["labels"]["app.kubernetes.io/component"] in COMPONENTS:
            assert endpoint["port"] in [p["name"] for p in service["spec"]["ports"]]
            scraped.add(service["metadata"]["labels"]["app.kubernetes.io/component"])
    assert scraped == set(COMPONENTS)  # the env Service included: job="rlfleet-env"


def test_prometheus_rule_carries_the_rules_file(promtool, tmp_path):
    objects = render(load_values("ci-values"))
    (rule,) = by_kind(objects, "PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]
    path = tmp_path / "from-chart.rules.yml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    run_promtool(promtool, "check", "rules", str(path))


def test_dashboards_ship_as_sidecar_configmaps():
    objects = render()
    maps = [
        o for o in by_kind(objects, "ConfigMap") if o["metadata"]["labels"].get("grafana_dashboard")
    ]
    shipped = {p.name: p.read_text() for p in DASHBOARDS.glob("*.json")}
    assert shipped, "no dashboards in deploy/grafana/dashboards"
    got = {}
    for cm in maps:
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        got.update(cm["data"])
    assert {k: v.strip() for k, v in got.items()} == {k: v.strip() for k, v in shipped.items()}
    assert not [
        o
        for o in by_kind(render({"dashboards": {"enabled": False}}), "ConfigMap")
        if "grafana_dashboard" in o["metadata"]["labels"]
    ]


@pytest.mark.parametrize("service", COMPONENTS)
@pytest.mark.parametrize("name", SETS)
def test_rendered_flags_env_and_config_load_into_the_service_settings(
    name, service, tmp_path, monkeypatch
):
    """A container's args, RLFLEET_* env and config.toml are accepted by load_config."""
    from rlfleet.common.config import load_config

    objects = render(load_values(name))
    cls = config_class(service)
    container = _container(objects, service)
    args = list(container["args"])
    if container["command"] == ["torchrun"]:
        # A trainer with several ranks: torchrun's flags, then `--module rlfleet.trainer` and
        # the same flags `rlfleet trainer` takes.
        i = args.index("--module")
        assert service == "trainer" and args[i + 1] == "rlfleet.trainer"
        args = [service, *args[i + 2 :]]
    else:
        assert container["command"] == ["rlfleet"]
    assert args[0] == service
    args = args[1:]
    for flag, field in (("--engine", "engine"),):
        # Engines the chart offers ahead of the rollout service (documented in its README).
        if flag in args and args[args.index(flag) + 1] not in _choices(cls, field):
            pytest.skip(
                f"{name}: {service} does not offer {field} {args[args.index(flag) + 1]!r} yet"
            )
    toml_text = find(objects, "ConfigMap", _config_map(objects, service))["data"]["config.toml"]
    tomllib.loads(toml_text)
    config_file = tmp_path / f"{service}.toml"
    config_file.write_text(toml_text)
    args[args.index("--config") + 1] = str(config_file)
    if "--api-tokens-file" in args:
        # Where the pod mounts the tokens Secret; here a file with one token hash.
        i = args.index("--api-tokens-file") + 1
        mount = next(m for m in container["volumeMounts"] if m["name"] == "api-tokens")
        assert args[i].startswith(mount["mountPath"] + "/") and mount["readOnly"]
        tokens = tmp_path / "api-tokens"
        tokens.write_text("0" * 64 + " write ci\n")
        args[i] = str(tokens)
    env = {}
    for var in container["env"]:
        if "value" in var:
            env[var["name"]] = var["value"].replace("$(RLFLEET_REDIS_PASSWORD)", "pw")
        elif "fieldRef" in var["valueFrom"]:  # the downward API, e.g. the pod's namespace
            env[var["name"]] = "rl"
        else:
            env[var["name"]] = "redis://redis.example:6379/0"
    for key in [k for k in os.environ if k.startswith("RLFLEET_")]:
        monkeypatch.delenv(key)
    prefix = f"RLFLEET_{service.upper()}_"
    for key, value in env.items():
        if key.startswith(prefix):
            monkeypatch.setenv(key, value)
    if "RLFLEET_API_TOKENS" in env:  # token hashes from a Secret, through the environment
        monkeypatch.setenv("RLFLEET_API_TOKENS", "0" * 64)
    cfg = load_config(cls, args)
    assert cfg.host == "0.0.0.0" and cfg.port == 50051 and cfg.metrics_port == 9400
    assert cfg.redis_url.startswith("redis://")
    for var in env:
        if var.startswith(prefix):
            field = var.removeprefix(prefix).lower()
            assert field in cls.model_fields, f"{service}: {var} sets no setting"
    if service == "weightsync":
        assert cfg.data_port == load_values(name).get("weightsync", {}).get("dataPort", 50052)
    if service == "scheduler":
        assert cfg.http_port == 8080
        assert cfg.auth == load_values(name).get("scheduler", {}).get("api", {}).get(
            "auth", "local"
        )
        # Jobs with a task.environment reach the env Service (its name and gRPC port).
        (env_service,) = [
            s
            for s in by_kind(objects, "Service")
            if s["metadata"]["labels"]["app.kubernetes.io/component"] == "env"
        ]
        (grpc,) = [p for p in env_service["spec"]["ports"] if p["name"] == "grpc"]
        assert cfg.env_address == f"{env_service['metadata']['name']}.rl.svc:{grpc['port']}"
    if service == "env":
        # It keeps episodes in memory: no Redis URL, no Redis password.
        assert not [v for v in env if "REDIS" in v], env
        assert cfg.redis_url == config_class("env").model_fields["redis_url"].default
    if service == "scheduler" and cfg.discovery == "kubernetes":
        assert cfg.rollout_namespace == "rl"
        assert cfg.rollout_selector == (
            "app.kubernetes.io/instance=rlfleet,app.kubernetes.io/component=rollout"
        )
        assert cfg.rollout_port == 50051


def _choices(cls, field: str) -> tuple:
    import typing

    return typing.get_args(cls.model_fields[field].annotation)


def _config_map(objects, service) -> str:
    for workload, spec in pod_specs(objects):
        if workload["metadata"]["labels"]["app.kubernetes.io/component"] == service:
            return next(v["configMap"]["name"] for v in spec["volumes"] if v["name"] == "config")
    raise AssertionError(service)


def _env_objects(objects: list[dict]) -> list[dict]:
    return [
        o
        for o in objects
        if o["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "env"
    ]


def test_env_service_is_one_pod_behind_a_service_the_scheduler_calls():
    """The env service: a Deployment of one pod (episodes live in its memory; Recreate, so
    two pods never hold episodes at once), a ClusterIP Service with grpc and metrics, the
    scheduler's --env-address on that Service, and the hardening every pod gets."""
    objects = render()
    deployment = find(objects, "Deployment", "rlfleet-env")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["command"] == ["rlfleet"] and container["args"][0] == "env"
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
        "grpc": 50051,
        "metrics": 9400,
    }
    service = find(objects, "Service", "rlfleet-env")
    assert service["spec"]["type"] == "ClusterIP"
    assert {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == {
        "grpc": (50051, "grpc"),
        "metrics": (9400, "metrics"),
    }
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    args = _container(objects, "scheduler")["args"]
    assert args[args.index("--env-address") + 1] == "rlfleet-env.rl.svc:50051"
    # The same security context, service account and probes as reward: it runs the model's
    # tool code in the same sandbox.
    reward = find(objects, "Deployment", "rlfleet-reward")["spec"]["template"]["spec"]
    assert spec["securityContext"] == reward["securityContext"]
    assert container["securityContext"] == reward["containers"][0]["securityContext"]
    assert spec["serviceAccountName"] == reward["serviceAccountName"]
    assert spec["automountServiceAccountToken"] is False
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["grpc"] == {"port": 50051, "service": ""}, probe
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["tmp"] == "/tmp"  # the sandbox's throwaway work directories
    assert "model" not in mounts
    assert {"requests", "limits"} <= set(container["resources"])
    assert not [e for e in container["env"] if "REDIS" in e["name"]]
    # Another Service port: the scheduler's address follows.
    objects = render({"env": {"service": {"grpcPort": 6000}}})
    args = _container(objects, "scheduler")["args"]
    assert args[args.index("--env-address") + 1] == "rlfleet-env.rl.svc:6000"


def test_env_service_can_be_turned_off_and_refuses_a_second_pod():
    objects = render({"env": {"enabled": False}})
    assert not _env_objects(objects)
    assert "--env-address" not in _container(objects, "scheduler")["args"]
    assert "refuses jobs with a task.environment" in notes({"env": {"enabled": False}})
    with pytest.raises(_helm().HelmError, match=r"env.replicas is 2: .*memory"):
        render({"env": {"replicas": 2}})
    render({"env": {"replicas": 2, "enabled": False}})  # off: nothing to refuse
    objects = render({"env": {"pdb": {"enabled": True}}})
    assert find(objects, "PodDisruptionBudget", "rlfleet-env")["spec"]["maxUnavailable"] == 1


def test_network_policies_let_only_the_scheduler_reach_env_and_env_reach_no_redis():
    objects = render({"networkPolicy": {"egress": {"enabled": True}}})
    policies = {p["metadata"]["name"]: p for p in by_kind(objects, "NetworkPolicy")}
    env = policies["rlfleet-env"]
    assert _ingress_sources(env, "grpc") == ["scheduler"]
    assert _ingress_sources(env, "metrics") == [None]
    # The scheduler may call env on its gRPC port; env calls nothing, not even Redis.
    assert _egress_ports_to(policies["rlfleet-scheduler"], "env") == {50051}
    for component in (*COMPONENTS, "redis"):
        assert _egress_ports_to(env, component) == set(), component
    assert _egress_ports_to(policies["rlfleet-reward"], "redis") == {6379}
    (redis_rule,) = policies["rlfleet-redis"]["spec"]["ingress"]
    (peer,) = redis_rule["from"]
    assert "env" not in peer["podSelector"]["matchExpressions"][0]["values"]
    # env off: the scheduler's egress no longer names it.
    objects = render({"env": {"enabled": False}, "networkPolicy": {"egress": {"enabled": True}}})
    scheduler = find(objects, "NetworkPolicy", "rlfleet-scheduler")
    assert _egress_ports_to(scheduler, "env") == set()


def test_notes_tell_how_to_reach_the_fleet():
    text = notes()
    assert "rlfleet-scheduler" in text and "rlfleet --url http://127.0.0.1:8080 submit" in text
    assert "port-forward svc/rlfleet-scheduler 8080:http" in text
    assert "--token" in notes(load_values("ci-values"))
    assert "WARNING: model.existingClaim is empty" in text
    assert "data plane on port 50052" in text
    assert "over gRPC streams" in notes({"weightsync": {"dataPort": -1}})
    assert "episodes in rlfleet-env (the scheduler's --env-address)" in text
    assert "WARNING" not in notes(load_values("ci-values"))
