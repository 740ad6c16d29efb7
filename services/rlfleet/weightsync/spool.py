"""Versions on disk, so a restarted weight-sync serves the current version again.

Each version is one file ``<root>/job-<quoted job id>/v<version>.<algo>-<hex>.safetensors``,
its checksum in the name (a bare ``<64 hex>`` is sha256, as files were named before).
It is written to a temporary name, fsynced, renamed into place and the directory
fsynced, so a file under its final name is always complete: a crash mid-write
leaves only a temporary file, which the next start removes. The checksum in the
name is checked again whenever a file is read, so bit rot is refused too.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote

from rlfleet.common.errors import DataLoss, InvalidArgument
from rlfleet.common.weights import checksum_algorithm, verify_checksum

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^v(\d{20})\.(?:([a-z0-9-]+?)-)?([0-9a-f]{16,128})\.safetensors$")
_TMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class SpooledVersion:
    job_id: str
    version: int
    checksum: str
    num_bytes: int
    path: Path


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    def __init__(self, root: Path):
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def _job_dir(self, job_id: str) -> Path:
        # Quoting keeps any job id inside root ("/" and ".." cannot escape it);
        # the "job-" prefix keeps "." and ".." from being directory names.
        return self.root / ("job-" + quote(job_id, safe=""))

    def write(
        self,
        *,
        job_id: str,
        version: int,
        checksum: str,
        parts: Sequence[bytes | memoryview],
    ) -> SpooledVersion:
        """Writes the payload made of ``parts`` (in order) as one file, durably."""
        directory = self._job_dir(job_id)
        directory.mkdir(parents=True, exist_ok=True)
        algo, digest = checksum_algorithm(checksum), checksum.rpartition(":")[2]
        final = directory / f"v{version:020d}.{algo}-{digest}.safetensors"
        tmp = directory / f"{_TMP_PREFIX}{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as fh:
                for part in parts:  # no joined copy of a multi-gigabyte payload
                    fh.write(part)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(directory)
        return SpooledVersion(job_id, version, checksum, sum(len(p) for p in parts), final)

    def read(self, entry: SpooledVersion) -> bytes:
        """The payload of ``entry``, verified against the checksum in its name."""
        try:
            payload = entry.path.read_bytes()
        except FileNotFoundError:
            raise DataLoss(
                f"version {entry.version} of job {entry.job_id} is missing from the spool"
            ) from None
        verify_checksum(
            payload, entry.checksum, what=f"version {entry.version} of job {entry.job_id} on disk"
        )
        return payload

    def delete(self, entry: SpooledVersion) -> None:
        entry.path.unlink(missing_ok=True)

    def scan(self) -> list[SpooledVersion]:
        """Every complete version on disk; removes temporary files left by a crash."""
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
                    SpooledVersion(job_id, int(match[1]), checksum, path.stat().st_size, path)
                )
        return found
