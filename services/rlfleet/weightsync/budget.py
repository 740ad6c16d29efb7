"""What a job's versions need of weight-sync's memory and spool disk, and whether it has it.

Weight-sync has no InitJob: nothing tells it about a job before the trainer's first
push (the scheduler only hands the replicas weight-sync's address). So the needs are
derived from a push's size, ``num_bytes``: a data-plane push announces it in its
header and is checked before any byte is sent; a gRPC PushVersion stream announces
it only in its last chunk, so it is checked once the stream has arrived, before the
version becomes current. Every push is checked (it costs a statvfs and a small file
read), which includes the first push of each job.

- With a spool, versions are files mapped MAP_SHARED: their pages are page cache,
  which the kernel writes back and reclaims, not anonymous memory. The hard need is
  spool disk, ``keep_versions × version``, against the spool's free space plus what
  the job's own files already take (they are replaced as versions move on). Memory
  below ``keep_versions × version + memory_overhead_mb`` is no error but a warning:
  the page cache cannot keep every held version, so receives and pulls run at disk speed.
- Without a spool, versions are anonymous memory: ``keep_versions × version +
  memory_overhead_mb`` plus what other jobs hold must fit weight-sync's memory limit.

The memory limit is the cgroup's (``/sys/fs/cgroup/memory.max``, cgroup v2, as a
container has it) when there is one, else ``memory_limit_mb``; with neither, memory is
not checked. Sizes are printed in decimal GB / MB.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from rlfleet.common.errors import FailedPrecondition

logger = logging.getLogger(__name__)

CGROUP_MEMORY_MAX = Path("/sys/fs/cgroup/memory.max")


def fmt_bytes(n: float) -> str:
    if abs(n) >= 1e9:
        return f"{n / 1e9:.1f} GB"
    if abs(n) >= 1e6:
        return f"{n / 1e6:.1f} MB"
    return f"{int(n)} bytes"


def memory_limit(cgroup_file: Path, configured_bytes: int) -> tuple[int | None, str]:
    """(limit in bytes, where it comes from), or (None, "") when there is none."""
    try:
        text = cgroup_file.read_text().strip()
    except OSError:
        text = ""
    if text and text != "max":
        try:
            return int(text), f"the cgroup limit in {cgroup_file}"
        except ValueError:
            logger.warning("unreadable cgroup memory limit", extra={"path": str(cgroup_file)})
    if configured_bytes > 0:
        return configured_bytes, "weight-sync's memory_limit_mb"
    return None, ""


@dataclass(frozen=True)
class Needs:
    """A job's needs for versions of ``version_bytes``."""

    version_bytes: int
    keep_versions: int
    spool_bytes: int  # 0 without a spool
    memory_bytes: int  # anonymous memory that must fit (without a spool, the versions too)
    page_cache_bytes: int  # with a spool: what keeps every held version in memory

    def describe(self) -> str:
        versions = (
            f"versions of {fmt_bytes(self.version_bytes)} × keep_versions {self.keep_versions}"
        )
        if self.spool_bytes:
            return (
                f"{versions}: {fmt_bytes(self.spool_bytes)} of spool disk, and "
                f"{fmt_bytes(self.page_cache_bytes)} of memory to keep them all in the page cache"
            )
        return f"{versions}: {fmt_bytes(self.memory_bytes)} of memory"


class Budget:
    """Checks a job's needs against weight-sync's limits (see the module's docstring)."""

    def __init__(
        self,
        *,
        keep_versions: int,
        spool_root: Path | None,
        memory_overhead_bytes: int,
        memory_limit_bytes: int = 0,
        cgroup_memory_max: Path = CGROUP_MEMORY_MAX,
    ):
        self.keep_versions = keep_versions
        self.spool_root = spool_root
        self.memory_overhead_bytes = memory_overhead_bytes
        self.memory_limit_bytes = memory_limit_bytes
        self.cgroup_memory_max = cgroup_memory_max
        self._told: set[tuple[str, int]] = set()  # (job, size) whose needs were logged

    def needs(self, num_bytes: int) -> Needs:
        versions = self.keep_versions * num_bytes
        if self.spool_root is not None:
            return Needs(num_bytes, self.keep_versions, versions, self.memory_overhead_bytes,
                         versions + self.memory_overhead_bytes)  # fmt: skip
        return Needs(num_bytes, self.keep_versions, 0, versions + self.memory_overhead_bytes, 0)

    def check(
        self,
        job_id: str,
        num_bytes: int,
        *,
        job_spool_bytes: int = 0,
        arriving_spool_bytes: int = 0,
        other_jobs_memory_bytes: int = 0,
    ) -> Needs:
        """Raises FailedPrecondition, with a sentence naming the setting, when a job's
        versions of ``num_bytes`` do not fit. ``job_spool_bytes``: what the job's held
        versions take in the spool; ``arriving_spool_bytes``: what the version being
        checked has already written there (a gRPC push); ``other_jobs_memory_bytes``:
        versions other jobs hold in memory (without a spool)."""
        needs = self.needs(num_bytes)
        limit, source = memory_limit(self.cgroup_memory_max, self.memory_limit_bytes)
        versions = f"a version of {fmt_bytes(num_bytes)} × keep_versions {self.keep_versions}"
        if self.spool_root is not None:
            free = shutil.disk_usage(self.spool_root).free + arriving_spool_bytes
            if needs.spool_bytes > free + job_spool_bytes:
                reuse = (
                    f" besides the {fmt_bytes(job_spool_bytes)} this job's versions take"
                    if job_spool_bytes
                    else ""
                )
                raise FailedPrecondition(
                    f"job {job_id}: {versions} needs {fmt_bytes(needs.spool_bytes)} of spool "
                    f"disk; {self.spool_root} (spool_dir) has {fmt_bytes(free)} free{reuse}. "
                    "Lower keep_versions or give the spool more room."
                )
            if (
                limit is not None
                and needs.page_cache_bytes > limit
                and self._first(job_id, num_bytes)
            ):
                logger.warning(
                    "the page cache cannot hold every version weight-sync keeps: receives "
                    "and pulls will run at disk speed",
                    extra={"job_id": job_id, "needs": needs.describe(),
                           "memory_limit": fmt_bytes(limit), "limit_from": source},
                )  # fmt: skip
        elif limit is not None:
            need = needs.memory_bytes + other_jobs_memory_bytes
            if need > limit:
                others = (
                    f" + {fmt_bytes(other_jobs_memory_bytes)} that other jobs hold"
                    if other_jobs_memory_bytes
                    else ""
                )
                raise FailedPrecondition(
                    f"job {job_id}: {versions} + memory_overhead_mb "
                    f"({fmt_bytes(self.memory_overhead_bytes)}){others} needs {fmt_bytes(need)} "
                    f"of memory; weight-sync's memory limit is {fmt_bytes(limit)} ({source}). "
                    "Set spool_dir (versions then live in the page cache), lower keep_versions, "
                    "or raise the limit."
                )
        if self._first(job_id, num_bytes, mark=True):
            logger.info(
                "weight-sync's needs for a job",
                extra={"job_id": job_id, "needs": needs.describe(),
                       "memory_limit": fmt_bytes(limit) if limit is not None else "none",
                       "limit_from": source or "none"},
            )  # fmt: skip
        return needs

    def _first(self, job_id: str, num_bytes: int, *, mark: bool = False) -> bool:
        key = (job_id, num_bytes)
        first = key not in self._told
        if mark:
            self._told.add(key)
        return first
