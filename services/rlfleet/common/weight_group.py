"""A job's weight group: the trainer and its rollout replicas in a process group of their
own, over which each new version is broadcast while the trainer gathers it.

The TCP path moves a version trainer → weight-sync → every replica: one pod sends K + 1
copies. The weight group is the collective path beside it (issue #16): the trainer
(rank 0, the source) and K replicas (ranks 1..K) form a torch.distributed process group
that belongs to nobody's default group (``ProcessGroupGloo`` built on a ``TCPStore``
the trainer serves), arranged over gRPC by the scheduler (``OpenWeightGroup`` on the
trainer, ``JoinWeightGroup`` on each replica). What travels is the very payload the TCP
path carries (``publish.gather_payload``: safetensors bytes), range by range as the
trainer fills it from its shards, so a replica ends up with the same bytes, checks the
same checksum (sent last: the collective's own delivery plus a final digest) and loads
them through the same path as a pulled version. Only a version received whole and
verified is handed over; a broken group (a member died, a timeout) is dropped by both
sides, and the TCP path, which every version still takes, serves instead.

Backends (``GroupAddress.backend``): ``gloo`` for members on CPUs, ``nccl`` for members
on GPUs (each on a distinct one: NCCL refuses two ranks on one device). Either way the
control messages travel over a gloo group on the host, where versions begin and end and
where replicas wait between versions; with nccl the bytes go over an NCCL group beside
it, used only between a version's begin and end (no NCCL kernel waits on a replica's GPU
during its rollouts, and a member that leaves closes the gloo connections, which the
others see at once). Both groups connect at join time (a first "hello" on each, in the
join threads, under their timeouts): NCCL would otherwise connect lazily inside the
trainer's first broadcast. Bytes go in chunks of the sender's ``chunk_bytes``, announced
as a version begins, so every member broadcasts the same pieces. A member on the CPU
moves each chunk in place (zero copy); a member on a GPU passes it through one staging
bucket on its device (host → bucket → broadcast on the sender, broadcast → bucket →
host on a receiver), so GPU memory stays bounded whatever the model size, and the host
payload, its checksum and the load path stay those of the TCP path. The staging also
runs on the CPU when a test asks for it (``staged=True``), and over gloo on CUDA tensors
on a one-GPU machine (scripts/gpu_check.sh). NCCL's own failure handling would tear the
whole process down on a timeout; its group is built with blocking waits, without the
heartbeat monitor, so a dead member surfaces as an exception here, as with gloo, and
only the group is dropped (its communicators aborted).

Messages, each a broadcast from rank 0: a control tensor of four int64
``[kind, a, b, c]``, then for a range its bytes. Kinds: hello (once, at join), a version
begins (a = version, b = payload bytes, c = chunk bytes), a range follows (a = start,
b = end), the version ends (a = checksum length; the checksum follows as bytes), the
version is abandoned.

The sender logs "weight group G: broadcasting version N" as a version begins.

Fault tests only: ``RLFLEET_WEIGHT_GROUP_PAUSE_S`` (seconds, default 0), read once when a
``WeightSender`` is made, makes the trainer sleep that long before each range of a version
but the first, after logging "weight group G: version N paused ...", so a test can kill a
member (or the trainer) while a version is cut in half (tests/chaos). Leave it unset in
service: it delays every version by that much.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from rlfleet.common.weights import Buffer, verify_checksum

logger = logging.getLogger(__name__)

BEGIN, RANGE, END, ABANDON, HELLO = 1, 2, 3, 4, 5
_CHECKSUM_BYTES = 256
BACKENDS = ("gloo", "nccl")
CHUNK_BYTES = 64 << 20
"""Bytes per broadcast: the size of a staging bucket on a member's device (one each)."""
PAUSE_ENV = "RLFLEET_WEIGHT_GROUP_PAUSE_S"
"""Fault-injection knob (tests only): seconds the sender sleeps between ranges."""


@dataclass(frozen=True)
class GroupAddress:
    """Where a weight group meets: the trainer's TCPStore, its size and generation."""

    host: str
    port: int
    world_size: int
    generation: int
    backend: str = "gloo"  # one of BACKENDS


_NCCL_ENV = threading.Lock()  # NCCL reads its failure handling from the environment
DATA_TIMEOUT_S = 300.0
"""How long a replica waits in one broadcast of bytes (nccl): only between a version's
begin and end, while the trainer gathers the next bucket."""


