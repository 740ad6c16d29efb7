"""Overlapped C3PO++ (``scheduling.overlap``) on the simulated fleet.

The scripted scenarios use the cost model of sim_scripts.py: every engine
step lasts exactly 1 virtual second and prefill is free, so a sequence of length
n admitted at time t ends at t + n. Virtual time is deterministic, so relations
between virtual times are asserted exactly; nothing here depends on wall time.
"""

from __future__ import annotations

import pytest
from rlfleet.rollout.sim_engine import LengthModel
from rlfleet.scheduler.c3po.driver import C3poSettings, IterationDriver
from rlfleet.scheduler.c3po.pool import InferencePool, Progress, expand_spans
from rlfleet.scheduler.c3po.sim import (
    SimFleet,
    SimGroupSource,
    SimJob,
    SimRun,
    TrainCostModel,
    run_sim,
)
from sim_scripts import UNIT_COST, ScriptedLengths

# g0 ends the first iteration (C = 5 = Φ at t = 3); g1 is still generating then.
SCENARIO = [("g0", 0, 2), ("g0", 1, 3), ("g1", 0, 4), ("g1", 1, 10)]


def make(table, *, budget=5, capacity=4, sigma=2, max_staleness=None):
    lengths = ScriptedLengths(table=tuple(table))
    fleet = SimFleet(replicas=1, cost=UNIT_COST, lengths=lengths)
    settings = C3poSettings(
        token_budget=budget,
        pool_capacity=capacity,
        retention_limit=sigma,
        group_size=2,
        overlap=True,
        max_staleness=max_staleness,
    )
    pool = InferencePool()
    driver = IterationDriver(pool, SimGroupSource(lengths, seed=0, group_size=2), settings)
    fleet.begin(version=0, at=0.0)
    return fleet, pool, driver


def train_then_load(fleet: SimFleet, version: int, seconds: float) -> None:
    """The trainer trains for ``seconds`` while the replicas generate; then they load."""
    fleet.advance(fleet.now() + seconds)
    fleet.load_version(version)


def test_tokens_keep_the_version_that_made_them_across_an_in_flight_load():
    fleet, pool, driver = make(SCENARIO)
    first = driver.run_c3po(fleet, step=0, version=0)
    # t=2: g0-0 ends; t=3: g0-1 ends, g0 complete, C = 5 = Φ. Nothing is aborted.
    assert [g.group_id for g in first.released] == ["g0"]
    assert fleet.now() == 3.0 and first.aborted == 0
    assert sorted(pool.in_flight()) == ["g1-0", "g1-1"] and first.carried == 2
    # Training lasts 5 s: g1-0 ends at t=4 under version 0; g1-1 has 8 tokens at t=8.
    train_then_load(fleet, 1, 5.0)
    assert fleet.now() == 8.0 and fleet.version == 1
    second = driver.run_c3po(fleet, step=1, version=1)
    # t=8: g2 joins (Ω = 4, g1-1 still unfinished); t=9: g2 complete, C = 2; g3 joins;
    # t=10: g1-1 ends (8 tokens of version 0, then 2 of version 1), g1 complete, C = 16.
    assert [g.group_id for g in second.released] == ["g2", "g1"]
    g1 = second.released[1]
    assert g1.members[0].spans == [[0, 4]]  # finished while the step trained
    assert g1.members[1].spans == [[0, 8], [1, 2]]  # straddles the load at t=8
    assert [m.retention for m in g1.members] == [1, 1]
    assert second.released[0].members[0].spans == [[1, 1]]
    assert fleet.now() == 10.0 and second.rollout_seconds == 2.0
    assert second.budget_used == 16 and second.deferred == 1  # g3 ended with g1-1


def test_a_load_pause_delays_generation_but_not_the_versions_already_made():
    fleet, pool, driver = make(SCENARIO)
    driver.run_c3po(fleet, step=0, version=0)
    fleet.advance(8.0)
    fleet.load_version(1, pause_s=3.0)  # decoding resumes at t=11
    fleet.advance(11.0)
    report = driver.run_c3po(fleet, step=1, version=1)
    g1 = next(g for g in report.released if g.group_id == "g1")
    # g1-1 makes its last 2 tokens at t=12 and t=13.
    assert g1.members[1].spans == [[0, 8], [1, 2]]
    assert fleet.now() == 13.0


