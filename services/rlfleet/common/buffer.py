"""Experience buffer: Redis Streams, one stream per job.

Design
- Reward appends scored samples; the trainer reads them through the consumer
  group ``trainer`` and acknowledges (XACK + XDEL) only after the optimizer step
  that used them, so a trainer crash leaves them pending for the next one.
- Append is idempotent by ``sample_id`` (a Redis set of written ids, updated in
  the same MULTI/EXEC transaction as XADD), so a retried Score call never
  duplicates experience. The check is optimistic: WATCH the id set and the
  stream, look up which ids are new and how long the stream is, then write in
  one transaction that Redis refuses if either key changed meanwhile (then we
  look again). A Lua script could do the same in one call, but Redis copies
  every argument into Lua strings and back, which made large samples (32K
  tokens) 5-10x slower on the server than a plain XADD (bench/buffer.py).
- Length is bounded without trimming: an append that would exceed ``max_len``
  unconsumed entries is refused with ResourceExhausted (backpressure), never
  dropped — MAXLEN trimming would silently lose accepted work.
- Entries carry a format version (``v``) next to the protobuf payload; a reader
  refuses a version it does not know instead of mis-decoding it.
"""

from __future__ import annotations

import abc
import logging
import time
from dataclasses import dataclass

import redis

from rlfleet.common.errors import InvalidArgument, ResourceExhausted
from rlfleet.v1.common_pb2 import Sample

logger = logging.getLogger(__name__)

FORMAT_VERSION = b"1"
GROUP = "trainer"


@dataclass(frozen=True)
class Entry:
    entry_id: str
    sample: Sample


class ExperienceBuffer(abc.ABC):
    """Where scored experience waits for the trainer."""

    @abc.abstractmethod
    def append(self, job_id: str, samples: list[Sample]) -> int:
        """Appends samples not seen before; returns how many were new. Raises ResourceExhausted when full."""

    @abc.abstractmethod
    def read(self, job_id: str, consumer: str, *, count: int, block_ms: int = 0) -> list[Entry]:
        """New entries for ``consumer`` (they stay pending until acknowledged)."""

    @abc.abstractmethod
    def read_own_pending(self, job_id: str, consumer: str, *, count: int) -> list[Entry]:
        """Entries delivered to ``consumer`` and not yet acknowledged (after its restart)."""

    @abc.abstractmethod
    def claim(self, job_id: str, consumer: str, entry_ids: list[str]) -> list[Entry]:
        """Exactly these pending entries, now ``consumer``'s (whoever held them); ones
        acknowledged meanwhile are left out."""

    @abc.abstractmethod
    def reclaim(
        self, job_id: str, consumer: str, *, min_idle_ms: int, count: int = 1000
    ) -> list[Entry]:
        """Takes over entries left pending by another (dead) consumer for ``min_idle_ms``."""

    @abc.abstractmethod
    def ack(self, job_id: str, entry_ids: list[str]) -> int:
        """Acknowledges trained entries and removes them from the stream."""

    @abc.abstractmethod
    def length(self, job_id: str) -> int:
        """Entries not yet acknowledged (read or unread)."""

    @abc.abstractmethod
    def pending(self, job_id: str) -> int:
        """Entries delivered but not acknowledged."""

    @abc.abstractmethod
    def delete_job(self, job_id: str) -> None:
        """Drops the job's stream and bookkeeping."""