def _connect(address: GroupAddress, rank: int, timeout_s: float, *,
             data_timeout_s: float) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:  # fmt: skip
    """Joins the group (blocks until every member has): rank 0 serves the store. Returns
    (control, data): control is gloo on the host, where versions begin and end and where
    members wait between versions; data carries the bytes: the same group for gloo, an
    NCCL group for nccl (so no NCCL kernel waits on a GPU between versions, and a member
    that leaves closes the control group's connections, which the others see at once)."""
    if address.backend not in BACKENDS:
        raise ValueError(f"weight group backend {address.backend!r} is not supported; use "
                         f"one of {', '.join(BACKENDS)}")  # fmt: skip
    if address.backend == "nccl" and not dist.is_nccl_available():
        raise RuntimeError("this torch build has no NCCL; use the gloo weight group")
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(address.host, address.port, address.world_size, is_master=rank == 0,
                          timeout=timeout, wait_for_workers=False)  # fmt: skip
    prefix = f"rlfleet-weights/{address.generation}"
    # The prefix stores hold the TCPStore (rank 0: its server) for as long as the groups.
    control = dist.ProcessGroupGloo(dist.PrefixStore(prefix, store), rank, address.world_size,
                                    timeout)  # fmt: skip
    if address.backend == "gloo":
        return control, control
    data = _nccl_group(dist.PrefixStore(f"{prefix}/nccl", store), rank, address.world_size,
                       timedelta(seconds=data_timeout_s))  # fmt: skip
    return control, data


def _nccl_group(store: dist.Store, rank: int, world_size: int,
                timeout: timedelta) -> dist.ProcessGroup:  # fmt: skip
    """An NCCL group whose failures raise in the waiting thread: by default NCCL's
    watchdog (and its heartbeat monitor) end the whole process when a member dies, which
    must not happen to the trainer (or a replica) over a group that is only a shortcut.
    Each group reads these settings once, as it is built; the job's own training group
    keeps its own."""
    options = dist.ProcessGroupNCCL.Options()
    options._timeout = timeout
    overrides = {"TORCH_NCCL_BLOCKING_WAIT": "1", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "0",
                 "TORCH_NCCL_ENABLE_MONITORING": "0", "TORCH_NCCL_DUMP_ON_TIMEOUT": "0"}  # fmt: skip
    with _NCCL_ENV:
        saved = {k: os.environ.get(k) for k in overrides}
        os.environ.update(overrides)
        try:
            return dist.ProcessGroupNCCL(store, rank, world_size, options)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def _broadcast(group: dist.ProcessGroup, tensor: torch.Tensor) -> None:
    options = dist.BroadcastOptions()
    options.rootRank = 0
    group.broadcast([tensor], options).wait()


def _bytes_of(buf: Buffer, start: int, end: int) -> torch.Tensor:
    """A uint8 tensor over ``buf[start:end]`` (no copy; a receive writes into ``buf``)."""
    if end == start:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(buf, dtype=torch.uint8, count=end - start, offset=start)


class _Wire:
    """One member's end of the group's messages: control tensors and checksums on the
    host (the control group), and a payload's bytes over the data group in pieces of
    ``chunk_bytes`` (the sender's, announced with each version: every member must
    broadcast the same pieces), each moved in place (CPU) or through a staging bucket on
    the member's device."""

    def __init__(self, groups: tuple[dist.ProcessGroup, dist.ProcessGroup],
                 device: torch.device, *, staged: bool, chunk_bytes: int) -> None:  # fmt: skip
        (self.control_group, self.data_group), self.device = groups, device
        self.staged, self.chunk_bytes = staged, chunk_bytes
        self._bucket: torch.Tensor | None = None  # made at the first staged piece, kept

    def control(self, values: list[int] | None = None) -> list[int]:
        """Rank 0 sends ``values`` (four ints); the others receive them."""
        t = torch.tensor(values or [0, 0, 0, 0], dtype=torch.int64)
        _broadcast(self.control_group, t)
        return t.tolist()

    def blob(self, data: bytes | None = None, size: int = 0) -> bytes:
        """Rank 0 sends ``data`` (``size`` bytes, zero-padded); the others receive it."""
        t = torch.tensor(list((data or b"").ljust(size, b"\0")), dtype=torch.uint8)
        _broadcast(self.control_group, t)
        return bytes(t.tolist())

    def hello(self) -> None:
        """The first message, on both groups: NCCL connects lazily, at its first
        collective, so this makes every member connect inside the join threads (under
        their timeouts) rather than in the trainer's first broadcast of a version."""
        kind = self.control([HELLO, 0, 0, 0])[0]
        if kind != HELLO:
            raise ValueError(f"weight group protocol: expected hello, got {kind}")
        if self.data_group is not self.control_group:
            _broadcast(self.data_group, torch.zeros(1, dtype=torch.uint8, device=self.device))

    def payload(self, buf: Buffer, start: int, end: int, *, send: bool) -> None:
        """Moves ``buf[start:end]`` from rank 0 into every member's ``buf``."""
        for offset in range(start, end, self.chunk_bytes):
            n = min(self.chunk_bytes, end - offset)
            host = _bytes_of(buf, offset, offset + n)
            if not self.staged:
                _broadcast(self.data_group, host)
                continue
            bucket = self._stage(n)
            if send:
                bucket.copy_(host)
            _broadcast(self.data_group, bucket)
            if not send:
                host.copy_(bucket)  # ordered after the broadcast on the device's stream

    def _stage(self, n: int) -> torch.Tensor:
        if self._bucket is None or self._bucket.numel() < self.chunk_bytes:
            self._bucket = None  # the old one goes before the new one is made
            self._bucket = torch.empty(self.chunk_bytes, dtype=torch.uint8, device=self.device)
        return self._bucket[:n]

    def abort(self) -> None:
        """Frees the data group's NCCL communicators (a broken or replaced group)."""
        if self.data_group is not self.control_group:
            with contextlib.suppress(Exception):  # already broken, or no abort in this torch
                self.data_group.abort()
        self._bucket = None


