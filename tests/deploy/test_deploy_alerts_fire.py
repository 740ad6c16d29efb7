"""Alerts that fire (issue #17, item 4): the project's alert rules, end to end, in a real
Prometheus and a real Alertmanager (Debian's ``prometheus`` and ``prometheus-alertmanager``).

Two real rollout replica processes (``python -m rlfleet.rollout``, no model loaded: the
cheapest rlfleet process that serves /metrics) are scraped as ``job="rlfleet-rollout"``,
the job name of deploy/prometheus/prometheus.yml and of the chart's ServiceMonitor.
Prometheus evaluates deploy/prometheus/rules/rlfleet.rules.yml and sends to Alertmanager;
while both replicas are up RlfleetServiceDown stays quiet; after one replica is killed -9
Alertmanager receives RlfleetServiceDown for that replica's target, and for no other.

Everything listens on loopback only; every process is stopped by its PID at the end.
"""

from __future__ import annotations

import re
import time
import urllib.parse
from datetime import datetime
from pathlib import Path

import pytest
import yaml
from deploy_helpers import (  # noqa: F401 - fixtures
    alertmanager_bin,
    daemon,
    get_json,
    prometheus_bin,
    rules_with_short_for,
)
from rlfleet.common.procs import free_port

pytestmark = pytest.mark.slow

INTERVAL_S = 1  # scrape and rule evaluation interval
# The `for:` every alert gets in the test's copy of the rules (see the test).
FOR_S = 3
# Deadline of each wait below (all polled): it only bounds a hang; an idle machine takes a
# few seconds, a loaded 2-core one may take much longer.
WAIT_S = 90
ALERT = "RlfleetServiceDown"
# Fires here because no scheduler is scraped: its arrival in Alertmanager shows the whole
# path (rules -> Prometheus -> Alertmanager) works before RlfleetServiceDown is checked
# to be quiet, so that check is not passing merely because nothing gets delivered yet.
CANARY = "RlfleetSchedulerAbsent"
REPLICA_ARGS = ["--device", "cpu", "--torch-threads", "1", "--log-format", "text"]


def _am_alerts(am_url: str) -> list[dict]:
    return get_json(f"{am_url}/api/v2/alerts")


def _named(alerts: list[dict], name: str) -> list[dict]:
    return [a for a in alerts if a["labels"].get("alertname") == name]


def _wait_am_alert(am_url: str, name: str) -> list[dict]:
    """Polls Alertmanager until it holds an active alert ``name``; returns those alerts."""
    end = time.monotonic() + WAIT_S
    while True:
        alerts = _am_alerts(am_url)
        found = [a for a in _named(alerts, name) if a["status"]["state"] == "active"]
        if found:
            return found
        assert time.monotonic() < end, f"{name} did not reach Alertmanager: {alerts}"
        time.sleep(0.5)


def _wait_targets_up(prom_url: str, instances: list[str]) -> None:
    end = time.monotonic() + WAIT_S
    while True:
        active = get_json(f"{prom_url}/api/v1/targets")["data"]["activeTargets"]
        up = {t["labels"]["instance"] for t in active if t["health"] == "up"}
        if up >= set(instances):
            return
        assert time.monotonic() < end, f"targets not up: {active}"
        time.sleep(0.3)


def _prometheus_alerts(prom_url: str, name: str) -> list[dict]:
    """Prometheus's own pending and firing alerts named ``name``."""
    alerts = get_json(f"{prom_url}/api/v1/alerts")["data"]["alerts"]
    return [a for a in alerts if a["labels"]["alertname"] == name]


def _unix(rfc3339: str) -> float:
    """Alertmanager's nanosecond RFC 3339 times, which fromisoformat does not take whole."""
    text = re.sub(r"(\.\d{6})\d+", r"\1", rfc3339).replace("Z", "+00:00")
    return datetime.fromisoformat(text).timestamp()


