"""Property-based API testing with schemathesis: requests generated from the live
scheduler's OpenAPI schema (valid and invalid ones) must never get a 5xx, and
every answer must match the schema (status codes, content types, bodies).

Bounded: a few dozen examples per operation, so the run takes seconds.
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from rlfleet.common.procs import redis_url_of, start_redis, start_service
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def live_schema(tmp_path_factory):
    run = tmp_path_factory.mktemp("schema")
    redis_proc = start_redis(run / "redis")
    # Its peers need not exist: no generated spec names a real model directory,
    # so no job ever runs; the API and Redis are what is under test.
    proc = start_service(
        "scheduler",
        "rlfleet.scheduler",
        [
            "--redis-url", redis_url_of(redis_proc),
            "--rollout-addresses", "127.0.0.1:9",
            "--reward-address", "127.0.0.1:9",
            "--trainer-address", "127.0.0.1:9",
            "--log-format", "text",
            "--log-level", "WARNING",
        ],
        run_dir=run,
    )  # fmt: skip
    try:
        # The first spec validation imports reasoning-gym (seconds); pay for it here.
        warm = httpx.post(
            proc.info["url"] + "/v1/jobs",
            json={"model": {"path": "/nonexistent"}, "task": {"name": "basic_arithmetic"}},
            timeout=120,
        )
        assert warm.status_code == 422
        yield schemathesis.openapi.from_url(proc.info["url"] + "/openapi.json")
    finally:
        proc.stop()
        redis_proc.stop()
        assert "Traceback" not in proc.log_tail(10_000), proc.log_tail()


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def test_api_never_fails_with_5xx(live_schema):
    # Driven with hypothesis directly: schemathesis' own pytest plugin does not
    # support this pytest version.
    operations = [result.ok() for result in live_schema.get_all_operations()]
    assert len(operations) >= 9
    for operation in operations:

        @settings(
            max_examples=20,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        @given(case=operation.as_strategy())
        def check(case):
            case.call_and_validate(checks=CHECKS, timeout=30)

        check()