def _staging(device: str, staged: bool | None) -> tuple[torch.device, bool]:
    where = torch.device(device)
    return where, where.type != "cpu" if staged is None else staged


class WeightSender:
    """The trainer's end: rank 0 of the group, broadcasting versions as they are gathered.

    Joining waits for every replica, so it runs in a thread from the start; a send waits
    for it (up to the timeout). Any failure marks the group broken: the caller carries
    on without it (the TCP path) and the scheduler opens a new one."""

    def __init__(self, address: GroupAddress, *, timeout_s: float = 60.0, device: str = "cpu",
                 staged: bool | None = None, chunk_bytes: int = CHUNK_BYTES):  # fmt: skip
        """``device``: where the trainer's bytes are staged for the broadcast (its GPU for
        nccl); ``staged`` (default: off the CPU) forces staging through a bucket;
        ``chunk_bytes``: bytes per broadcast, announced to the replicas."""
        self.address = address
        self.timeout_s = timeout_s
        self.broken = ""  # why the group is unusable; empty while it is fine
        self._device, self._staged = _staging(device, staged)
        self._chunk_bytes = chunk_bytes
        self._wire: _Wire | None = None
        self.pause_s = float(os.environ.get(PAUSE_ENV) or 0.0)  # fault tests only
        self._version, self._ranges = 0, 0  # the version being sent, its ranges sent
        self._joined = threading.Event()
        threading.Thread(target=self._join, name="weight-group", daemon=True).start()

    def _join(self) -> None:
        try:
            if self._device.type == "cuda":  # this thread's NCCL calls run on its device
                torch.cuda.set_device(self._device)
            groups = _connect(self.address, 0, self.timeout_s, data_timeout_s=self.timeout_s)
            wire = _Wire(groups, self._device, staged=self._staged,
                         chunk_bytes=self._chunk_bytes)  # fmt: skip
            wire.hello()
            if self.broken:  # closed while it formed: the replicas leave with its connections
                wire.abort()
            else:
                self._wire = wire
        except Exception as exc:  # noqa: BLE001 - reported by the next send
            self.broken = f"the replicas did not all join: {exc}"
        finally:
            self._joined.set()

    @property
    def usable(self) -> bool:
        if not self._joined.wait(self.timeout_s):
            self.broken = f"the replicas did not all join within {self.timeout_s:.0f}s"
        return not self.broken

    def _control(self, kind: int, a: int = 0, b: int = 0, c: int = 0) -> None:
        self._wire.control([kind, a, b, c])

    def _guarded(self, what: str, fn: Callable[[], None]) -> bool:
        if not self.usable:
            return False
        try:
            fn()
            return True
        except Exception as exc:  # noqa: BLE001 - a member died or timed out: drop the group
            self.broken = f"{what} failed: {exc}"
            logger.warning("weight group %d broken: %s", self.address.generation, self.broken)
            # Its connections close with it, so the other members leave at once instead of
            # waiting mid-version (holding a buffer) until the next group forms.
            self._drop()
            return False

    def begin(self, version: int, num_bytes: int) -> bool:
        self._version, self._ranges = version, 0
        ok = self._guarded("begin", lambda: self._control(BEGIN, version, num_bytes,
                                                          self._chunk_bytes))  # fmt: skip
        if ok:
            logger.info("weight group %d: broadcasting version %d", self.address.generation,
                        version)  # fmt: skip
        return ok

    def send(self, payload: Buffer, start: int, end: int) -> bool:
        """Broadcasts ``payload[start:end]``, final bytes of the version being sent."""

        def run() -> None:
            if self.pause_s > 0 and self._ranges > 0:  # fault tests: a version cut in half
                logger.info("weight group %d: version %d paused %.2fs after %d range(s) (%s)",
                            self.address.generation, self._version, self.pause_s,
                            self._ranges, PAUSE_ENV)  # fmt: skip
                time.sleep(self.pause_s)
            self._ranges += 1
            self._control(RANGE, start, end)
            self._wire.payload(payload, start, end, send=True)

        return self._guarded("send", run)

    def end(self, checksum: str) -> bool:
        data = checksum.encode()
        if len(data) > _CHECKSUM_BYTES:
            raise ValueError("checksum too long for the weight group")

        def run() -> None:
            self._control(END, len(data))
            self._wire.blob(data, _CHECKSUM_BYTES)

        return self._guarded("end", run)

    def abandon(self) -> None:
        self._guarded("abandon", lambda: self._control(ABANDON))

    def close(self) -> None:
        self.broken = self.broken or "closed"
        self._drop()

    def _drop(self) -> None:
        wire, self._wire = self._wire, None
        if wire is not None:
            wire.abort()


