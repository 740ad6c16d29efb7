"""Replica registries (memory and the real Redis) and the scrape-time replica metrics."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from rlfleet.common.errors import InvalidArgument
from rlfleet.common.weights import iter_chunks
from rlfleet.weightsync.metrics import ReplicaCollector
from rlfleet.weightsync.replicas import setup_replica_registry
from rlfleet.weightsync.store import VersionStore


@pytest.fixture(params=["memory", "redis"])
def registry(request, redis_url):
    return setup_replica_registry(request.param, redis_url=redis_url)


def test_report_and_list(registry):
    registry.report(replica_id="r0", job_id="j1", version=0, address="127.0.0.1:1")
    registry.report(replica_id="r1", job_id="j1", version=0)
    registry.report(replica_id="r0", job_id="j1", version=2, address="127.0.0.1:1")
    registry.report(replica_id="r0", job_id="j2", version=5)
    held = [(r.replica_id, r.version, r.address) for r in registry.list("j1")]
    assert held == [("r0", 2, "127.0.0.1:1"), ("r1", 0, "")]
    assert [(r.job_id, r.replica_id) for r in registry.list()] == [
        ("j1", "r0"),
        ("j1", "r1"),
        ("j2", "r0"),
    ]
    assert all(r.reported_at > 0 for r in registry.list())
    assert registry.list("nobody") == []


def test_report_validation(registry):
    with pytest.raises(InvalidArgument, match="replica_id"):
        registry.report(replica_id="", job_id="j", version=0)
    with pytest.raises(InvalidArgument, match="job_id"):
        registry.report(replica_id="r", job_id="", version=0)
    with pytest.raises(InvalidArgument, match="version"):
        registry.report(replica_id="r", job_id="j", version=-3)


def test_redis_registry_survives_a_restart(redis_url):
    setup_replica_registry("redis", redis_url=redis_url).report(
        replica_id="r0", job_id="j1", version=4
    )
    again = setup_replica_registry("redis", redis_url=redis_url)
    assert [(r.replica_id, r.version) for r in again.list("j1")] == [("r0", 4)]


def test_unknown_registry_kind():
    with pytest.raises(ValueError, match="unknown replica registry"):
        setup_replica_registry("etcd")


def test_replica_metrics():
    store = VersionStore(keep_versions=2)
    store.push(iter_chunks(b"weights v3", job_id="j1", version=3))
    registry = setup_replica_registry("memory")
    for replica, version in (("r0", 3), ("r1", 2), ("r2", 2)):
        registry.report(replica_id=replica, job_id="j1", version=version)
    prom = CollectorRegistry()
    prom.register(ReplicaCollector(store, registry))
    text = generate_latest(prom).decode()
    assert 'rlfleet_weightsync_replicas{job_id="j1",version="2"} 2.0' in text
    assert 'rlfleet_weightsync_replicas{job_id="j1",version="3"} 1.0' in text
    assert 'rlfleet_weightsync_replicas_behind{job_id="j1"} 2.0' in text
