"""The C3PO++ rollout backend over live replicas: Generate streams, Abort, partials.

Work is dispatched whole-group-at-a-time to the replica with the fewest
outstanding sequences; each ``submit`` opens one Generate stream per replica it
uses, and the engines batch concurrent streams together (continuous batching),
so a refill joins the running batch at once. Carried-over rollouts are sent with
their prefix (tokens, log-probs, per-token versions) back to the replica that
generated them: it resumes them from the KV cache it kept at the stop
(``resume_kv``) or re-prefills prompt + prefix, and samples on under the version
it holds.

``abort`` calls Abort on every replica with a stream open and waits for the
streams to hand back their partials (finished = false). An Abort that reaches a
replica before a just-sent Generate has registered there is repeated until the
stream ends; a replica that does not stop within ``abort_grace_s`` has its
streams cancelled, and its sequences keep the state they had when dispatched.
A replica that fails with a retryable code, or stops answering the pool's
heartbeat, is dropped for the step and its sequences are dispatched again to
the others (``Lost``).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent import futures
from dataclasses import dataclass

import grpc

from rlfleet.common.errors import RlfleetError, Unavailable, from_rpc_error
from rlfleet.common.grpc_client import RETRYABLE, call
from rlfleet.scheduler import metrics
from rlfleet.scheduler.c3po.driver import Event, Lost, RolloutBackend, WorkUnit
from rlfleet.scheduler.c3po.pool import Progress, expand_spans, spans_of
from rlfleet.scheduler.pool import Replica, ReplicaPool
from rlfleet.v1 import rollout_pb2

logger = logging.getLogger(__name__)


@dataclass
class _Ended:
    """A stream ended; ``pending`` sequences got no result (``error`` says why, if known)."""

    replica: Replica
    pending: list[str]
    error: RlfleetError | None
    cancelled: bool = False


class GrpcBackend(RolloutBackend):
    def __init__(
        self,
        pool: ReplicaPool,
        *,
        job_id: str,
        version: int,
        sampling: rollout_pb2.SamplingParams,
        limit: int = 0,
        abort_grace_s: float = 30.0,
    ):
        self.pool = pool
        self.sampling = sampling
        self.abort_grace_s = abort_grace_s
        self.replicas = pool.ready(job_id, version, limit=limit)
        if not self.replicas:
            raise Unavailable(f"rollout: no replica holds version {version} of job {job_id}")
        self._events: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._load = {r.address: 0 for r in self.replicas}
        self._alive = {r.address: True for r in self.replicas}
        self._open = 0  # streams not yet ended
        self._in_flight = 0
        self._prefix: dict[str, int] = {}
        self._aborting = False
        self._next_beat = time.monotonic() + getattr(pool, "heartbeat_s", 0.0)
        now = time.perf_counter()
        self._idle = {r.address: 0.0 for r in self.replicas}
        self._idle_since: dict[str, float | None] = {r.address: now for r in self.replicas}
        self._names = {r.address: str(r) for r in self.replicas}

    # -- RolloutBackend -------------------------------------------------------

    def now(self) -> float:
        return time.perf_counter()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def submit(self, units: list[WorkUnit]) -> None:
        if not units:
            return
        plan: dict[str, list[rollout_pb2.SequenceRequest]] = {}
        with self._lock:
            live = [r for r in self.replicas if self._alive[r.address]]
            if not live:
                raise Unavailable("rollout: no healthy replica is left to generate on")
            for group, members in units:
                # A carried rollout goes back to its replica, which may hold its KV cache;
                # new work goes to the least outstanding sequences: keeps batches full.
                home = [r for r in live if r.address == members[0].replica]
                replica = home[0] if home else min(live, key=lambda r: self._load[r.address])
                requests = plan.setdefault(replica.address, [])
                for m in members:
                    m.replica = replica.address
                    requests.append(
                        rollout_pb2.SequenceRequest(
                            seq_id=m.seq_id,
                            prompt_token_ids=group.prompt_ids,
                            prefix_token_ids=m.token_ids,
                            prefix_logprobs=m.logprobs,
                            prefix_versions=expand_spans(m.spans),
                            max_new_tokens=m.max_tokens,
                        )
                    )
                    self._prefix[m.seq_id] = len(m.token_ids)
                self._busy(replica.address, len(members))
            self._open += len(plan)
            self._in_flight += sum(len(v) for v in plan.values())
        by_address = {r.address: r for r in self.replicas}
        for address, requests in plan.items():
            threading.Thread(
                target=self._stream,
                args=(by_address[address], requests),
                name="c3po-generate",
                daemon=True,
            ).start()

    def wait(self, timeout: float) -> list[Event]:
        self._heartbeat()
        try:
            first = self._events.get(timeout=timeout)
        except queue.Empty:
            return []
        try:
            return self._drain([first])
        except RlfleetError:
            self.abort()  # stop the other replicas before the job fails
            raise

    def abort(self) -> list[Event]:
        with self._lock:
            self._aborting = True
        events: list[Event] = []
        deadline = time.monotonic() + self.abort_grace_s
        while self._open and time.monotonic() < deadline:
            self._abort_replicas()
            # Partials follow the Abort reply on each stream; a Generate that had
            # not registered yet needs the next round.
            end = min(deadline, time.monotonic() + 1.0)
            while self._open and time.monotonic() < end:
                try:
                    item = self._events.get(timeout=max(0.0, end - time.monotonic()))
                except queue.Empty:
                    break
                events += self._drain([item])
        if self._open:
            logger.warning(
                "rollout replicas did not stop within %.0fs; cancelling", self.abort_grace_s
            )
            for replica in self.replicas:
                for stream in list(replica.calls):
                    stream.cancel()
            while self._open:
                events += self._drain([self._events.get()])
        events += self._drain([])
        with self._lock:
            self._aborting = False
        return events

    def live_replicas(self) -> list[Replica]:
        """The replicas this backend still dispatches to (not dropped for failing)."""
        with self._lock:
            return [r for r in self.replicas if self._alive[r.address]]

    def idle_seconds(self) -> dict[str, float]:
        now = time.perf_counter()
        with self._lock:
            return {
                self._names[a]: self._idle[a] + (now - s if (s := self._idle_since[a]) else 0.0)
                for a in self._idle
            }

    # -- internals ------------------------------------------------------------

    def _heartbeat(self) -> None:
        """The pool's hang check: a replica that stops answering has its streams
        cancelled, and its sequences are dispatched to the others (``_ended``)."""
        every = getattr(self.pool, "heartbeat_s", 0.0)
        if every <= 0 or time.monotonic() < self._next_beat:
            return
        self._next_beat = time.monotonic() + every
        streaming = [r for r in self.replicas if r.calls]
        if streaming:
            self.pool._heartbeat(streaming)

    def _busy(self, address: str, n: int) -> None:
        since = self._idle_since[address]
        if since is not None:
            self._idle[address] += time.perf_counter() - since
            self._idle_since[address] = None
        self._load[address] += n

    def _done(self, address: str, n: int) -> None:
        self._load[address] -= n
        self._in_flight -= n
        if self._load[address] == 0 and self._idle_since[address] is None:
            self._idle_since[address] = time.perf_counter()

    def _abort_replicas(self) -> None:
        targets = [r for r in self.replicas if r.calls]

        def abort_one(replica: Replica) -> None:
            try:
                call(
                    replica.stub.Abort,
                    rollout_pb2.AbortRequest(),
                    timeout=self.pool.status_timeout_s,
                    retry=False,
                )
            except RlfleetError as exc:
                logger.warning("Abort on rollout replica %s failed: %s", replica, exc.message)

        if targets:
            with futures.ThreadPoolExecutor(max_workers=min(len(targets), 32)) as ex:
                list(ex.map(abort_one, targets))

    def _stream(self, replica: Replica, requests: list[rollout_pb2.SequenceRequest]) -> None:
        pending = {r.seq_id for r in requests}
        error: RlfleetError | None = None
        cancelled = False
        request = rollout_pb2.GenerateRequest(sequences=requests, sampling=self.sampling)
        try:
            stream = replica.stub.Generate(request, timeout=self.pool.generate_timeout_s)
        except grpc.RpcError as exc:  # pragma: no cover - the stub call itself is lazy
            self._events.put(_Ended(replica, sorted(pending), from_rpc_error(exc)))
            return
        replica.calls.append(stream)
        try:
            for result in stream:
                if result.seq_id not in pending:
                    continue
                pending.discard(result.seq_id)
                self._events.put((replica, result))
        except grpc.RpcError as exc:
            cancelled = exc.code() == grpc.StatusCode.CANCELLED
            error = None if cancelled else from_rpc_error(exc)
        finally:
            replica.calls.remove(stream)
        self._events.put(_Ended(replica, sorted(pending), error, cancelled))

    def _drain(self, items: list) -> list[Event]:
        """Turns raw stream items (plus whatever is queued) into driver events."""
        while True:
            try:
                items.append(self._events.get_nowait())
            except queue.Empty:
                break
        out: list[Event] = []
        for item in items:
            if isinstance(item, _Ended):
                out += self._ended(item)
            elif isinstance(item, tuple):
                out.append(self._progress(*item))
            else:
                out.append(item)  # posted by a layer above (``post``)
        return out

    def post(self, item) -> None:
        """Queues ``item`` to come out of ``wait`` (or ``abort``) as it is: a layer above
        (multi-turn episodes) wakes the driver with its own events this way."""
        self._events.put(item)

    def _progress(self, replica: Replica, result: rollout_pb2.SequenceResult) -> Progress:
        with self._lock:
            self._done(replica.address, 1)
        new = len(result.token_ids) - self._prefix.pop(result.seq_id, 0)
        metrics.TOKENS_GENERATED.inc(max(new, 0))
        return Progress(
            seq_id=result.seq_id,
            length=len(result.token_ids),
            spans=spans_of(result.versions),
            finished=result.finished,
            finish_reason=result.finish_reason,
            token_ids=list(result.token_ids),
            logprobs=list(result.logprobs),
        )

    def _ended(self, ended: _Ended) -> list[Event]:
        address = ended.replica.address
        with self._lock:
            self._open -= 1
            self._done(address, len(ended.pending))
            aborting = self._aborting
        for seq_id in ended.pending:
            self._prefix.pop(seq_id, None)
        if not ended.pending:
            return []
        reason = ended.error.message if ended.error else "stream ended with unfinished sequences"
        if ended.error is not None and getattr(ended.error, "grpc_code", None) not in RETRYABLE:
            if not aborting:
                raise type(ended.error)(
                    f"rollout replica {ended.replica}: Generate failed: {ended.error.message}"
                )
        if not (aborting and (ended.cancelled or ended.error is None)):
            with self._lock:
                self._alive[address] = False
            self.pool.drop(ended.replica, f"Generate failed: {reason}")
        return [Lost(ended.pending, reason)]
