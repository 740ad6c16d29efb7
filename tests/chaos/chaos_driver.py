"""Chaos driver and exact accounting for a job on the real local fleet.

``ChaosDriver`` kills -9 each service type in turn (a rollout replica, reward,
trainer, weight-sync, scheduler) and crashes Redis, restarting each on the
same port (Redis on the same data directory), while a job runs. It waits for
the job to finish a new step between two kills, so every kill lands in a job
that is moving, and sleeps a varying moment first, so kills land in different
phases of a step (rollout, scoring, training, weight sync). The trainer is
killed while it holds the step's samples unacknowledged (mid-TrainStep), a
rollout replica while it generates.

``account`` then reads Redis directly (not through the services it just
killed) and checks the books: every prompt the job dispatched was written to
the buffer once and trained in exactly one step, nothing is left pending, and
the scheduler recorded each step once.

``kill_mid_broadcast`` kills -9 a member of a collective job's weight group (a rollout
replica or the trainer) while the trainer is broadcasting a version to it: the trainer
runs with ``RLFLEET_WEIGHT_GROUP_PAUSE_S`` (``common/weight_group.py``), which holds each
version between its first range and the next, and the kill lands the moment its log says
"weight group G: version N paused": the replicas hold the version's start, not its end.

``kill_mid_background_publish`` kills -9 the trainer while it holds the push of a version
it has broadcast to weight-sync in the background: the trainer runs with
``RLFLEET_PUBLISH_PAUSE_S`` (``trainer/job.py``), which holds that push before it starts,
and the kill lands after its log says "version N: background publish paused" (and a
test's own condition holds): the replicas hold the version, weight-sync does not.
"""

from __future__ import annotations

import json
import logging
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis
from rlfleet.cli.fleet import Fleet
from rlfleet.common.jobspec import JobSpec

logger = logging.getLogger(__name__)

PASSWORD = "chaos-redis-pw-51c0"
"""The Redis password of the chaos fleet; no service may write it to its log."""

# A killed rollout replica is the one kill the job carries on through (on the other
# replica), so it comes last in a round: the job may run ahead while it restarts.
SERVICE_TYPES = ("reward", "trainer", "weightsync", "scheduler", "redis", "rollout")
# Steps a job may run while a killed rollout replica restarts (steps take ~0.5 s).
STEPS_PER_ROLLOUT_RESTART = 30


def _retry(fn, *, within_s: float = 120.0):
    """Calls ``fn`` until Redis answers (it may be restarting, slowly on a loaded machine)."""
    end = time.monotonic() + within_s
    while True:
        try:
            return fn()
        except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
            if time.monotonic() > end:
                raise
            time.sleep(0.2)


def read_job(client: redis.Redis, job_id: str) -> dict:
    raw = _retry(lambda: client.hget("rlfleet:jobs", job_id))
    return json.loads(raw)


