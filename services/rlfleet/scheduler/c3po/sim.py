"""A simulated rollout fleet with a virtual clock, for the real C3PO++ driver at scale.

``SimFleet`` is a ``RolloutBackend``: the unchanged ``IterationDriver`` and
``InferencePool`` (the code the scheduler runs in production) drive it, but
instead of gRPC streams it runs a discrete-event simulation of N replicas, each
a continuous-batching engine timed by ``rollout.sim_engine.DecodeCostModel``
with output lengths from ``LengthModel``. Nothing is decoded token by token: a
replica's batch is constant between two of its events (a sequence ends, one is
admitted, the fleet is aborted), and the time of k steps of a constant batch has
a closed form, so an event costs O(log n) whatever the lengths. Hundreds of
replicas and thousands of 64K-token sequences simulate in about a second per
step on one CPU core.

Modelling choices (docs/C3PO.md has the numbers):
- an admission takes effect at the time it is made: the step in flight on that
  replica is restarted with the new batch (at most one step lost) and the
  replica then spends the prefill time of prompt + prefix before decoding on;
- a replica runs at most ``max_num_seqs`` sequences (vLLM's default 256); more
  wait in its queue in arrival order;
- after an abort, a sequence keeps the tokens of the whole steps it completed.

``run_sim`` drives whole jobs (rollout, then modelled training and weight sync)
in either mode, for ``bench/c3po.py`` and the tests.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field

from rlfleet.rollout.sim_engine import DecodeCostModel, LengthModel
from rlfleet.scheduler.c3po.driver import (
    C3poSettings,
    Event,
    IterationDriver,
    IterationReport,
    RolloutBackend,
    WorkUnit,
)
from rlfleet.scheduler.c3po.pool import Group, InferencePool, Progress, Rollout, extend_spans


@dataclass(eq=False)
class _Seq:
    rollout: Rollout
    prompt_len: int
    target: int
    reason: str
    admit_step: int = 0


@dataclass(eq=False)
class _Replica:
    name: str
    index: int
    t: float = 0.0
    """Virtual time of the replica's last step boundary."""
    steps: int = 0
    ctx: int = 0
    """Context tokens of the running batch at ``t``."""
    running: dict[str, _Seq] = field(default_factory=dict)
    finish: list[tuple[int, str]] = field(default_factory=list)
    """Heap of (step at which a running sequence ends, seq_id)."""
    queue: deque = field(default_factory=deque)
    epoch: int = 0
    idle: float = 0.0
    idle_since: float | None = 0.0

    @property
    def load(self) -> int:
        return len(self.running) + len(self.queue)


