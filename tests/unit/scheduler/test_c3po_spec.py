"""C3PO++ settings at submission: bad Φ, σ or Ω are refused with the field named."""

from __future__ import annotations

import pytest
from rlfleet.common.errors import InvalidArgument
from rlfleet.common.jobspec import JobSpec
from rlfleet.scheduler.c3po.driver import C3poSettings


@pytest.fixture
def core(make_core):
    return make_core(replica_addresses=["127.0.0.1:1"])


@pytest.mark.parametrize(
    ("scheduling", "field", "what"),
    [
        ({"token_budget": 0}, "scheduling.token_budget", "greater than 0"),
        ({"token_budget": -5}, "scheduling.token_budget", "greater than 0"),
        ({"retention_limit": -1}, "scheduling.retention_limit", "greater than or equal to 0"),
        ({"pool_capacity": 1}, "scheduling.pool_capacity", "smaller than one group"),
        ({"pool_capacity": -2}, "scheduling.pool_capacity", "greater than or equal to 0"),
    ],
)
def test_bad_c3po_settings_are_refused(core, spec_of, scheduling, field, what):
    with pytest.raises(InvalidArgument) as info:
        core.submit(spec_of(scheduling={"mode": "c3po", **scheduling}))
    assert field in info.value.message and what in info.value.message
    assert core.list()[0] == []


def test_c3po_job_is_accepted_and_defaults_fill_in(core, spec_of):
    job = core.submit(spec_of(scheduling={"mode": "c3po", "token_budget": 64}))
    spec = JobSpec.model_validate_json(job.spec_json)
    settings = C3poSettings.from_spec(spec)
    # Ω = 0 means twice the synchronous step's sequences (3 prompts × 2 samples); P is
    # refilled once a quarter of Ω is free; no overlap, so no staleness bound beyond σ.
    assert settings == C3poSettings(
        token_budget=64, pool_capacity=12, retention_limit=2, group_size=2, refill_batch=3
    )
    assert settings.max_staleness is None and not settings.overlap
    # Ω of exactly one group is the smallest that works.
    core.submit(spec_of(scheduling={"mode": "c3po", "pool_capacity": 2}))


def test_overlap_needs_c3po_and_bounds_staleness_by_default(core, spec_of):
    with pytest.raises(InvalidArgument) as info:
        core.submit(spec_of(scheduling={"mode": "sync", "overlap": True}))
    assert "scheduling" in info.value.message and "C3PO++" in info.value.message
    job = core.submit(spec_of(scheduling={"mode": "c3po", "overlap": True, "retention_limit": 1}))
    settings = C3poSettings.from_spec(JobSpec.model_validate_json(job.spec_json))
    assert settings.overlap and settings.max_staleness == 2  # σ + 1
