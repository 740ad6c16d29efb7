"""Replica discovery: the static list, the factory, the scheduler settings that pick a
discovery, and which pods the Kubernetes discovery counts as replicas (pure functions;
the client against an API stand-in is in test_discovery_k8s.py).
"""

from __future__ import annotations

import pytest
from rlfleet.scheduler.config import SchedulerConfig
from rlfleet.scheduler.discovery import StaticDiscovery, parse_addresses, setup_discovery
from rlfleet.scheduler.discovery_k8s import _natural_key, pod_address


def test_static_discovery_keeps_order_and_drops_duplicates():
    d = setup_discovery("static", addresses=["b:1", " a:2", "b:1", ""])
    assert isinstance(d, StaticDiscovery)
    assert d.addresses() == ["b:1", "a:2"]
    d.close()  # a no-op, but part of every discovery's interface
    assert parse_addresses(" a:1, ,b:2 ") == ["a:1", "b:2"]


def test_unknown_discovery_is_refused():
    with pytest.raises(ValueError, match="unknown replica discovery 'dns'.*static, kubernetes"):
        setup_discovery("dns")


def test_kubernetes_discovery_refuses_an_empty_selector():
    with pytest.raises(ValueError, match="label selector"):
        setup_discovery("kubernetes", namespace="rl", selector=" ", port=50051)


def _cfg(**kwargs) -> SchedulerConfig:
    return SchedulerConfig(reward_address="r:1", trainer_address="t:1", **kwargs)


def test_settings_accept_kubernetes_discovery_from_the_environment(monkeypatch):
    # The variables the Helm chart renders for `scheduler.rolloutDiscovery: kubernetes`.
    monkeypatch.setenv("RLFLEET_SCHEDULER_ROLLOUT_NAMESPACE", "rl")
    monkeypatch.setenv(
        "RLFLEET_SCHEDULER_ROLLOUT_SELECTOR",
        "app.kubernetes.io/instance=x,app.kubernetes.io/component=rollout",
    )
    monkeypatch.setenv("RLFLEET_SCHEDULER_ROLLOUT_PORT", "50051")
    cfg = _cfg(discovery="kubernetes")
    assert (cfg.rollout_namespace, cfg.rollout_port) == ("rl", 50051)
    assert cfg.rollout_selector.endswith("component=rollout")
    assert cfg.rollout_list == []  # no static list needed


def test_kubernetes_discovery_settings_need_a_selector():
    with pytest.raises(ValueError, match="rollout_selector"):
        _cfg(discovery="kubernetes")
    with pytest.raises(ValueError, match="rollout_addresses"):
        _cfg(discovery="static")
    with pytest.raises(ValueError):
        _cfg(discovery="kubernetes", rollout_selector="a=b", rollout_port=0)


def _pod(**status) -> dict:
    base = {
        "phase": "Running",
        "podIP": "10.0.0.7",
        "conditions": [{"type": "Ready", "status": "True"}],
    }
    return {"metadata": {"name": "rollout-0"}, "status": {**base, **status}}


def test_only_running_ready_pods_with_an_ip_are_replicas():
    assert pod_address(_pod(), 50051) == "10.0.0.7:50051"
    assert pod_address(_pod(podIP="fd00::7"), 50051) == "[fd00::7]:50051"
    assert pod_address(_pod(conditions=[{"type": "Ready", "status": "False"}]), 1) is None
    assert pod_address(_pod(conditions=[]), 1) is None
    assert pod_address(_pod(podIP=""), 1) is None
    assert pod_address(_pod(phase="Pending"), 1) is None
    terminating = _pod()
    terminating["metadata"]["deletionTimestamp"] = "2030-01-01T00:00:00Z"
    assert pod_address(terminating, 1) is None


def test_pods_sort_by_ordinal():
    names = ["rollout-10", "rollout-2", "rollout-1"]
    assert sorted(names, key=_natural_key) == ["rollout-1", "rollout-2", "rollout-10"]
