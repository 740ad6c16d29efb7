"""Transport-agnostic core of a rollout replica: generation streams, abort, version loads.

The servicer only converts messages; everything a replica decides lives here:
which Generate calls are in flight (so one Abort reaches them all and can count
the partials it caused), how a policy version is pulled from weight-sync,
verified and swapped in, and what the replica reports about itself. Metrics are
counted here too, so every engine reports the same series.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from rlfleet.common.errors import DataLoss, FailedPrecondition, InvalidArgument
from rlfleet.common.weight_transport import BufferPool
from rlfleet.common.weights import decode_state_dict
from rlfleet.common.weightsync_client import WeightSyncClient
from rlfleet.rollout import metrics
from rlfleet.rollout.engine import (
    FINISH_ABORTED,
    RolloutEngine,
    Sampling,
    SeqRequest,
    SeqResult,
    validate_generate,
)

if TYPE_CHECKING:
    from rlfleet.common.weight_group import GroupAddress, WeightReceiver

logger = logging.getLogger(__name__)

_DONE = object()


@dataclass(eq=False)
class _InFlight:
    """One Generate call as Abort sees it."""

    total: int
    abort: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    returned: int = 0
    aborted: int = 0


@dataclass
class Status:
    replica_id: str
    version: int
    engine: str
    running_sequences: int
    model_path: str
    job_id: str


class GenerateStream:
    """Results of one Generate call, in the order sequences finish; ``cancel`` aborts it."""

    def __init__(self, results: Iterator[SeqResult], flight: _InFlight):
        self._results = results
        self._flight = flight

    def __iter__(self) -> Iterator[SeqResult]:
        return self._results

    def cancel(self) -> None:
        self._flight.abort.set()


class RolloutCore:
    """Everything a rollout replica does, over one ``RolloutEngine``."""

    def __init__(
        self,
        engine: RolloutEngine,
        *,
        replica_id: str,
        weightsync_address: str = "",
        address: str = "",
        pull_timeout_s: float = 300.0,
        abort_wait_s: float = 60.0,
        max_message_mb: int = 256,
    ):
        self.engine = engine
        self.replica_id = replica_id
        self.weightsync_address = weightsync_address
        self.address = address
        self._address_set = threading.Event()  # the server's port is known only once it is bound
        if address:
            self._address_set.set()
        self.pull_timeout_s = pull_timeout_s
        self.abort_wait_s = abort_wait_s
        self.max_message_mb = max_message_mb
        self.job_id = ""
        self._lock = threading.Lock()
        self._inflight: set[_InFlight] = set()
        self._load_lock = threading.Lock()  # one LoadVersion at a time
        self._weightsync_clients: dict[str, WeightSyncClient] = {}  # used under _load_lock
        # A job's weight group (common/weight_group.py): versions broadcast by the trainer.
        self._receiver: WeightReceiver | None = None
        self._group_buffers = BufferPool(keep=1)
        metrics.POLICY_VERSION.set(engine.version)

    # -- generation -------------------------------------------------------------------

    def generate(self, seqs: Sequence[SeqRequest], sampling: Sampling) -> GenerateStream:
        """Checks the request (errors come before any result), starts it, streams results.

        The call counts as in flight from the moment this returns, so an Abort
        right after it reaches it.
        """
        if not self.engine.loaded:
            raise FailedPrecondition(
                "no model is loaded on this replica; call LoadVersion (or start it with "
                "--model-path) before Generate"
            )
        seqs = list(seqs)
        validate_generate(seqs, sampling, vocab_size=self.engine.vocab_size)
        flight = _InFlight(total=len(seqs))
        results: queue.Queue = queue.Queue()

        def on_result(result: SeqResult) -> None:
            flight.returned += 1
            if result.finish_reason == FINISH_ABORTED:
                flight.aborted += 1
            metrics.SEQUENCES_FINISHED.labels(result.finish_reason).inc()
            metrics.TOKENS_GENERATED.inc(len(result.token_ids) - result.num_prefix_tokens)
            metrics.RUNNING_SEQUENCES.dec()
            results.put(result)

        def run() -> None:
            start = time.perf_counter()
            try:
                self.engine.generate(seqs, sampling, abort=flight.abort, on_result=on_result)
            except BaseException as exc:  # noqa: BLE001 - handed to the streaming caller
                results.put(exc)
            finally:
                metrics.RUNNING_SEQUENCES.dec(flight.total - flight.returned)
                metrics.GENERATE_SECONDS.observe(time.perf_counter() - start)
                with self._lock:
                    self._inflight.discard(flight)
                flight.done.set()
                results.put(_DONE)

        with self._lock:
            self._inflight.add(flight)
        metrics.RUNNING_SEQUENCES.inc(flight.total)
        threading.Thread(target=run, name="generate", daemon=True).start()
        return GenerateStream(_drain(results, flight), flight)

    def abort(self) -> int:
        """Aborts every Generate in flight; returns how many sequences came back partial.

        Waits until those calls have handed back their partials, so once Abort
        returns no sequence of theirs is still being sampled.
        """
        with self._lock:
            flights = list(self._inflight)
        for flight in flights:
            flight.abort.set()
        deadline = time.monotonic() + self.abort_wait_s
        for flight in flights:
            if not flight.done.wait(max(0.0, deadline - time.monotonic())):
                logger.warning("a Generate call did not end within the abort wait")
        aborted = sum(f.aborted for f in flights)
        logger.info("aborted", extra={"calls": len(flights), "sequences": aborted})
        return aborted

    @property
    def running_sequences(self) -> int:
        with self._lock:
            return sum(f.total - f.returned for f in self._inflight)

    # -- policy versions --------------------------------------------------------------

    def load_version(
        self, *, job_id: str, version: int, model_path: str = "", weightsync_address: str = ""
    ) -> tuple[int, float, str]:
        """Swaps ``version`` of ``job_id`` in: the copy the job's weight group delivered
        when it holds that version whole, else pulled from weight-sync. Returns (version,
        seconds, how: "weight-group", "weight-sync" or "held").

        Builds ``model_path`` first when the replica holds another model. Loading
        the version already held is cheap (no transfer), so callers may retry.
        """
        if not job_id:
            raise InvalidArgument("job_id is empty; name the job whose version to load")
        if version < 0:
            raise InvalidArgument(f"version must be >= 0 (0 = the current one), got {version}")
        address = weightsync_address or self.weightsync_address
        if not address:
            raise FailedPrecondition(
                "no weight-sync address: set weightsync_address in the request or start the "
                "replica with --weightsync-address"
            )
        with self._load_lock:
            start = time.perf_counter()
            switched = False
            if model_path and not _same_path(model_path, self.engine.model_path):
                self.engine.load_model(model_path)
                self.job_id = ""
                switched = True
            elif not self.engine.loaded:
                raise FailedPrecondition(
                    "no model is loaded on this replica; pass model_path with LoadVersion"
                )
            held = (self.job_id, self.engine.version) == (job_id, version)
            if job_id != self.job_id:
                self.engine.drop_kept_kv()  # another job's seq_ids could match its rows
            via = "held"
            if switched or version == 0 or not held:
                got, via = self._receive_or_pull(address, job_id, version)
                self.job_id = job_id
            else:
                got = version
            metrics.POLICY_VERSION.set(got)
            self._report_held(address, job_id, got)
            seconds = time.perf_counter() - start
        metrics.WEIGHT_LOAD_SECONDS.observe(seconds)
        logger.info(
            "version loaded",
            extra={"job_id": job_id, "version": got, "seconds": round(seconds, 3), "via": via},
        )
        return got, seconds, via

    def join_weight_group(self, job_id: str, group: GroupAddress, rank: int) -> None:
        """Joins ``job_id``'s weight group as ``rank`` (a thread receives from now on);
        leaves the previous group."""
        if not job_id:
            raise InvalidArgument("job_id is empty; name the job whose weight group to join")
        from rlfleet.common.weight_group import BACKENDS, WeightReceiver  # torch: only here

        if group.backend not in BACKENDS:
            raise InvalidArgument(f"weight group backend {group.backend!r} is not one of "
                                  f"{', '.join(BACKENDS)}")  # fmt: skip
        device = self.engine.weights_device if group.backend == "nccl" else "cpu"
        if group.backend == "nccl" and not device.startswith("cuda"):
            raise FailedPrecondition(
                f"this replica's {self.engine.kind} engine runs on {device}; an nccl weight "
                "group needs its GPU (it gets each version from weight-sync instead)"
            )
        if not 1 <= rank < group.world_size:
            raise InvalidArgument(
                f"rank {rank} is outside the replicas' ranks 1..{group.world_size - 1} of the "
                "weight group (rank 0 is the trainer)"
            )
        if self._receiver is not None:
            self._receiver.close()
        self._receiver = WeightReceiver(group, rank, job_id=job_id, alloc=self._group_buffers.take,
                                        release=self._group_buffers.give,
                                        device=device)  # fmt: skip
        logger.info("joined a weight group", extra={"job_id": job_id, "rank": rank,
                                                    "generation": group.generation})  # fmt: skip

    def _receive_or_pull(self, address: str, job_id: str, version: int) -> tuple[int, str]:
        received = self._receiver.take(job_id, version) if self._receiver and version else None
        if received is None:
            return self._pull_and_swap(address, job_id, version), "weight-sync"
        try:
            state = decode_state_dict(received.payload)
            self.engine.load_state_dict(state, version)
            del state  # views of the buffer, dropped before it is reused
        finally:
            self._group_buffers.give(received.payload)
        return version, "weight-group"

    def _client(self, address: str) -> WeightSyncClient:
        """One client per weight-sync address, kept: it remembers where the data plane is."""
        client = self._weightsync_clients.get(address)
        if client is None:
            client = self._weightsync_clients[address] = WeightSyncClient(
                address, timeout_s=self.pull_timeout_s, max_message_mb=self.max_message_mb
            )
        return client

    def _pull_and_swap(self, address: str, job_id: str, version: int) -> int:
        client = self._client(address)
        try:
            got = client.pull(job_id=job_id, version=version, replica_id=self.replica_id)
        except InvalidArgument as exc:  # a malformed stream is weight-sync's fault, not ours
            raise DataLoss(f"weight-sync sent a malformed stream: {exc.message}") from None
        if got.job_id != job_id or (version and got.version != version):
            raise DataLoss(
                f"weight-sync served {got.job_id!r} version {got.version} for a request of "
                f"{job_id!r} version {version}"
            )
        try:
            state = decode_state_dict(got.payload)
        except Exception as exc:  # noqa: BLE001 - checksum matched, contents did not decode
            raise DataLoss(
                f"version {got.version} of {job_id!r} is not a safetensors state dict: {exc}"
            ) from None
        self.engine.load_state_dict(state, got.version)  # copies into the model
        del state  # views of the received buffer: dropped before the buffer is reused
        client.release(got)
        return got.version

    def set_address(self, address: str) -> None:
        """The host:port this replica is reached at, reported to weight-sync."""
        self.address = address
        self._address_set.set()

    def _report_held(self, address: str, job_id: str, version: int) -> None:
        self._address_set.wait(timeout=10.0)
        self._client(address).report_held(
            replica_id=self.replica_id, job_id=job_id, version=version, address=self.address
        )

    # -- status -----------------------------------------------------------------------

    def status(self) -> Status:
        return Status(
            replica_id=self.replica_id,
            version=self.engine.version,
            engine=self.engine.kind,
            running_sequences=self.running_sequences,
            model_path=self.engine.model_path,
            job_id=self.job_id,
        )

    def close(self) -> None:
        self.abort()
        if self._receiver is not None:
            self._receiver.close()
        self.engine.close()
        for client in self._weightsync_clients.values():
            client.close()


def _drain(results: queue.Queue, flight: _InFlight) -> Iterator[SeqResult]:
    try:
        while (item := results.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        # The reader stopped early (cancelled, disconnected): stop sampling for it.
        if not flight.done.is_set():
            flight.abort.set()


def _same_path(a: str, b: str) -> bool:
    try:
        return bool(b) and Path(a).resolve() == Path(b).resolve()
    except (OSError, ValueError):  # a path the filesystem refuses is not the loaded model
        return False
