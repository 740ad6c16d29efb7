"""One real local fleet (Redis with a password, weight-sync, reward, trainer, two
rollout replicas, scheduler) shared by the chaos tests of a module."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from rlfleet.cli.fleet import Fleet, FleetOptions

sys.path.insert(0, str(Path(__file__).resolve().parent))

from chaos_driver import PASSWORD  # noqa: E402


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    fleet = Fleet(
        FleetOptions(
            run_dir=tmp_path_factory.mktemp("fleet") / "run",
            rollout_replicas=2,
            log_format="json",
            extra_env={"MKL_NUM_THREADS": "1"},
            redis_password=PASSWORD,
        )
    )
    fleet.start()
    yield fleet
    fleet.stop()
