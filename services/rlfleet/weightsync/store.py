"""Policy versions per job: received, verified, kept, served.

Rules
- A pushed version is received and its checksum verified (``weights``) before
  it becomes current: a torn or corrupted stream is refused with DATA_LOSS,
  nothing of it is kept, and the previous version stays current.
- Versions only move forward: a version not newer than the newest one the job
  has had is refused with FAILED_PRECONDITION, unless it is the identical
  payload of a version still held (the trainer retrying a push that did
  arrive). The data plane asks ``begin_push`` before it receives a payload, so
  a stale push is refused and a repeated one acknowledged without a byte sent.
- At most ``keep_versions`` versions of a job exist at a time, *counting the one
  arriving*: when a new version starts to arrive and ``keep_versions`` are held,
  the oldest one that no replica is pulling at that moment is evicted first
  (the current one only when ``keep_versions`` is 1). When every candidate is
  being pulled, the push waits up to ``evict_wait_s`` for a pull to end, then
  is refused with UNAVAILABLE (retryable: ``WeightSyncClient`` retries). One push
  per job arrives at a time; a second waits for the first the same way.
- With a spool directory (``spool.Spool``) a version is received straight into
  a file of the spool that is mapped MAP_SHARED and served from that mapping:
  its bytes are page cache, which the kernel can write back and reclaim, never
  a second copy in anonymous memory. It becomes current as soon as it is
  received and verified; its fsync (file, rename to its final name, directory)
  runs on a background thread, so a push's reply never waits for the disk. A
  restart trusts a version under its final name; one whose fsync had not
  completed is trusted only once it has been read back in full against its
  checksum and fsynced (``_recover``). Evicting a version never leaves a job
  without a durable one: if the victim is the job's only durable version and a
  newer one is being fsynced, the eviction waits for that fsync.
- Without a spool, versions are kept in anonymous memory as they arrived: the
  buffer a data-plane push was received into (the buffer of an evicted version
  when its size fits, ``self.buffers``), or the serialised WeightChunk frames a
  gRPC push brought when their chunk size is ``chunk_bytes``. Pulls of the same
  kind send them as they are; a gRPC pull of another version frames it chunk by
  chunk as it goes (one copy). The message-based ``push`` / ``pull`` are the same
  operations for callers that hold messages.
- A job's memory and spool-disk needs are derived from a push's size and checked
  against weight-sync's limits (``budget.Budget``) before the version is kept.
"""

from __future__ import annotations

import errno
import itertools
import logging
import mmap
import os
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import Counter, Gauge, Histogram

from rlfleet.common.errors import (
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from rlfleet.common.job_ids import check_job_id
from rlfleet.common.weight_transport import BufferPool
from rlfleet.common.weights import (
    CHUNK_BYTES,
    checksum_algorithm,
    encode_frames,
    split_frame,
    verify_checksum,
)
from rlfleet.v1 import weightsync_pb2
from rlfleet.weightsync.budget import CGROUP_MEMORY_MAX, Budget
from rlfleet.weightsync.spool import Spool, SpooledVersion, populate

logger = logging.getLogger(__name__)

DEFAULT_KEEP_VERSIONS = 2
EVICT_WAIT_S = 60.0
MEMORY_OVERHEAD_BYTES = 512 << 20
# A data-plane push into a spool file is received a window at a time, each window's
# pages mapped in one call first (``spool.populate``).
RECEIVE_WINDOW = 64 << 20

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
    "Pushes by outcome (accepted, repeat, stale, data_loss, invalid, no_room: the job's "
    "versions do not fit weight-sync's memory or spool disk, busy: no version could be "
    "evicted in time).",
    ["outcome"],
)
CURRENT_VERSION = Gauge(
    "rlfleet_weightsync_current_version", "The current policy version of a job.", ["job_id"]
)
FSYNC_SECONDS = Histogram(
    "rlfleet_weightsync_fsync_seconds",
    "Time to make a spooled version durable (fsync of its file, rename, fsync of the "
    "directory), in the background after it became current.",
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 2, 5, 15, 60, 300),
)
UNSYNCED_VERSIONS = Gauge(
    "rlfleet_weightsync_unsynced_versions",
    "Spooled versions received and served whose fsync has not completed yet.",
)


