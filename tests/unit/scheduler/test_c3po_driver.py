"""C3PO++ iterations, step by step, on a simulated fleet whose every length is scripted.

The cost model makes each engine step last exactly 1 virtual second whatever
the batch, and prefill free, so a sequence of length n admitted at time t ends
at t + n: every scenario below can be followed by hand.
"""

from __future__ import annotations

import pytest
from rlfleet.common.errors import FailedPrecondition
from rlfleet.rollout.sim_engine import LengthModel
from rlfleet.scheduler.c3po.driver import C3poSettings, IterationDriver
from rlfleet.scheduler.c3po.pool import (
    Group,
    InferencePool,
    Progress,
    Rollout,
    expand_spans,
    extend_spans,
    spans_of,
)
from rlfleet.scheduler.c3po.sim import SimFleet, SimGroupSource, SimJob, run_sim
from sim_scripts import UNIT_COST, ScriptedLengths


class RecordingFleet(SimFleet):
    """The simulated fleet, remembering the order sequences were handed to it."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.submitted: list[str] = []
        self.calls: list[list[str]] = []

    def submit(self, units):
        self.calls.append([m.seq_id for _, members in units for m in members])
        self.submitted += self.calls[-1]
        super().submit(units)


def make(table, *, budget=10, capacity=4, sigma=2, group_size=2, replicas=1):
    lengths = ScriptedLengths(table=tuple(table))
    fleet = RecordingFleet(replicas=replicas, cost=UNIT_COST, lengths=lengths)
    pool = InferencePool()
    settings = C3poSettings(
        token_budget=budget, pool_capacity=capacity, retention_limit=sigma, group_size=group_size
    )
    driver = IterationDriver(pool, SimGroupSource(lengths, seed=0, group_size=group_size), settings)
    return fleet, pool, driver


def iterate(fleet, driver, step):
    fleet.begin(version=step, at=fleet.now())
    return driver.run_c3po(fleet, step=step)


SCENARIO = [("g0", 0, 3), ("g0", 1, 4), ("g1", 0, 2), ("g1", 1, 9), ("g2", 0, 5), ("g2", 1, 5)]


def test_budget_counts_released_groups_and_slow_members_hold_their_group():
    fleet, pool, driver = make(SCENARIO)
    report = iterate(fleet, driver, 0)
    # t=0: g0, g1 start (Ω = 4 sequences). t=2: g1-0 ends, g1 waits for g1-1.
    # t=3: g0-0 ends, 2 slots free: g2 joins. t=4: g0 complete, C = 7.
    # t=8: g2 complete, C = 17 >= Φ = 10: abort; g1-1 has 8 of its 9 tokens.
    assert [g.group_id for g in report.released] == ["g0", "g2"]
    assert report.budget_used == 17 == report.trained_tokens
    assert report.completed == 5 and report.carried == 1 and report.aborted == 1
    assert report.new_groups == 3 and report.resumed == 0
    assert fleet.now() == 8.0
    g1 = pool.groups[1]
    assert [(m.finished, m.length, m.retention) for m in g1.members] == [
        (True, 2, 0),
        (False, 8, 1),
    ]
    assert g1.members[1].spans == [[0, 8]]
    assert pool.unfinished == 1 and pool.next_serial == 3


def test_carried_rollout_resumes_first_under_the_new_version():
    fleet, pool, driver = make(SCENARIO)
    iterate(fleet, driver, 0)
    fleet.submitted.clear()
    report = iterate(fleet, driver, 1)
    # The carried g1-1 goes first; then one new group fills P up to Ω.
    assert fleet.submitted == ["g1-1", "g3-0", "g3-1"]
    assert report.resumed == 1
    # g1-1 and g3 end in the same engine step; g1 completes first and C = 11 >= Φ:
    # g3, completed after the stop, stays in P and is released first next time.
    assert [g.group_id for g in report.released] == ["g1"] and report.deferred == 1
    assert report.budget_used == 11
    g1 = report.released[0]
    assert [m.retention for m in g1.members] == [0, 1]
    assert g1.members[1].spans == [[0, 8], [1, 1]]  # 8 tokens of version 0, 1 of version 1
    assert g1.members[0].spans == [[0, 2]]
    assert pool.groups[3].finished and pool.unfinished == 0
    fleet.submitted.clear()
    report = iterate(fleet, driver, 2)
    assert report.released[0].group_id == "g3" and report.budget_used >= 10
    assert report.released[0].members[0].spans == [[1, 1]]  # sampled by version 1
    assert fleet.submitted[:2] == ["g4-0", "g4-1"]


def test_purge_before_the_iteration_drops_the_whole_group():
    fleet, pool, driver = make(SCENARIO, sigma=0)
    iterate(fleet, driver, 0)
    report = iterate(fleet, driver, 1)
    assert [g.group_id for g in report.purged] == ["g1"]  # g1-1 was carried once > σ = 0
    assert "g1" not in [g.group_id for g in report.released]
    assert 1 not in pool.groups


def test_retention_at_the_limit_is_kept_and_one_more_is_purged():
    long = [("g0", 0, 1), ("g0", 1, 1), ("g1", 0, 100), ("g1", 1, 1)]
    fleet, pool, driver = make(long, budget=2, capacity=4, sigma=2)
    retentions = []
    purged = []
    for step in range(4):
        report = iterate(fleet, driver, step)
        purged.append([g.group_id for g in report.purged])
        g1 = pool.groups.get(1)
        retentions.append(g1.members[0].retention if g1 else None)
    # Carried after iterations 0, 1, 2 (retention 1, 2, 3); purged before iteration 3.
    assert retentions[:3] == [1, 2, 3]
    assert purged == [[], [], [], ["g1"]]


def test_refill_adds_whole_groups_only():
    fleet, pool, driver = make([("g0", 0, 5), ("g0", 1, 5)], budget=4, capacity=5, group_size=2)
    iterate(fleet, driver, 0)
    # Ω = 5 holds two groups of 2 (one slot stays empty, a group is never split);
    # each refill after a group of 2 ends adds one whole group.
    assert fleet.calls[0] == ["g0-0", "g0-1", "g1-0", "g1-1"]
    assert all(len(call) == 2 for call in fleet.calls[1:])


def test_sync_baseline_waits_for_every_sequence():
    fleet, pool, driver = make(SCENARIO, capacity=4)
    fleet.begin(version=0, at=0.0)
    report = driver.run_sync(fleet, step=0, groups=3)
    assert sorted(g.group_id for g in report.released) == ["g0", "g1", "g2"]
    assert report.rollout_seconds == 9.0  # the longest sequence, g1-1
    assert report.carried == 0 and not pool.groups
    idle = fleet.idle_seconds()
    assert idle == {"sim-0": 0.0}  # one replica, busy until the end
    with pytest.raises(FailedPrecondition, match="empty pool"):
        pool.add(Group(9, 1, [Rollout("g9-0", 0)], 0))
        driver.run_sync(fleet, step=1, groups=1)


def test_idle_time_of_replicas_in_the_sync_baseline():
    fleet, pool, driver = make([("g0", 0, 2), ("g0", 1, 2), ("g1", 0, 9), ("g1", 1, 9)], replicas=2)
    fleet.begin(version=0, at=0.0)
    report = driver.run_sync(fleet, step=0, groups=2)
    assert report.rollout_seconds == 9.0
    assert sorted(report.idle_seconds.values()) == [0.0, 7.0]


def test_spans_helpers():
    assert spans_of([0, 0, 1, 1, 1, 3]) == [[0, 2], [1, 3], [3, 1]]
    assert expand_spans([[0, 2], [1, 1]]) == [0, 0, 1]
    assert extend_spans([[0, 2]], 0, 3) == [[0, 5]]
    assert extend_spans([[0, 2]], 1, 0) == [[0, 2]]


def test_pool_ignores_reports_for_unknown_or_finished_sequences():
    pool = InferencePool()
    pool.add(Group(0, 3, [Rollout("g0-0", 0), Rollout("g0-1", 1)], 0))
    done = Progress("g0-0", 2, [[0, 2]], True, "stop")
    assert pool.apply(done) == (True, None)
    assert pool.apply(done) == (False, None)  # a duplicate
    assert pool.apply(Progress("g7-0", 2, [[0, 2]], True, "stop")) == (False, None)
    applied, group = pool.apply(Progress("g0-1", 1, [[0, 1]], True, "length"))
    assert applied and group is pool.groups[0] and group.tokens == 3
    with pytest.raises(ValueError, match="already in the pool"):
        pool.add(Group(0, 3, [Rollout("g0-0", 0)], 0))


@pytest.mark.parametrize("mode", ["sync", "c3po"])
def test_simulated_job_invariants(mode):
    """A few steps at a small scale with the default models: what every step must hold."""
    job = SimJob(replicas=8, prompts_per_step=16, group_size=4, retention_limit=1, seed=3)
    steps = run_sim(mode, job, steps=4)
    seen: set[str] = set()
    settings = job.settings(LengthModel())
    for s in steps:
        r = s.report
        assert s.samples == 4 * len(r.released)
        if mode == "sync":
            assert s.samples == 64 and r.carried == 0
        else:
            assert r.budget_used >= settings.token_budget
        for g in r.released:
            assert g.finished
            for m in g.members:
                assert m.seq_id not in seen
                seen.add(m.seq_id)
                assert sum(n for _, n in m.spans) == m.length
                versions = expand_spans(m.spans)
                assert versions == sorted(versions) and versions[-1] <= s.step
                assert m.retention <= job.retention_limit
                assert versions[-1] - versions[0] <= m.retention