class SimFleet(RolloutBackend):
    """N simulated replicas under one virtual clock."""

    def __init__(
        self,
        *,
        replicas: int,
        cost: DecodeCostModel | None = None,
        lengths: LengthModel | None = None,
        seed: int = 0,
        max_num_seqs: int = 256,
    ):
        self.cost = cost or DecodeCostModel()
        self.lengths = lengths or LengthModel()
        self.seed = seed
        self.max_num_seqs = max_num_seqs
        self.replicas = [_Replica(f"sim-{i}", i) for i in range(replicas)]
        self.clock = 0.0
        self.version = 0
        self._heap: list[tuple[float, int, int]] = []  # (time, epoch, replica index)
        # (load, replica index) with stale entries skipped: O(log n) least-loaded placement.
        self._loads: list[tuple[int, int]] = [(0, i) for i in range(replicas)]
        self._in_flight = 0
        self.tokens_generated = 0
        self.prefill_tokens = 0

    # -- phase control (called by the job simulation, not the driver) ----------

    def begin(self, *, version: int, at: float) -> None:
        """A rollout phase starts at virtual time ``at`` with ``version`` on every replica."""
        self.version = version
        self.clock = max(self.clock, at)
        for r in self.replicas:
            r.idle, r.idle_since = 0.0, self.clock
            r.t = max(r.t, self.clock)

    # -- RolloutBackend -------------------------------------------------------

    def now(self) -> float:
        return self.clock

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def submit(self, units: list[WorkUnit]) -> None:
        touched: set[int] = set()
        for group, members in units:
            i = self._least_loaded()
            r = self.replicas[i]
            if i not in touched:
                self._advance_to(r, self.clock)
                touched.add(i)
            for m in members:
                length, capped = self.lengths.output_length(self.seed, group.group_id, m.member)
                target = max(length, m.length + 1)
                r.queue.append(_Seq(m, group.prompt_len, target, "length" if capped else "stop"))
                self._in_flight += 1
            heapq.heappush(self._loads, (r.load, i))
        for i in touched:
            r = self.replicas[i]
            if r.idle_since is not None and r.load:
                r.idle += self.clock - r.idle_since
                r.idle_since = None
            self._admit(r)
            self._schedule(i)

    def wait(self, timeout: float) -> list[Event]:
        while self._heap:
            t, epoch, i = heapq.heappop(self._heap)
            r = self.replicas[i]
            if epoch != r.epoch:
                continue
            self.clock = max(self.clock, t)
            events = self._complete(r)
            self._admit(r)
            self._schedule(i)
            if events:
                return events
        return []

    def abort(self) -> list[Event]:
        events: list[Event] = []
        for r in self.replicas:
            if r.running:
                k = self.cost.steps_within(self.clock - r.t, len(r.running), r.ctx)
                k = min(k, r.finish[0][0] - r.steps)
                r.steps += k
            for seq in r.running.values():
                made = min(r.steps - seq.admit_step, seq.target - seq.rollout.length)
                events.append(
                    self._report(seq, made, finished=made >= seq.target - seq.rollout.length)
                )
            for seq in r.queue:
                events.append(self._report(seq, 0, finished=False))
            r.running.clear()
            r.finish.clear()
            r.queue.clear()
            r.ctx = 0
            r.t = self.clock
            r.epoch += 1
            if r.idle_since is None:
                r.idle_since = self.clock
        self._heap.clear()
        self._loads = [(0, i) for i in range(len(self.replicas))]
        self._in_flight = 0
        return events

    def idle_seconds(self) -> dict[str, float]:
        return {
            r.name: r.idle + (self.clock - r.idle_since if r.idle_since is not None else 0.0)
            for r in self.replicas
        }

    # -- the replicas -----------------------------------------------------------

    def _least_loaded(self) -> int:
        while True:
            load, i = self._loads[0]
            if load == self.replicas[i].load:
                return i
            heapq.heapreplace(self._loads, (self.replicas[i].load, i))

    def _report(self, seq: _Seq, made: int, *, finished: bool) -> Progress:
        m = seq.rollout
        self.tokens_generated += made
        return Progress(
            seq_id=m.seq_id,
            length=m.length + made,
            spans=extend_spans(m.spans, self.version, made),
            finished=finished,
            finish_reason=seq.reason if finished else "aborted",
        )

    def _advance_to(self, r: _Replica, t: float) -> None:
        """Whole steps done by ``t`` are kept; the step in flight restarts at ``t``."""
        if r.running:
            k = self.cost.steps_within(t - r.t, len(r.running), r.ctx)
            k = min(k, r.finish[0][0] - r.steps - 1)  # its next event is later than t
            r.steps += max(k, 0)
            r.ctx += max(k, 0) * len(r.running)
        r.t = max(r.t, t)

    def _complete(self, r: _Replica) -> list[Event]:
        """The replica reached its next event: advance to it and hand back what ended."""
        k = r.finish[0][0] - r.steps
        r.t += self.cost.steps_seconds(k, len(r.running), r.ctx)
        r.steps += k
        r.ctx += k * len(r.running)
        events: list[Event] = []
        while r.finish and r.finish[0][0] <= r.steps:
            _, seq_id = heapq.heappop(r.finish)
            seq = r.running.pop(seq_id)
            r.ctx -= seq.prompt_len + seq.target
            self._in_flight -= 1
            events.append(self._report(seq, seq.target - seq.rollout.length, finished=True))
        if events:
            heapq.heappush(self._loads, (r.load, r.index))
        if not r.running and not r.queue and r.idle_since is None:
            r.idle_since = r.t
        return events

    def _admit(self, r: _Replica) -> None:
        prefill = 0
        while r.queue and len(r.running) < self.max_num_seqs:
            seq = r.queue.popleft()
            seq.admit_step = r.steps
            r.running[seq.rollout.seq_id] = seq
            heapq.heappush(
                r.finish, (r.steps + seq.target - seq.rollout.length, seq.rollout.seq_id)
            )
            context = seq.prompt_len + seq.rollout.length
            r.ctx += context
            prefill += context
        if prefill:
            self.prefill_tokens += prefill
            r.t += self.cost.prefill_seconds(prefill)

    def _schedule(self, i: int) -> None:
        r = self.replicas[i]
        r.epoch += 1
        if r.running:
            k = r.finish[0][0] - r.steps
            t = r.t + self.cost.steps_seconds(k, len(r.running), r.ctx)
            heapq.heappush(self._heap, (t, r.epoch, i))


class SimGroupSource:
    """New groups with modelled prompt lengths (output lengths are drawn by the fleet)."""

    def __init__(self, lengths: LengthModel, *, seed: int, group_size: int):
        self.lengths = lengths
        self.seed = seed
        self.group_size = group_size

    def draw(self, serial: int, *, step: int) -> Group:
        gid = f"g{serial}"
        return Group(
            serial=serial,
            prompt_len=self.lengths.prompt_length(self.seed, gid),
            members=[Rollout(seq_id=f"{gid}-{m}", member=m) for m in range(self.group_size)],
            entered_step=step,
        )