@dataclass
class Received:
    job_id: str
    version: int
    payload: Buffer
    checksum: str


class WeightReceiver:
    """A replica's end: receives every version the trainer broadcasts, in a thread, and
    keeps the newest verified one for ``take``. A version cut short (the trainer died
    mid-broadcast, a checksum mismatch) is dropped, never handed over."""

    def __init__(self, address: GroupAddress, rank: int, *, job_id: str,
                 alloc: Callable[[int], Buffer], release: Callable[[Buffer], None],
                 idle_timeout_s: float = 24 * 3600.0, device: str = "cpu",
                 staged: bool | None = None) -> None:  # fmt: skip
        """``device``: where bytes land before they are copied into the host payload
        (the engine's GPU for nccl); ``staged`` as for ``WeightSender``."""
        self.address = address
        self.rank = rank
        self.job_id = job_id
        self.alloc, self.release = alloc, release
        # Between versions a whole step passes: the group waits that long for the next.
        self.idle_timeout_s = idle_timeout_s
        self.broken = ""
        self._device, self._staged = _staging(device, staged)
        self._lock = threading.Lock()
        self._ready: Received | None = None
        self._stop = False
        self.thread = threading.Thread(target=self._run, name="weight-group-recv", daemon=True)
        self.thread.start()

    def take(self, job_id: str, version: int) -> Received | None:
        """The verified payload of ``version`` when it arrived whole; the caller releases it."""
        with self._lock:
            ready = self._ready
            if ready is None or (ready.job_id, ready.version) != (job_id, version):
                return None
            self._ready = None
            return ready

    def _keep(self, received: Received) -> None:
        with self._lock:
            old, self._ready = self._ready, received
        if old is not None:
            self.release(old.payload)

    def _run(self) -> None:
        wire = None
        try:
            if self._device.type == "cuda":  # this thread's NCCL calls run on its device
                torch.cuda.set_device(self._device)
            groups = _connect(self.address, self.rank, self.idle_timeout_s,
                              data_timeout_s=DATA_TIMEOUT_S)  # fmt: skip
            wire = _Wire(groups, self._device, staged=self._staged, chunk_bytes=CHUNK_BYTES)
            wire.hello()
            while not self._stop:
                self._receive_version(wire)
        except Exception as exc:  # noqa: BLE001 - the group is gone; the TCP path serves
            self.broken = str(exc) or type(exc).__name__
            if not self._stop:
                logger.warning("weight group %d left: %s", self.address.generation, self.broken)
        finally:
            if wire is not None:
                wire.abort()

    def _receive_version(self, wire: _Wire) -> None:
        kind, version, num_bytes, chunk_bytes = wire.control()
        if kind == ABANDON:
            return
        if kind != BEGIN:
            raise ValueError(f"weight group protocol: expected a version to begin, got {kind}")
        if not 0 < chunk_bytes <= 4 * CHUNK_BYTES:
            raise ValueError(f"weight group protocol: a {chunk_bytes}-byte chunk")
        wire.chunk_bytes = chunk_bytes
        payload = self.alloc(num_bytes)
        try:
            while True:
                kind, a, b, _ = wire.control()
                if kind == ABANDON:  # the trainer gave this version up (it still publishes)
                    return
                if kind == RANGE:
                    if not 0 <= a <= b <= num_bytes:
                        raise ValueError(f"range {a}..{b} outside a {num_bytes}-byte version")
                    wire.payload(payload, a, b, send=False)
                    continue
                if kind != END:
                    raise ValueError(f"weight group protocol: unexpected message {kind}")
                checksum = wire.blob(size=_CHECKSUM_BYTES)[:a].decode()
                verify_checksum(payload, checksum, what=f"broadcast version {version}")
                self._keep(Received(self.job_id, version, payload, checksum))
                payload = None
                logger.info("version %d received over the weight group", version)
                return
        finally:
            if payload is not None:
                self.release(payload)

    def close(self) -> None:
        self._stop = True
        self.broken = self.broken or "closed"
