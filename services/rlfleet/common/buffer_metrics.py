"""Experience-buffer gauges read from Redis at scrape time, per job:

- ``rlfleet_buffer_length{job_id}``: entries in the job's stream, i.e. samples not yet
  acknowledged (read or not: the trainer deletes what it acknowledges);
- ``rlfleet_buffer_pending{job_id}``: entries delivered to a trainer and not yet
  acknowledged (a step in progress, or left by a crashed trainer);
- ``rlfleet_buffer_oldest_age_seconds{job_id}``: age of the oldest unacknowledged
  sample (how long experience waits for training);
- ``rlfleet_buffer_oldest_pending_age_seconds{job_id}``: age of the oldest delivered,
  unacknowledged sample.

Why a custom collector and not gauges set by the writer or the reader: the stream is
shared by every reward replica and the trainer, so no single process knows its length;
Redis does, and asking it when Prometheus scrapes gives the true value without a
polling thread. The process that registers the collector says which jobs to report
(the scheduler: its running jobs). Ages come from the entry ids, which Redis stamps
with its own clock in milliseconds, against Redis's TIME, so clock skew between
machines does not enter.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator

import redis
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from rlfleet.common.buffer import GROUP

logger = logging.getLogger(__name__)


def _entry_ms(entry_id: bytes | str | None) -> int | None:
    """Milliseconds part of a stream entry id ``<ms>-<seq>``."""
    if not entry_id:
        return None
    if isinstance(entry_id, bytes):
        entry_id = entry_id.decode()
    return int(entry_id.split("-", 1)[0])


class BufferCollector(Collector):
    """Reports the experience streams of the jobs ``job_ids()`` names."""

    def __init__(
        self, client: redis.Redis, job_ids: Callable[[], Iterable[str]], *, prefix: str = "rlfleet"
    ):
        self.r = client
        self.job_ids = job_ids
        self.prefix = prefix
        self._failing = False

    def _stream(self, job_id: str) -> str:
        # The key RedisStreamBuffer writes (docs/DESIGN.md, "Redis keys").
        return f"{self.prefix}:exp:{job_id}"

    def describe(self) -> list:
        # Names only, so registering does not query Redis.
        return list(self._families())

    @staticmethod
    def _families() -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(
            "rlfleet_buffer_length",
            "Samples in the job's experience stream not yet acknowledged by the trainer.",
            labels=["job_id"],
        )
        yield GaugeMetricFamily(
            "rlfleet_buffer_pending",
            "Samples delivered to a trainer and not yet acknowledged.",
            labels=["job_id"],
        )
        yield GaugeMetricFamily(
            "rlfleet_buffer_oldest_age_seconds",
            "Age of the oldest sample not yet acknowledged (0 when the stream is empty).",
            labels=["job_id"],
        )
        yield GaugeMetricFamily(
            "rlfleet_buffer_oldest_pending_age_seconds",
            "Age of the oldest sample delivered and not yet acknowledged (0 when none).",
            labels=["job_id"],
        )

    def collect(self) -> Iterator[GaugeMetricFamily]:
        length, pending, oldest, oldest_pending = self._families()
        try:
            rows = self._read(sorted(set(self.job_ids())))
        except (redis.RedisError, OSError) as exc:
            # A scrape must not fail because Redis is away; say so once per outage.
            if not self._failing:
                logger.warning("cannot read experience-buffer metrics from Redis: %s", exc)
            self._failing = True
            rows = []
        else:
            self._failing = False
        for job_id, n, n_pending, age, age_pending in rows:
            length.add_metric([job_id], n)
            pending.add_metric([job_id], n_pending)
            oldest.add_metric([job_id], age)
            oldest_pending.add_metric([job_id], age_pending)
        yield from (length, pending, oldest, oldest_pending)

    def _read(self, job_ids: list[str]) -> list[tuple[str, int, int, float, float]]:
        if not job_ids:
            return []
        pipe = self.r.pipeline(transaction=False)
        pipe.time()
        for job_id in job_ids:
            key = self._stream(job_id)
            pipe.xlen(key)
            pipe.xrange(key, count=1)
            pipe.xpending(key, GROUP)
        # raise_on_error=False: a job whose stream or group does not exist yet (no sample
        # written) answers XPENDING with NOGROUP; it counts as empty.
        replies = pipe.execute(raise_on_error=False)
        seconds, micros = replies[0]
        now_ms = seconds * 1000 + micros // 1000
        rows = []
        for i, job_id in enumerate(job_ids):
            n, first, summary = replies[1 + 3 * i : 4 + 3 * i]
            if isinstance(n, Exception):
                raise n
            first_ms = (
                _entry_ms(first[0][0]) if first and not isinstance(first, Exception) else None
            )
            n_pending, pending_ms = 0, None
            if isinstance(summary, dict):
                n_pending = int(summary.get("pending") or 0)
                pending_ms = _entry_ms(summary.get("min")) if n_pending else None
            rows.append(
                (
                    job_id,
                    int(n),
                    n_pending,
                    max(0.0, (now_ms - first_ms) / 1000) if first_ms is not None else 0.0,
                    max(0.0, (now_ms - pending_ms) / 1000) if pending_ms is not None else 0.0,
                )
            )
        return rows


def register_buffer_metrics(
    *,
    redis_url: str,
    job_ids: Callable[[], Iterable[str]],
    registry: CollectorRegistry = REGISTRY,
    timeout_s: float = 2.0,
) -> BufferCollector:
    """Registers a BufferCollector on its own Redis connection, with short timeouts so a
    slow Redis cannot hold a scrape for long."""
    client = redis.Redis.from_url(
        redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
    )
    collector = BufferCollector(client, job_ids)
    registry.register(collector)
    return collector