class RedisStreamBuffer(ExperienceBuffer):
    def __init__(self, client: redis.Redis, *, max_len: int = 100_000, prefix: str = "rlfleet"):
        self.r = client
        self.max_len = max_len
        self.prefix = prefix
        self._groups_ready: set[str] = set()

    @classmethod
    def from_url(cls, url: str, **kwargs) -> RedisStreamBuffer:
        return cls(redis.Redis.from_url(url), **kwargs)

    def _stream(self, job_id: str) -> str:
        return f"{self.prefix}:exp:{job_id}"

    def _ids(self, job_id: str) -> str:
        return f"{self.prefix}:exp:{job_id}:ids"

    def _ensure_group(self, job_id: str) -> str:
        key = self._stream(job_id)
        if key not in self._groups_ready:
            try:
                self.r.xgroup_create(key, GROUP, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
            self._groups_ready.add(key)
        return key

    def append(self, job_id: str, samples: list[Sample], *, wait_s: float = 0.0) -> int:
        if not samples:
            return 0
        payloads: dict[str, bytes] = {}  # sample id -> encoded sample; the first copy of an id wins
        for s in samples:
            if not s.sample_id:
                raise InvalidArgument("every sample needs a sample_id to be written to the buffer")
            if s.sample_id not in payloads:
                payloads[s.sample_id] = s.SerializeToString()
        key = self._ensure_group(job_id)
        end = time.monotonic() + wait_s
        while True:
            written = self._append_once(key, self._ids(job_id), payloads)
            if written >= 0:
                return written
            if time.monotonic() >= end:
                raise ResourceExhausted(
                    f"experience buffer of job {job_id} is full ({self.max_len} unconsumed samples); retry later"
                )
            time.sleep(0.05)

    def _append_once(self, key: str, ids_key: str, payloads: dict[str, bytes]) -> int:
        """Writes the ids not yet in ``ids_key`` with their samples, atomically; -1 when full.

        Either a sample is in the id set and in the stream, or in neither: the
        SADD and XADDs run in one MULTI/EXEC, which Redis aborts (WatchError) if
        another client changed the id set or the stream after we looked.
        """
        ids = list(payloads)
        with self.r.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(ids_key, key)
                    known = pipe.smismember(ids_key, ids)
                    fresh = [sid for sid, seen in zip(ids, known, strict=True) if not seen]
                    if self.max_len > 0 and int(pipe.xlen(key)) + len(fresh) > self.max_len:
                        pipe.unwatch()
                        return -1
                    if not fresh:
                        pipe.unwatch()
                        return 0
                    pipe.multi()
                    pipe.sadd(ids_key, *fresh)
                    for sid in fresh:
                        pipe.xadd(key, {"v": FORMAT_VERSION, "pb": payloads[sid]})
                    pipe.execute()
                    return len(fresh)
                except redis.WatchError:
                    # Someone wrote, read or acknowledged meanwhile: look again.
                    pipe.reset()

    def _decode(self, raw: list) -> list[Entry]:
        out = []
        for entry_id, fields in raw:
            if fields is None:  # deleted while pending
                continue
            version = fields.get(b"v")
            if version != FORMAT_VERSION:
                raise InvalidArgument(
                    f"buffer entry {entry_id!r} has unknown format version {version!r}"
                )
            out.append(Entry(entry_id.decode(), Sample.FromString(fields[b"pb"])))
        return out

    def read(self, job_id: str, consumer: str, *, count: int, block_ms: int = 0) -> list[Entry]:
        key = self._ensure_group(job_id)
        reply = self.r.xreadgroup(GROUP, consumer, {key: ">"}, count=count, block=block_ms or None)
        return self._decode(reply[0][1]) if reply else []

    def read_own_pending(self, job_id: str, consumer: str, *, count: int) -> list[Entry]:
        key = self._ensure_group(job_id)
        reply = self.r.xreadgroup(GROUP, consumer, {key: "0"}, count=count)
        return self._decode(reply[0][1]) if reply else []

    def claim(self, job_id: str, consumer: str, entry_ids: list[str]) -> list[Entry]:
        if not entry_ids:
            return []
        key = self._ensure_group(job_id)
        return self._decode(self.r.xclaim(key, GROUP, consumer, 0, entry_ids))

    def reclaim(
        self, job_id: str, consumer: str, *, min_idle_ms: int, count: int = 1000
    ) -> list[Entry]:
        key = self._ensure_group(job_id)
        out: list[Entry] = []
        cursor = "0-0"
        while True:
            reply = self.r.xautoclaim(
                key, GROUP, consumer, min_idle_ms, start_id=cursor, count=count
            )
            cursor, claimed = reply[0], reply[1]
            out += self._decode(claimed)
            if cursor in (b"0-0", "0-0") or len(out) >= count:
                return out

    def ack(self, job_id: str, entry_ids: list[str]) -> int:
        if not entry_ids:
            return 0
        key = self._stream(job_id)
        pipe = self.r.pipeline(transaction=True)
        pipe.xack(key, GROUP, *entry_ids)
        pipe.xdel(key, *entry_ids)
        acked, _ = pipe.execute()
        return int(acked)

    def length(self, job_id: str) -> int:
        return int(self.r.xlen(self._stream(job_id)))

    def pending(self, job_id: str) -> int:
        key = self._ensure_group(job_id)
        return int(self.r.xpending(key, GROUP)["pending"])

    def delete_job(self, job_id: str) -> None:
        self.r.delete(self._stream(job_id), self._ids(job_id))
        self._groups_ready.discard(self._stream(job_id))


def setup_buffer(kind: str, url: str, **kwargs) -> ExperienceBuffer:
    """Factory: the buffer implementation named by ``kind``."""
    if kind == "redis":
        return RedisStreamBuffer.from_url(url, **kwargs)
    raise ValueError(f"unknown buffer kind {kind!r}; known: redis")