@dataclass
class ChaosDriver:
    fleet: Fleet
    client: redis.Redis
    job_id: str
    rounds: int = 1
    seed: int = 0
    kills: Counter = field(default_factory=Counter)
    log: list[str] = field(default_factory=list)
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos", daemon=True)

    def start(self) -> ChaosDriver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(300)

    def _run(self) -> None:
        try:
            last = -1
            for round_ in range(self.rounds):
                for kind in SERVICE_TYPES:
                    if not self._wait_for_progress(since=last):
                        return
                    last = self._crash(kind, round_)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def _wait_for_progress(self, *, since: int) -> bool:
        """Until the job has completed a step after step ``since``; False when it is over
        or we are stopped."""
        start = since + 1
        while not self._stop.is_set():
            job = read_job(self.client, self.job_id)
            if job["state"] not in ("queued", "running"):
                return False
            if job["current_step"] > start:
                # land somewhere inside the next step, not always at its start
                return not self._stop.wait(self._rng.uniform(0.0, 1.0))
            self._stop.wait(0.1)
        return False

    def _wait_for_work(self, kind: str, name: str, *, within_s: float = 10.0) -> None:
        """For the trainer and rollout replicas, wait (a bounded time) until they are in
        the middle of their work, so the kill lands there: the trainer has read the
        step's samples and not yet acknowledged them; a replica is generating."""
        if kind not in ("trainer", "rollout"):
            return
        stream = f"rlfleet:exp:{self.job_id}"
        end = time.monotonic() + within_s
        while time.monotonic() < end and not self._stop.is_set():
            if kind == "trainer":
                try:
                    if int(self.client.xpending(stream, "trainer")["pending"]) > 0:
                        return
                except redis.ResponseError:  # no stream or group yet
                    pass
            elif _running_sequences(self.fleet.procs[name].address) > 0:
                return
            time.sleep(0.005)

    def _crash(self, kind: str, round_: int) -> int:
        """Kills and restarts one service of ``kind``; returns the step it was killed in."""
        step = read_job(self.client, self.job_id)["current_step"]
        if kind == "redis":
            self.fleet.restart_redis(crash=True)
            name = "redis"
        else:
            if kind == "rollout":
                replicas = sorted(n for n in self.fleet.procs if n.startswith("rollout"))
                name = replicas[round_ % len(replicas)]
            else:
                name = kind
            self._wait_for_work(kind, name)
            self.fleet.procs[name].kill()
            # Let its peers see it gone (streams break, calls fail) before it is back.
            self._stop.wait(self._rng.uniform(0.2, 1.5))
            self.fleet.restart(name)
        self.kills[kind] += 1
        self.log.append(f"{time.strftime('%H:%M:%S')} killed {name} during step {step}")
        logger.warning("chaos: killed and restarted %s during step %d", name, step)
        return step


PAUSED = re.compile(r"weight group (\d+): version (\d+) paused")
"""What the trainer logs as it holds a version between two ranges (WeightSender.send with
RLFLEET_WEIGHT_GROUP_PAUSE_S set), the version's first range sent."""
_TS = re.compile(r'"ts": ([0-9.]+)')


class LogWatch:
    """The lines a service's log gains from the moment this is made (a restarted service
    appends to the same file)."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0

    def lines(self) -> list[tuple[int, str]]:
        """The complete lines written since the last call, each with the offset it ends at."""
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except FileNotFoundError:
            return []
        out = []
        *complete, _ = data.split(b"\n")  # not splitlines: progress bars write bare \r
        for raw in complete:
            self.offset += len(raw) + 1
            out.append((self.offset, raw.decode(errors="replace")))
        return out

    def wait_for(self, pattern: re.Pattern, *, timeout_s: float,
                 accept: Callable[[re.Match], bool] = lambda m: True,
                 poll_s: float = 0.005) -> tuple[re.Match, int] | None:  # fmt: skip
        """The first new line that matches ``pattern`` (and ``accept``) with the offset it
        ends at, or None when none does in time. The lines after it are skipped."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            for offset, line in self.lines():
                match = pattern.search(line)
                if match and accept(match):
                    return match, offset
            time.sleep(poll_s)
        return None


def log_between(path: Path, start: int, end: int | None = None) -> list[str]:
    """The lines of a log from byte ``start`` to ``end`` (None: its end)."""
    with open(path, "rb") as fh:
        fh.seek(start)
        data = fh.read() if end is None else fh.read(end - start)
    return data.decode(errors="replace").split("\n")


@dataclass
class BroadcastKill:
    """One kill -9 that landed while the trainer was broadcasting ``version``."""

    name: str
    version: int
    generation: int
    step: int  # the job's current step (the one training) when it was killed
    lag_s: float  # from the trainer's log line (its timestamp) to the kill
    marker_offset: int  # where that log line ends in the trainer's log
    killed_offset: int  # where the trainer's log stood right after the kill

    def line(self) -> str:
        return (f"killed {self.name} {self.lag_s * 1000:.0f} ms into the pause in version "
                f"{self.version} over weight group {self.generation} (step {self.step})")  # fmt: skip


