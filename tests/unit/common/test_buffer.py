"""The Redis Streams experience buffer against a real redis-server."""

from __future__ import annotations

import time

import pytest
import redis
from rlfleet.common.buffer import RedisStreamBuffer, setup_buffer
from rlfleet.common.errors import InvalidArgument, ResourceExhausted
from rlfleet.common.procs import redis_url_of, start_redis
from rlfleet.v1.common_pb2 import Sample


def samples(*ids: str) -> list[Sample]:
    return [Sample(job_id="j", sample_id=i, completion_token_ids=[1, 2], reward=1.0) for i in ids]


@pytest.fixture
def buf(redis_url) -> RedisStreamBuffer:
    return RedisStreamBuffer.from_url(redis_url, max_len=6)


def test_append_is_idempotent_by_sample_id(buf):
    assert buf.append("j", samples("a", "b")) == 2
    assert buf.append("j", samples("b", "c", "c")) == 1  # retried and repeated ids are skipped
    assert buf.length("j") == 3


def test_full_buffer_refuses_instead_of_dropping(buf):
    buf.append("j", samples(*"abcdef"))
    with pytest.raises(ResourceExhausted, match="full"):
        buf.append("j", samples("g"))
    assert buf.length("j") == 6  # nothing accepted was trimmed
    entries = buf.read("j", "c", count=2)
    buf.ack("j", [e.entry_id for e in entries])
    assert buf.append("j", samples("g")) == 1


def test_entries_stay_pending_until_acknowledged(buf):
    buf.append("j", samples("a", "b", "c"))
    got = buf.read("j", "trainer-0", count=10)
    assert [e.sample.sample_id for e in got] == ["a", "b", "c"]
    assert got[0].sample.reward == 1.0
    assert buf.pending("j") == 3
    assert buf.read("j", "trainer-0", count=10) == []  # delivered once
    # After a restart the same consumer sees what it had not acknowledged.
    assert [e.sample.sample_id for e in buf.read_own_pending("j", "trainer-0", count=10)] == [
        "a",
        "b",
        "c",
    ]
    assert buf.ack("j", [got[0].entry_id]) == 1
    assert buf.pending("j") == 2 and buf.length("j") == 2


def test_reclaim_takes_over_a_dead_consumers_entries(buf):
    buf.append("j", samples("a", "b"))
    buf.read("j", "dead-trainer", count=10)
    assert buf.reclaim("j", "new-trainer", min_idle_ms=60_000) == []  # not idle long enough
    time.sleep(0.05)
    taken = buf.reclaim("j", "new-trainer", min_idle_ms=20)
    assert sorted(e.sample.sample_id for e in taken) == ["a", "b"]
    buf.ack("j", [e.entry_id for e in taken])
    assert buf.pending("j") == 0 and buf.length("j") == 0


def test_unknown_format_version_is_refused(buf, redis_url):
    buf.append("j", samples("a"))
    redis.Redis.from_url(redis_url).xadd("rlfleet:exp:j", {"v": "99", "pb": b""})
    with pytest.raises(InvalidArgument, match="format version"):
        buf.read("j", "c", count=10)


def test_sample_without_id_is_refused(buf):
    with pytest.raises(InvalidArgument, match="sample_id"):
        buf.append("j", [Sample(job_id="j")])


def test_accepted_experience_survives_a_redis_restart(tmp_path):
    proc = start_redis(tmp_path, appendonly=True)
    port = proc.port
    buf = setup_buffer("redis", redis_url_of(proc))
    buf.append("j", samples("a", "b"))
    buf.read("j", "trainer-0", count=1)
    proc.stop()  # SIGTERM: redis flushes its append-only file
    proc = start_redis(tmp_path, appendonly=True, port=port)
    try:
        buf = setup_buffer("redis", redis_url_of(proc))
        assert buf.length("j") == 2
        assert [e.sample.sample_id for e in buf.read_own_pending("j", "trainer-0", count=10)] == [
            "a"
        ]
        assert buf.append("j", samples("a")) == 0  # the dedupe set survived too
    finally:
        proc.stop()


def test_unknown_buffer_kind():
    with pytest.raises(ValueError, match="unknown buffer kind"):
        setup_buffer("kafka", "x")