@dataclass(frozen=True)
class VersionInfo:
    job_id: str
    version: int
    checksum: str
    num_bytes: int


@dataclass(eq=False)
class _Held:
    info: VersionInfo | None  # None until stored
    # The payload as views, in order; None: on disk only, mapped on the first pull
    # after a restart.
    views: tuple[memoryview, ...] | None = None
    # The serialised WeightChunks the views lie in, when a gRPC push brought them
    # in ``chunk_bytes`` chunks (no spool); None: gRPC pulls frame the views as they go.
    frames: tuple[bytes, ...] | None = None
    spooled: SpooledVersion | None = None
    # No spool: the pool buffer a data-plane push received the payload into; it goes
    # back to the pool when the version is evicted. Spool: the file's mapping.
    buffer: mmap.mmap | bytearray | None = None
    readers: int = 0
    dropped: bool = False
    fd: int | None = None  # spool: the file, open until its fsync is done
    sync_pending: bool = False  # spool: queued for, or in, its fsync
    durable: bool = False  # spool: fsynced under its final name
    load_lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass(eq=False)
class _Job:
    versions: dict[int, _Held] = field(default_factory=dict)
    index_lock: threading.Lock = field(default_factory=threading.Lock)
    # One push per job at a time, held from its admission until it is stored or refused.
    push_lock: threading.Lock = field(default_factory=threading.Lock)
    high_water: int = -1  # the newest version the job has had
    changed: threading.Condition = field(init=False)  # on index_lock: a pull ended, an fsync

    def __post_init__(self) -> None:
        self.changed = threading.Condition(self.index_lock)

    def current(self) -> _Held | None:
        return self.versions[max(self.versions)] if self.versions else None

    def held_bytes(self) -> int:
        return sum(h.info.num_bytes for h in self.versions.values() if h.info is not None)


class Arrival:
    """A data-plane push admitted by ``begin_push``: receive ``num_bytes`` into ``windows()``,
    then ``VersionStore.finish_push`` (or ``abort_push``)."""

    def __init__(self, job: _Job, job_id: str, version: int, checksum: str, num_bytes: int,
                 start: float):  # fmt: skip
        self.job, self.job_id, self.version = job, job_id, version
        self.checksum, self.num_bytes, self.start = checksum, num_bytes, start
        self.buffer: mmap.mmap | bytearray | None = None  # a spool file's mapping or a pool buffer
        self.fd: int | None = None
        self.tmp: Path | None = None
        self.view: memoryview = memoryview(bytearray())
        self.closed = False

    def windows(self, size: int = RECEIVE_WINDOW) -> Iterator[memoryview]:
        """The payload's place, in order, a window at a time (a spool file's pages mapped
        ahead of each window)."""
        spooled = self.fd is not None and isinstance(self.buffer, mmap.mmap)
        for offset in range(0, self.num_bytes, size):
            length = min(size, self.num_bytes - offset)
            if spooled:
                populate(self.buffer, offset, length)
            yield self.view[offset : offset + length]


def _release_views(views: Iterable[memoryview] | None) -> None:
    for view in views or ():
        try:
            view.release()
        except (BufferError, ValueError):
            pass


def _close_mapping(mapping: mmap.mmap | None) -> None:
    if mapping is None:
        return
    try:
        mapping.close()
    except BufferError:
        # A view of it is still referenced somewhere (a traceback, say); it is unmapped
        # once that goes. Its file is already removed.
        logger.debug("a mapping of an evicted version outlives its eviction")