def test_wait_zero_returns_what_ended_by_now_and_never_moves_the_clock():
    fleet, pool, driver = make([("g0", 0, 3), ("g0", 1, 7)])
    g0 = driver.source.draw(0, step=0)
    pool.add(g0)
    fleet.submit([(g0, list(g0.members))])
    assert fleet.wait(0.0) == [] and fleet.now() == 0.0
    fleet.advance(5.0)  # g0-0 ends at t=3, g0-1 is still running
    assert fleet.now() == 5.0 and fleet.in_flight == 2  # one queued report, one running
    events = fleet.wait(0.0)
    assert [(e.seq_id, e.finished, e.length) for e in events] == [("g0-0", True, 3)]
    assert fleet.now() == 5.0 and fleet.wait(0.0) == [] and fleet.in_flight == 1
    # A positive timeout moves to the next event (virtual time: waiting is free).
    events = fleet.wait(0.2)
    assert [e.seq_id for e in events] == ["g0-1"] and fleet.now() == 7.0
    assert fleet.wait(0.0) == [] and fleet.now() == 7.0


def test_wait_zero_returns_an_event_due_at_the_present_instant():
    fleet, pool, driver = make([("g0", 0, 2), ("g0", 1, 4), ("g1", 0, 4), ("g1", 1, 9)])
    for serial in (0, 1):
        group = driver.source.draw(serial, step=0)
        pool.add(group)
        fleet.submit([(group, list(group.members))])
    assert [e.seq_id for e in fleet.wait(1.0)] == ["g0-0"] and fleet.now() == 2.0
    fleet.advance(4.0)
    # Both sequences ending at t=4 are reported, nothing later, clock unchanged.
    assert sorted(e.seq_id for e in fleet.wait(0.0)) == ["g0-1", "g1-0"]
    assert fleet.now() == 4.0


def test_wait_zero_in_the_non_overlapped_modes():
    """After an aborted (non-overlapped) phase nothing is queued: wait(0.0) is a no-op."""
    lengths = ScriptedLengths(table=(("g0", 0, 3), ("g0", 1, 5)))
    fleet = SimFleet(replicas=1, cost=UNIT_COST, lengths=lengths)
    settings = C3poSettings(token_budget=2, pool_capacity=2, retention_limit=2, group_size=2)
    driver = IterationDriver(
        InferencePool(), SimGroupSource(lengths, seed=0, group_size=2), settings
    )
    fleet.begin(version=0, at=0.0)
    report = driver.run_c3po(fleet, step=0)
    assert fleet.now() == 5.0 and report.released[0].group_id == "g0"
    assert fleet.wait(0.0) == [] and fleet.now() == 5.0 and fleet.in_flight == 0


def test_max_staleness_drops_a_group_and_stops_its_members_in_flight():
    fleet, pool, driver = make(SCENARIO, max_staleness=0)
    driver.run_c3po(fleet, step=0, version=0)
    train_then_load(fleet, 1, 5.0)
    report = driver.run_c3po(fleet, step=1, version=1)
    # g1 holds version-0 tokens (g1-0 finished while training, g1-1 in flight): trained
    # against version 1 they would lag by 1 > 0. Dropped whole and counted; g1-1 is
    # stopped on the replica (its report is ignored, it never comes back).
    assert [g.group_id for g in report.stale] == ["g1"]
    assert all(g.group_id != "g1" for g in report.released)
    assert 1 not in pool.groups and "g1-1" not in pool.in_flight()
    for g in report.released:
        for m in g.members:
            assert min(expand_spans(m.spans)) >= 1


def test_max_staleness_one_trains_the_same_group():
    fleet, pool, driver = make(SCENARIO, max_staleness=1)
    driver.run_c3po(fleet, step=0, version=0)
    train_then_load(fleet, 1, 5.0)
    report = driver.run_c3po(fleet, step=1, version=1)
    assert report.stale == [] and "g1" in [g.group_id for g in report.released]


def test_stale_groups_are_counted_when_released_late():
    """A group that completes under the budget but whose oldest token is too old is
    counted as stale when it would be released, not trained."""
    fleet, pool, driver = make(SCENARIO, max_staleness=1)
    driver.run_c3po(fleet, step=0, version=0)
    fleet.advance(8.0)
    fleet.load_version(1)
    # Skip a version: the replicas now hold version 2 (two training steps went by).
    fleet.load_version(2)
    report = driver.run_c3po(fleet, step=2, version=2)
    assert [g.group_id for g in report.stale] == ["g1"]


def _overlap_job(**kw) -> SimJob:
    return SimJob(
        replicas=4,
        prompts_per_step=12,
        group_size=4,
        retention_limit=1,
        seed=5,
        train_gpus=4,
        **kw,
    )


# Training takes about half as long as a rollout phase: some rollouts end while
# the step trains, others straddle a load, and carried groups age.
TRAIN = TrainCostModel(flops_per_gpu_s=2e14)
SMALL_LENGTHS = LengthModel(median=3000, cap=32768)