def kill_mid_broadcast(fleet: Fleet, client: redis.Redis, job_id: str, name: str, *,
                       min_version: int, within_s: float = 180.0,
                       down_s: float = 0.5) -> BroadcastKill:  # fmt: skip
    """Kills -9 service ``name`` (a rollout replica, or the trainer) as soon as the trainer
    logs that it paused in a version >= ``min_version`` it is broadcasting over the job's
    weight group, then restarts it on its ports after ``down_s``, as ``rlfleet up`` would.
    The trainer must run with RLFLEET_WEIGHT_GROUP_PAUSE_S set."""
    trainer_log = fleet.procs["trainer"].log_path
    watch = LogWatch(trainer_log)
    found = watch.wait_for(PAUSED, timeout_s=within_s,
                           accept=lambda m: int(m[2]) >= min_version)  # fmt: skip
    if found is None:
        raise AssertionError(
            f"the trainer did not pause in a version >= {min_version} within {within_s:.0f}s "
            f"(job state: {read_job(client, job_id)['state']}; is RLFLEET_WEIGHT_GROUP_PAUSE_S "
            "set?)"
        )
    fleet.procs[name].kill()
    match, marker_offset = found
    ts = _TS.search(match.string)
    lag_s = time.time() - float(ts[1]) if ts else float("nan")
    kill = BroadcastKill(name, int(match[2]), int(match[1]),
                         read_job(client, job_id)["current_step"], lag_s, marker_offset,
                         trainer_log.stat().st_size)  # fmt: skip
    logger.warning("chaos: %s", kill.line())
    time.sleep(down_s)  # its peers see it gone (sockets closed) before it is back
    fleet.restart(name)
    return kill


PUBLISH_PAUSED = re.compile(r"version (\d+): background publish paused")
"""What the trainer logs as it holds the push of a broadcast version to weight-sync
(``_publish_and_settle`` on its background thread, with RLFLEET_PUBLISH_PAUSE_S set)."""


@dataclass
class PublishKill:
    """One kill -9 of the trainer while it held the background push of ``version``."""

    version: int
    lag_s: float  # from the trainer's log line (its timestamp) to the kill
    marker_offset: int  # where that log line ends in the trainer's log
    killed_offset: int  # where the trainer's log stood right after the kill
    seen: object = None  # what ``ready`` returned, taken just before the kill
    passed: list[int] = field(default_factory=list)  # versions whose pause was not ready
    down: object = None  # what ``while_down`` returned, taken before the restart

    def line(self) -> str:
        return (f"killed the trainer {self.lag_s * 1000:.0f} ms into the pause before "
                f"version {self.version}'s background push to weight-sync")  # fmt: skip


def kill_mid_background_publish(
    fleet: Fleet,
    *,
    min_version: int,
    max_version: int | None = None,
    ready: Callable[[int], object] = lambda version: True,
    ready_within_s: float = 10.0,
    while_down: Callable[[int], object] = lambda version: None,
    within_s: float = 180.0,
    down_s: float = 0.5,
) -> PublishKill:
    """Kills -9 the trainer while it holds the background push of a version in
    ``min_version``..``max_version`` to weight-sync, then restarts it on its ports after
    ``down_s``. After the trainer logs that pause, the kill waits until ``ready(version)``
    returns something true (polled for ``ready_within_s``, which must stay inside the
    pause; e.g. the next step's samples are in the buffer); when it does not, the next
    version's pause is tried. ``while_down(version)`` runs while the trainer is down (e.g.
    to ask weight-sync what it holds). The trainer must run with RLFLEET_PUBLISH_PAUSE_S
    set."""
    trainer_log = fleet.procs["trainer"].log_path
    watch = LogWatch(trainer_log)
    end = time.monotonic() + within_s
    tried: list[int] = []
    while True:
        found = watch.wait_for(PUBLISH_PAUSED, timeout_s=max(0.0, end - time.monotonic()),
                               accept=lambda m: int(m[1]) >= min_version)  # fmt: skip
        if found is None or (max_version is not None and int(found[0][1]) > max_version):
            raise AssertionError(
                f"the trainer did not pause a background publish of a version in "
                f"{min_version}..{max_version} in time (not ready in the pauses of versions "
                f"{tried}; is RLFLEET_PUBLISH_PAUSE_S set, and the job collective with every "
                "replica in its weight group?)"
            )
        match, marker_offset = found
        version = int(match[1])
        give_up = time.monotonic() + ready_within_s
        while not (seen := ready(version)) and time.monotonic() < give_up:
            time.sleep(0.01)
        if seen:
            break
        tried.append(version)
        logger.warning("chaos: not ready to kill in version %d's pause; trying the next", version)
    fleet.procs["trainer"].kill()
    ts = _TS.search(match.string)
    lag_s = time.time() - float(ts[1]) if ts else float("nan")
    kill = PublishKill(version, lag_s, marker_offset, trainer_log.stat().st_size, seen, tried)
    logger.warning("chaos: %s", kill.line())
    kill.down = while_down(version)
    time.sleep(down_s)  # its peers see it gone (sockets closed) before it is back
    fleet.restart("trainer")
    return kill