@dataclass(frozen=True)
class TrainCostModel:
    """Training time of a step: FLOPs of the trained tokens at a measured achieved rate.

    Per sample of n = prompt + completion tokens: 8·N·n for the matmuls (forward
    and backward, 6N, plus the θ_old log-prob pass, 2N) and 4·layers·heads·(d_qk +
    d_v)·n² for causal attention (3 passes for training + 1 for θ_old, each
    layers·heads·(d_qk + d_v)·n² FLOPs). Architecture of DeepSeek-V3 (N = 37B
    active, 61 layers, 128 heads, d_qk = 192, d_v = 128). Achieved rate: its
    pre-training ran 14.8T tokens in 2.664M H800 GPU-hours, 1543 tokens/s per
    GPU, i.e. 6N × 1543 ≈ 3.4e14 FLOP/s per GPU (counting matmuls only).
    Weight sync: 671 GB of FP8 weights at 200 GB/s per node (8 × 400 Gb/s NICs
    at half their line rate), every node receiving in parallel.
    """

    active_params: float = 37e9
    layers: int = 61
    heads: int = 128
    head_dims: int = 192 + 128
    flops_per_gpu_s: float = 6 * 37e9 * 1543
    model_bytes: float = 671e9
    node_bandwidth_bytes_s: float = 200e9

    def train_seconds(self, sample_lengths: list[int], *, gpus: int) -> float:
        dense = 8 * self.active_params * sum(sample_lengths)
        attn = 4 * self.layers * self.heads * self.head_dims * sum(n * n for n in sample_lengths)
        return (dense + attn) / (self.flops_per_gpu_s * gpus)

    def sync_seconds(self) -> float:
        return self.model_bytes / self.node_bandwidth_bytes_s


@dataclass
class SimStep:
    step: int
    rollout_s: float
    train_s: float
    sync_s: float
    trained_tokens: int
    samples: int
    decision_s: float
    idle_frac: float
    """Mean over replicas of idle time / rollout-phase time."""
    report: IterationReport

    @property
    def e2e_s(self) -> float:
        return self.rollout_s + self.train_s + self.sync_s


@dataclass(frozen=True)
class SimJob:
    replicas: int = 256
    prompts_per_step: int = 480
    group_size: int = 8
    token_budget: int = 0
    """Φ; 0: the baseline's expected completion tokens per step."""
    pool_capacity: int = 0
    """Ω; 0: 2 × prompts_per_step × group_size (the job spec's default)."""
    retention_limit: int = 2
    seed: int = 0
    train_gpus: int = 0
    """0: colocated, 8 GPUs per replica train between rollout phases."""
    max_num_seqs: int = 256

    def settings(self, lengths: LengthModel) -> C3poSettings:
        batch = self.prompts_per_step * self.group_size
        return C3poSettings(
            token_budget=self.token_budget or int(batch * lengths.mean()),
            pool_capacity=self.pool_capacity or 2 * batch,
            retention_limit=self.retention_limit,
            group_size=self.group_size,
        )


def run_sim(
    mode: str,
    job: SimJob,
    *,
    steps: int,
    cost: DecodeCostModel | None = None,
    lengths: LengthModel | None = None,
    train: TrainCostModel | None = None,
) -> list[SimStep]:
    """Simulates ``steps`` steps of a job in ``mode`` ("sync" or "c3po")."""
    lengths = lengths or LengthModel()
    train = train or TrainCostModel()
    fleet = SimFleet(
        replicas=job.replicas,
        cost=cost,
        lengths=lengths,
        seed=job.seed,
        max_num_seqs=job.max_num_seqs,
    )
    settings = job.settings(lengths)
    pool = InferencePool()
    driver = IterationDriver(
        pool, SimGroupSource(lengths, seed=job.seed, group_size=job.group_size), settings
    )
    gpus = job.train_gpus or 8 * job.replicas
    out: list[SimStep] = []
    clock = 0.0
    for step in range(steps):
        fleet.begin(version=step, at=clock)
        if mode == "c3po":
            report = driver.run_c3po(fleet, step=step)
        elif mode == "sync":
            report = driver.run_sync(fleet, step=step, groups=job.prompts_per_step)
        else:
            raise ValueError(f"unknown mode {mode!r}; use 'sync' or 'c3po'")
        sample_lengths = [g.prompt_len + m.length for g in report.released for m in g.members]
        train_s = train.train_seconds(sample_lengths, gpus=gpus)
        sync_s = train.sync_seconds()
        idle = report.idle_seconds
        phase = report.rollout_seconds
        out.append(
            SimStep(
                step=step,
                rollout_s=phase,
                train_s=train_s,
                sync_s=sync_s,
                trained_tokens=report.trained_tokens,
                samples=sum(len(g.members) for g in report.released),
                decision_s=report.decision_seconds,
                idle_frac=(sum(idle.values()) / len(idle) / phase) if idle and phase else 0.0,
                report=report,
            )
        )
        clock = fleet.now() + train_s + sync_s
    return out
