"""Fixtures of the scheduler tests: a tokenizer-only model dir, scripted services, a core."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from scheduler_fakes import ScriptedFleet, write_tokenizer_model  # noqa: E402


@pytest.fixture(scope="session")
def token_model_dir(tmp_path_factory) -> Path:
    """What the scheduler reads of a model (tokenizer.json, config.json); no weights, no torch."""
    return write_tokenizer_model(tmp_path_factory.mktemp("token-model"))


@pytest.fixture
def fleet(token_model_dir):
    f = ScriptedFleet(token_model_dir)
    yield f
    f.close()


@pytest.fixture
def spec_of(token_model_dir):
    """A small valid spec as JSON, with ``overrides`` merged per section."""

    def make(**overrides) -> str:
        spec = {
            "model": {"path": str(token_model_dir)},
            "task": {"name": "basic_arithmetic", "size": 50},
            "sampling": {"max_new_tokens": 8},
            "algorithm": {"group_size": 2, "prompts_per_step": 3},
            "steps": 2,
        }
        for key, value in overrides.items():
            if isinstance(value, dict):
                spec.setdefault(key, {}).update(value)
            else:
                spec[key] = value
        return json.dumps(spec)

    return make


@pytest.fixture
def make_core(redis_url):
    """Builds a SchedulerCore wired to a (scripted) fleet; the worker is not started."""
    from rlfleet.scheduler.clients import ServiceClients, Timeouts
    from rlfleet.scheduler.core import SchedulerCore
    from rlfleet.scheduler.discovery import StaticDiscovery
    from rlfleet.scheduler.loop import JobRunner
    from rlfleet.scheduler.pool import ReplicaPool
    from rlfleet.scheduler.store import JobStore

    built = []

    def make(
        *,
        replica_addresses: list[str],
        reward_address: str = "127.0.0.1:1",
        trainer_address: str = "127.0.0.1:1",
        retry_deadline: float = 1.0,
    ) -> SchedulerCore:
        store = JobStore.from_url(redis_url)
        # Per-call timeouts are generous: the scripted peers answer at once, but on a
        # loaded 2-core machine a call can wait seconds for a thread; a timeout there
        # would drop a healthy replica or fail the job. Calls that are meant to fail
        # (dead addresses, scripted errors) fail at once, not by timing out.
        pool = ReplicaPool(
            StaticDiscovery(replica_addresses),
            status_timeout_s=10.0,
            load_timeout_s=60.0,
            generate_timeout_s=60.0,
            replica_retry_s=0.5,
        )
        clients = ServiceClients(
            reward_address=reward_address,
            trainer_address=trainer_address,
            timeouts=Timeouts(init=60.0, score=60.0, train=120.0, retry_deadline=retry_deadline),
        )
        runner = JobRunner(store=store, pool=pool, clients=clients, score_batch_size=4)
        core = SchedulerCore(store=store, runner=runner, poll_interval_s=0.05)
        built.append(core)
        return core

    yield make
    for core in built:
        core.stop()
        core.runner.pool.close()
        core.runner.clients.close()
        core.store.r.close()


@pytest.fixture
def fleet_core(make_core, fleet):
    """A core wired to the scripted fleet."""
    return make_core(
        replica_addresses=fleet.replica_addresses,
        reward_address=fleet.reward_address,
        trainer_address=fleet.trainer_address,
    )
