"""Policy versions per job: received in chunks, verified, kept, served.

Rules
- A pushed version is assembled and its checksum verified (``weights``) before
  anything else happens: a torn or corrupted stream is refused with DATA_LOSS
  and the previous version stays current.
- Versions only move forward: a version not newer than the current one is
  refused with FAILED_PRECONDITION, unless it is the identical payload of a
  version still held (the trainer retrying a push that did arrive). The data
  plane asks ``admit`` before it receives a payload, so a stale push is refused
  and a repeated one acknowledged without a byte sent.
- With a spool directory, a version is on disk (fsynced) before it becomes
  current, so a restarted weight-sync serves it again.
- The newest ``keep_versions`` versions of each job are kept; a replica that
  lags further must take the current one (PullVersion version=0).
- A version is kept as it arrived: the payload a data-plane push received, or
  the serialised WeightChunk frames a gRPC push brought when their chunk size
  is ``chunk_bytes``. Pulls of the same kind send it as it is, so no byte is
  copied in Python between a push and its pulls; a gRPC pull of a data-plane
  version frames it chunk by chunk as it goes (one copy). The message-based
  ``push`` / ``pull`` are the same operations for callers that hold messages.
"""

from __future__ import annotations

import logging
import mmap
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import Counter, Gauge, Histogram

from rlfleet.common.errors import DataLoss, FailedPrecondition, InvalidArgument, NotFound
from rlfleet.common.weight_transport import BufferPool
from rlfleet.common.weights import (
    CHUNK_BYTES,
    assemble_pieces,
    checksum_algorithm,
    encode_frames,
    split_frame,
    verify_checksum,
)
from rlfleet.v1 import weightsync_pb2
from rlfleet.weightsync.spool import Spool, SpooledVersion

logger = logging.getLogger(__name__)

RECEIVED_BYTES = Counter(
    "rlfleet_weightsync_received_bytes_total", "Payload bytes received by PushVersion."
)
SERVED_BYTES = Counter(
    "rlfleet_weightsync_served_bytes_total", "Payload bytes sent by PullVersion."
)
PUSH_SECONDS = Histogram(
    "rlfleet_weightsync_push_seconds",
    "Time from the first chunk of a push to its version being current.",
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 2, 5, 15, 60, 300),
)
PUSHES = Counter(
    "rlfleet_weightsync_pushes_total",
    "Pushes by outcome (accepted, repeat, stale, data_loss, invalid).",
    ["outcome"],
)
CURRENT_VERSION = Gauge(
    "rlfleet_weightsync_current_version", "The current policy version of a job.", ["job_id"]
)


@dataclass(frozen=True)
class VersionInfo:
    job_id: str
    version: int
    checksum: str
    num_bytes: int


@dataclass
class _Held:
    info: VersionInfo | None  # None until stored
    # The payload as views, in order; None: on disk only, read on the first pull
    # after a restart.
    views: tuple[memoryview, ...] | None
    # The serialised WeightChunks the views lie in, when a gRPC push brought them
    # in ``chunk_bytes`` chunks; None: gRPC pulls frame the views as they go.
    frames: tuple[bytes, ...] | None
    spooled: SpooledVersion | None
    # The pool buffer a data-plane push received the payload into: it goes back to
    # the pool once the version is dropped and no pull reads it any more.
    buffer: mmap.mmap | bytearray | None = None
    readers: int = 0
    dropped: bool = False


@dataclass
class _Job:
    versions: dict[int, _Held] = field(default_factory=dict)
    index_lock: threading.Lock = field(default_factory=threading.Lock)
    push_lock: threading.Lock = field(default_factory=threading.Lock)

    def current(self) -> _Held | None:
        return self.versions[max(self.versions)] if self.versions else None


