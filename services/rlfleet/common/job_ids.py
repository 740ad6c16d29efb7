"""The one rule for job ids, which every service checks where an id enters it: a job id
names checkpoint and spool directories and Redis keys, so it keeps to safe characters
and a length every filesystem takes."""

from __future__ import annotations

import re

from rlfleet.common.errors import InvalidArgument

_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_job_id(job_id: str) -> str:
    """``job_id``, or InvalidArgument with the rule."""
    if not _JOB_ID.match(job_id or ""):
        raise InvalidArgument(
            f"job_id {job_id[:140]!r} is not valid: use 1-128 letters, digits, '.', '_' or "
            "'-', starting with a letter or digit"
        )
    return job_id
