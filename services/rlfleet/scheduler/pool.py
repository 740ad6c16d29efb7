"""The rollout replica pool: who is up, which policy version each holds, and
spreading generation work over them.

A replica that fails with a retryable status (UNAVAILABLE, DEADLINE_EXCEEDED,
RESOURCE_EXHAUSTED) is dropped for the rest of the step and its unfinished
sequences go to the others; it comes back at the next ``refresh`` and is brought
up to the current version before it gets work again (the same path a late
joiner or a restarted replica takes). Any other status is a real error and is
raised with the replica's address in the message.

A replica that hangs (a stopped process, a wedged engine) breaks no stream, so
while streams run every ``heartbeat_s`` each replica still streaming is asked
for its status; one that misses ``heartbeat_misses`` heartbeats in a row has its
streams cancelled and is treated like one that failed with UNAVAILABLE.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent import futures
from dataclasses import dataclass, field

import grpc

from rlfleet.common.errors import RlfleetError, Unavailable, from_rpc_error
from rlfleet.common.grpc_client import RETRYABLE, call, make_channel
from rlfleet.scheduler import metrics
from rlfleet.scheduler.discovery import ReplicaDiscovery
from rlfleet.scheduler.jobs import Interrupted
from rlfleet.v1 import rollout_pb2, rollout_pb2_grpc

logger = logging.getLogger(__name__)

# How often a waiting step loop looks at its stop flag while streams run.
_STOP_POLL_S = 0.2


@dataclass
class Replica:
    address: str
    channel: grpc.Channel
    stub: rollout_pb2_grpc.RolloutServiceStub
    healthy: bool = False
    replica_id: str = ""
    engine: str = ""
    job_id: str = ""
    version: int = -1
    last_error: str = ""
    calls: list = field(default_factory=list)  # Generate streams in flight (to cancel)
    missed_heartbeats: int = 0
    lost: str = ""  # why its streams were cancelled for want of a heartbeat
    loaded_via: str = ""  # how it got its last version: weight-group, weight-sync or held

    def holds(self, job_id: str, version: int) -> bool:
        return self.healthy and self.job_id == job_id and self.version == version

    def __str__(self) -> str:
        return f"{self.replica_id or 'replica'}@{self.address}"


Group = list[rollout_pb2.SequenceRequest]


class ReplicaPool:
    def __init__(
        self,
        discovery: ReplicaDiscovery,
        *,
        weightsync_address: str = "",
        status_timeout_s: float = 5.0,
        load_timeout_s: float = 600.0,
        generate_timeout_s: float = 3600.0,
        replica_retry_s: float = 5.0,
        max_message_mb: int = 256,
        heartbeat_s: float = 5.0,
        heartbeat_misses: int = 2,
    ):
        self.discovery = discovery
        self.weightsync_address = weightsync_address
        self.status_timeout_s = status_timeout_s
        self.load_timeout_s = load_timeout_s
        self.generate_timeout_s = generate_timeout_s
        self.replica_retry_s = replica_retry_s
        self.max_message_mb = max_message_mb
        self.heartbeat_s = heartbeat_s
        self.heartbeat_misses = heartbeat_misses
        self._replicas: dict[str, Replica] = {}
        self._lock = threading.Lock()
        self._busy: dict[str, float] = {}  # stream seconds per replica during generate()
        self.last_idle: dict[str, float] = {}
        """Per replica of the last ``generate``: seconds it had no stream open."""

    # -- membership and health ----------------------------------------------

    def refresh(self) -> list[Replica]:
        """Follows discovery and asks every replica for its status; returns the healthy ones."""
        wanted = self.discovery.addresses()
        with self._lock:
            for address in list(self._replicas):
                if address not in wanted:
                    self._replicas.pop(address).channel.close()
            for address in wanted:
                if address not in self._replicas:
                    channel = make_channel(address, max_message_mb=self.max_message_mb)
                    stub = rollout_pb2_grpc.RolloutServiceStub(channel)
                    self._replicas[address] = Replica(address, channel, stub)
            replicas = [self._replicas[a] for a in wanted]
        self._each(replicas, self._check)
        metrics.REPLICAS_HEALTHY.set(sum(r.healthy for r in replicas))
        return [r for r in replicas if r.healthy]

    def _check(self, replica: Replica) -> None:
        try:
            status = call(
                replica.stub.GetStatus,
                rollout_pb2.RolloutStatusRequest(),
                timeout=self.status_timeout_s,
                retry=False,
            )
        except RlfleetError as exc:
            if replica.healthy or not replica.last_error:
                logger.warning("rollout replica %s is not answering: %s", replica, exc.message)
            replica.healthy, replica.last_error = False, exc.message
            return
        if not replica.healthy:
            logger.info("rollout replica %s is up (version %d)", replica.address, status.version)
        replica.healthy, replica.last_error = True, ""
        replica.missed_heartbeats, replica.lost = 0, ""
        replica.replica_id, replica.engine = status.replica_id, status.engine
        replica.job_id, replica.version = status.job_id, status.version

    def replicas(self) -> list[Replica]:
        with self._lock:
            return list(self._replicas.values())

    def healthy(self, *, limit: int = 0) -> list[Replica]:
        """Healthy replicas in discovery order, at most ``limit`` (0: all)."""
        out = [r for r in self.replicas() if r.healthy]
        return out[:limit] if limit else out

    def ready(self, job_id: str, version: int, *, limit: int = 0) -> list[Replica]:
        """Healthy replicas that hold ``version`` of ``job_id``: the ones that may get work."""
        return [r for r in self.healthy(limit=limit) if r.holds(job_id, version)]

    def drop(self, replica: Replica, reason: str) -> None:
        """Takes a failing replica out of service until the next ``refresh``."""
        logger.warning("dropping rollout replica %s: %s", replica, reason)
        replica.healthy, replica.last_error = False, reason
        metrics.REPLICAS_DROPPED.inc()
        metrics.REPLICAS_HEALTHY.set(len(self.healthy()))

    def close(self) -> None:
        with self._lock:
            for replica in self._replicas.values():
                replica.channel.close()
            self._replicas.clear()

    # -- versions ------------------------------------------------------------

    def ensure_version(
        self, *, job_id: str, version: int, model_path: str, limit: int = 0
    ) -> list[Replica]:
        """Loads ``version`` on every healthy replica that lags; returns those that hold it."""
        request = rollout_pb2.LoadVersionRequest(
            job_id=job_id,
            version=version,
            model_path=model_path,
            weightsync_address=self.weightsync_address,
        )
        lagging = [r for r in self.healthy(limit=limit) if not r.holds(job_id, version)]
        errors: list[RlfleetError] = []

        def load(replica: Replica) -> None:
            try:
                reply = call(
                    replica.stub.LoadVersion,
                    request,
                    timeout=self.load_timeout_s,
                    deadline=self.replica_retry_s,
                )
            except RlfleetError as exc:
                if _retryable_error(exc):
                    self.drop(replica, f"LoadVersion({version}) failed: {exc.message}")
                    return
                errors.append(
                    type(exc)(
                        f"rollout replica {replica}: LoadVersion({version}) failed: {exc.message}"
                    )
                )
                return
            replica.job_id, replica.version = job_id, reply.version
            replica.loaded_via = reply.via
            logger.info(
                "rollout replica %s loaded version %d in %.2fs (%s)",
                replica,
                reply.version,
                reply.load_seconds,
                reply.via or "weight-sync",
            )

        self._each(lagging, load)
        if errors:
            raise errors[0]
        holders = self.ready(job_id, version, limit=limit)
        if not holders:
            raise Unavailable(
                f"rollout: no replica holds version {version} of job {job_id}" + self._last_errors()
            )
        return holders

    def _last_errors(self) -> str:
        errs = [f"{r.address}: {r.last_error}" for r in self.replicas() if r.last_error]
        if not self.replicas():
            return " (no rollout replicas are configured)"
        return f" ({'; '.join(errs)})" if errs else ""

    # -- generation ----------------------------------------------------------

    def generate(
        self,
        groups: list[Group],
        sampling: rollout_pb2.SamplingParams,
        *,
        job_id: str,
        version: int,
        stop: threading.Event,
        limit: int = 0,
    ) -> dict[str, rollout_pb2.SequenceResult]:
        """Generates every sequence to its end; returns finished results by seq_id.

        Whole groups go to one replica. Sequences of a replica that fails are
        retried on the others; raises Interrupted when ``stop`` is set.
        """
        results: dict[str, rollout_pb2.SequenceResult] = {}
        pending = [list(g) for g in groups if g]
        started, self._busy = time.monotonic(), {}
        used = self.ready(job_id, version, limit=limit)
        while pending:
            if stop.is_set():
                raise Interrupted("stopped before generating")
            replicas = self.ready(job_id, version, limit=limit)
            if not replicas:
                raise Unavailable(
                    "rollout: no healthy replica is left to generate on" + self._last_errors()
                )
            plan = spread(pending, replicas, max_new_tokens=sampling.max_new_tokens)
            outcomes = self._run_streams(plan, sampling, stop)
            if stop.is_set():
                raise Interrupted("stopped while generating")
            pending = []
            for replica, assigned, got, error in outcomes:
                results.update(got)
                leftover = [[s for s in g if s.seq_id not in results] for g in assigned]
                leftover = [g for g in leftover if g]
                if error is not None and not _retryable_error(error):
                    raise type(error)(
                        f"rollout replica {replica}: Generate failed: {error.message}"
                    )
                if error is not None or leftover:
                    why = error.message if error else "stream ended with unfinished sequences"
                    self.drop(replica, f"Generate failed: {why}")
                    pending += leftover
        total = time.monotonic() - started
        self.last_idle = {str(r): max(0.0, total - self._busy.get(r.address, 0.0)) for r in used}
        return results

    def _run_streams(
        self,
        plan: list[tuple[Replica, list[Group]]],
        sampling: rollout_pb2.SamplingParams,
        stop: threading.Event,
    ) -> list[tuple[Replica, list[Group], dict, RlfleetError | None]]:
        with futures.ThreadPoolExecutor(max_workers=len(plan)) as pool:
            running = {
                pool.submit(self._stream, replica, groups, sampling, stop): (replica, groups)
                for replica, groups in plan
            }
            aborted = False
            next_beat = time.monotonic() + self.heartbeat_s
            while True:
                done, not_done = futures.wait(running, timeout=_STOP_POLL_S)
                if not not_done:
                    break
                if stop.is_set() and not aborted:
                    self.abort([running[f][0] for f in not_done])
                    aborted = True
                if self.heartbeat_s > 0 and time.monotonic() >= next_beat and not aborted:
                    self._heartbeat([running[f][0] for f in not_done])
                    next_beat = time.monotonic() + self.heartbeat_s
            return [(*running[f], *f.result()) for f in running]

    def _heartbeat(self, replicas: list[Replica]) -> None:
        """Asks each streaming replica for its status; cancels the streams of a hung one."""

        def beat(replica: Replica) -> None:
            try:
                call(
                    replica.stub.GetStatus,
                    rollout_pb2.RolloutStatusRequest(),
                    timeout=self.status_timeout_s,
                    retry=False,
                )
            except RlfleetError as exc:
                replica.missed_heartbeats += 1
                if replica.missed_heartbeats >= self.heartbeat_misses and not replica.lost:
                    replica.lost = (
                        f"no heartbeat for {replica.missed_heartbeats} checks ({exc.message})"
                    )
                    logger.warning("rollout replica %s is hung: %s", replica, replica.lost)
                    for stream in list(replica.calls):
                        stream.cancel()
                return
            replica.missed_heartbeats = 0

        self._each(replicas, beat)

    def _stream(
        self,
        replica: Replica,
        groups: list[Group],
        sampling: rollout_pb2.SamplingParams,
        stop: threading.Event,
    ) -> tuple[dict, RlfleetError | None]:
        sequences = [s for g in groups for s in g]
        wanted = {s.seq_id for s in sequences}
        request = rollout_pb2.GenerateRequest(sequences=sequences, sampling=sampling)
        got: dict[str, rollout_pb2.SequenceResult] = {}
        stream = replica.stub.Generate(request, timeout=self.generate_timeout_s)
        replica.calls.append(stream)
        opened = time.monotonic()
        try:
            for result in stream:
                if result.finished and result.seq_id in wanted:
                    got[result.seq_id] = result
                    metrics.TOKENS_GENERATED.inc(len(result.token_ids))
        except grpc.RpcError as exc:
            if replica.lost and exc.code() == grpc.StatusCode.CANCELLED:
                return got, Unavailable(replica.lost)  # retried on the others
            if stop.is_set() and exc.code() == grpc.StatusCode.CANCELLED:
                return got, None
            return got, from_rpc_error(exc)
        finally:
            replica.calls.remove(stream)
            with self._lock:
                self._busy[replica.address] = (
                    self._busy.get(replica.address, 0.0) + time.monotonic() - opened
                )
        return got, None

    def abort(self, replicas: Iterable[Replica]) -> None:
        """Ends the Generate streams in flight on ``replicas`` (server side, then ours)."""

        def abort_one(replica: Replica) -> None:
            try:
                call(
                    replica.stub.Abort,
                    rollout_pb2.AbortRequest(),
                    timeout=self.status_timeout_s,
                    retry=False,
                )
            except RlfleetError as exc:
                logger.warning("Abort on rollout replica %s failed: %s", replica, exc.message)
            # A replica that did not answer Abort must not keep us waiting.
            for stream in list(replica.calls):
                stream.cancel()

        self._each(list(replicas), abort_one)

    @staticmethod
    def _each(replicas: list[Replica], fn: Callable[[Replica], None]) -> None:
        if not replicas:
            return
        with futures.ThreadPoolExecutor(max_workers=len(replicas)) as pool:
            for f in [pool.submit(fn, r) for r in replicas]:
                f.result()


def _retryable_error(exc: RlfleetError) -> bool:
    return getattr(exc, "grpc_code", None) in RETRYABLE


def spread(
    groups: list[Group], replicas: list[Replica], *, max_new_tokens: int
) -> list[tuple[Replica, list[Group]]]:
    """Assigns whole groups to replicas, balancing an estimate of tokens to process.

    Largest groups first, each to the least loaded replica (greedy LPT): groups
    stay together so a replica can share the prompt's prefill across members.
    """

    def cost(group: Group) -> int:
        return sum(len(s.prompt_token_ids) + max_new_tokens for s in group)

    load = [0] * len(replicas)
    assigned: list[list[Group]] = [[] for _ in replicas]
    for group in sorted(groups, key=cost, reverse=True):
        i = min(range(len(replicas)), key=lambda k: (load[k], k))
        assigned[i].append(group)
        load[i] += cost(group)
    return [(r, gs) for r, gs in zip(replicas, assigned, strict=True) if gs]