def _running_sequences(address: str) -> int:
    from rlfleet.common.grpc_client import make_channel
    from rlfleet.v1 import rollout_pb2, rollout_pb2_grpc

    try:
        with make_channel(address) as channel:
            stub = rollout_pb2_grpc.RolloutServiceStub(channel)
            return stub.GetStatus(rollout_pb2.RolloutStatusRequest(), timeout=2).running_sequences
    except Exception:  # noqa: BLE001 - a replica that does not answer is not generating
        return 0


@dataclass
class Accounting:
    state: str
    reason: str
    steps: int
    prompts_dispatched: int
    samples_written: int
    samples_trained: int
    stream_entries_added: int
    left_in_stream: int
    left_pending: int
    step_records: list[int]
    problems: list[str]

    def lines(self) -> list[str]:
        return [
            f"job state: {self.state}{' (' + self.reason + ')' if self.reason else ''}",
            f"steps recorded by the scheduler: {len(self.step_records)} of {self.steps}",
            f"prompts dispatched: {self.prompts_dispatched}",
            f"samples written to the buffer (dedupe set): {self.samples_written}",
            f"stream entries ever added: {self.stream_entries_added}",
            f"samples trained (sum over trainer step results): {self.samples_trained}",
            f"left in the stream: {self.left_in_stream}, left pending: {self.left_pending}",
            "problems: " + ("none" if not self.problems else "; ".join(self.problems)),
        ]


