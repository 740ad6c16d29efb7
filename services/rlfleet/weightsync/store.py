"""Policy versions per job: received in chunks, verified, kept, served.

Rules
- A pushed version is assembled and its sha256 verified (``weights.assemble``)
  before anything else happens: a torn or corrupted stream is refused with
  DATA_LOSS and the previous version stays current.
- Versions only move forward: a version not newer than the current one is
  refused with FAILED_PRECONDITION, unless it is the identical payload of a
  version still held (the trainer retrying a push that did arrive).
- With a spool directory, a version is on disk (fsynced) before it becomes
  current, so a restarted weight-sync serves it again.
- The newest ``keep_versions`` versions of each job are kept; a replica that
  lags further must take the current one (PullVersion version=0).
- A version is kept as serialised WeightChunk frames (``weights.encode_frames``),
  the very frames a push brought when their chunk size is ``chunk_bytes``: a
  pull then sends them as they are, and no byte of a version is copied in
  Python between its push and its pulls. The message-based ``push`` / ``pull``
  are the same operations for callers that hold messages.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import Counter, Gauge, Histogram

from rlfleet.common.errors import DataLoss, FailedPrecondition, InvalidArgument, NotFound
from rlfleet.common.weights import (
    CHUNK_BYTES,
    assemble_pieces,
    encode_frames,
    split_frame,
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
    "PushVersion calls by outcome (accepted, repeat, stale, data_loss, invalid).",
    ["outcome"],
)
CURRENT_VERSION = Gauge(
    "rlfleet_weightsync_current_version", "The current policy version of a job.", ["job_id"]
)


@dataclass(frozen=True)
class VersionInfo:
    job_id: str
    version: int
    sha256: str
    num_bytes: int


@dataclass
class _Held:
    info: VersionInfo
    # Serialised WeightChunks and views of their data; None: on disk only, read on
    # the first pull after a restart.
    frames: tuple[bytes, ...] | None
    views: tuple[memoryview, ...] | None
    spooled: SpooledVersion | None


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
                info = VersionInfo(job_id, entry.version, entry.sha256, entry.num_bytes)
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

        try:
            got = assemble_pieces(pieces())
        except DataLoss as exc:
            PUSHES.labels("data_loss").inc()
            logger.warning("refused a push: %s", exc.message)
            raise
        except InvalidArgument:
            PUSHES.labels("invalid").inc()
            raise
        job_id, version, digest = got.job_id, got.version, got.sha256
        if not job_id:
            PUSHES.labels("invalid").inc()
            raise InvalidArgument("WeightChunk.job_id is empty")
        if version < 0:
            PUSHES.labels("invalid").inc()
            raise InvalidArgument(f"WeightChunk.version must be >= 0, got {version}")

        job = self._job(job_id, create=True)
        assert job is not None
        with job.push_lock:  # one push per job at a time; pulls go on meanwhile
            held = job.versions.get(version)
            if held is not None and held.info.sha256 == digest:
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
            info = VersionInfo(job_id, version, digest, got.num_bytes)
            if got.chunk_sizes_fit(self.chunk_bytes):
                frames, views = got.frames, got.views  # served as they came
            else:
                frames, views = self._frames(info, got.payload())
            spooled = None
            if self.spool is not None:
                spooled = self.spool.write(
                    job_id=job_id, version=version, sha256=digest, parts=views
                )
            with job.index_lock:
                job.versions[version] = _Held(info, frames, views, spooled)
                dropped = sorted(job.versions)[: -self.keep_versions]
                evicted = [job.versions.pop(v) for v in dropped]
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

    def _frames(
        self, info: VersionInfo, payload: bytes
    ) -> tuple[tuple[bytes, ...], tuple[memoryview, ...]]:
        frames = tuple(
            encode_frames(
                payload,
                job_id=info.job_id,
                version=info.version,
                sha256=info.sha256,
                chunk_bytes=self.chunk_bytes,
            )
        )
        return frames, tuple(split_frame(f)[1] for f in frames)

    def _load(self, held: _Held) -> None:
        """Reads a spooled version back (verifying its checksum) and frames it."""
        assert held.spooled is not None and self.spool is not None
        held.frames, held.views = self._frames(held.info, self.spool.read(held.spooled))

    def _held(self, job_id: str, version: int) -> _Held:
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
        if held.views is None:  # set last by _load, so frames are there when views are
            self._load(held)  # verifies the checksum
        return held

    def get(self, job_id: str, version: int = 0) -> tuple[VersionInfo, bytes]:
        """A held version and its payload; ``version`` 0 means the current one."""
        held = self._held(job_id, version)
        return held.info, b"".join(held.views)

    def pull(self, job_id: str, version: int = 0) -> Iterator[weightsync_pb2.WeightChunk]:
        """The version as WeightChunks; the last carries the sha256 the puller verifies.

        Looks the version up at once (NotFound before any chunk is sent).
        """
        frames = self.pull_frames(job_id, version)
        return (weightsync_pb2.WeightChunk.FromString(f) for f in frames)

    def pull_frames(self, job_id: str, version: int = 0) -> Iterator[bytes]:
        """``pull`` as serialised WeightChunks, as PullVersion sends them."""
        held = self._held(job_id, version)
        return self._stream(held.frames, held.views)

    @staticmethod
    def _stream(frames: tuple[bytes, ...], views: tuple[memoryview, ...]) -> Iterator[bytes]:
        for frame, view in zip(frames, views, strict=True):
            SERVED_BYTES.inc(len(view))
            yield frame

    def held_versions(self, job_id: str) -> list[int]:
        job = self._job(job_id)
        if job is None:
            return []
        with job.index_lock:
            return sorted(job.versions)

    def jobs(self) -> list[str]:
        with self._jobs_lock:
            return [j for j, job in self._jobs.items() if job.versions]
