"""Which replica holds which version of which job.

Rollout replicas call ReportHeld after they swap in a version; the scheduler
reads ListReplicas to find replicas that lag (late joiners, restarts) before it
gives them work. A report replaces the replica's previous one for that job, so
a replica that restarts on an older version shows as behind.

Two registries behind one base: ``memory`` (lost when weight-sync restarts;
replicas report again on their next LoadVersion) and ``redis`` (hash
``rlfleet:ws:<job>:replicas``, field replica id -> JSON, survives restarts).
"""

from __future__ import annotations

import abc
import json
import threading
import time
from dataclasses import asdict, dataclass

import redis

from rlfleet.common.errors import InvalidArgument, Unavailable


@dataclass(frozen=True)
class ReplicaRecord:
    replica_id: str
    job_id: str
    version: int
    address: str
    reported_at: float


def _check(replica_id: str, job_id: str, version: int) -> None:
    if not replica_id:
        raise InvalidArgument("replica_id is empty")
    if not job_id:
        raise InvalidArgument("job_id is empty")
    if version < 0:
        raise InvalidArgument(f"version must be >= 0, got {version}")


class ReplicaRegistry(abc.ABC):
    def report(self, *, replica_id: str, job_id: str, version: int, address: str = "") -> None:
        _check(replica_id, job_id, version)
        self._put(ReplicaRecord(replica_id, job_id, version, address, time.time()))

    @abc.abstractmethod
    def _put(self, record: ReplicaRecord) -> None: ...

    @abc.abstractmethod
    def list(self, job_id: str = "") -> list[ReplicaRecord]:
        """Records of one job, or of every job when ``job_id`` is empty; sorted."""


class MemoryReplicaRegistry(ReplicaRegistry):
    def __init__(self) -> None:
        self._records: dict[tuple[str, str], ReplicaRecord] = {}
        self._lock = threading.Lock()

    def _put(self, record: ReplicaRecord) -> None:
        with self._lock:
            self._records[(record.job_id, record.replica_id)] = record

    def list(self, job_id: str = "") -> list[ReplicaRecord]:
        with self._lock:
            records = [r for (j, _), r in self._records.items() if not job_id or j == job_id]
        return sorted(records, key=lambda r: (r.job_id, r.replica_id))


class RedisReplicaRegistry(ReplicaRegistry):
    def __init__(self, client: redis.Redis, *, prefix: str = "rlfleet"):
        self.r = client
        self.prefix = prefix

    def _key(self, job_id: str) -> str:
        return f"{self.prefix}:ws:{job_id}:replicas"

    def _put(self, record: ReplicaRecord) -> None:
        try:
            self.r.hset(self._key(record.job_id), record.replica_id, json.dumps(asdict(record)))
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise Unavailable(f"the replica registry (Redis) is unreachable: {exc}") from None

    def list(self, job_id: str = "") -> list[ReplicaRecord]:
        try:
            keys = (
                [self._key(job_id)]
                if job_id
                else list(self.r.scan_iter(match=f"{self.prefix}:ws:*:replicas", count=500))
            )
            records = []
            for key in keys:
                for raw in self.r.hvals(key):
                    records.append(ReplicaRecord(**json.loads(raw)))
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise Unavailable(f"the replica registry (Redis) is unreachable: {exc}") from None
        return sorted(records, key=lambda r: (r.job_id, r.replica_id))


def setup_replica_registry(kind: str, *, redis_url: str = "") -> ReplicaRegistry:
    """Factory: the registry named by ``kind``; raises ValueError on an unknown kind."""
    if kind == "memory":
        return MemoryReplicaRegistry()
    if kind == "redis":
        if not redis_url:
            raise ValueError("the redis replica registry needs a redis_url")
        return RedisReplicaRegistry(redis.Redis.from_url(redis_url))
    raise ValueError(f"unknown replica registry {kind!r}; known: memory, redis")