def account(client: redis.Redis, job_id: str) -> Accounting:
    """The books of a finished job, read from Redis (keys in docs/DESIGN.md). A sync job
    writes exactly the groups of prompts 0 .. steps × prompts_per_step − 1; a C3PO++ job
    writes whole groups of whatever prompts its pool released, each step as many samples
    as its record says."""
    job = read_job(client, job_id)
    spec = JobSpec.model_validate_json(job["spec_json"])
    per_step, group = spec.algorithm.prompts_per_step, spec.algorithm.group_size
    c3po = spec.scheduling.mode == "c3po"
    problems: list[str] = []

    records = [
        json.loads(r) for r in _retry(lambda: client.lrange(f"rlfleet:job:{job_id}:steps", 0, -1))
    ]
    record_steps = [int(r["step"]) for r in records]
    if record_steps != list(range(spec.steps)):
        problems.append(f"step records are {record_steps}, expected 0..{spec.steps - 1} once each")
    recorded_samples = {int(r["step"]): int(r["metrics"]["samples"]) for r in records}

    written = {x.decode() for x in _retry(lambda: client.smembers(f"rlfleet:exp:{job_id}:ids"))}
    if c3po:
        members = Counter(sid.rsplit("-", 1)[0] for sid in written)
        partial = sorted(g for g, n in members.items() if n != group)
        if partial:
            problems.append(f"{len(partial)} groups were written incomplete: {partial[:3]}")
        if len(written) != sum(recorded_samples.values()):
            problems.append(f"{len(written)} samples written, the step records hold "
                            f"{sum(recorded_samples.values())}")  # fmt: skip
    else:
        expected_ids = {
            f"g{serial}-{m}" for serial in range(spec.steps * per_step) for m in range(group)
        }
        if written != expected_ids:
            missing, extra = expected_ids - written, written - expected_ids
            problems.append(
                f"buffer ids differ from the dispatched prompts: {len(missing)} missing "
                f"(e.g. {sorted(missing)[:3]}), {len(extra)} unexpected (e.g. {sorted(extra)[:3]})"
            )

    trained_entries: list[str] = []
    samples_trained = 0
    for s in range(spec.steps):
        raw = _retry(lambda s=s: client.get(f"rlfleet:trainer:{job_id}:step:{s}"))
        if raw is None:
            problems.append(f"trainer has no result for step {s}")
            continue
        result = json.loads(raw)
        trained_entries += result["entry_ids"]
        samples_trained += int(result["samples_trained"])
        expected = recorded_samples.get(s, 0) if c3po else per_step * group
        if int(result["samples_trained"]) != expected:
            problems.append(
                f"step {s} trained {result['samples_trained']} samples, expected {expected}"
            )
    dupes = [e for e, n in Counter(trained_entries).items() if n > 1]
    if dupes:
        problems.append(f"{len(dupes)} buffer entries were trained in two steps: {dupes[:3]}")

    stream = f"rlfleet:exp:{job_id}"
    info = _retry(lambda: client.xinfo_stream(stream))
    added = int(info["entries-added"])
    if added != len(written):
        problems.append(f"the stream got {added} entries for {len(written)} distinct samples")
    if len(trained_entries) != added:
        problems.append(f"{len(trained_entries)} entries trained, {added} added to the stream")
    left = int(_retry(lambda: client.xlen(stream)))
    pending = int(_retry(lambda: client.xpending(stream, "trainer"))["pending"])
    if left or pending:
        problems.append(f"{left} entries left in the stream, {pending} pending")
    if job["state"] != "succeeded":
        problems.append(f"job ended {job['state']}: {job.get('reason', '')}")
    return Accounting(
        state=job["state"],
        reason=job.get("reason", ""),
        steps=spec.steps,
        prompts_dispatched=len(written) // group if c3po else spec.steps * per_step,
        samples_written=len(written),
        samples_trained=samples_trained,
        stream_entries_added=added,
        left_in_stream=left,
        left_pending=pending,
        step_records=record_steps,
        problems=problems,
    )


def wait_until(what: str, predicate, *, timeout: float = 120.0, poll: float = 0.05):
    """``predicate()``'s first true value; fails the test after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < end, f"timed out waiting until {what}"
        time.sleep(poll)


def step_records(client: redis.Redis, job_id: str) -> list[dict]:
    """The scheduler's step records of the job, in order."""
    return [json.loads(r) for r in client.lrange(f"rlfleet:job:{job_id}:steps", 0, -1)]


def trainer_lines(fleet, start: int, end: int | None = None) -> list[dict]:
    """The trainer's JSON log records between two offsets of its log."""
    out = []
    for line in log_between(fleet.procs["trainer"].log_path, start, end):
        try:  # a progress bar may precede a record on its line
            out.append(json.loads(line[line.index('{"ts"') :]))
        except ValueError:  # a traceback or a library's own print
            out.append({"msg": line})
    return out


def submit_job(fleet: Fleet, spec_json: str) -> str:
    """Submits a job to the fleet's scheduler; its id."""
    from rlfleet.common.grpc_client import make_channel
    from rlfleet.v1 import scheduler_pb2, scheduler_pb2_grpc

    with make_channel(fleet.scheduler_address) as channel:
        stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
        request = scheduler_pb2.SubmitJobRequest(spec_json=spec_json)
        return stub.SubmitJob(request, timeout=30).job_id
