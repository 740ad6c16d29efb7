"""One C3PO++ iteration, exactly as the paper gives it, over any rollout backend.

    1. purge from P every rollout carried over more than σ times;
    2. C = 0; while C < Φ: refill P with new prompts up to Ω; every rollout in P
       advances under the current version; a finished one moves to Q, adding its
       length to C;
    3. (the step loop trains on Q, giving the next version)
    4. unfinished rollouts stay in P with retention + 1 and resume next time.

With GRPO the unit that "finishes" and moves to Q is a whole group (see
``pool``). When C reaches Φ the backend aborts: replicas hand back their
partial sequences, which stay in P with their tokens, log-probs and versions.
A real stop is not instantaneous: a group that completes after C reached Φ
(later in the same batch of reports, or while Abort travels) stays in P,
finished, and is the first thing the next iteration moves to Q. That keeps each
step's training batch at Φ plus at most the group that crossed it.

Overlapped (``settings.overlap``): at the budget nothing is aborted. The rollouts
in flight keep generating under version t while the step loop trains on Q_t; the
replicas load version t + 1 in flight, between two engine iterations, so each
token keeps the version that produced it. Whatever finished meanwhile is
released first by the next iteration. A token may then lag the trained version by
more than σ + 1; ``max_staleness`` bounds that lag: a group holding an older
token is dropped (``IterationReport.stale``) instead of trained.

The driver never blocks on anything but ``backend.wait``, so the same code runs
against live replicas over gRPC (``grpc_backend.GrpcBackend``) and against the
discrete-event fleet with a virtual clock (``sim.SimFleet``). It also runs
the budget-free synchronous baseline (``run_sync``) for the simulated
comparison; the production baseline is ``strategy.SyncStrategy``.
"""

from __future__ import annotations

import abc
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

from rlfleet.common.errors import FailedPrecondition
from rlfleet.scheduler.c3po.pool import Group, InferencePool, Progress, Rollout
from rlfleet.scheduler.jobs import Interrupted

WorkUnit = tuple[Group, list[Rollout]]
"""A group and those of its members to (re)start; they go to one replica together."""


@dataclass
class Lost:
    """Sequences a failed replica will not report on; they are dispatched again."""

    seq_ids: list[str]
    reason: str


@dataclass
class Continued:
    """A multi-turn episode's model turn ended and the environment answered: the member
    goes on from ``progress`` (unfinished: the turn and the reply's tokens) and is
    dispatched again; at a stop it stays in P, carried over between turns."""

    progress: Progress


Event = Progress | Lost | Continued


class RolloutBackend(abc.ABC):
    """Where rollouts run: live replicas over gRPC, or the simulated fleet."""

    @abc.abstractmethod
    def now(self) -> float:
        """The backend's clock in seconds (wall time, or virtual time in simulation)."""

    @abc.abstractmethod
    def submit(self, units: list[WorkUnit]) -> None:
        """Starts (or resumes from their prefix) the given members under the current version."""

    @abc.abstractmethod
    def wait(self, timeout: float) -> list[Event]:
        """Blocks until at least one sequence finishes (or ``timeout`` passes)."""

    @abc.abstractmethod
    def abort(self) -> list[Event]:
        """Stops every replica; returns the partials (and any late finishers)."""

    @property
    @abc.abstractmethod
    def in_flight(self) -> int:
        """Sequences submitted and not yet reported."""

    def idle_seconds(self) -> dict[str, float]:
        """Per replica: time with nothing to generate since the backend was built."""
        return {}


class GroupSource(Protocol):
    def draw(self, serial: int, *, step: int) -> Group:
        """A new group for prompt ``serial`` (its members unstarted)."""