@pytest.mark.parametrize("max_staleness", [None, 1])
def test_overlapped_job_loses_nothing_and_trains_nothing_twice(max_staleness):
    job = _overlap_job(max_staleness=max_staleness)
    state = SimRun()
    steps = run_sim("overlap", job, steps=8, lengths=SMALL_LENGTHS, train=TRAIN, state=state)
    released: set[str] = set()
    dropped: set[str] = set()
    new = 0
    multi_version = 0
    bound = job.retention_limit + 1 if max_staleness is None else max_staleness
    for s in steps:
        r = s.report
        new += r.new_groups
        assert r.budget_used == r.trained_tokens
        for g in r.released:
            assert g.finished and g.group_id not in released | dropped
            released.add(g.group_id)
            for m in g.members:
                versions = expand_spans(m.spans)
                assert len(versions) == m.length
                assert versions == sorted(versions) and versions[-1] <= s.step
                assert s.step - versions[0] <= bound  # the staleness bound holds
                multi_version += len(m.spans) > 1
        for g in r.purged + r.stale:
            assert g.group_id not in released | dropped
            dropped.add(g.group_id)
    left = {g.group_id for g in state.pool}
    assert not left & (released | dropped)
    # Every group drawn is trained, dropped (σ or staleness), or still in P.
    assert new == len(released) + len(dropped) + len(left) == state.pool.next_serial
    assert multi_version > 0  # some samples straddle an in-flight load
    if max_staleness == 1:
        assert sum(len(s.report.stale) for s in steps) > 0


def test_an_overlapped_step_trains_the_budget_not_everything_that_finished():
    """What finished while the step trained is released oldest first up to Φ; the rest
    waits in P. A step trains Φ plus at most the group that crossed it."""
    job = _overlap_job()
    steps = run_sim("overlap", job, steps=8, lengths=SMALL_LENGTHS, train=TRAIN)
    budget = job.settings(SMALL_LENGTHS, overlap=True).token_budget
    for s in steps:
        last = max((g.tokens for g in s.report.released), default=0)
        assert budget <= s.trained_tokens < budget + last
    assert any(s.rollout_s == 0.0 for s in steps[1:])  # some batches ready at once


def test_overlapped_step_time_is_the_time_between_iteration_ends():
    job = _overlap_job()
    steps = run_sim("overlap", job, steps=5, lengths=SMALL_LENGTHS, train=TRAIN)
    pause = TRAIN.load_pause_seconds()
    for prev, s in zip(steps, steps[1:], strict=False):
        # Iteration t + 1 starts once t's training, weight sync and load are done.
        assert s.e2e_s == pytest.approx(prev.train_s + prev.sync_s + pause + s.rollout_s)
    assert steps[0].e2e_s == steps[0].rollout_s


def test_sync_and_c3po_can_train_on_their_own_gpus_too():
    colocated = SimJob(replicas=4, prompts_per_step=8, group_size=4, seed=2)
    apart = SimJob(replicas=4, prompts_per_step=8, group_size=4, seed=2, train_gpus=8)
    for mode in ("sync", "c3po"):
        a = run_sim(mode, colocated, steps=2, lengths=SMALL_LENGTHS)
        b = run_sim(mode, apart, steps=2, lengths=SMALL_LENGTHS)
        assert [s.trained_tokens for s in a] == [s.trained_tokens for s in b]
        # 32 colocated GPUs train 4× faster than 8 separate ones.
        assert b[1].train_s == pytest.approx(4 * a[1].train_s)
        assert b[1].e2e_s == pytest.approx(b[1].rollout_s + b[1].train_s + b[1].sync_s)


def test_overlap_needs_separate_training_gpus():
    with pytest.raises(ValueError, match="train_gpus"):
        run_sim("overlap", SimJob(replicas=2, prompts_per_step=2), steps=1)
    with pytest.raises(ValueError, match="unknown mode"):
        run_sim("async", SimJob(replicas=2, prompts_per_step=2), steps=1)


def test_an_abort_after_a_load_reports_each_token_with_its_version():
    fleet, pool, driver = make([("g0", 0, 10), ("g0", 1, 10)])
    g0 = driver.source.draw(0, step=0)
    pool.add(g0)
    fleet.submit([(g0, list(g0.members))])
    fleet.advance(4.0)
    fleet.load_version(1, pause_s=1.0)  # decoding resumes at t=5
    fleet.advance(7.0)
    events = fleet.abort()
    assert all(isinstance(e, Progress) and not e.finished for e in events)
    assert [e.spans for e in events] == [[[0, 4], [1, 2]], [[0, 4], [1, 2]]]
    assert fleet.tokens_generated == 12
