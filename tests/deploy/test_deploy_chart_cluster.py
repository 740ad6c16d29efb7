"""The chart on a real GPU cluster (issue #17, "a chart for a real cluster").

Each `examples/values/*.yaml` renders, lints and validates strictly against Kubernetes 1.33,
and what it renders holds together:

- the trainer is a StatefulSet of `replicas` pods × `gpu.count` ranks under torchrun, whose
  environment (NODE_RANK, WORLD_SIZE, MASTER_ADDR, ...) and flags agree with that count;
  its Service reaches pod 0 only; probes that work on every ordinal;
- a vLLM rollout replica gets `--tensor-parallel-size` equal to its GPUs, which the rollout
  service's own settings class reads;
- a Hub or S3 model gets a download init container in every pod that reads it;
- Redis's maxmemory is below its memory limit and the buffer's bound below maxmemory;
- weight sync's memory and spool follow `model.sizeGiB`;
- values that cannot work fail to render with a sentence naming the value.

The scripts the pods run (files/fetch_model.py, files/trainer_probe.py) are tested here as
well, and the rendered torchrun line is run: two "pods" of a CPU trainer on loopback, where
rank 0 serves only once both have joined.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from deploy_helpers import CHART, REPO, _helm, by_kind, config_class, find, pod_specs, render

EXAMPLES = {p.stem: p for p in sorted((REPO / "examples" / "values").glob("*.yaml"))}
# The Kubernetes release the examples are written for (kubernetes-validate ships its schema).
KUBE = "1.33.0"
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}
FILES = CHART / "files"


def example(name: str) -> dict:
    return yaml.safe_load(EXAMPLES[name].read_text())


def merged(values: dict) -> dict:
    """The values as the templates see them: the file over the chart's defaults."""
    return _helm().Chart.load(str(CHART)).merge_values(values)


def component(objects: list[dict], name: str) -> tuple[dict, dict]:
    """(workload, pod spec) of one component."""
    for workload, spec in pod_specs(objects):
        if workload["metadata"]["labels"]["app.kubernetes.io/component"] == name:
            return workload, spec
    raise AssertionError(f"no workload for {name}")


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def flag(args: list[str], name: str) -> str:
    """The value of ``--name value`` or ``--name=value``."""
    for i, arg in enumerate(args):
        if arg == name:
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"no {name} in {args}")


def quantity_bytes(q: str | int) -> int:
    if isinstance(q, int | float):
        return int(q)
    num, unit = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)([kKMGTPE]i?)?", q).groups()
    power = {"k": 1, "K": 1, "M": 2, "G": 3, "T": 4, "P": 5, "E": 6}
    if not unit:
        return int(float(num))
    base = 1024 if unit.endswith("i") else 1000
    return int(float(num) * base ** power[unit[0]])


@pytest.fixture(scope="module", params=sorted(EXAMPLES))
def rendered(request) -> tuple[str, dict, list[dict]]:
    values = example(request.param)
    return request.param, merged(values), render(values)


def test_both_examples_are_shipped():
    assert set(EXAMPLES) == {"one-node-8xh100-qwen2.5-7b", "two-nodes-8xh100-qwen2.5-32b"}


# -- the examples render into valid Kubernetes 1.33 objects ------------------------------


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_matches_the_schema_and_lints(name):
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((CHART / "values.schema.json").read_text())
    errors = list(jsonschema.Draft7Validator(schema).iter_errors(merged(example(name))))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)
    report = _helm().lint(str(CHART), example(name), strict=True, namespace="rl")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"] and not problems, report


def test_every_object_validates_strictly_against_kubernetes_1_33(rendered):
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    from kubernetes_validate.utils import all_versions

    assert KUBE in all_versions(), f"kubernetes-validate has no {KUBE} schema"
    name, _values, objects = rendered
    for obj in objects:
        if obj["kind"] in CRD_KINDS:
            continue
        body = {k: v for k, v in obj.items() if k != "_template"}
        try:
            kv.validate(body, KUBE, strict=True)
        except kv.ValidationError as exc:
            pytest.fail(f"{name}: {obj['kind']} {obj['metadata']['name']} is not valid: {exc}")


def test_example_pods_and_init_containers_keep_the_security_context(rendered):
    name, _values, objects = rendered
    for workload, spec in pod_specs(objects):
        where = f"{name}: {workload['kind']} {workload['metadata']['name']}"
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        for container in spec["containers"] + spec.get("initContainers", []):
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"]["drop"] == ["ALL"], where


def test_example_trainer_flags_load_into_the_trainer_settings(rendered, tmp_path, monkeypatch):
    from rlfleet.common.config import load_config

    _name, _values, objects = rendered
    (container,) = component(objects, "trainer")[1]["containers"]
    args = container["args"]
    service_args = args[args.index("--module") + 2 :]
    config = tmp_path / "trainer.toml"
    config.write_text(find(objects, "ConfigMap", "rlfleet-trainer")["data"]["config.toml"])
    service_args[service_args.index("--config") + 1] = str(config)
    for key in [k for k in os.environ if k.startswith("RLFLEET_")]:
        monkeypatch.delenv(key)
    cfg = load_config(config_class("trainer"), service_args)
    assert cfg.port == 50051 and cfg.checkpoint_dir == "/var/lib/rlfleet/checkpoints"


# -- the trainer: replicas × gpu.count ranks ---------------------------------------------