class VersionStore:
    def __init__(
        self,
        *,
        keep_versions: int = DEFAULT_KEEP_VERSIONS,
        spool_dir: Path | str | None = None,
        chunk_bytes: int = CHUNK_BYTES,
        evict_wait_s: float = EVICT_WAIT_S,
        memory_limit_bytes: int = 0,
        memory_overhead_bytes: int = MEMORY_OVERHEAD_BYTES,
        cgroup_memory_max: Path = CGROUP_MEMORY_MAX,
    ):
        if keep_versions < 1:
            raise ValueError("keep_versions must be at least 1")
        self.keep_versions = keep_versions
        self.chunk_bytes = chunk_bytes
        self.evict_wait_s = evict_wait_s
        self.spool = Spool(Path(spool_dir)) if spool_dir else None
        self.budget = Budget(
            keep_versions=keep_versions,
            spool_root=self.spool.root if self.spool else None,
            memory_overhead_bytes=memory_overhead_bytes,
            memory_limit_bytes=memory_limit_bytes,
            cgroup_memory_max=cgroup_memory_max,
        )
        # No spool: the receive buffer of the last evicted version, which the next push of
        # the same size lands in instead of first-touching fresh memory (on a VM that costs
        # more than the transfer). One is enough: eviction comes before the receive.
        self.buffers = BufferPool(keep=1)
        self._jobs: dict[str, _Job] = {}
        self._jobs_lock = threading.Lock()
        self._sync_queue: queue.Queue[tuple[_Job, _Held] | None] = queue.Queue()
        self._sync_pending = 0
        self._sync_idle = threading.Condition()
        self._syncer: threading.Thread | None = None
        if keep_versions == 1:
            logger.warning(
                "keep_versions is 1: the current version is evicted when the next starts "
                "to arrive, so none is served meanwhile (and none if that push fails)"
            )
        if self.spool is not None:
            self._recover()
            self._syncer = threading.Thread(
                target=self._sync_loop, name="weightsync-fsync", daemon=True
            )
            self._syncer.start()

    # -- bookkeeping -------------------------------------------------------

    def _job(self, job_id: str, *, create: bool = False) -> _Job | None:
        with self._jobs_lock:
            job = self._jobs.get(job_id)
            if job is None and create:
                job = self._jobs[job_id] = _Job()
            return job

    def _recover(self) -> None:
        """Indexes the spool; the newest intact version of each job becomes current.

        A version whose fsync had not completed (``.unsynced``) is read back in full and
        trusted only if it matches its checksum, and then only once it is fsynced: after
        a crash of the process it is intact (its pages were in the page cache), after a
        crash of the machine it may not be, and is removed.
        """
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
                held = _Held(info, spooled=entry, durable=entry.durable)
                if not job.versions or not entry.durable:
                    # Map the would-be current version now, and any not known durable: a
                    # file that fails its checksum must not become current.
                    try:
                        self._load(held)
                    except DataLoss as exc:
                        # Unusable; removing it also keeps its version number free for
                        # the trainer to push again.
                        logger.warning(
                            "dropping a damaged spooled version: %s%s", exc.message,
                            "" if entry.durable else " (its fsync had not completed)",
                            extra={"job_id": job_id, "version": entry.version},
                        )  # fmt: skip
                        self.spool.delete(entry)
                        continue
                    if not entry.durable:
                        held.spooled = self.spool.make_durable(entry)
                        held.durable = True
                        logger.info(
                            "a spooled version whose fsync had not completed matched its "
                            "checksum and is durable now",
                            extra={"job_id": job_id, "version": entry.version},
                        )
                job.versions[entry.version] = held
            current = job.current()
            if current is not None:
                job.high_water = current.info.version
                CURRENT_VERSION.labels(job_id).set(current.info.version)
                logger.info(
                    "recovered from the spool",
                    extra={"job_id": job_id, "version": current.info.version},
                )

    # -- admission and room ------------------------------------------------

    def _lock_push(self, job: _Job, job_id: str) -> None:
        if not job.push_lock.acquire(timeout=self.evict_wait_s):
            PUSHES.labels("busy").inc()
            raise Unavailable(
                f"job {job_id}: another push of this job is still arriving after "
                f"evict_wait_s {self.evict_wait_s:g} s; retry the push"
            )

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
        """Under the job's push lock: the held version's info when this is a repeat of it,
        None for a new version; raises for a stale one."""
        with job.index_lock:
            held = job.versions.get(version)
            high = job.high_water
        if held is not None and held.info.checksum == checksum:
            PUSHES.labels("repeat").inc()
            return held.info
        if version <= high:
            PUSHES.labels("stale").inc()
            logger.warning(
                "refused a stale push",
                extra={"job_id": job_id, "version": version, "current": high},
            )
            if held is not None:
                reason = "is already held with a different payload"
            else:
                reason = f"is not newer than the current version {high}"
            raise FailedPrecondition(
                f"version {version} of job {job_id} {reason}; versions only move forward"
            )
        return None

    def _check_budget(self, job: _Job, job_id: str, num_bytes: int, *, arriving: int = 0) -> None:
        """Raises FailedPrecondition when versions of ``num_bytes`` do not fit (``budget``)."""
        with self._jobs_lock:
            others = [j for j in self._jobs.values() if j is not job]
        with job.index_lock:
            mine = job.held_bytes()
        other_memory = 0
        if self.spool is None:
            for other in others:
                with other.index_lock:
                    other_memory += other.held_bytes()
        try:
            self.budget.check(
                job_id, num_bytes, job_spool_bytes=mine if self.spool else 0,
                arriving_spool_bytes=arriving, other_jobs_memory_bytes=other_memory,
            )  # fmt: skip
        except FailedPrecondition as exc:
            PUSHES.labels("no_room").inc()
            logger.warning("refused a push: %s", exc.message)
            raise

    def _make_room(self, job: _Job, job_id: str) -> None:
        """Under the job's push lock: evicts until fewer than ``keep_versions`` are held, so
        the one about to arrive makes ``keep_versions`` (see the module's rules)."""
        deadline = time.monotonic() + self.evict_wait_s
        with job.index_lock:
            while len(job.versions) >= self.keep_versions:
                newest = max(job.versions)
                candidates = [
                    v
                    for v in sorted(job.versions)
                    if job.versions[v].readers == 0 and (v != newest or self.keep_versions == 1)
                ]
                waiting_for = f"replicas are pulling versions {sorted(job.versions)}"
                if candidates:
                    victim = job.versions[candidates[0]]
                    syncing = [
                        v for v, h in job.versions.items() if h is not victim and h.sync_pending
                    ]
                    others_durable = any(
                        h.durable for h in job.versions.values() if h is not victim
                    )
                    if not (victim.durable and syncing and not others_durable):
                        self._evict(job, job_id, candidates[0])
                        continue
                    waiting_for = (
                        f"version {candidates[0]} is the job's only durable version and "
                        f"version {max(syncing)} is still being fsynced"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    PUSHES.labels("busy").inc()
                    raise Unavailable(
                        f"job {job_id}: weight-sync keeps keep_versions {self.keep_versions} "
                        f"versions, the one arriving counted, and none could be evicted within "
                        f"evict_wait_s {self.evict_wait_s:g} s ({waiting_for}); retry the push"
                    )
                job.changed.wait(remaining)

    def _evict(self, job: _Job, job_id: str, version: int) -> None:
        """Under the job's index_lock: drops a version nobody reads; frees its memory or file."""
        held = job.versions.pop(version)
        held.dropped = True
        self._release(held)
        logger.info("evicted a version", extra={"job_id": job_id, "version": version})

    def _release(self, held: _Held) -> None:
        """Frees what a dropped version nobody reads holds (under its job's index_lock)."""
        views, held.views, held.frames = held.views, None, None
        _release_views(views)
        buffer, held.buffer = held.buffer, None
        if held.spooled is None:
            if buffer is not None:  # a data-plane receive buffer: the next push's
                self.buffers.give(buffer)
            return
        _close_mapping(buffer if isinstance(buffer, mmap.mmap) else None)
        assert self.spool is not None
        self.spool.delete(held.spooled)
        if held.fd is not None and not held.sync_pending:  # else the fsync thread closes it
            os.close(held.fd)
            held.fd = None

    # -- push: the data plane ----------------------------------------------

    def begin_push(
        self, job_id: str, version: int, checksum: str, num_bytes: int
    ) -> VersionInfo | Arrival:
        """Admits a data-plane push of ``num_bytes``: the held version's info when it is a
        repeat of it (nothing to receive), else an ``Arrival`` to receive the payload into,
        room made for it; raises for a stale or invalid push, or one that does not fit."""
        start = time.perf_counter()
        self._counted(_check_version, job_id, version, checksum)
        job = self._job(job_id, create=True)
        self._lock_push(job, job_id)
        arrival = None
        try:
            repeat = self._repeat_or_refuse(job, job_id, version, checksum)
            if repeat is not None:
                job.push_lock.release()
                return repeat
            self._check_budget(job, job_id, num_bytes)
            self._make_room(job, job_id)
            arrival = Arrival(job, job_id, version, checksum, num_bytes, start)
            if self.spool is not None:
                arrival.fd, arrival.tmp = self.spool.create(job_id, num_bytes)
                if num_bytes:
                    arrival.buffer = mmap.mmap(arrival.fd, num_bytes, flags=mmap.MAP_SHARED)
            else:
                arrival.buffer = self.buffers.take(num_bytes)
            if num_bytes:
                arrival.view = memoryview(arrival.buffer)
        except BaseException:
            if arrival is not None:
                self._discard(arrival)
            job.push_lock.release()
            raise
        return arrival

    def finish_push(self, arrival: Arrival) -> VersionInfo:
        """Verifies a received ``Arrival`` and makes it the current version."""
        try:
            RECEIVED_BYTES.inc(arrival.num_bytes)
            what = f"version {arrival.version}"
            self._counted(verify_checksum, arrival.view, arrival.checksum, what=what)
            if self.spool is not None:
                held = self._spooled_held(
                    arrival.job_id, arrival.version, arrival.checksum, arrival.num_bytes,
                    arrival.fd, arrival.tmp, arrival.buffer,
                )  # fmt: skip
                _release_views([arrival.view])
            else:
                held = _Held(None, views=(arrival.view,), buffer=arrival.buffer)
            arrival.closed = True  # the held version owns the buffer, fd and file now
            return self._commit(
                arrival.job, arrival.job_id, arrival.version, held, arrival.checksum, arrival.start
            )
        except BaseException:
            self._discard(arrival)
            raise
        finally:
            arrival.job.push_lock.release()

    def abort_push(self, arrival: Arrival) -> None:
        """A push whose payload did not arrive: nothing of it is kept."""
        try:
            self._discard(arrival)
        finally:
            arrival.job.push_lock.release()

    def _discard(self, arrival: Arrival) -> None:
        if arrival.closed:
            return
        arrival.closed = True
        _release_views([arrival.view])
        if self.spool is None:
            if arrival.buffer is not None:
                self.buffers.give(arrival.buffer)
            return
        _close_mapping(arrival.buffer if isinstance(arrival.buffer, mmap.mmap) else None)
        if arrival.fd is not None:
            os.close(arrival.fd)
        if arrival.tmp is not None:
            self.spool.delete_path(arrival.tmp)

    def _spooled_held(
        self,
        job_id: str,
        version: int,
        checksum: str,
        num_bytes: int,
        fd: int,
        tmp: Path,
        mapping: mmap.mmap | None,
    ) -> _Held:
        """A verified spool file under its version's (``.unsynced``) name, as a held version
        served from ``mapping``."""
        assert self.spool is not None
        entry = self.spool.publish(
            tmp, job_id=job_id, version=version, checksum=checksum, num_bytes=num_bytes
        )
        views = (memoryview(mapping).toreadonly(),) if mapping is not None else (memoryview(b""),)
        return _Held(None, views=views, spooled=entry, buffer=mapping, fd=fd)

    # -- push: gRPC streams ------------------------------------------------

    def push(self, chunks: Iterable[weightsync_pb2.WeightChunk]) -> VersionInfo:
        """Receives, verifies and stores one version; it becomes current last."""
        return self.push_frames(chunk.SerializeToString() for chunk in chunks)

    def push_frames(self, frames: Iterable[bytes]) -> VersionInfo:
        """``push`` for serialised WeightChunks, as PushVersion receives them.

        The stream's first chunk names the job and version, so a stale push is refused,
        and room made for a new one, before the rest arrives; its size and checksum come
        with the last chunk, so the budget is checked then, before it becomes current.
        """
        start = time.perf_counter()

        def pieces():
            for frame in frames:
                header, data = split_frame(frame)
                RECEIVED_BYTES.inc(len(data))
                yield header, data, frame

        stream = pieces()
        first = self._counted(next, stream, None)
        if first is None:
            self._counted(_torn, -1)
        job_id, version = first[0].job_id, first[0].version
        self._counted(_check_id, job_id, version)
        job = self._job(job_id, create=True)
        self._lock_push(job, job_id)
        sink: _Sink | None = None
        try:
            with job.index_lock:
                held = job.versions.get(version)
            if held is not None:  # a repeat (the same checksum) or a conflict
                checksum, _ = self._counted(_receive, version, first, stream, None)
                repeat = self._repeat_or_refuse(job, job_id, version, checksum)
                assert repeat is not None  # a held version with another checksum raised
                return repeat
            if version <= job.high_water:
                self._repeat_or_refuse(job, job_id, version, "")  # raises: stale
            self._make_room(job, job_id)
            sink = _FileSink(self, job_id) if self.spool is not None else _MemorySink(self)
            checksum, total = self._counted(_receive, version, first, stream, sink)
            self._counted(_check_version, job_id, version, checksum)
            self._check_budget(job, job_id, total, arriving=total if self.spool is not None else 0)
            new = self._counted(sink.finish, job_id, version, checksum, total)
            sink = None  # the held version owns what it received
            return self._commit(job, job_id, version, new, checksum, start)
        finally:
            if sink is not None:
                sink.discard()
            job.push_lock.release()

    # -- becoming current --------------------------------------------------

    def _commit(
        self, job: _Job, job_id: str, version: int, held: _Held, checksum: str, start: float
    ) -> VersionInfo:
        """Under the job's push lock: makes ``held`` (its views set) the current version and,
        with a spool, queues its fsync."""
        info = VersionInfo(job_id, version, checksum, sum(len(v) for v in held.views))
        with job.index_lock:
            held.info = info
            job.versions[version] = held
            job.high_water = max(job.high_water, version)
            held.sync_pending = held.spooled is not None and not held.durable
        if held.sync_pending:
            self._schedule_sync(job, held)
        CURRENT_VERSION.labels(job_id).set(version)
        PUSHES.labels("accepted").inc()
        PUSH_SECONDS.observe(time.perf_counter() - start)
        logger.info(
            "version is current",
            extra={"job_id": job_id, "version": version, "num_bytes": info.num_bytes},
        )
        return info

    # -- fsync in the background -------------------------------------------

    def _schedule_sync(self, job: _Job, held: _Held) -> None:
        with self._sync_idle:
            self._sync_pending += 1
        UNSYNCED_VERSIONS.inc()
        self._sync_queue.put((job, held))

    def _sync_loop(self) -> None:
        while True:
            item = self._sync_queue.get()
            if item is None:
                return
            job, held = item
            try:
                self._sync_one(job, held)
            except Exception:
                logger.exception(
                    "fsync of a spooled version failed; it stays .unsynced (a restart "
                    "checks it against its checksum before trusting it)",
                    extra={"version": held.info.version if held.info else None},
                )
            finally:
                UNSYNCED_VERSIONS.dec()
                with self._sync_idle:
                    self._sync_pending -= 1
                    self._sync_idle.notify_all()

    def _sync_one(self, job: _Job, held: _Held) -> None:
        assert self.spool is not None
        start = time.perf_counter()
        try:
            with job.index_lock:
                if held.dropped:
                    return
                fd, entry = held.fd, held.spooled
            self.spool.sync_file(fd)
            with job.index_lock:
                if held.dropped:  # evicted meanwhile: its file is gone
                    return
                held.spooled = entry = self.spool.rename_durable(entry)
            self.spool.sync_dir(entry)
            with job.index_lock:
                held.durable = not held.dropped
            FSYNC_SECONDS.observe(time.perf_counter() - start)
            logger.debug(
                "version is durable",
                extra={"job_id": entry.job_id, "version": entry.version,
                       "fsync_s": round(time.perf_counter() - start, 3)},
            )  # fmt: skip
        finally:
            with job.index_lock:
                held.sync_pending = False
                if held.fd is not None:
                    os.close(held.fd)
                    held.fd = None
                job.changed.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Waits until every version received so far is durable (or its fsync failed);
        False if ``timeout`` passed first."""
        with self._sync_idle:
            return self._sync_idle.wait_for(lambda: self._sync_pending == 0, timeout)

    def durable(self, job_id: str, version: int) -> bool:
        """Whether a held version is fsynced under its final name (False without a spool)."""
        job = self._job(job_id)
        if job is None:
            return False
        with job.index_lock:
            held = job.versions.get(version)
            return held is not None and held.durable

    def close(self, timeout: float | None = None) -> None:
        """Lets pending fsyncs finish (up to ``timeout``), then stops the fsync thread. A
        version whose fsync did not finish is checked at the next start."""
        if self._syncer is None:
            return
        if not self.flush(timeout):
            logger.warning("stopping with fsyncs still pending; the next start checks them")
        self._sync_queue.put(None)
        self._syncer.join(timeout=1.0)
        self._syncer = None

    # -- read --------------------------------------------------------------

    def current(self, job_id: str) -> VersionInfo:
        job = self._job(job_id)
        held = job.current() if job else None
        if held is None:
            if job is not None and job.high_water >= 0:
                raise NotFound(
                    f"job {job_id!r} holds no version right now: keep_versions is 1 and the "
                    "next version is arriving"
                )
            raise NotFound(f"job {job_id!r} has no policy version yet")
        return held.info

    def _load(self, held: _Held) -> None:
        """Maps a spooled version (verifying its checksum), once."""
        assert held.spooled is not None and self.spool is not None
        with held.load_lock:
            if held.views is not None:
                return
            mapping = self.spool.map(held.spooled)
            held.buffer = mapping
            held.views = (
                (memoryview(mapping).toreadonly(),) if mapping is not None else (memoryview(b""),)
            )

    @contextmanager
    def _reading(self, job_id: str, version: int) -> Iterator[_Held]:
        """A held version, kept from being evicted while the caller reads it."""
        if version < 0:
            raise InvalidArgument(f"version must be >= 0 (0 = current), got {version}")
        job = self._job(job_id)
        if job is None:
            raise NotFound(f"job {job_id!r} has no policy version yet")
        with job.index_lock:
            held = job.current() if version == 0 else job.versions.get(version)
            if held is None:
                if version == 0:
                    raise NotFound(f"job {job_id!r} has no policy version yet")
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
                if held.readers == 0:
                    job.changed.notify_all()

    def get(self, job_id: str, version: int = 0) -> tuple[VersionInfo, bytes]:
        """A held version and its payload (a copy); ``version`` 0 means the current one."""
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


# -- receiving a gRPC stream -------------------------------------------------------------


class _Sink:
    def add(self, data: memoryview, frame: bytes) -> None:
        raise NotImplementedError

    def finish(self, job_id: str, version: int, checksum: str, total: int) -> _Held:
        raise NotImplementedError

    def discard(self) -> None:
        raise NotImplementedError


class _MemorySink(_Sink):
    """Keeps the frames as they came (no spool)."""

    def __init__(self, store: VersionStore):
        self.store = store
        self.frames: list[bytes] = []
        self.views: list[memoryview] = []

    def add(self, data: memoryview, frame: bytes) -> None:
        self.frames.append(frame)
        self.views.append(data)

    def finish(self, job_id: str, version: int, checksum: str, total: int) -> _Held:
        verify_checksum(self.views, checksum, what=f"version {version}")
        sizes = [len(v) for v in self.views]
        chunk = self.store.chunk_bytes
        if all(n == chunk for n in sizes[:-1]) and (not sizes or sizes[-1] <= chunk):
            held = _Held(None, views=tuple(self.views), frames=tuple(self.frames))
        else:  # served reframed, from one joined copy
            held = _Held(None, views=(memoryview(b"".join(self.views)),))
        return held

    def discard(self) -> None:
        self.frames.clear()
        self.views.clear()


class _FileSink(_Sink):
    """Writes each chunk's data into a new spool file as it comes; maps it at the end."""

    def __init__(self, store: VersionStore, job_id: str):
        assert store.spool is not None
        self.store, self.spool, self.job_id = store, store.spool, job_id
        self.fd, self.tmp = self.spool.create(job_id)
        self.mapping: mmap.mmap | None = None

    def add(self, data: memoryview, frame: bytes) -> None:
        try:
            while data:
                data = data[os.write(self.fd, data) :]
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise self.spool.no_room(exc, job_id=self.job_id, num_bytes=None) from None
            raise

    def finish(self, job_id: str, version: int, checksum: str, total: int) -> _Held:
        if total:
            self.mapping = mmap.mmap(self.fd, total, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        verify_checksum(self.mapping if total else b"", checksum, what=f"version {version}")
        held = self.store._spooled_held(
            job_id, version, checksum, total, self.fd, self.tmp, self.mapping
        )
        self.fd = None  # the held version owns the fd, the mapping and the file now
        return held

    def discard(self) -> None:
        _close_mapping(self.mapping)
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
            self.spool.delete_path(self.tmp)


def _receive(version: int, first, stream, sink: _Sink | None) -> tuple[str, int]:
    """Checks a stream of (fields, data, frame) as ``weights.assemble_pieces`` does, handing
    each chunk's data to ``sink`` (None: discarded); returns (checksum, total bytes).

    Raises InvalidArgument for a malformed stream and DataLoss for a torn one.
    """
    received = 0
    job_id = first[0].job_id
    digest, total = "", -1
    for chunk, data, frame in itertools.chain([first], stream):
        if (chunk.job_id, chunk.version) != (job_id, version):
            raise InvalidArgument("weight chunks of different versions were mixed in one stream")
        if chunk.offset != received:
            raise InvalidArgument(
                f"weight chunk at offset {chunk.offset} arrived, expected {received}"
            )
        if sink is not None:
            sink.add(data, frame)
        received += len(data)
        if chunk.last:
            digest, total = chunk.checksum, chunk.total_bytes
            break
    if not digest:
        _torn(version)
    if total != received:
        raise DataLoss(f"version {version}: received {received} bytes, sender announced {total}")
    return digest, total


def _torn(version: int) -> None:
    raise DataLoss(
        f"weight stream for version {version} ended before its last chunk (torn transfer)"
    )


def _check_id(job_id: str, version: int) -> None:
    check_job_id(job_id)  # it names the job's spool directory
    if version < 0:
        raise InvalidArgument(f"version must be >= 0, got {version}")


def _check_version(job_id: str, version: int, checksum: str) -> None:
    _check_id(job_id, version)
    checksum_algorithm(checksum)
