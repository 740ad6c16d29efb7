"""Versions on disk: weight-sync keeps each version in a file of the spool and serves it from
a shared memory mapping of that file, so its bytes are page cache (reclaimable, not
anonymous memory), and a restarted weight-sync serves the same versions again.

Each version is one file ``<root>/job-<quoted job id>/v<version>.<algo>-<hex>.safetensors``,
its checksum in the name (a bare ``<64 hex>`` is sha256, as files were named before). A
file goes through three names:

1. ``.tmp-<uuid>`` while it is received (``create``; room reserved with ``fallocate``, so
   a full disk is an error before any byte arrives, never a SIGBUS in a mapping);
2. ``<final name>.unsynced`` once its checksum is verified (``publish``): from here on
   it is the current version and is served, while its fsync runs in the background;
3. ``<final name>`` once the file and then the rename are fsynced (``make_durable``).

A file under its final name is therefore complete and on stable storage. At a restart
(``scan``) temporary files are removed (a half-received version never becomes current);
an ``.unsynced`` file is only trusted after the store has read it in full against the
checksum in its name and fsynced it (``make_durable``): after a crash of the process
its pages were still in the page cache and it is intact; after a crash of the machine
it may be torn, fails its checksum and is removed. The checksum in the name is checked
again whenever a file is mapped (``map``), so bit rot is refused too.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import re
import sys
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import quote, unquote

from rlfleet.common.errors import DataLoss, FailedPrecondition, InvalidArgument
from rlfleet.common.weights import checksum_algorithm, verify_checksum

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^v(\d{20})\.(?:([a-z0-9-]+?)-)?([0-9a-f]{16,128})\.safetensors(\.unsynced)?$")
_TMP_PREFIX = ".tmp-"
UNSYNCED = ".unsynced"
# madvise(MADV_POPULATE_WRITE), Linux 5.14+: maps a window of a fresh file's pages in
# one call instead of one page fault per 4 KiB (several times faster on a VM).
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23 if sys.platform == "linux" else 0)


@dataclass(frozen=True)
class SpooledVersion:
    job_id: str
    version: int
    checksum: str
    num_bytes: int
    path: Path
    durable: bool = True  # False: its fsync has not completed (``.unsynced``)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def populate(mapping: mmap.mmap, offset: int, length: int) -> None:
    """Maps ``length`` bytes of a shared file mapping from ``offset`` ahead of writing them
    (best effort: a kernel without MADV_POPULATE_WRITE simply faults them in as written)."""
    if _MADV_POPULATE_WRITE and length > 0:
        try:
            mapping.madvise(_MADV_POPULATE_WRITE, offset, length)
        except (OSError, ValueError):
            pass


class Spool:
    def __init__(self, root: Path):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def _job_dir(self, job_id: str) -> Path:
        # Quoting keeps any job id inside root ("/" and ".." cannot escape it);
        # the "job-" prefix keeps "." and ".." from being directory names.
        return self.root / ("job-" + quote(job_id, safe=""))

    def final_path(self, job_id: str, version: int, checksum: str) -> Path:
        algo, digest = checksum_algorithm(checksum), checksum.rpartition(":")[2]
        return self._job_dir(job_id) / f"v{version:020d}.{algo}-{digest}.safetensors"

    def no_room(self, exc: OSError, *, job_id: str, num_bytes: int | None) -> FailedPrecondition:
        """The sentence for a full spool disk (ENOSPC / EDQUOT while writing)."""
        size = f"a version of {num_bytes} bytes" if num_bytes is not None else "a version"
        return FailedPrecondition(
            f"job {job_id}: the spool disk is full: {size} does not fit in {self.root} "
            f"(spool_dir): {exc.strerror}; lower keep_versions or give the spool more room"
        )

    # -- receiving ------------------------------------------------------------------

    def create(self, job_id: str, num_bytes: int | None = None) -> tuple[int, Path]:
        """A new temporary file for a version being received: (its fd, its path).

        With ``num_bytes`` its room is reserved up front (``posix_fallocate``): a full disk
        is a FailedPrecondition now, and the file can be mapped and written in place.
        """
        directory = self._job_dir(job_id)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            if num_bytes:
                os.posix_fallocate(fd, 0, num_bytes)
        except OSError as exc:
            os.close(fd)
            path.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise self.no_room(exc, job_id=job_id, num_bytes=num_bytes) from None
            raise
        return fd, path

    def publish(
        self, tmp: Path, *, job_id: str, version: int, checksum: str, num_bytes: int
    ) -> SpooledVersion:
        """Names a received, verified file after its version, not yet durable (``.unsynced``)."""
        final = self.final_path(job_id, version, checksum)
        unsynced = final.with_name(final.name + UNSYNCED)
        os.replace(tmp, unsynced)
        return SpooledVersion(job_id, version, checksum, num_bytes, unsynced, durable=False)

    def sync_file(self, fd: int) -> None:
        """fsync of a received file (its data, including what was written through a mapping)."""
        os.fsync(fd)

    def make_durable(self, entry: SpooledVersion) -> SpooledVersion:
        """fsyncs an ``.unsynced`` file, renames it to its final name and fsyncs the
        directory; returns the durable entry. (The store does the same three steps on its
        fsync thread, with the lock it needs between them.)"""
        if entry.durable:
            return entry
        fd = os.open(entry.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.sync_file(fd)
        finally:
            os.close(fd)
        durable = self.rename_durable(entry)
        self.sync_dir(durable)
        return durable

    def rename_durable(self, entry: SpooledVersion) -> SpooledVersion:
        """The rename step of ``make_durable`` (after the file's fsync, before the directory's)."""
        final = self.final_path(entry.job_id, entry.version, entry.checksum)
        os.replace(entry.path, final)
        return replace(entry, path=final, durable=True)

    def sync_dir(self, entry: SpooledVersion) -> None:
        _fsync_dir(entry.path.parent)

    # -- reading ------------------------------------------------------------------

    def _missing(self, entry: SpooledVersion) -> DataLoss:
        return DataLoss(f"version {entry.version} of job {entry.job_id} is missing from the spool")

    def map(self, entry: SpooledVersion) -> mmap.mmap | None:
        """A read-only shared mapping of ``entry``'s file, verified against the checksum in
        its name (DataLoss if it does not match); None for an empty payload."""
        what = f"version {entry.version} of job {entry.job_id} on disk"
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise self._missing(entry) from None
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                verify_checksum(b"", entry.checksum, what=what)
                return None
            mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        try:
            verify_checksum(mapping, entry.checksum, what=what)
        except BaseException:
            mapping.close()
            raise
        return mapping

    def delete(self, entry: SpooledVersion) -> None:
        entry.path.unlink(missing_ok=True)

    def delete_path(self, path: Path) -> None:
        path.unlink(missing_ok=True)

    def scan(self) -> list[SpooledVersion]:
        """Every version on disk, durable or ``.unsynced`` (``durable`` says which); removes
        temporary files left by a crash mid-receive."""
        found: list[SpooledVersion] = []
        for directory in sorted(self.root.glob("job-*")):
            if not directory.is_dir():
                continue
            job_id = unquote(directory.name[len("job-") :])
            for path in directory.iterdir():
                if path.name.startswith(_TMP_PREFIX):
                    logger.info("removing an unfinished spool file", extra={"path": str(path)})
                    path.unlink(missing_ok=True)
                    continue
                match = _NAME.match(path.name)
                if match is None:
                    logger.warning("ignoring a stray spool file", extra={"path": str(path)})
                    continue
                checksum = f"{match[2]}:{match[3]}" if match[2] else match[3]
                try:
                    checksum_algorithm(checksum)
                except InvalidArgument:
                    logger.warning(
                        "ignoring a spool file of unknown checksum", extra={"path": str(path)}
                    )
                    continue
                found.append(
                    SpooledVersion(
                        job_id, int(match[1]), checksum, path.stat().st_size, path,
                        durable=match[4] is None,
                    )
                )  # fmt: skip
        return found
