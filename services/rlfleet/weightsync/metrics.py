"""Replica metrics computed at scrape time from the registry and the store.

A collector (rather than gauges set on each report) leaves no stale series
behind: a version no replica holds any more simply disappears.
"""

from __future__ import annotations

import logging
from collections import Counter

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from rlfleet.common.errors import NotFound, RlfleetError
from rlfleet.weightsync.replicas import ReplicaRegistry
from rlfleet.weightsync.store import VersionStore

logger = logging.getLogger(__name__)


class ReplicaCollector(Collector):
    def __init__(self, store: VersionStore, registry: ReplicaRegistry):
        self.store = store
        self.registry = registry

    def collect(self):
        by_version = GaugeMetricFamily(
            "rlfleet_weightsync_replicas",
            "Replicas that reported holding a version of a job.",
            labels=["job_id", "version"],
        )
        behind = GaugeMetricFamily(
            "rlfleet_weightsync_replicas_behind",
            "Replicas whose reported version is older than the job's current version.",
            labels=["job_id"],
        )
        try:
            records = self.registry.list()
        except RlfleetError:
            logger.warning("replica registry unavailable during a scrape", exc_info=True)
            records = []
        counts = Counter((r.job_id, r.version) for r in records)
        for (job_id, version), n in sorted(counts.items()):
            by_version.add_metric([job_id, str(version)], n)
        for job_id in sorted({r.job_id for r in records}):
            try:
                current = self.store.current(job_id).version
            except NotFound:
                continue
            lagging = sum(n for (j, v), n in counts.items() if j == job_id and v < current)
            behind.add_metric([job_id], lagging)
        yield by_version
        yield behind
