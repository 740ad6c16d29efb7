"""Shared fixtures: a real redis-server on a free port, per-test Redis databases,
and a way to start any rlfleet service as the real process it is in production.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import redis
from rlfleet.common.procs import Proc, redis_url_of, start_redis, start_service

_db_numbers = itertools.count(1)


@pytest.fixture(scope="session")
def redis_proc(tmp_path_factory) -> Proc:
    proc = start_redis(tmp_path_factory.mktemp("redis"))
    yield proc
    proc.stop()


@pytest.fixture
def redis_url(redis_proc) -> str:
    """A fresh, empty logical database of the session's real redis-server."""
    db = next(_db_numbers) % 16
    url = redis_url_of(redis_proc).rsplit("/", 1)[0] + f"/{db}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    return url


@pytest.fixture
def service_factory(tmp_path: Path):
    """Starts rlfleet services as processes; all are stopped (by PID) at teardown."""
    started: list[Proc] = []

    def start(name: str, module: str, args: list[str], **kwargs) -> Proc:
        proc = start_service(name, module, args, run_dir=tmp_path / "run", **kwargs)
        started.append(proc)
        return proc

    yield start
    for proc in reversed(started):
        proc.stop()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A randomly initialised tiny Llama model + tokenizer in Hugging Face format."""
    from rlfleet.common.tinymodel import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"), seed=0)
