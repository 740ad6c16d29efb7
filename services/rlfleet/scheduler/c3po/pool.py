"""C3PO++ state: the inference pool P of GRPO groups, their rollouts, and the
rules that move them (purge, refill accounting, group release, carry-over).

Pure data and bookkeeping, no I/O: the iteration driver (``c3po.py``) runs it
against live rollout replicas over gRPC or against the simulated fleet
(``sim.py``), and ``store.py`` persists it in Redis. Keeping it apart
is what lets the very same scheduling code run at the scale of hundreds of
simulated replicas on a laptop.

Group policy (docs/C3PO.md): a group's members enter P together and stay there
until every member has finished; the group is then released to training as a
whole and its completion tokens count towards the step's budget C (a group that
completes while the replicas are stopping stays in P, finished, until the next
iteration releases it). A finished member waits (it is not generated further).
If any unfinished member has been carried over more than σ times, the whole
group is purged, finished members included, so the trainer only ever sees
complete groups.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

Spans = list[list[int]]
"""Per-token policy versions, run-length encoded: ``[[version, count], ...]``."""


def spans_of(versions: Iterable[int]) -> Spans:
    """Run-length encodes a per-token version list."""
    out: Spans = []
    for v in versions:
        if out and out[-1][0] == v:
            out[-1][1] += 1
        else:
            out.append([int(v), 1])
    return out


def expand_spans(spans: Spans) -> list[int]:
    return [v for v, n in spans for _ in range(n)]


def extend_spans(spans: Spans, version: int, count: int) -> Spans:
    """``spans`` followed by ``count`` tokens of ``version`` (a new list)."""
    out = [list(s) for s in spans]
    if count <= 0:
        return out
    if out and out[-1][0] == version:
        out[-1][1] += count
    else:
        out.append([version, count])
    return out


ENV_VERSION = -1
"""The version of a token an environment inserted into a multi-turn episode: no policy
sampled it. It is masked from the loss and counts towards neither the budget C nor a
group's staleness."""


@dataclass
class EpisodeState:
    """A member that is a multi-turn episode (``task.environment``): its env-service
    episode and where it stands. Its completion holds the model's turns and the
    environment's replies in order; the replies' tokens carry ``ENV_VERSION``."""

    episode_id: str
    turns: int = 0
    """Model turns the environment has answered."""
    turn_start: int = 0
    """Index in the completion where the model's current turn began: a turn carried over
    mid-way resumes with the rest of its own token cap."""
    reward: float = 0.0
    tool_calls: int = 0
    restarts: int = 0
    """Times the episode was started again from the prompt because the env service had
    lost it (restarted, expired) or moved past the state P holds."""


@dataclass
class Rollout:
    """One member of a group: the completion generated so far and how it got there.

    ``token_ids``/``logprobs`` hold the completion on the real path; the
    simulated fleet keeps only ``length`` and the version spans.
    """

    seq_id: str
    member: int
    length: int = 0
    spans: Spans = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    retention: int = 0
    """Iterations this rollout has been carried over unfinished (the paper's retention)."""
    finished: bool = False
    finish_reason: str = ""
    dirty: bool = True
    """Changed since the pool was last saved."""
    replica: str = ""
    """Address of the replica it was last dispatched to: a carried rollout goes back
    there, where its KV cache may wait (``SamplingParams.resume_kv``). Never saved."""
    in_flight: bool = False
    """Submitted to a replica that has not reported on it yet. Only overlapped
    scheduling leaves rollouts in flight across an iteration boundary; never saved
    (a restarted scheduler has no streams open)."""
    episode: EpisodeState | None = None
    """Multi-turn episodes only (``episodes.py``)."""
    max_tokens: int = 0
    """The completion limit (prefix included) of its next dispatch; 0: the sampling's.
    An episode's is its current turn's start plus one turn. Never saved."""

    @property
    def versions(self) -> list[int]:
        return expand_spans(self.spans)

    @property
    def model_tokens(self) -> int:
        """Completion tokens a policy sampled (all of them but an environment's)."""
        return sum(n for v, n in self.spans if v != ENV_VERSION)

    @property
    def oldest_version(self) -> int | None:
        return min((v for v, _ in self.spans if v != ENV_VERSION), default=None)


@dataclass
class Group:
    """A drawn prompt and its ``group_size`` rollouts."""

    serial: int
    prompt_len: int
    members: list[Rollout]
    entered_step: int
    prompt_ids: list[int] = field(default_factory=list)
    task_json: str = ""
    dirty: bool = True

    @property
    def group_id(self) -> str:
        return f"g{self.serial}"

    @property
    def finished(self) -> bool:
        return all(m.finished for m in self.members)

    @property
    def tokens(self) -> int:
        """Completion tokens the members' policy sampled (what a released group adds to
        C): an episode's environment tokens are not counted."""
        return sum(m.model_tokens for m in self.members)

    def unfinished(self) -> list[Rollout]:
        return [m for m in self.members if not m.finished]

    def oldest_version(self) -> int | None:
        """The oldest policy version any member's tokens were sampled by."""
        return min((v for m in self.members if (v := m.oldest_version) is not None), default=None)