class VersionStore:
    def __init__(
        self,
        *,
        keep_versions: int = 3,
        spool_dir: Path | str | None = None,
        chunk_bytes: int = CHUNK_BYTES,
    ):
        if keep_versions < 1:
            raise ValueError("keep_versions must be at least 1")
        self.keep_versions = keep_versions
        self.chunk_bytes = chunk_bytes
        self.spool = Spool(Path(spool_dir)) if spool_dir else None
        # The receive buffer of the last dropped version: the next push of the same size
        # lands in it instead of first-touching fresh memory (on a VM that costs more than
        # the transfer). One is enough in steady state and keeps peak memory where it was:
        # keep_versions held plus the one being received.
        self.buffers = BufferPool(keep=1)
        self._jobs: dict[str, _Job] = {}
        self._jobs_lock = threading.Lock()
        if self.spool is not None:
            self._recover()

    # -- bookkeeping -------------------------------------------------------

    def _job(self, job_id: str, *, create: bool = False) -> _Job | None:
        with self._jobs_lock:
            job = self._jobs.get(job_id)
            if job is None and create:
                job = self._jobs[job_id] = _Job()
            return job

    def _recover(self) -> None:
        """Indexes the spool; the newest intact version of each job becomes current."""
        assert self.spool is not None
        by_job: dict[str, list[SpooledVersion]] = {}
        for entry in self.spool.scan():
            by_job.setdefault(entry.job_id, []).append(entry)
        for job_id, entries in by_job.items():
            entries.sort(key=lambda e: e.version, reverse=True)
            job = self._job(job_id, create=True)
            for entry in entries:
                if len(job.versions) >= self.keep_versions:
                    self.spool.delete(entry)
                    continue
                info = VersionInfo(job_id, entry.version, entry.checksum, entry.num_bytes)
                held = _Held(info, None, None, entry)
                if not job.versions:
                    # Read the would-be current version now: a file that fails its
                    # checksum must not become current.
                    try:
                        self._load(held)
                    except DataLoss:
                        # Unusable; removing it also keeps its version number free
                        # for the trainer to push again.
                        logger.exception("dropping a damaged spooled version")
                        self.spool.delete(entry)
                        continue
                job.versions[entry.version] = held
            current = job.current()
            if current is not None:
                CURRENT_VERSION.labels(job_id).set(current.info.version)
                logger.info(
                    "recovered from the spool",
                    extra={"job_id": job_id, "version": current.info.version},
                )

    # -- push --------------------------------------------------------------

    def push(self, chunks: Iterable[weightsync_pb2.WeightChunk]) -> VersionInfo:
        """Assembles, verifies and stores one version; it becomes current last."""
        return self.push_frames(chunk.SerializeToString() for chunk in chunks)

    def push_frames(self, frames: Iterable[bytes]) -> VersionInfo:
        """``push`` for serialised WeightChunks, as PushVersion receives them."""
        start = time.perf_counter()

        def pieces():
            for frame in frames:
                header, data = split_frame(frame)
                RECEIVED_BYTES.inc(len(data))
                yield header, data, frame

        got = self._counted(assemble_pieces, pieces())
        if got.chunk_sizes_fit(self.chunk_bytes):
            held = _Held(None, got.views, got.frames, None)  # served as they came
        else:
            held = _Held(None, (memoryview(got.payload()),), None, None)
        return self._store(got.job_id, got.version, got.checksum, held, start)

    def push_payload(
        self, job_id: str, version: int, payload: mmap.mmap | bytearray, checksum: str
    ) -> VersionInfo:
        """``push`` for a whole payload in a buffer from ``self.buffers``, as the data plane
        receives it; the buffer is the store's from here on."""
        start = time.perf_counter()
        RECEIVED_BYTES.inc(len(payload))
        held = _Held(None, (memoryview(payload),), None, None, buffer=payload)
        try:
            self._counted(verify_checksum, payload, checksum, what=f"version {version}")
            return self._store(job_id, version, checksum, held, start)
        finally:
            if held.info is None:  # refused, or a repeat: nothing holds the buffer
                held.views = None
                self.buffers.give(payload)

    def admit(self, job_id: str, version: int, checksum: str) -> VersionInfo | None:
        """Whether a push may start: the held version's info when it is a repeat of it
        (nothing to send), None for a new version; raises for a stale or invalid one."""
        self._counted(_check_version, job_id, version, checksum)
        job = self._job(job_id, create=True)
        with job.push_lock:
            return self._repeat_or_refuse(job, job_id, version, checksum)

    @staticmethod
    def _counted(fn, *args, **kwargs):
        """``fn``, with a refusal counted by its outcome."""
        try:
            return fn(*args, **kwargs)
        except DataLoss as exc:
            PUSHES.labels("data_loss").inc()
            logger.warning("refused a push: %s", exc.message)
            raise
        except InvalidArgument:
            PUSHES.labels("invalid").inc()
            raise

    def _repeat_or_refuse(
        self, job: _Job, job_id: str, version: int, checksum: str
    ) -> VersionInfo | None:
        held = job.versions.get(version)
        if held is not None and held.info.checksum == checksum:
            PUSHES.labels("repeat").inc()
            return held.info
        current = job.current()
        if current is not None and version <= current.info.version:
            PUSHES.labels("stale").inc()
            logger.warning(
                "refused a stale push",
                extra={"job_id": job_id, "version": version, "current": current.info.version},
            )
            if held is not None:
                reason = "is already held with a different payload"
            else:
                reason = f"is not newer than the current version {current.info.version}"
            raise FailedPrecondition(
                f"version {version} of job {job_id} {reason}; versions only move forward"
            )
        return None

    def _store(
        self, job_id: str, version: int, checksum: str, held: _Held, start: float
    ) -> VersionInfo:
        """Makes ``held`` (its views set, its info not yet) the current version."""
        self._counted(_check_version, job_id, version, checksum)
        job = self._job(job_id, create=True)
        assert job is not None
        with job.push_lock:  # one push per job at a time; pulls go on meanwhile
            repeat = self._repeat_or_refuse(job, job_id, version, checksum)
            if repeat is not None:
                return repeat
            info = VersionInfo(job_id, version, checksum, sum(len(v) for v in held.views))
            if self.spool is not None:
                held.spooled = self.spool.write(
                    job_id=job_id, version=version, checksum=checksum, parts=held.views
                )
            with job.index_lock:
                held.info = info
                job.versions[version] = held
                dropped = sorted(job.versions)[: -self.keep_versions]
                evicted = [job.versions.pop(v) for v in dropped]
                for old in evicted:
                    old.dropped = True
                    self._recycle(old)
            for old in evicted:
                if old.spooled is not None and self.spool is not None:
                    self.spool.delete(old.spooled)
        CURRENT_VERSION.labels(job_id).set(version)
        PUSHES.labels("accepted").inc()
        PUSH_SECONDS.observe(time.perf_counter() - start)
        logger.info(
            "version is current",
            extra={"job_id": job_id, "version": version, "num_bytes": info.num_bytes},
        )
        return info

    # -- read --------------------------------------------------------------

    def current(self, job_id: str) -> VersionInfo:
        job = self._job(job_id)
        held = job.current() if job else None
        if held is None:
            raise NotFound(f"job {job_id!r} has no policy version yet")
        return held.info

    def _load(self, held: _Held) -> None:
        """Reads a spooled version back (verifying its checksum)."""
        assert held.spooled is not None and self.spool is not None
        held.views = (memoryview(self.spool.read(held.spooled)),)

    def _recycle(self, held: _Held) -> None:
        """Under the job's index_lock: a dropped version nobody reads gives its buffer back."""
        if held.dropped and held.readers == 0 and held.buffer is not None:
            buffer, held.buffer, held.views = held.buffer, None, None
            self.buffers.give(buffer)

    @contextmanager
    def _reading(self, job_id: str, version: int) -> Iterator[_Held]:
        """A held version, kept from being recycled while the caller reads it."""
        if version < 0:
            raise InvalidArgument(f"version must be >= 0 (0 = current), got {version}")
        job = self._job(job_id)
        if job is None:
            raise NotFound(f"job {job_id!r} has no policy version yet")
        with job.index_lock:
            held = job.current() if version == 0 else job.versions.get(version)
            if held is None:
                kept = sorted(job.versions)
                raise NotFound(
                    f"version {version} of job {job_id!r} is not held (held: {kept}); "
                    "pull version 0 for the current one"
                )
            held.readers += 1
        try:
            if held.views is None:
                self._load(held)  # verifies the checksum
            yield held
        finally:
            with job.index_lock:
                held.readers -= 1
                self._recycle(held)

    def get(self, job_id: str, version: int = 0) -> tuple[VersionInfo, bytes]:
        """A held version and its payload; ``version`` 0 means the current one."""
        with self._reading(job_id, version) as held:
            return held.info, b"".join(held.views)

    @contextmanager
    def reading_views(
        self, job_id: str, version: int = 0
    ) -> Iterator[tuple[VersionInfo, tuple[memoryview, ...]]]:
        """A held version as views of its payload, in order (no copy), valid inside the
        ``with``: the data plane sends them from there."""
        with self._reading(job_id, version) as held:
            SERVED_BYTES.inc(held.info.num_bytes)
            yield held.info, held.views

    def pull(self, job_id: str, version: int = 0) -> Iterator[weightsync_pb2.WeightChunk]:
        """The version as WeightChunks; the last carries the checksum the puller verifies.

        Looks the version up at once (NotFound before any chunk is sent).
        """
        frames = self.pull_frames(job_id, version)
        return (weightsync_pb2.WeightChunk.FromString(f) for f in frames)

    def pull_frames(self, job_id: str, version: int = 0) -> Iterator[bytes]:
        """``pull`` as serialised WeightChunks, as PullVersion sends them.

        Looks the version up at once (NotFound before any frame is sent)."""
        reading = self._reading(job_id, version)
        held = reading.__enter__()
        return self._stream(held, reading)

    def _stream(self, held: _Held, reading) -> Iterator[bytes]:
        try:  # the version is read until the stream ends or is dropped
            if held.frames is not None:
                for frame, view in zip(held.frames, held.views, strict=True):
                    SERVED_BYTES.inc(len(view))
                    yield frame
                return
            (payload,) = held.views
            info, sent = held.info, 0
            for frame in encode_frames(
                payload,
                job_id=info.job_id,
                version=info.version,
                checksum=info.checksum,
                chunk_bytes=self.chunk_bytes,
            ):
                n = min(self.chunk_bytes, info.num_bytes - sent)
                SERVED_BYTES.inc(n)
                sent += n
                yield frame
        finally:
            reading.__exit__(None, None, None)

    def held_versions(self, job_id: str) -> list[int]:
        job = self._job(job_id)
        if job is None:
            return []
        with job.index_lock:
            return sorted(job.versions)

    def jobs(self) -> list[str]:
        with self._jobs_lock:
            return [j for j, job in self._jobs.items() if job.versions]


def _check_version(job_id: str, version: int, checksum: str) -> None:
    if not job_id:
        raise InvalidArgument("job_id is empty")
    if version < 0:
        raise InvalidArgument(f"version must be >= 0, got {version}")
    checksum_algorithm(checksum)