def test_replica_down_alert_reaches_alertmanager(
    service_factory,
    prometheus_bin,  # noqa: F811 - the fixture imported above
    alertmanager_bin,  # noqa: F811 - the fixture imported above
    tmp_path: Path,
):
    replicas = [
        service_factory(
            f"rollout-{i}",
            "rlfleet.rollout",
            [*REPLICA_ARGS, "--replica-id", f"rollout-{i}"],
            env={"OMP_NUM_THREADS": "1"},
        )
        for i in range(2)
    ]
    instances = [f"127.0.0.1:{r.info['metrics_port']}" for r in replicas]

    # A temporary copy of the rules whose `for:` durations are FOR_S seconds: the shipped
    # ones hold an alert pending for minutes (2m for RlfleetServiceDown), which would make
    # this test that long. Only the `for:` values change (the YAML is parsed and written
    # back, not edited as text), so the expressions, labels and annotations are the shipped
    # ones; the durations themselves are covered by promtool's unit tests (tests.yml).
    rules = tmp_path / "rlfleet.rules.yml"
    original_for = rules_with_short_for(rules, FOR_S)
    assert ALERT in original_for and CANARY in original_for

    am_port, prom_port = free_port(), free_port()
    am_url, prom_url = f"http://127.0.0.1:{am_port}", f"http://127.0.0.1:{prom_port}"
    am_config = tmp_path / "alertmanager.yml"
    am_config.write_text(
        yaml.safe_dump(
            {
                # One receiver without integrations: alerts are only held, and read
                # back through the API.
                "route": {"receiver": "blackhole", "group_wait": "1s"},
                "receivers": [{"name": "blackhole"}],
            }
        )
    )
    prom_config = tmp_path / "prometheus.yml"
    prom_config.write_text(
        yaml.safe_dump(
            {
                "global": {
                    "scrape_interval": f"{INTERVAL_S}s",
                    "evaluation_interval": f"{INTERVAL_S}s",
                },
                "rule_files": [str(rules)],
                "alerting": {
                    "alertmanagers": [
                        {
                            "api_version": "v2",
                            "static_configs": [{"targets": [f"127.0.0.1:{am_port}"]}],
                        }
                    ]
                },
                "scrape_configs": [
                    {"job_name": "rlfleet-rollout", "static_configs": [{"targets": instances}]}
                ],
            }
        )
    )
    am_argv = [
        alertmanager_bin,
        f"--config.file={am_config}",
        f"--storage.path={tmp_path / 'alertmanager'}",
        f"--web.listen-address=127.0.0.1:{am_port}",
        "--cluster.listen-address=",  # no HA gossip: no other port, nothing on 0.0.0.0
        "--log.level=warn",
    ]
    prom_argv = [
        prometheus_bin,
        f"--config.file={prom_config}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{prom_port}",
        # Prometheus sends a firing alert at once, then again every resend delay (1m by
        # default). Its notifier learns the Alertmanager address a few seconds after the
        # start, so an alert that fires sooner (the canary) is first sent to no one, and
        # would reach Alertmanager only a minute later; resending at each evaluation keeps
        # the test short.
        f"--rules.alert.resend-delay={INTERVAL_S}s",
        "--log.level=warn",
    ]
    with (
        daemon(am_argv, tmp_path / "alertmanager.log", f"{am_url}/-/ready"),
        daemon(prom_argv, tmp_path / "prometheus.log", f"{prom_url}/-/ready"),
    ):
        _wait_targets_up(prom_url, instances)
        up_at = time.monotonic()

        # Before the kill: the canary reaches Alertmanager, and RlfleetServiceDown is
        # neither there nor pending in Prometheus, also once it would have had time to fire.
        _wait_am_alert(am_url, CANARY)
        time.sleep(max(0.0, up_at + FOR_S + 3 * INTERVAL_S - time.monotonic()))
        assert _named(_am_alerts(am_url), ALERT) == []
        assert _prometheus_alerts(prom_url, ALERT) == []
        query = urllib.parse.urlencode({"query": 'up{job="rlfleet-rollout"}'})
        result = get_json(f"{prom_url}/api/v1/query?{query}")["data"]["result"]
        assert sorted((r["metric"]["instance"], r["value"][1]) for r in result) == sorted(
            (i, "1") for i in instances
        )

        killed, survivor = replicas[0], instances[1]
        killed_at = time.time()
        killed.kill()  # kill -9 of its process group: the one we started
        down = _wait_am_alert(am_url, ALERT)
        # Let a few more evaluations pass: the surviving replica must not join it.
        time.sleep(3 * INTERVAL_S)
        down = _named(_am_alerts(am_url), ALERT)

    assert len(down) == 1, down
    alert = down[0]
    assert alert["labels"] == {
        "alertname": ALERT,
        "job": "rlfleet-rollout",
        "instance": instances[0],
        "severity": "critical",
    }
    assert alert["labels"]["instance"] != survivor
    assert alert["status"]["state"] == "active"
    assert alert["annotations"]["summary"] == f"rlfleet-rollout on {instances[0]} is down"
    # Prometheus sends an alert's startsAt as the moment it went from pending to firing:
    # at least `for` after the target went down (a little slack for clock rounding).
    assert _unix(alert["startsAt"]) >= killed_at + FOR_S - 0.5, (alert["startsAt"], killed_at)
