"""The experience-buffer collector against a real Redis: length, pending and ages per
job as the reward service writes and the trainer reads and acknowledges.
"""

from __future__ import annotations

import redis
from prometheus_client import CollectorRegistry, generate_latest
from rlfleet.common.buffer import RedisStreamBuffer
from rlfleet.common.buffer_metrics import BufferCollector, register_buffer_metrics
from rlfleet.common.procs import free_port
from rlfleet.v1.common_pb2 import Sample


def _samples(job_id: str, n: int) -> list[Sample]:
    return [Sample(job_id=job_id, sample_id=f"s{i}", completion_token_ids=[1]) for i in range(n)]


def test_reports_length_pending_and_ages_per_job(redis_url):
    buf = RedisStreamBuffer.from_url(redis_url)
    jobs = ["j1", "j2", "j-empty"]
    registry = CollectorRegistry()
    register_buffer_metrics(redis_url=redis_url, job_ids=lambda: jobs, registry=registry)

    def value(name: str, job_id: str) -> float | None:
        return registry.get_sample_value(name, {"job_id": job_id})

    buf.append("j1", _samples("j1", 5))
    buf.append("j2", _samples("j2", 2))
    entries = buf.read("j1", "trainer-0", count=3)  # a step in progress: 3 delivered
    assert value("rlfleet_buffer_length", "j1") == 5
    assert value("rlfleet_buffer_pending", "j1") == 3
    assert value("rlfleet_buffer_length", "j2") == 2
    assert value("rlfleet_buffer_pending", "j2") == 0
    assert 0 <= value("rlfleet_buffer_oldest_age_seconds", "j1") < 60
    assert 0 <= value("rlfleet_buffer_oldest_pending_age_seconds", "j1") < 60
    assert value("rlfleet_buffer_oldest_pending_age_seconds", "j2") == 0
    # A job with no stream yet (nothing written) is reported empty, and not created.
    assert value("rlfleet_buffer_length", "j-empty") == 0
    assert value("rlfleet_buffer_pending", "j-empty") == 0
    assert not buf.r.exists("rlfleet:exp:j-empty")

    buf.ack("j1", [e.entry_id for e in entries])  # trained: acknowledged and deleted
    assert value("rlfleet_buffer_length", "j1") == 2
    assert value("rlfleet_buffer_pending", "j1") == 0

    jobs.remove("j2")  # e.g. the job ended: its series go away
    assert value("rlfleet_buffer_length", "j2") is None
    text = generate_latest(registry).decode()
    assert 'rlfleet_buffer_length{job_id="j1"} 2.0' in text


def test_age_is_measured_from_the_entry_id(redis_url):
    client = redis.Redis.from_url(redis_url)
    # An entry written at 1 s after the epoch: decades old by Redis's clock.
    client.xadd("rlfleet:exp:old", {"v": b"1", "pb": b""}, id="1000-0")
    client.xgroup_create("rlfleet:exp:old", "trainer", id="0")
    client.xreadgroup("trainer", "t", {"rlfleet:exp:old": ">"}, count=1)
    registry = CollectorRegistry()
    registry.register(BufferCollector(client, lambda: ["old"]))
    (seconds, _) = client.time()
    age = registry.get_sample_value("rlfleet_buffer_oldest_age_seconds", {"job_id": "old"})
    pending_age = registry.get_sample_value(
        "rlfleet_buffer_oldest_pending_age_seconds", {"job_id": "old"}
    )
    # Decades old; the margin only covers the time between Redis's clock and the scrape
    # (seconds on a loaded machine).
    assert abs(age - (seconds - 1)) < 60
    assert abs(pending_age - (seconds - 1)) < 60


def test_a_scrape_survives_redis_being_away():
    registry = CollectorRegistry()
    register_buffer_metrics(
        redis_url=f"redis://127.0.0.1:{free_port()}/0",  # nothing listens there
        job_ids=lambda: ["j1"],
        registry=registry,
        timeout_s=0.5,
    )
    text = generate_latest(registry).decode()
    assert "# TYPE rlfleet_buffer_length gauge" in text  # the families, without samples
    assert "rlfleet_buffer_length{" not in text


def test_a_failing_job_list_does_not_break_the_scrape(redis_url):
    def broken():
        raise redis.ConnectionError("gone")

    registry = CollectorRegistry()
    register_buffer_metrics(redis_url=redis_url, job_ids=broken, registry=registry)
    assert "rlfleet_buffer_pending" in generate_latest(registry).decode()
