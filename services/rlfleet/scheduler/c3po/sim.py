"""A simulated rollout fleet with a virtual clock, for the real C3PO++ driver at scale.

``SimFleet`` is a ``RolloutBackend``: the unchanged ``IterationDriver`` and
``InferencePool`` (the code the scheduler runs in production) drive it, but
instead of gRPC streams it runs a discrete-event simulation of N replicas, each
a continuous-batching engine timed by ``rollout.sim_engine.DecodeCostModel``
with output lengths from ``LengthModel``. Nothing is decoded token by token: a
replica's batch is constant between two of its events (a sequence ends, one is
admitted, a version is loaded, the fleet is aborted), and the time of k steps of
a constant batch has a closed form, so an event costs O(log n) whatever the
lengths. Hundreds of replicas and thousands of 64K-token sequences simulate in
about a second per step on one CPU core.

Modelling choices (docs/C3PO.md has the numbers):
- an admission takes effect at the time it is made: the step in flight on that
  replica is restarted with the new batch (at most one step lost) and the
  replica then spends the prefill time of prompt + prefix before decoding on;
- a replica runs at most ``max_num_seqs`` sequences (vLLM's default 256); more
  wait in its queue in arrival order;
- after an abort, a sequence keeps the tokens of the whole steps it completed;
- a new version is loaded in flight (``load_version``, overlapped scheduling):
  like an admission, the step in flight restarts; every replica then pauses for
  the load, and the tokens generated before it keep the old version.

The clock moves only in ``wait`` (to the next event, whatever the timeout: in a
virtual clock nothing happens between events, so waiting there is free) and in
``advance`` (the job simulation moving through a training phase while the
replicas keep generating; what ends meanwhile is queued). ``wait(0.0)`` returns
what is queued and what ends at the present instant, never advancing.

``run_sim`` drives whole jobs (rollout, then modelled training and weight sync)
in three modes: ``sync`` (the budget-free baseline), ``c3po`` and ``overlap``
(C3PO++ with rollout overlapping training on separate GPUs).
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
from rlfleet.scheduler.c3po.pool import (
    Group,
    InferencePool,
    Progress,
    Rollout,
    Spans,
    extend_spans,
)

MODES = ("sync", "c3po", "overlap")


@dataclass(eq=False)
class _Seq:
    rollout: Rollout
    prompt_len: int
    target: int
    """Completion length (prefix included) at which the sequence ends."""
    reason: str
    base: int
    """Completion tokens it had when submitted (a carried prefix)."""
    spans: Spans
    """Versions of its tokens up to ``recorded`` tokens made here."""
    admit_step: int = 0
    recorded: int = 0
    """Tokens made on this replica whose versions are already in ``spans`` (a version
    was loaded while it ran)."""


@dataclass(eq=False)
class _Replica:
    name: str
    index: int
    t: float = 0.0
    """Virtual time of the replica's last step boundary (later than the clock while it
    prefills or loads a version)."""
    steps: int = 0
    ctx: int = 0
    """Context tokens of the running batch at ``t``."""
    running: dict[str, _Seq] = field(default_factory=dict)
    finish: list[tuple[int, str]] = field(default_factory=list)
    """Heap of (step at which a running sequence ends, seq_id)."""
    queue: deque = field(default_factory=deque)
    epoch: int = 0
    idle: float = 0.0
    """Seconds with nothing to generate since the fleet was built (closed intervals)."""
    idle_since: float | None = 0.0
    idle_mark: float = 0.0
    """``idle`` at the start of the current rollout phase (``begin``)."""
    paused_until: float = 0.0
    """End of the last version load (an abort does not shorten it)."""

    @property
    def load(self) -> int:
        return len(self.running) + len(self.queue)

    def idle_total(self, now: float) -> float:
        return self.idle + (now - self.idle_since if self.idle_since is not None else 0.0)


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
        self._queued: list[Event] = []
        """Reports of sequences that ended during ``advance``, not yet handed out."""
        self.tokens_generated = 0
        self.prefill_tokens = 0
        self.aborts = 0
        """Fleet-wide aborts so far (every replica stopped, partials handed back)."""

    # -- phase control (called by the job simulation, not the driver) ----------

    def begin(self, *, version: int, at: float) -> None:
        """A rollout phase starts at virtual time ``at`` with ``version`` on every replica
        (nothing running: the previous phase was aborted). Idle time counts from here."""
        self.version = version
        self.clock = max(self.clock, at)
        for r in self.replicas:
            r.t = max(r.t, self.clock)
            r.idle_mark = r.idle_total(self.clock)

    def advance(self, to: float) -> None:
        """Moves the clock to ``to`` while the replicas keep generating what they hold
        (no new work arrives). Sequences that end meanwhile are reported by the next
        ``wait`` (or ``abort``)."""
        self._run_until(to)
        self.clock = max(self.clock, to)

    def load_version(self, version: int, *, pause_s: float = 0.0) -> None:
        """Every replica loads ``version`` now, between two engine steps, and pauses
        ``pause_s`` for the load. Tokens generated so far keep the version that made
        them; tokens after the load carry ``version``."""
        self._run_until(self.clock)
        for i, r in enumerate(self.replicas):
            if r.running:
                self._advance_to(r, self.clock)
                for seq in r.running.values():
                    made = r.steps - seq.admit_step
                    seq.spans = extend_spans(seq.spans, self.version, made - seq.recorded)
                    seq.recorded = made
            r.paused_until = self.clock + pause_s
            r.t = max(r.t, r.paused_until)
            if r.running:
                self._schedule(i)
        self.version = version

    # -- RolloutBackend -------------------------------------------------------

    def now(self) -> float:
        return self.clock

    @property
    def in_flight(self) -> int:
        return self._in_flight + len(self._queued)

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
                r.queue.append(
                    _Seq(
                        m,
                        group.prompt_len,
                        target,
                        "length" if capped else "stop",
                        base=m.length,
                        spans=[list(s) for s in m.spans],
                    )
                )
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
        """What ended and is not reported yet. With ``timeout`` > 0 and nothing queued,
        the clock moves to the next event (virtual time: waiting is free); with
        ``timeout`` <= 0, only what ends at or before the present instant."""
        if timeout <= 0:
            self._run_until(self.clock)
            return self._drain()
        if self._queued:
            return self._drain()
        while self._heap:
            t, epoch, i = heapq.heappop(self._heap)
            r = self.replicas[i]
            if epoch != r.epoch:
                continue
            self.clock = max(self.clock, t)
            events = self._step_replica(i)
            if events:
                return events
        return []

    def abort(self) -> list[Event]:
        self.aborts += 1
        self._run_until(self.clock)
        events: list[Event] = self._drain()
        for r in self.replicas:
            if r.running:
                k = self.cost.steps_within(self.clock - r.t, len(r.running), r.ctx)
                k = min(k, r.finish[0][0] - r.steps)
                r.steps += k
            for seq in r.running.values():
                made = min(r.steps - seq.admit_step, seq.target - seq.base)
                events.append(self._report(seq, made, finished=made >= seq.target - seq.base))
            for seq in r.queue:
                events.append(self._report(seq, 0, finished=False))
            r.running.clear()
            r.finish.clear()
            r.queue.clear()
            r.ctx = 0
            r.t = max(self.clock, r.paused_until)
            r.epoch += 1
            if r.idle_since is None:
                r.idle_since = self.clock
        self._heap.clear()
        self._loads = [(0, i) for i in range(len(self.replicas))]
        self._in_flight = 0
        return events

    def idle_seconds(self) -> dict[str, float]:
        """Per replica: idle time since the current rollout phase began (``begin``)."""
        return {r.name: r.idle_total(self.clock) - r.idle_mark for r in self.replicas}

    def idle_total(self) -> float:
        """Replica-seconds with nothing to generate since the fleet was built."""
        return sum(r.idle_total(self.clock) for r in self.replicas)

    # -- the replicas -----------------------------------------------------------

    def _drain(self) -> list[Event]:
        out, self._queued = self._queued, []
        return out

    def _run_until(self, t: float) -> None:
        """Processes every replica event at or before ``t``; their reports are queued."""
        while self._heap and self._heap[0][0] <= t:
            te, epoch, i = heapq.heappop(self._heap)
            if epoch != self.replicas[i].epoch:
                continue
            self.clock = max(self.clock, te)
            self._queued += self._step_replica(i)

    def _step_replica(self, i: int) -> list[Event]:
        r = self.replicas[i]
        events = self._complete(r)
        self._admit(r)
        self._schedule(i)
        return events

    def _least_loaded(self) -> int:
        while True:
            load, i = self._loads[0]
            if load == self.replicas[i].load:
                return i
            heapq.heapreplace(self._loads, (self.replicas[i].load, i))

    def _report(self, seq: _Seq, made: int, *, finished: bool) -> Progress:
        """``made``: tokens the sequence generated on this replica (all of them, including
        those already recorded at a version load)."""
        self.tokens_generated += made
        return Progress(
            seq_id=seq.rollout.seq_id,
            length=seq.base + made,
            spans=extend_spans(seq.spans, self.version, made - seq.recorded),
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
            events.append(self._report(seq, seq.target - seq.base, finished=True))
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
            heapq.heappush(r.finish, (r.steps + seq.target - seq.base, seq.rollout.seq_id))
            context = seq.prompt_len + seq.base
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


DEEPSEEK_V3_PRETRAIN_FLOPS = 6 * 37e9 * 1543
"""Achieved model FLOP/s per H800 in DeepSeek-V3's pre-training (14.8T tokens in 2.664M
GPU-hours: 1,543 tokens/s per GPU, counting 6N per token): FP8, 4K sequences, an
in-house stack tuned for that model and cluster. The best published rate for this model."""


@dataclass(frozen=True)
class TrainCostModel:
    """Training time of a step: FLOPs of the trained tokens at an achieved rate.

    Per sample of n = prompt + completion tokens: 8·N·n for the matmuls (forward
    and backward, 6N, plus the θ_old log-prob pass, 2N) and 4·layers·heads·(d_qk +
    d_v)·n² for causal attention (3 passes for training + 1 for θ_old, each
    layers·heads·(d_qk + d_v)·n² FLOPs). Architecture of DeepSeek-V3 (N = 37B
    active, 61 layers, 128 heads, d_qk = 192, d_v = 128). Achieved rate by default:
    DeepSeek-V3's pre-training, ≈ 3.4e14 FLOP/s per GPU (matmuls only, see
    ``DEEPSEEK_V3_PRETRAIN_FLOPS``); docs/C3PO.md gives the slower rate the
    paper-conditions configuration assumes, and why.
    Weight sync: 671 GB of FP8 weights at 200 GB/s per node (8 × 400 Gb/s NICs
    at half their line rate), every node receiving in parallel. Overlapped, the
    transfer lands in host memory while the replica decodes, then the replica
    pauses to copy the weights into HBM (``load_pause_seconds``: 84 GB per GPU at
    50 GB/s, PCIe 5.0 x16 at ~80 % of its 64 GB/s): the whole model does not fit
    twice in HBM next to the KV cache.
    """

    active_params: float = 37e9
    layers: int = 61
    heads: int = 128
    head_dims: int = 192 + 128
    flops_per_gpu_s: float = DEEPSEEK_V3_PRETRAIN_FLOPS
    model_bytes: float = 671e9
    node_bandwidth_bytes_s: float = 200e9
    gpus_per_node: int = 8
    h2d_bytes_s: float = 50e9

    def train_flops(self, sample_lengths: list[int]) -> float:
        dense = 8 * self.active_params * sum(sample_lengths)
        attn = 4 * self.layers * self.heads * self.head_dims * sum(n * n for n in sample_lengths)
        return dense + attn

    def train_seconds(self, sample_lengths: list[int], *, gpus: int) -> float:
        return self.train_flops(sample_lengths) / (self.flops_per_gpu_s * gpus)

    def sync_seconds(self) -> float:
        return self.model_bytes / self.node_bandwidth_bytes_s

    def load_pause_seconds(self) -> float:
        """Overlapped only: the replica's pause to copy the received weights into HBM."""
        return self.model_bytes / self.gpus_per_node / self.h2d_bytes_s