@dataclass
class Progress:
    """What a replica reported about one sequence: finished, or partial after an abort."""

    seq_id: str
    length: int
    spans: Spans
    finished: bool
    finish_reason: str
    token_ids: list[int] | None = None
    logprobs: list[float] | None = None


def seq_serial(seq_id: str) -> int:
    """``g<serial>-<member>`` -> serial."""
    return int(seq_id[1:].split("-", 1)[0])


class InferencePool:
    """P: the groups in flight or waiting for members, with the job's prompt counter."""

    def __init__(self, *, next_serial: int = 0):
        self.groups: dict[int, Group] = {}
        self.next_serial = next_serial
        self.removed: set[int] = set()
        """Serials dropped (released or purged) since the last save."""
        self._unfinished = 0

    # -- membership -----------------------------------------------------------

    def add(self, group: Group) -> None:
        if group.serial in self.groups:
            raise ValueError(f"group {group.group_id} is already in the pool")
        self.groups[group.serial] = group
        self._unfinished += len(group.unfinished())
        self.removed.discard(group.serial)

    def remove(self, serial: int) -> Group:
        group = self.groups.pop(serial)
        self._unfinished -= len(group.unfinished())
        self.removed.add(serial)
        return group

    def group_of(self, seq_id: str) -> Group | None:
        return self.groups.get(seq_serial(seq_id))

    def __len__(self) -> int:
        return len(self.groups)

    def __iter__(self) -> Iterator[Group]:
        return iter(self.groups.values())

    @property
    def unfinished(self) -> int:
        """Sequences still to be generated: what the capacity Ω bounds."""
        return self._unfinished

    def free_slots(self, capacity: int) -> int:
        return max(0, capacity - self._unfinished)

    # -- the algorithm's moves --------------------------------------------------

    def purge(self, retention_limit: int) -> list[Group]:
        """Step 1: drops every group with an unfinished rollout carried more than σ times."""
        stale = [
            g.serial
            for g in self.groups.values()
            if any(m.retention > retention_limit for m in g.members if not m.finished)
        ]
        return [self.remove(s) for s in stale]

    def purge_stale(self, min_version: int) -> list[Group]:
        """Drops every group holding a token sampled before ``min_version``: it could
        only be trained beyond the job's staleness bound (``max_staleness``)."""
        stale = [
            g.serial
            for g in self.groups.values()
            if (v := g.oldest_version()) is not None and v < min_version
        ]
        return [self.remove(s) for s in stale]

    def resume_order(self) -> list[tuple[Group, list[Rollout]]]:
        """The groups in P with unfinished members, and those members, oldest first.

        Groups carried over the most iterations go first (highest retention,
        then lowest serial), so the rollouts closest to the purge get replica
        capacity before any new prompt.
        """
        waiting = [
            (g, idle)
            for g in self.groups.values()
            if (idle := [m for m in g.unfinished() if not m.in_flight])
        ]
        waiting.sort(key=lambda gm: (-max(m.retention for m in gm[1]), gm[0].serial))
        return waiting

    def member(self, seq_id: str) -> Rollout | None:
        group = self.group_of(seq_id)
        if group is None:
            return None
        return next((m for m in group.members if m.seq_id == seq_id), None)

    def apply(self, progress: Progress) -> tuple[bool, Group | None]:
        """Records what a replica reported; returns (applied, the group if it is now complete).

        Reports for sequences no longer in P (a purged group, a duplicate) or
        already finished are ignored (applied = False).
        """
        group = self.group_of(progress.seq_id)
        member = self.member(progress.seq_id)
        if group is None or member is None or member.finished:
            return False, None
        member.in_flight = False
        member.length = progress.length
        member.spans = progress.spans
        if progress.token_ids is not None:
            member.token_ids = list(progress.token_ids)
            member.logprobs = list(progress.logprobs or [])
        member.dirty = True
        if progress.finished:
            member.finished = True
            member.finish_reason = progress.finish_reason
            self._unfinished -= 1
            if group.finished:
                return True, group
        return True, None

    def in_flight(self) -> list[str]:
        """Sequence ids a replica is generating (or is about to report on)."""
        return [m.seq_id for g in self.groups.values() for m in g.members if m.in_flight]

    def carry(self) -> int:
        """Step 4: every unfinished rollout left in P gets retention + 1; returns how many."""
        carried = 0
        for group in self.groups.values():
            for member in group.unfinished():
                member.retention += 1
                member.dirty = True
                carried += 1
        return carried

    def mark_saved(self) -> None:
        self.removed.clear()
        for group in self.groups.values():
            group.dirty = False
            for member in group.members:
                member.dirty = False