@dataclass(frozen=True)
class C3poSettings:
    token_budget: int
    """Φ: completion tokens of released groups that end an iteration."""
    pool_capacity: int
    """Ω: unfinished sequences kept in P (whole groups are added)."""
    retention_limit: int
    """σ: carry-overs allowed before a rollout is purged."""
    group_size: int
    overlap: bool = False
    """Keep generating across the iteration boundary (while the step trains)."""
    max_staleness: int | None = None
    """Most versions a trained token may lag the version it is trained against
    (None: no bound beyond what σ implies)."""
    refill_batch: int = 0
    """Free slots P waits for before it is refilled while rollouts run (0: one group)."""

    @classmethod
    def from_spec(cls, spec) -> C3poSettings:
        s = spec.scheduling
        capacity = s.pool_capacity or 2 * spec.samples_per_step
        return cls(
            token_budget=s.token_budget,
            pool_capacity=capacity,
            retention_limit=s.retention_limit,
            group_size=spec.algorithm.group_size,
            overlap=s.overlap,
            max_staleness=s.max_staleness,
            refill_batch=s.refill_batch or max(spec.algorithm.group_size, capacity // 4),
        )


@dataclass
class IterationReport:
    step: int
    released: list[Group] = field(default_factory=list)
    purged: list[Group] = field(default_factory=list)
    stale: list[Group] = field(default_factory=list)
    """Groups dropped because a token lagged the trained version by more than
    ``max_staleness``."""
    budget_used: int = 0
    completed: int = 0
    """Sequences that finished in this iteration (released or waiting for their group)."""
    carried: int = 0
    """Unfinished sequences left in P for the next iteration."""
    new_groups: int = 0
    deferred: int = 0
    """Groups that completed after C reached Φ, while the replicas were stopping; they
    stay in P and are released first in the next iteration."""
    resumed: int = 0
    """Sequences dispatched from a prefix carried over from an earlier iteration."""
    aborted: int = 0
    rollout_seconds: float = 0.0
    abort_seconds: float = 0.0
    """Of ``rollout_seconds``: from calling Abort until every replica handed back."""
    decision_seconds: float = 0.0
    """CPU time of the driver and pool code: everything but the backend's calls (network
    and replicas in production, the event simulation in simulation). CPU time, so that a
    busy machine does not inflate it."""
    idle_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def trained_tokens(self) -> int:
        return sum(g.tokens for g in self.released)

    def retention_counts(self) -> Counter:
        return Counter(m.retention for g in self.released for m in g.members)


class IterationDriver:
    """Runs iterations of one job's pool against a backend."""

    def __init__(
        self,
        pool: InferencePool,
        source: GroupSource,
        settings: C3poSettings,
        *,
        poll_s: float = 0.2,
    ):
        self.pool = pool
        self.source = source
        self.settings = settings
        self.poll_s = poll_s
        self._version = 0

    def run_c3po(
        self,
        backend: RolloutBackend,
        *,
        step: int,
        version: int | None = None,
        stop: threading.Event | None = None,
    ) -> IterationReport:
        """One iteration; ``version`` is the policy version the replicas hold now, which
        the released groups are trained against (it bounds staleness; default: ``step``)."""
        clock0, wall0 = backend.now(), time.thread_time()
        waited = 0.0
        report = IterationReport(step=step)
        s = self.settings
        self._version = step if version is None else version
        # Overlapped: what finished while the step trained is reported first.
        t = time.thread_time()
        queued = backend.wait(0.0) if self.pool.in_flight() else []
        waited += time.thread_time() - t
        self._handle(queued, None, report, budget=0)  # completed groups stay in P for now
        report.purged = self.pool.purge(s.retention_limit)
        if s.max_staleness is not None:
            report.stale += self.pool.purge_stale(self._version - s.max_staleness)
        if any(m.in_flight for g in report.purged + report.stale for m in g.members):
            # A dropped rollout is still generating (overlapped): stop every replica;
            # the others come back as partials and are resumed below.
            t = time.thread_time()
            partials = backend.abort()
            waited += time.thread_time() - t
            self._handle(partials, None, report, budget=0)
            self._settle_in_flight()
        report.deferred = 0  # counted below: overlapped, those left in P once C reaches Φ
        # Groups that completed while the replicas were stopping end first, all of them
        # (a handful: at most one iteration late, as a carried prefix is). Overlapped,
        # the groups that completed while the step trained can be many: they are
        # released up to Φ and the rest wait, bounded by max_staleness.
        for group in sorted((g for g in self.pool if g.finished), key=lambda g: g.serial):
            if s.overlap and report.budget_used >= s.token_budget:
                report.deferred += 1
                continue
            self._release(group, report)
        carried_units = self.pool.resume_order()
        report.resumed = sum(len(members) for _, members in carried_units)
        waited += self._submit(backend, carried_units)
        waited += self._refill(backend, report)
        while report.budget_used < s.token_budget:
            if stop is not None and stop.is_set():
                backend.abort()
                self._settle_in_flight()
                raise Interrupted("stopped while generating")
            if not backend.in_flight:
                raise FailedPrecondition(
                    "C3PO++: nothing is left to generate before the token budget was reached "
                    f"(C = {report.budget_used} < Φ = {s.token_budget})"
                )
            t = time.thread_time()
            events = backend.wait(self.poll_s)
            waited += time.thread_time() - t
            waited += self._handle(events, backend, report, budget=s.token_budget)
            if report.budget_used < s.token_budget:
                waited += self._refill(backend, report)
        if not s.overlap:
            t, stopping = time.thread_time(), backend.now()
            late = backend.abort()
            waited += time.thread_time() - t
            report.abort_seconds = backend.now() - stopping
            report.aborted = sum(isinstance(e, Progress) and not e.finished for e in late)
            # Sequences that finished while the replicas stopped keep their tokens; a
            # group they complete is deferred to the next iteration (the budget is spent).
            self._handle(late, None, report, budget=s.token_budget)
            self._settle_in_flight()
        report.carried = self.pool.carry()
        report.rollout_seconds = backend.now() - clock0
        report.decision_seconds = time.thread_time() - wall0 - waited
        report.idle_seconds = backend.idle_seconds()
        return report

    def run_sync(
        self,
        backend: RolloutBackend,
        *,
        step: int,
        groups: int,
        stop: threading.Event | None = None,
    ) -> IterationReport:
        """The budget-free baseline: ``groups`` new prompts, every sequence run to its end."""
        if len(self.pool):
            raise FailedPrecondition("the synchronous baseline starts each step with an empty pool")
        clock0, wall0 = backend.now(), time.thread_time()
        waited = 0.0
        report = IterationReport(step=step)
        units = [self._new_group(step, report) for _ in range(groups)]
        waited += self._submit(backend, units)
        while len(self.pool):
            if stop is not None and stop.is_set():
                backend.abort()
                raise Interrupted("stopped while generating")
            t = time.thread_time()
            events = backend.wait(self.poll_s)
            waited += time.thread_time() - t
            waited += self._handle(events, backend, report)
        report.rollout_seconds = backend.now() - clock0
        report.decision_seconds = time.thread_time() - wall0 - waited
        report.idle_seconds = backend.idle_seconds()
        return report

    # -- internals ------------------------------------------------------------

    def _new_group(self, step: int, report: IterationReport) -> WorkUnit:
        group = self.source.draw(self.pool.next_serial, step=step)
        self.pool.next_serial += 1
        self.pool.add(group)
        report.new_groups += 1
        return group, list(group.members)

    @staticmethod
    def _submit(backend: RolloutBackend, units: list[WorkUnit]) -> float:
        """Hands work to the backend; returns the time spent there (not scheduling time)."""
        if not units:
            return 0.0
        for _, members in units:
            for m in members:
                m.in_flight = True
        t = time.thread_time()
        backend.submit(units)
        return time.thread_time() - t

    def _settle_in_flight(self) -> None:
        """The backend was aborted: nothing is in flight any more (a sequence it lost
        without a report resumes from the state P holds)."""
        for group in self.pool:
            for m in group.members:
                m.in_flight = False

    def abort(self, backend: RolloutBackend) -> None:
        """Stops what an overlapped iteration left generating; P keeps the partials."""
        events = backend.abort()
        self._handle(events, None, IterationReport(step=-1), budget=0)
        self._settle_in_flight()

    def _refill(self, backend: RolloutBackend, report: IterationReport) -> float:
        """Tops P up to Ω with whole new groups, dispatched after everything carried."""
        units = []
        s = self.settings
        g = s.group_size
        # Refill only once ``refill_batch`` slots are free (while anything still runs), so a
        # replica prefills many new sequences in one pass rather than one group per pass.
        if backend.in_flight and self.pool.free_slots(s.pool_capacity) < max(g, s.refill_batch):
            return 0.0
        while self.pool.free_slots(s.pool_capacity) >= g:
            units.append(self._new_group(report.step, report))
        return self._submit(backend, units)

    def _release(self, group: Group, report: IterationReport) -> None:
        """Moves a complete group from P to Q; its tokens count towards C. A group
        with a token older than ``max_staleness`` allows is dropped instead."""
        self.pool.remove(group.serial)
        bound = self.settings.max_staleness
        oldest = group.oldest_version()
        if bound is not None and oldest is not None and oldest < self._version - bound:
            report.stale.append(group)
            return
        report.released.append(group)
        report.budget_used += group.tokens

    def _handle(
        self,
        events: list[Event],
        backend: RolloutBackend | None,
        report: IterationReport,
        *,
        budget: int | None = None,
    ) -> float:
        """Applies replica reports; releases groups they complete while C < ``budget``."""
        retry: list[WorkUnit] = []
        for event in events:
            if isinstance(event, Lost):
                retry += self._lost_units(event)
                continue
            if isinstance(event, Continued):
                applied, _ = self.pool.apply(event.progress)  # unfinished: completes nothing
                group = self.pool.group_of(event.progress.seq_id)
                member = self.pool.member(event.progress.seq_id)
                if applied and group is not None and member is not None:
                    retry.append((group, [member]))
                continue
            applied, group = self.pool.apply(event)
            if applied and event.finished:
                report.completed += 1
            if group is None:
                continue
            if budget is not None and report.budget_used >= budget:
                report.deferred += 1  # completed after the stop: stays in P
            else:
                self._release(group, report)
        if retry and backend is not None:
            return self._submit(backend, retry)
        for _, members in retry:  # no backend to retry on: resumed from P later
            for m in members:
                m.in_flight = False
        return 0.0

    def _lost_units(self, lost: Lost) -> list[WorkUnit]:
        by_group: dict[int, list[Rollout]] = {}
        for seq_id in lost.seq_ids:
            group = self.pool.group_of(seq_id)
            if group is None:
                continue
            for m in group.members:
                if m.seq_id == seq_id and not m.finished:
                    by_group.setdefault(group.serial, []).append(m)
        return [(self.pool.groups[s], members) for s, members in by_group.items()]