def test_trainer_statefulset_ranks_match_replicas_times_gpus(rendered):
    name, values, objects = rendered
    t = values["trainer"]
    replicas, gpus = t["replicas"], t["gpu"]["count"]
    world = replicas * max(gpus, 1)
    assert t["ranks"] in (0, world), name  # the example states its ranks and they agree

    sts = find(objects, "StatefulSet", "rlfleet-trainer")
    assert not [
        d for d in by_kind(objects, "Deployment") if d["metadata"]["name"].endswith("-trainer")
    ]
    assert sts["spec"]["replicas"] == replicas
    assert sts["spec"]["podManagementPolicy"] == "Parallel"  # pod 0 waits for the others
    spec = sts["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == gpus
    assert container["resources"]["requests"]["nvidia.com/gpu"] == gpus

    # The ranks Service: headless, names resolvable before pods are ready.
    ranks_svc = find(objects, "Service", sts["spec"]["serviceName"])
    assert ranks_svc["spec"]["clusterIP"] == "None"
    assert ranks_svc["spec"]["publishNotReadyAddresses"] is True

    env = env_of(container)
    assert env["WORLD_SIZE"]["value"] == str(world)
    assert env["NNODES"]["value"] == str(replicas)
    assert env["NPROC_PER_NODE"]["value"] == str(max(gpus, 1))
    pod0 = f"rlfleet-trainer-0.{sts['spec']['serviceName']}.rl.svc"
    if replicas > 1:
        # Each pod's node rank is its ordinal, from the StatefulSet's pod-index label.
        assert env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == (
            "metadata.labels['apps.kubernetes.io/pod-index']"
        )
        assert env["MASTER_ADDR"]["value"] == pod0
    else:
        assert env["NODE_RANK"]["value"] == "0"
        assert env["MASTER_ADDR"]["value"] == "127.0.0.1"

    # torchrun gets the same numbers, then the trainer module with the usual flags.
    assert container["command"] == ["torchrun"]
    args = container["args"]
    assert flag(args, "--nnodes") == str(replicas)
    assert flag(args, "--nproc-per-node") == str(max(gpus, 1))
    assert flag(args, "--node-rank") == "$(NODE_RANK)"
    assert flag(args, "--master-addr") == env["MASTER_ADDR"]["value"]
    assert flag(args, "--master-port") == env["MASTER_PORT"]["value"]
    assert args[args.index("--module") + 1] == "rlfleet.trainer"
    rdzv = next(p for p in container["ports"] if p["name"] == "rdzv")
    assert str(rdzv["containerPort"]) == env["MASTER_PORT"]["value"]
    # Kubernetes expands $(VAR) only from variables defined before the one using it; args
    # may use any variable of the container.
    assert "NODE_RANK" in env

    # The client-facing Service: gRPC to pod 0 only, where global rank 0 serves.
    svc = find(objects, "Service", "rlfleet-trainer")
    assert svc["spec"]["selector"]["statefulset.kubernetes.io/pod-name"] == "rlfleet-trainer-0"
    assert svc["spec"].get("clusterIP") != "None"


def test_trainer_probes_work_on_every_ordinal(rendered):
    name, values, objects = rendered
    _, spec = component(objects, "trainer")
    (container,) = spec["containers"]
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        probe = container[kind]
        if values["trainer"]["replicas"] > 1:
            # Pods other than 0 serve no gRPC: an exec probe that checks pod 0 only.
            cmd = probe["exec"]["command"]
            assert cmd[0] == "python" and cmd[1].endswith("/trainer_probe.py"), (name, kind)
            assert cmd[2] == "50051"
            assert "grpc" not in probe
        else:
            assert probe["grpc"]["port"] == 50051, (name, kind)
    if values["trainer"]["replicas"] > 1:
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        assert mounts["scripts"]["mountPath"] == str(Path(cmd[1]).parent)


def test_default_trainer_stays_a_plain_single_process():
    for values in ({}, {"trainer": {"gpu": {"count": 0}}}):
        objects = render(values)
        sts = find(objects, "StatefulSet", "rlfleet-trainer")
        assert sts["spec"]["replicas"] == 1
        (container,) = sts["spec"]["template"]["spec"]["containers"]
        assert container["command"] == ["rlfleet"] and container["args"][0] == "trainer"
        env = env_of(container)
        assert not {"WORLD_SIZE", "MASTER_ADDR", "NODE_RANK", "RANK"} & set(env)
        assert container["livenessProbe"]["grpc"]["port"] == 50051
        assert "rdzv" not in [p["name"] for p in container["ports"]]
        assert "initContainers" not in sts["spec"]["template"]["spec"]
        # No ConfigMap of scripts when nothing runs them.
        assert not [
            c for c in by_kind(objects, "ConfigMap") if c["metadata"]["name"] == "rlfleet-scripts"
        ]


def test_a_trainer_over_several_pods_opens_the_network_between_them():
    values = {
        "trainer": {"replicas": 3, "gpu": {"count": 8},
                    "checkpoints": {"persistence": {"accessModes": ["ReadWriteMany"]}}},
        "networkPolicy": {"egress": {"enabled": True}},
    }  # fmt: skip
    objects = render(values)
    policy = find(objects, "NetworkPolicy", "rlfleet-trainer")["spec"]
    trainer_peer = {"app.kubernetes.io/name": "rlfleet", "app.kubernetes.io/instance": "rlfleet",
                    "app.kubernetes.io/component": "trainer"}  # fmt: skip
    # Rendezvous, then NCCL on ports it picks: every port, from and to trainer pods only.
    ingress = [r for r in policy["ingress"] if "ports" not in r]
    assert [p["podSelector"]["matchLabels"] for r in ingress for p in r["from"]] == [trainer_peer]
    egress = [r for r in policy["egress"] if "ports" not in r]
    assert [p["podSelector"]["matchLabels"] for r in egress for p in r["to"]] == [trainer_peer]
    # Single-pod trainers keep the tight policy.
    single = find(render(), "NetworkPolicy", "rlfleet-trainer")["spec"]
    assert all("ports" in r for r in single["ingress"])


def test_example_deploys_the_env_service_wired_to_the_scheduler(rendered):
    """A job with a task.environment works from `helm install -f <example>`: one env pod
    (CPU image, no GPU), its Service, and the scheduler's --env-address on it."""
    name, values, objects = rendered
    assert values["env"]["enabled"] and values["env"]["replicas"] == 1, name
    workload, spec = component(objects, "env")
    assert workload["kind"] == "Deployment" and workload["spec"]["replicas"] == 1
    (container,) = spec["containers"]
    assert "nvidia.com/gpu" not in str(container["resources"])
    assert not container["image"].endswith(values["image"]["cudaSuffix"])
    svc = find(objects, "Service", "rlfleet-env")
    (grpc,) = [p for p in svc["spec"]["ports"] if p["name"] == "grpc"]
    (scheduler,) = component(objects, "scheduler")[1]["containers"]
    assert flag(scheduler["args"], "--env-address") == f"rlfleet-env.rl.svc:{grpc['port']}"
    policy = find(objects, "NetworkPolicy", "rlfleet-env")["spec"]
    (grpc_rule,) = [
        r for r in policy["ingress"] if {"port": "grpc", "protocol": "TCP"} in r["ports"]
    ]
    assert [p["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
            for p in grpc_rule["from"]] == ["scheduler"]  # fmt: skip


def test_the_ranks_service_stays_out_of_the_service_monitor():
    values = {"metrics": {"serviceMonitor": {"enabled": True}}}
    objects = render(values)
    (sm,) = by_kind(objects, "ServiceMonitor")
    selected = set(sm["spec"]["selector"]["matchExpressions"][0]["values"])
    ranks = find(objects, "Service", "rlfleet-trainer-ranks")
    assert ranks["metadata"]["labels"]["app.kubernetes.io/component"] not in selected
    assert [p["name"] for p in ranks["spec"]["ports"]] == ["rdzv"]


# -- rollout: vLLM's tensor-parallel size is the replica's GPU count -----------------------


def test_vllm_rollout_tensor_parallel_size_equals_its_gpus(rendered, tmp_path, monkeypatch):
    from rlfleet.common.config import load_config

    name, values, objects = rendered
    _, spec = component(objects, "rollout")
    (container,) = spec["containers"]
    gpus = container["resources"]["limits"]["nvidia.com/gpu"]
    assert gpus == values["rollout"]["gpu"]["count"] > 1
    args = container["args"]
    assert flag(args, "--engine") == "vllm"
    assert "--tensor-parallel-size" in args
    assert flag(args, "--tensor-parallel-size") == str(gpus)
    # The rollout service reads that flag into the setting it hands vLLM's EngineArgs.
    config = tmp_path / "rollout.toml"
    config.write_text(find(objects, "ConfigMap", "rlfleet-rollout")["data"]["config.toml"])
    service_args = list(args[1:])
    service_args[service_args.index("--config") + 1] = str(config)
    for key in [k for k in os.environ if k.startswith("RLFLEET_")]:
        monkeypatch.delenv(key)
    cfg = load_config(config_class("rollout"), service_args)
    assert cfg.engine == "vllm" and cfg.tensor_parallel_size == gpus


def test_tensor_parallel_size_only_for_vllm_on_gpus():
    args = component(render(), "rollout")[1]["containers"][0]["args"]  # torch engine
    assert "--tensor-parallel-size" not in args
    cpu = render({"rollout": {"engine": "vllm", "gpu": {"count": 0}}})
    assert "--tensor-parallel-size" not in component(cpu, "rollout")[1]["containers"][0]["args"]


# -- model storage ------------------------------------------------------------------------


def test_downloaded_models_get_an_init_container_in_every_reader(rendered):
    name, values, objects = rendered
    m = values["model"]
    assert m["source"] in ("hub", "s3")
    path = f"/models/{(m['hub']['repo'] if m['source'] == 'hub' else m['s3']['prefix']).rsplit('/', 1)[-1]}"
    claim = find(objects, "PersistentVolumeClaim", "rlfleet-model")
    assert claim["spec"]["accessModes"] == m["download"]["persistence"]["accessModes"]
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    scripts = find(objects, "ConfigMap", "rlfleet-scripts")["data"]
    assert scripts["fetch_model.py"].strip() == (FILES / "fetch_model.py").read_text().strip()
    for reader in ("scheduler", "rollout", "trainer"):
        _, spec = component(objects, reader)
        (init,) = spec["initContainers"]
        assert init["name"] == "fetch-model"
        assert init["command"][0] == "python" and init["command"][1].endswith("/fetch_model.py")
        assert flag(init["args"], "--source") == m["source"]
        assert flag(init["args"], "--dest") == path
        assert init["image"] == spec["containers"][0]["image"]  # no other image to pull
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["model"]["persistentVolumeClaim"]["claimName"] == "rlfleet-model"
        (mount,) = [v for v in init["volumeMounts"] if v["name"] == "model"]
        assert not mount.get("readOnly")  # the download writes
        (mount,) = [v for v in spec["containers"][0]["volumeMounts"] if v["name"] == "model"]
        assert mount["readOnly"] is True  # the service only reads
        env = env_of(init)
        if m["source"] == "hub":
            assert flag(init["args"], "--repo") == m["hub"]["repo"]
        else:
            assert flag(init["args"], "--bucket") == m["s3"]["bucket"]
            for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                assert env[var]["valueFrom"]["secretKeyRef"]["name"] == m["s3"]["credentialsSecret"]
    rollout_args = component(objects, "rollout")[1]["containers"][0]["args"]
    assert flag(rollout_args, "--model-path") == path  # replicas preload the download


def test_hub_token_secret_and_per_pod_downloads():
    values = {"model": {"source": "hub", "hub": {"repo": "org/Private-7B", "private": True,
                                                  "tokenSecret": "hf", "tokenSecretKey": "t"},
                        "download": {"persistence": {"enabled": False, "size": "20Gi"}}}}  # fmt: skip
    objects = render(values)
    assert not [
        c
        for c in by_kind(objects, "PersistentVolumeClaim")
        if c["metadata"]["name"] == "rlfleet-model"
    ]
    for reader in ("scheduler", "rollout", "trainer"):
        _, spec = component(objects, reader)
        (init,) = spec["initContainers"]
        assert env_of(init)["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "t"}
        volume = next(v for v in spec["volumes"] if v["name"] == "model")
        assert volume["emptyDir"] == {"sizeLimit": "20Gi"}
        # Its own volume: the scheduler (tokenizer only) fetches no weights.
        assert ("--metadata-only" in init["args"]) is (reader == "scheduler")


def test_a_read_write_once_claim_is_allowed_when_the_readers_are_pinned_to_one_node():
    pin = {"nodeSelector": {"kubernetes.io/hostname": "gpu-0"}}
    values = {"model": {"existingClaim": "models", "accessMode": "ReadWriteOnce"},
              "scheduler": pin, "rollout": pin, "trainer": pin}  # fmt: skip
    render(values)  # no error
    values["trainer"] = {"nodeSelector": {"kubernetes.io/hostname": "gpu-1"}}
    with pytest.raises(_helm().HelmError, match="model.accessMode ReadWriteOnce"):
        render(values)


# -- Redis and the buffer -----------------------------------------------------------------


def test_redis_maxmemory_is_below_its_limit_and_the_buffer_below_maxmemory(rendered):
    name, values, objects = rendered
    conf = find(objects, "ConfigMap", "rlfleet-redis")["data"]["redis.conf"]
    assert "maxmemory-policy noeviction" in conf
    (maxmemory,) = [int(x) for x in re.findall(r"^maxmemory (\d+)$", conf, re.M)]
    limit = quantity_bytes(values["redis"]["resources"]["limits"]["memory"])
    assert maxmemory < limit
    assert maxmemory == limit * values["redis"]["maxmemoryPercent"] // 100
    reward = component(objects, "reward")[1]["containers"][0]
    bound = int(flag(reward["args"], "--buffer-max-len"))
    sample_bytes = values["buffer"]["sampleTokens"] * 16 + 4096
    assert 0 < bound * sample_bytes < maxmemory
    assert bound == maxmemory * values["buffer"]["memoryPercent"] // 100 // sample_bytes
    # The bound leaves room for a step's samples (the examples' job specs: 128 x 8, 64 x 8).
    assert bound >= 2 * 1024


@pytest.mark.parametrize(
    "limit, maxmemory",
    [("4Gi", 3435973836), ("4096Mi", 3435973836), ("8G", 6400000000), ("1.5Gi", 1288490188)],
)
def test_redis_maxmemory_reads_any_memory_unit(limit, maxmemory):
    values = {"redis": {"resources": {"limits": {"memory": limit}}}}
    conf = find(render(values), "ConfigMap", "rlfleet-redis")["data"]["redis.conf"]
    assert re.findall(r"^maxmemory (\d+)$", conf, re.M) == [str(maxmemory)]
    assert maxmemory == quantity_bytes(limit) * 80 // 100


def test_buffer_bound_from_values_or_reward_config():
    objects = render({"buffer": {"maxLen": 1000}})
    args = component(objects, "reward")[1]["containers"][0]["args"]
    assert flag(args, "--buffer-max-len") == "1000"
    # A bound in reward's own settings is left alone (no flag overrides it).
    objects = render({"reward": {"config": {"buffer_max_len": 500}}})
    assert "--buffer-max-len" not in component(objects, "reward")[1]["containers"][0]["args"]
    # An external Redis: nothing to derive it from.
    objects = render({"redis": {"enabled": False, "external": {"url": "redis://r:6379/0"}}})
    assert "--buffer-max-len" not in component(objects, "reward")[1]["containers"][0]["args"]
    conf = find(render({"redis": {"maxmemoryPercent": 0}}), "ConfigMap", "rlfleet-redis")
    assert not re.search(r"^maxmemory \d", conf["data"]["redis.conf"], re.M)


# -- weight sync from model.sizeGiB -------------------------------------------------------


def _weightsync_sizes(objects) -> tuple[str, str, str]:
    res = component(objects, "weightsync")[1]["containers"][0]["resources"]
    spool = find(objects, "PersistentVolumeClaim", "rlfleet-weightsync-spool")
    return (
        res["requests"]["memory"],
        res["limits"]["memory"],
        spool["spec"]["resources"]["requests"]["storage"],
    )


def test_weightsync_sizes_follow_model_size(rendered):
    name, values, objects = rendered
    size = values["model"]["sizeGiB"]
    keep = values["weightsync"]["config"].get("keep_versions", 2)
    overhead = values["weightsync"]["sizing"]["memoryOverheadGiB"]
    memory = f"{math.ceil(keep * size + overhead)}Gi"
    spool = f"{math.ceil(keep * size * 1.1)}Gi"
    assert _weightsync_sizes(objects) == (memory, memory, spool), name


@pytest.mark.parametrize(
    "size, keep, expect",
    [(14.2, None, ("33Gi", "33Gi", "32Gi")), (61, 3, ("187Gi", "187Gi", "202Gi")),
     (0, None, ("8Gi", "48Gi", "50Gi"))],
)  # fmt: skip
def test_weightsync_sizing_formula(size, keep, expect):
    values = {"model": {"sizeGiB": size}}
    if keep is not None:
        values["weightsync"] = {"config": {"keep_versions": keep}}
    # keep_versions counts the version arriving: 2 × 14.2 + 4 = 32.4 -> 33; 2 × 14.2 × 1.1 =
    # 31.24 -> 32; 0: values as given.
    assert _weightsync_sizes(render(values)) == expect


# -- values that cannot work ----------------------------------------------------------------

RWX = {"persistence": {"accessModes": ["ReadWriteMany"]}}


@pytest.mark.parametrize(
    "bad, says",
    [
        # Trainer GPUs that do not divide the ranks, and ranks that disagree with the pods.
        ({"trainer": {"ranks": 12, "gpu": {"count": 8}}},
         r"trainer\.ranks \(12\) is not a multiple of trainer\.gpu\.count \(8\)"),
        ({"trainer": {"ranks": 16, "replicas": 1, "gpu": {"count": 8}}},
         r"trainer\.ranks \(16\) must equal trainer\.replicas \(1\) × trainer\.gpu\.count .*"
         r"set trainer\.replicas to 2"),
        # A Hub model that needs a token, without one.
        ({"model": {"source": "hub", "hub": {"repo": "org/Gated-70B", "private": True}}},
         r"model\.hub\.private is true but model\.hub\.tokenSecret is empty"),
        ({"model": {"source": "hub"}}, r"model\.hub\.repo"),
        ({"model": {"source": "s3"}}, r"model\.s3\.bucket"),
        # Access modes pods on several nodes cannot share.
        ({"model": {"existingClaim": "models", "accessMode": "ReadWriteOnce"}},
         r"model\.accessMode ReadWriteOnce"),
        ({"model": {"existingClaim": "models", "accessMode": "ReadWriteOncePod"}},
         r"model\.accessMode ReadWriteOncePod"),
        ({"model": {"source": "hub", "hub": {"repo": "Qwen/Qwen2.5-7B"},
                    "download": {"persistence": {"accessModes": ["ReadWriteOnce"]}}}},
         r"model\.download\.persistence\.accessModes \[ReadWriteOnce\]"),
        ({"model": {"source": "hub", "hub": {"repo": "Qwen/Qwen2.5-7B"},
                    "existingClaim": "models"}},
         r"model\.accessMode is ReadOnlyMany, but model\.source hub downloads"),
        ({"trainer": {"replicas": 2}},
         r"trainer\.checkpoints\.persistence\.accessModes \[ReadWriteOnce\] cannot be shared"),
        ({"trainer": {"replicas": 2, "checkpoints": {"persistence": {"enabled": False}}}},
         r"trainer\.checkpoints\.persistence\.enabled is false with trainer\.replicas 2"),
        # Other sums that cannot come out.
        ({"buffer": {"maxLen": 100000}}, r"buffer\.maxLen \(100000 samples"),
        ({"rollout": {"engine": "vllm", "gpu": {"count": 4},
                      "config": {"tensor_parallel_size": 2}}},
         r"rollout\.config\.tensor_parallel_size \(2\) differs from rollout\.gpu\.count \(4\)"),
        ({"model": {"source": "hub", "hub": {"repo": "Qwen/Qwen2.5-7B"}, "path": "/data/q"}},
         r"model\.path \(/data/q\) must be a directory under model\.mountPath"),
        # The schema's share.
        ({"trainer": {"replicas": 0}}, r"/trainer/replicas"),
        ({"model": {"source": "gcs"}}, r"/model/source"),
        ({"redis": {"maxmemoryPercent": 100}}, r"/redis/maxmemoryPercent"),
    ],
)  # fmt: skip
def test_bad_values_fail_with_a_message_naming_the_value(bad, says):
    with pytest.raises(_helm().HelmError, match=says):
        render(bad)


def test_the_good_neighbours_of_the_bad_values_render():
    render({"trainer": {"ranks": 16, "replicas": 2, "gpu": {"count": 8}, "checkpoints": RWX}})
    render({"trainer": {"ranks": 3, "replicas": 3, "gpu": {"count": 0}, "checkpoints": RWX}})
    render({"model": {"source": "hub", "hub": {"repo": "org/Gated-70B", "private": True,
                                                "tokenSecret": "hf"}}})  # fmt: skip
    render({"model": {"existingClaim": "models", "accessMode": "ReadWriteMany"}})
    render({"buffer": {"maxLen": 5000}})
    render({"rollout": {"engine": "vllm", "gpu": {"count": 4},
                        "config": {"tensor_parallel_size": 4}}})  # fmt: skip


# -- files/fetch_model.py -----------------------------------------------------------------


def _fetch_module():
    spec = importlib.util.spec_from_file_location("fetch_model", FILES / "fetch_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sigv4_matches_the_aws_documentation_examples():
    """The S3 Signature Version 4 examples of the AWS docs ("Authenticating Requests:
    Using the Authorization Header", GET Object and GET Bucket (List Objects))."""
    fm = _fetch_module()
    common = dict(host="examplebucket.s3.amazonaws.com", access_key="AKIAIOSFODNN7EXAMPLE",
                  secret_key="wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", region="us-east-1",
                  amz_date="20130524T000000Z", payload_sha256=fm.EMPTY_SHA256)  # fmt: skip
    dated = {"x-amz-date": "20130524T000000Z", "x-amz-content-sha256": fm.EMPTY_SHA256}
    auth = fm.sign_v4(method="GET", path="/test.txt", query={},
                      headers={"Range": "bytes=0-9", **dated}, **common)  # fmt: skip
    assert auth == (
        "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, "
        "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, "
        "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
    )
    auth = fm.sign_v4(method="GET", path="/", query={"max-keys": "2", "prefix": "J"},
                      headers=dated, **common)  # fmt: skip
    assert auth.endswith(
        "Signature=34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7"
    )


class _FakeS3(BaseHTTPRequestHandler):
    """Path-style S3: ListObjectsV2 two keys a page, GetObject; checks every signature."""

    objects: dict[str, bytes] = {}
    requests: list[str] = []
    module = None

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
        raw_path = urllib.parse.unquote(url.path)
        type(self).requests.append(self.path)
        signed = {k: self.headers[k] for k in ("x-amz-date", "x-amz-content-sha256")}
        expected = self.module.sign_v4(
            method="GET", host=self.headers["Host"], path=raw_path, query=query, headers=signed,
            payload_sha256=signed["x-amz-content-sha256"], access_key="AK", secret_key="SK",
            region="eu-west-1", amz_date=signed["x-amz-date"],
        )  # fmt: skip
        if self.headers.get("Authorization") != expected:
            return self._send(403, b"<Error><Code>SignatureDoesNotMatch</Code></Error>")
        bucket, _, key = raw_path.lstrip("/").partition("/")
        assert bucket == "models"
        if not key:
            keys = sorted(k for k in self.objects if k.startswith(query.get("prefix", "")))
            start = int(query.get("continuation-token") or 0)
            page, more = keys[start : start + 2], start + 2 < len(keys)
            ns = "http://s3.amazonaws.com/doc/2006-03-01/"
            items = "".join(
                f"<Contents><Key>{k}</Key><Size>{len(self.objects[k])}</Size></Contents>"
                for k in page
            )
            token = f"<NextContinuationToken>{start + 2}</NextContinuationToken>" if more else ""
            body = (f'<ListBucketResult xmlns="{ns}">{items}'
                    f"<IsTruncated>{str(more).lower()}</IsTruncated>{token}</ListBucketResult>")  # fmt: skip
            return self._send(200, body.encode())
        if key not in self.objects:
            return self._send(404, b"<Error><Code>NoSuchKey</Code></Error>")
        return self._send(200, self.objects[key])

    def _send(self, code: int, body: bytes):
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def fake_s3():
    fm = _fetch_module()
    _FakeS3.module = fm
    _FakeS3.requests = []
    _FakeS3.objects = {
        "hf/Tiny/config.json": b'{"model_type": "llama"}',
        "hf/Tiny/tokenizer.json": b"{}",
        "hf/Tiny/model-00001-of-00002.safetensors": b"a" * 1000,
        "hf/Tiny/model-00002-of-00002.safetensors": b"b" * 500,
        "hf/Tiny/sub/extra.txt": b"x",
        "hf/Other/config.json": b"{}",
    }
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeS3)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield fm, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _s3_args(fm, endpoint: str, dest: Path, *extra: str):
    return fm.parse(["--source", "s3", "--dest", str(dest), "--bucket", "models",
                     "--prefix", "hf/Tiny/", "--endpoint", endpoint, "--path-style",
                     "--region", "eu-west-1", "--poll-s", "0.05", *extra])  # fmt: skip


def test_s3_download_signs_pages_and_is_skipped_once_complete(fake_s3, tmp_path, monkeypatch):
    fm, endpoint = fake_s3
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AK")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "SK")
    dest = tmp_path / "models" / "Tiny"
    args = _s3_args(fm, endpoint, dest)
    assert fm.fetch_once(args, fm.s3_download(args)) == "downloaded"
    got = {str(p.relative_to(dest)): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    marker = json.loads(got.pop(fm.MARKER))
    assert got == {k.removeprefix("hf/Tiny/"): v for k, v in _FakeS3.objects.items()
                   if k.startswith("hf/Tiny/")}  # fmt: skip
    assert marker["identity"]["bucket"] == "models" and marker["files"] == 5
    assert not (dest / fm.LOCK).exists()
    listed = [r for r in _FakeS3.requests if "list-type=2" in r]
    assert len(listed) == 3  # five keys, two a page
    # The next pod, or a restart: nothing is requested.
    _FakeS3.requests.clear()
    assert fm.fetch_once(args, fm.s3_download(args)) == "present"
    assert _FakeS3.requests == []
    # Wrong credentials are refused by name, not retried for ever.
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    other = _s3_args(fm, endpoint, tmp_path / "models" / "Again")
    with pytest.raises(SystemExit, match="HTTP 403"):
        fm.fetch_once(other, fm.s3_download(other))


def test_s3_metadata_only_and_resume(fake_s3, tmp_path, monkeypatch):
    fm, endpoint = fake_s3
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AK")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "SK")
    dest = tmp_path / "Tiny"
    meta = _s3_args(fm, endpoint, dest, "--metadata-only")
    assert fm.fetch_once(meta, fm.s3_download(meta)) == "downloaded"
    assert not list(dest.glob("*.safetensors")) and (dest / "tokenizer.json").is_file()
    # A metadata-only copy does not satisfy a reader of the weights; files already there
    # with the right size are kept (a download cut short goes on from where it was).
    (dest / "model-00002-of-00002.safetensors").write_bytes(b"b" * 500)
    _FakeS3.requests.clear()
    full = _s3_args(fm, endpoint, dest)
    assert fm.fetch_once(full, fm.s3_download(full)) == "downloaded"
    fetched = [r for r in _FakeS3.requests if "list-type" not in r]
    assert fetched == ["/models/hf/Tiny/model-00001-of-00002.safetensors"]
    assert (dest / "model-00001-of-00002.safetensors").read_bytes() == b"a" * 1000
    assert fm.fetch_once(meta, fm.s3_download(meta)) == "present"  # the whole serves both


def test_hub_download_once_per_source(tmp_path, monkeypatch):
    import huggingface_hub

    fm = _fetch_module()
    calls = []

    def fake_snapshot_download(**kwargs):
        calls.append(kwargs)
        Path(kwargs["local_dir"], "config.json").write_text("{}")
        return kwargs["local_dir"]

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    dest = tmp_path / "Qwen2.5-7B-Instruct"
    argv = ["--source", "hub", "--dest", str(dest), "--repo", "Qwen/Qwen2.5-7B-Instruct"]
    assert fm.main(argv) == 0
    assert calls[-1]["repo_id"] == "Qwen/Qwen2.5-7B-Instruct" and calls[-1]["revision"] == "main"
    assert calls[-1]["local_dir"] == str(dest) and calls[-1]["ignore_patterns"] is None
    fm.main(argv)
    assert len(calls) == 1  # complete: skipped
    fm.main([*argv, "--revision", "abc123"])  # another revision is another copy
    assert len(calls) == 2 and calls[-1]["revision"] == "abc123"
    meta = tmp_path / "meta"
    fm.main(["--source", "hub", "--dest", str(meta), "--repo", "r/m", "--metadata-only",
             "--ignore", "original/*"])  # fmt: skip
    assert calls[-1]["ignore_patterns"][0] == "original/*"
    assert "*.safetensors" in calls[-1]["ignore_patterns"]


def test_a_held_lock_makes_others_wait_and_a_stale_one_is_taken_over(tmp_path):
    fm = _fetch_module()
    dest = tmp_path / "m"
    args = fm.parse(["--source", "hub", "--dest", str(dest), "--repo", "r/m",
                     "--poll-s", "0.05", "--stale-s", "30"])  # fmt: skip
    ran = []

    def download(d: Path) -> int:
        ran.append(d)
        return 1

    # Another pod holds a fresh lock and finishes 0.3 s later: this one waits, then skips.
    dest.mkdir()
    (dest / fm.LOCK).mkdir()

    def other_pod_finishes():
        time.sleep(0.3)
        fm.write_marker(dest, fm.identity(args), metadata_only=False, files=1)
        (dest / fm.LOCK).rmdir()

    thread = threading.Thread(target=other_pod_finishes)
    thread.start()
    assert fm.fetch_once(args, download) == "waited"
    thread.join()
    assert ran == []
    # A lock nobody refreshed for longer than --stale-s (its pod was killed): taken over.
    (dest / fm.MARKER).unlink()
    (dest / fm.LOCK).mkdir()
    old = time.time() - 60
    os.utime(dest / fm.LOCK, (old, old))
    assert fm.fetch_once(args, download) == "downloaded"
    assert ran == [dest] and not (dest / fm.LOCK).exists()


# -- files/trainer_probe.py ---------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _probe(port: int, node_rank: str, timeout_s: str = "3") -> subprocess.CompletedProcess:
    env = {**os.environ, "NODE_RANK": node_rank}
    return subprocess.run(
        [sys.executable, str(FILES / "trainer_probe.py"), str(port), "", timeout_s],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_trainer_probe_checks_rank_zero_and_passes_elsewhere():
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    port = _free_port()
    assert _probe(port, "0").returncode == 1  # nothing serves: pod 0 is not healthy
    assert _probe(port, "1").returncode == 0  # other pods serve nothing, by design
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    try:
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert _probe(port, "0").returncode == 0
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        result = _probe(port, "0")
        assert result.returncode == 1 and "NOT_SERVING" in result.stderr
    finally:
        server.stop(None)


# -- the rendered torchrun line, run -------------------------------------------------------


def _pod_command(container: dict, *, node: int, subst: dict[str, str], env: dict[str, str]):
    """argv and environment of one "pod": $(VAR) expanded as Kubernetes does."""
    pod_env = {}
    for var in container["env"]:
        if "value" in var:
            pod_env[var["name"]] = var["value"]
        elif "fieldRef" in var["valueFrom"]:
            path = var["valueFrom"]["fieldRef"]["fieldPath"]
            pod_env[var["name"]] = str(node) if "pod-index" in path else "rl"
        else:
            pod_env[var["name"]] = "unused"
    pod_env.update(env)

    def expand(text: str) -> str:
        for old, new in subst.items():
            text = text.replace(old, new)
        return re.sub(r"\$\((\w+)\)", lambda m: pod_env[m.group(1)], text)

    pod_env = {k: expand(v) for k, v in pod_env.items()}
    return [expand(a) for a in container["command"] + container["args"]], pod_env


@pytest.mark.slow
def test_rendered_torchrun_line_joins_two_pods_and_rank_zero_serves(redis_url, tmp_path):
    """A CPU trainer over two "pods" (two torchrun agents on loopback, as the rendered pod
    spec runs them): rank 0 does not serve until pod 1 has joined, then it does."""
    values = {
        "redis": {"enabled": False, "external": {"url": "redis://unused:6379/0"}},
        "trainer": {"replicas": 2, "ranks": 2, "gpu": {"count": 0},
                    "config": {"device": "cpu", "torch_threads": 1},
                    "checkpoints": {"persistence": {"accessModes": ["ReadWriteMany"]}}},
    }  # fmt: skip
    objects = render(values)
    sts = find(objects, "StatefulSet", "rlfleet-trainer")
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    config = tmp_path / "trainer.toml"
    config.write_text(find(objects, "ConfigMap", "rlfleet-trainer")["data"]["config.toml"])
    grpc_port, rdzv_port = _free_port(), _free_port()
    master = container["env"][[e["name"] for e in container["env"]].index("MASTER_ADDR")]["value"]
    subst = {
        master: "127.0.0.1",  # what pod 0's DNS name resolves to, here
        "--master-port=29500": f"--master-port={rdzv_port}",
        "/etc/rlfleet/config.toml": str(config),
        "/var/lib/rlfleet/checkpoints": str(tmp_path / "checkpoints"),
        "rlfleet-weightsync.rl.svc:50051": "",
    }
    torchrun = str(Path(sys.executable).parent / "torchrun")
    procs: list[subprocess.Popen] = []

    def start_pod(node: int) -> subprocess.Popen:
        argv, env = _pod_command(container, node=node, subst=subst, env={
            "RLFLEET_TRAINER_REDIS_URL": redis_url,
            "MASTER_PORT": str(rdzv_port),
            "HOME": str(tmp_path / "home"),
            "XDG_CACHE_HOME": str(tmp_path / "home" / ".cache"),
        })  # fmt: skip
        assert argv[0] == "torchrun"
        argv[0] = torchrun
        # Both "pods" share this host: pod 1's ranks never bind a port, pod 0's rank 0 binds
        # the gRPC port (and the metrics port, given another number here).
        argv[argv.index("--port") + 1] = str(grpc_port)
        argv[argv.index("--metrics-port") + 1] = str(_free_port())
        log = open(tmp_path / f"pod-{node}.log", "wb")  # noqa: SIM115 - closed with the test
        proc = subprocess.Popen(argv, env={**os.environ, **env, "OMP_NUM_THREADS": "1"},
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        procs.append(proc)
        return proc

    def serving(deadline_s: float) -> bool:
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            if _probe(grpc_port, "0", "2").returncode == 0:
                return True
            if any(p.poll() is not None for p in procs):
                return False
            time.sleep(1.0)
        return False

    try:
        start_pod(0)
        assert not serving(8.0), "rank 0 served before pod 1 joined the rendezvous"
        assert procs[0].poll() is None, (tmp_path / "pod-0.log").read_text(errors="replace")
        start_pod(1)
        assert serving(240.0), "\n".join(
            (tmp_path / f"pod-{i}.log").read_text(errors="replace")[-3000:] for i in range(2)
        )
        assert _probe(grpc_port, "1").returncode == 0  # pod 1's probe passes without serving
        assert all(p.poll() is None for p in procs)
    finally:
        for proc in procs:  # each agent leads its own session: stop it and its ranks
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def test_nothing_here_assumes_the_clock():
    # The S3 signer stamps requests with UTC time (AWS refuses a skew over 15 minutes).
    fm = _fetch_module()
    request = fm.S3(bucket="b", region="us-east-1", access_key="a", secret_key="s")._request(
        "k", {}
    )
    stamp = datetime.datetime.strptime(request.headers["X-amz-date"], "%Y%m%dT%H%M%SZ")
    now = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
    assert abs((now - stamp).total_seconds()) < 60
    assert request.full_url == "https://b.s3.us-east-1.amazonaws.com/k"


def test_the_weight_group_opens_trainer_and_rollout_to_each_other_when_asked():
    """networkPolicy.weightGroup: a collective job's gloo group connects every member to
    every other on ports gloo picks; the trainer meets the replicas at its pod IP."""
    objects = render({"networkPolicy": {"weightGroup": True}})
    for name in ("trainer", "rollout"):
        policy = find(objects, "NetworkPolicy", f"rlfleet-{name}")["spec"]
        open_from = [
            {p["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for p in r["from"]}
            for r in policy["ingress"] if "ports" not in r
        ]  # fmt: skip
        assert {"trainer", "rollout"} in open_from, (name, open_from)
    closed = find(render(), "NetworkPolicy", "rlfleet-rollout")["spec"]  # the default: off
    assert all("ports" in r for r in closed["ingress"])
    trainer = find(objects, "StatefulSet", "rlfleet-trainer")
    env = {e["name"]: e for e in trainer["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["RLFLEET_TRAINER_WEIGHT_GROUP_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "status.podIP"
    )
