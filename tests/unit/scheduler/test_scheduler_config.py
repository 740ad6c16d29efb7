"""Scheduler settings: flags, environment, and a clear error for what is missing."""

from __future__ import annotations

import pytest
from rlfleet.common.config import load_config
from rlfleet.scheduler.config import SchedulerConfig

ADDRESSES = ["--reward-address", "r:1", "--trainer-address", "t:1"]


def test_flags_and_addresses():
    cfg = load_config(
        SchedulerConfig,
        [*ADDRESSES, "--rollout-addresses", "a:1, b:2,,", "--train-timeout-s", "5"],
    )
    assert cfg.rollout_list == ["a:1", "b:2"]
    assert cfg.train_timeout_s == 5.0 and cfg.discovery == "static"


def test_environment(monkeypatch):
    monkeypatch.setenv("RLFLEET_SCHEDULER_ROLLOUT_ADDRESSES", "x:9")
    monkeypatch.setenv("RLFLEET_SCHEDULER_SCORE_BATCH_SIZE", "7")
    cfg = load_config(SchedulerConfig, ADDRESSES)
    assert cfg.rollout_list == ["x:9"] and cfg.score_batch_size == 7


def test_missing_addresses_are_named():
    with pytest.raises(SystemExit, match="trainer_address, rollout_addresses"):
        load_config(SchedulerConfig, ["--reward-address", "r:1"])


def test_bad_value_is_named():
    with pytest.raises(SystemExit, match="score_batch_size"):
        load_config(
            SchedulerConfig, [*ADDRESSES, "--rollout-addresses", "a:1", "--score-batch-size", "0"]
        )