@dataclass
class SimStep:
    step: int
    rollout_s: float
    """Iteration start (the version loaded) to the budget (sync: to the last sequence)."""
    train_s: float
    sync_s: float
    trained_tokens: int
    samples: int
    decision_s: float
    idle_frac: float
    """Mean over replicas of idle time / rollout-phase time."""
    report: IterationReport
    step_s: float = 0.0
    """End to end: rollout + train + sync; overlapped, the time between this iteration's
    end and the previous one's (training ran while the replicas generated)."""
    busy_frac: float = 0.0
    """Share of the rollout replicas' time over ``step_s`` with something to generate
    (decoding, prefilling, or loading a version in flight)."""
    train_flops: float = 0.0
    generated_tokens: int = 0
    """Completion tokens the replicas reported since the previous iteration ended
    (trained, waiting, carried, or purged later)."""

    @property
    def e2e_s(self) -> float:
        return self.step_s or self.rollout_s + self.train_s + self.sync_s


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
    max_staleness: int | None = None
    """None: no bound in sync/c3po; σ + 1 overlapped (the job spec's default)."""
    seed: int = 0
    train_gpus: int = 0
    """0: colocated, the 8 GPUs of every replica train between rollout phases. > 0:
    disaggregated, a separate pool of that many GPUs trains while the replicas wait
    (sync, c3po) or keep generating (overlap)."""
    max_num_seqs: int = 256
    refill_batch: int = 0
    """Free slots P waits for before a refill while rollouts run; 0: the job spec's
    default, max(group_size, Ω / 4) (``C3poSettings.from_spec``)."""

    def settings(self, lengths: LengthModel, *, overlap: bool = False) -> C3poSettings:
        """The driver's settings as ``C3poSettings.from_spec`` would give them for the
        equivalent job spec (its defaults included)."""
        batch = self.prompts_per_step * self.group_size
        capacity = self.pool_capacity or 2 * batch
        staleness = self.max_staleness
        if overlap and staleness is None:
            staleness = self.retention_limit + 1
        return C3poSettings(
            token_budget=self.token_budget or int(batch * lengths.mean()),
            pool_capacity=capacity,
            retention_limit=self.retention_limit,
            group_size=self.group_size,
            overlap=overlap,
            max_staleness=staleness,
            refill_batch=self.refill_batch or max(self.group_size, capacity // 4),
        )


@dataclass
class SimRun:
    """What ``run_sim`` leaves behind besides the steps (for tests and accounting)."""

    fleet: SimFleet | None = None
    pool: InferencePool | None = None
    driver: IterationDriver | None = None


def run_sim(
    mode: str,
    job: SimJob,
    *,
    steps: int,
    cost: DecodeCostModel | None = None,
    lengths: LengthModel | None = None,
    train: TrainCostModel | None = None,
    state: SimRun | None = None,
) -> list[SimStep]:
    """Simulates ``steps`` steps of a job in ``mode``: "sync" (budget-free baseline),
    "c3po", or "overlap" (C3PO++ with rollout overlapping training; needs
    ``job.train_gpus`` > 0). ``state``, if given, receives the fleet, pool and driver."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    overlap = mode == "overlap"
    if overlap and job.train_gpus <= 0:
        raise ValueError(
            "overlap needs training on its own GPUs (SimJob.train_gpus > 0): colocated "
            "replicas cannot generate while they train"
        )
    lengths = lengths or LengthModel()
    train = train or TrainCostModel()
    fleet = SimFleet(
        replicas=job.replicas,
        cost=cost,
        lengths=lengths,
        seed=job.seed,
        max_num_seqs=job.max_num_seqs,
    )
    settings = job.settings(lengths, overlap=overlap)
    pool = InferencePool()
    driver = IterationDriver(
        pool, SimGroupSource(lengths, seed=job.seed, group_size=job.group_size), settings
    )
    if state is not None:
        state.fleet, state.pool, state.driver = fleet, pool, driver
    gpus = job.train_gpus or 8 * job.replicas
    n = job.replicas
    out: list[SimStep] = []
    clock = 0.0
    prev_end, prev_idle, generated = 0.0, 0.0, 0
    fleet.begin(version=0, at=0.0)
    for step in range(steps):
        if overlap:
            report = driver.run_c3po(fleet, step=step, version=step)
        else:
            fleet.begin(version=step, at=clock)
            if mode == "c3po":
                report = driver.run_c3po(fleet, step=step, version=step)
            else:
                report = driver.run_sync(fleet, step=step, groups=job.prompts_per_step)
        end = fleet.now()
        made, generated = fleet.tokens_generated - generated, fleet.tokens_generated
        sample_lengths = [g.prompt_len + m.length for g in report.released for m in g.members]
        flops = train.train_flops(sample_lengths)
        train_s = train.train_seconds(sample_lengths, gpus=gpus)
        sync_s = train.sync_seconds()
        idle = report.idle_seconds
        phase = report.rollout_seconds
        if overlap:
            step_s = end - prev_end
            idle_now = fleet.idle_total()
            busy_s = n * step_s - (idle_now - prev_idle)
            # The trainer trains on Q_t while the replicas generate on under version t;
            # the weights reach them (sync_s), then every replica loads t + 1 between
            # two engine steps and the next iteration starts once they all have.
            fleet.advance(end + train_s + sync_s)
            pause = train.load_pause_seconds()
            fleet.load_version(step + 1, pause_s=pause)
            fleet.advance(fleet.now() + pause)
            prev_end, prev_idle = end, idle_now
        else:
            step_s = phase + train_s + sync_s
            busy_s = n * phase - sum(idle.values())
            clock = end + train_s + sync_s
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
                step_s=step_s,
                busy_frac=busy_s / (n * step_s) if step_s else 0.0,
                train_flops=flops,
                generated_tokens=made,
            )
        )
    return out
