"""A simulated rollout engine (kind ``sim``): no model, realistic timing and lengths.

Scheduling questions (how long a step's rollout phase takes, how idle replicas
are, what C3PO++ buys) depend on two things only: how long an engine step takes
for a given batch, and how long the outputs are. This module models both with
published numbers, and serves them behind the same ``RolloutEngine`` contract
as the PyTorch engine, so a replica process started with ``--engine sim`` speaks
the real gRPC protocol (Generate streams, Abort with partials, resume from a
prefix, LoadVersion through weight-sync) while costing almost no CPU.

Cost model (``DecodeCostModel``): one replica is one 8-GPU H100/H200-class node
serving a DeepSeek-V3/R1-sized MoE (671B total, 37B active parameters, MLA
attention) with vLLM. Time of one decode step with B sequences holding L tokens
of context in total::

    t(B, L) = base + per_seq · B + per_ctx_token · L

- base = 30 ms: time per output token of a lightly loaded node. DeepSeek's own
  V3/R1 inference system reports 20-22 output tokens/s per user (about 45-50 ms
  per token) under production load ("DeepSeek-V3/R1 Inference System Overview",
  2025); vLLM's single-node deployments are in the same range.
- per_seq = 0.2 ms: at B = 256 short sequences a node then makes ~3.2k output
  tokens/s, in line with published single-node vLLM results for DeepSeek-R1 on
  8×H200 (about 5.5k total - input plus output - tokens/s on ShareGPT; GPUStack
  performance lab, vLLM 0.11) and the ~5k total tokens/s the vLLM team quoted
  for ShareGPT at high concurrency.
- per_ctx_token = 5 ns: MLA keeps 576 values per token and layer (61 layers,
  2 bytes each, ~70 KB per token); reading them once per step at ~14 TB/s
  (about half the 8 GPUs' HBM peak) costs 5 ns per token of context.
- prefill = 30k tokens/s per node (DeepSeek quotes 73.7k/s per H800 node with
  its heavily optimised prefill cluster; a generic vLLM node is slower). Resumed
  sequences re-prefill prompt + prefix at this rate, so carry-over is not free.

Output lengths (``LengthModel``): response lengths of reasoning models in RL are
heavy-tailed and close to log-normal, with long tails within a prompt's group as
well as between prompts (RollPacker, arXiv 2509.21009; DARTS, arXiv 2605.30859).
length = min(cap, median · exp(σ_p·Z_prompt + σ_s·Z_sample)) with median 6000
tokens, σ_p = 0.6 (prompt difficulty, shared by the group), σ_s = 0.8 (sample)
and cap 65536: mean ≈ 9.9k tokens, ~1 % of samples truncated at the cap, the
longest of 3840 samples usually at the cap. Draws are a pure function of
(seed, group, member), so a sequence has the same fate on whichever replica and
in whichever scheduling mode it runs.

In a replica process time is virtual, scaled to wall time by ``time_scale``
(default 1e-3: a simulated second lasts a millisecond); lengths can be scaled
down (``length_scale``) so a CPU fleet runs the same shape quickly. The
in-process simulated fleet (``rlfleet.scheduler.c3po.sim``) uses the same two
models with a pure virtual clock.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from rlfleet.common.errors import FailedPrecondition, Unavailable
from rlfleet.rollout.engine import (
    FINISH_ABORTED,
    FINISH_LENGTH,
    FINISH_STOP,
    ResultCallback,
    RolloutEngine,
    Sampling,
    SeqRequest,
    SeqResult,
    require_model_dir,
    validate_generate,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecodeCostModel:
    """Seconds per engine step of one replica (see the module docstring for sources)."""

    base_s: float = 0.030
    per_seq_s: float = 0.0002
    per_ctx_token_s: float = 5e-9
    prefill_tokens_per_s: float = 30_000.0

    def step_seconds(self, batch: int, context_tokens: int) -> float:
        return self.base_s + self.per_seq_s * batch + self.per_ctx_token_s * context_tokens

    def steps_seconds(self, k: int, batch: int, context_tokens: int) -> float:
        """Time of k steps with a fixed batch whose context grows by ``batch`` per step."""
        if k <= 0:
            return 0.0
        first = self.step_seconds(batch, context_tokens)
        return k * first + self.per_ctx_token_s * batch * k * (k - 1) / 2

    def steps_within(self, seconds: float, batch: int, context_tokens: int) -> int:
        """The most whole steps that fit in ``seconds`` (inverse of ``steps_seconds``)."""
        if seconds <= 0:
            return 0
        a = self.per_ctx_token_s * batch / 2
        b = self.step_seconds(batch, context_tokens) - a
        if a <= 0:
            k = int(seconds / b)
        else:
            k = int((-b + math.sqrt(b * b + 4 * a * seconds)) / (2 * a))
        # Guard the float root against off-by-one either way.
        while k > 0 and self.steps_seconds(k, batch, context_tokens) > seconds:
            k -= 1
        while self.steps_seconds(k + 1, batch, context_tokens) <= seconds:
            k += 1
        return k

    def prefill_seconds(self, tokens: int) -> float:
        return tokens / self.prefill_tokens_per_s


_NORMAL = NormalDist()


def _normal_draw(seed: int, key: str) -> float:
    """A standard normal draw that is a pure function of (seed, key)."""
    digest = hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=8).digest()
    u = (int.from_bytes(digest, "little") + 0.5) / 2**64  # uniform in (0, 1)
    return _NORMAL.inv_cdf(u)


@dataclass(frozen=True)
class LengthModel:
    """Long-tailed output lengths of a reasoning model (see the module docstring)."""

    median: float = 6000.0
    sigma_prompt: float = 0.6
    sigma_sample: float = 0.8
    cap: int = 65536
    prompt_median: float = 400.0
    prompt_sigma: float = 0.5

    def output_length(self, seed: int, group: str, member: int) -> tuple[int, bool]:
        """(length, hit the cap) of ``member`` of ``group``: a pure function of its arguments."""
        z_prompt = _normal_draw(seed, f"prompt:{group}")
        z_sample = _normal_draw(seed, f"sample:{group}:{member}")
        raw = self.median * math.exp(self.sigma_prompt * z_prompt + self.sigma_sample * z_sample)
        n = max(1, int(round(raw)))
        return (self.cap, True) if n >= self.cap else (n, False)

    def prompt_length(self, seed: int, group: str) -> int:
        z = _normal_draw(seed, f"prompt-len:{group}")
        return max(1, int(round(self.prompt_median * math.exp(self.prompt_sigma * z))))

    def mean(self) -> float:
        """Mean length before the cap (log-normal)."""
        s2 = self.sigma_prompt**2 + self.sigma_sample**2
        return self.median * math.exp(s2 / 2)


class SimEngineSettings(BaseSettings):
    """Settings of the simulated engine in a replica process (env ``RLFLEET_ROLLOUT_SIM_*``)."""

    model_config = SettingsConfigDict(env_prefix="RLFLEET_ROLLOUT_SIM_", extra="ignore")

    time_scale: float = Field(default=1e-3, gt=0)
    """Wall seconds per simulated second."""
    length_scale: float = Field(default=1.0, gt=0)
    """Multiplies the length model's median and cap (e.g. 0.01 for a CPU fleet)."""
    seed: int = 0
    """Seed of the output-length draws (shared by every replica of a fleet)."""
    chunk_s: float = Field(default=0.02, gt=0)
    """Longest wall time simulated in one go (bounds how late an Abort is seen)."""


def _group_and_member(seq_id: str) -> tuple[str, int]:
    group, _, member = seq_id.rpartition("-")
    if group and member.isdigit():
        return group, int(member)
    return seq_id, 0


@dataclass(eq=False)
class _Call:
    seqs: Sequence[SeqRequest]
    sampling: Sampling
    abort: threading.Event
    on_result: ResultCallback
    outstanding: int
    next_index: int = 0
    """First sequence not yet admitted to the batch."""
    done: threading.Event = field(default_factory=threading.Event)


@dataclass(eq=False)
class _Row:
    call: _Call
    req: SeqRequest
    tokens: list[int]
    logprobs: list[float]
    versions: list[int]
    target: int
    """Completion length (prefix included) at which the row ends."""
    reason: str
    rng: random.Random


class SimEngine(RolloutEngine):
    """Continuous batching in scaled virtual time; tokens are random, lengths modelled."""

    kind = "sim"

    def __init__(
        self,
        *,
        max_batch_seqs: int = 256,
        cost: DecodeCostModel | None = None,
        lengths: LengthModel | None = None,
        settings: SimEngineSettings | None = None,
        **_ignored: Any,  # torch-engine settings (device, dtype, ...) mean nothing here
    ):
        self.settings = settings or SimEngineSettings()
        self.cost = cost or DecodeCostModel()
        base = lengths or LengthModel()
        scale = self.settings.length_scale
        self.lengths = LengthModel(
            median=base.median * scale,
            sigma_prompt=base.sigma_prompt,
            sigma_sample=base.sigma_sample,
            cap=max(2, int(base.cap * scale)),
            prompt_median=base.prompt_median,
            prompt_sigma=base.prompt_sigma,
        )
        self.max_batch_seqs = max_batch_seqs
        self._model_path = ""
        self._vocab = 0
        self._eos: list[int] = []
        self._version = 0
        self._cv = threading.Condition()
        self._pending: list[_Call] = []
        self._rows: list[_Row] = []
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="sim-engine", daemon=True)
        self._thread.start()

    # -- model and weights ----------------------------------------------------------

    def load_model(self, model_path: str) -> None:
        require_model_dir(model_path)
        path = Path(model_path) / "config.json"
        config = json.loads(path.read_text())
        eos = config.get("eos_token_id")
        with self._cv:
            if self._rows or self._pending:
                raise FailedPrecondition("cannot switch models while sequences are generating")
            self._model_path = str(Path(model_path))
            self._vocab = int(config.get("vocab_size") or 32000)
            self._eos = [eos] if isinstance(eos, int) else [int(e) for e in eos or []] or [0]
            self._version = 0

    def load_state_dict(self, state: Mapping[str, Any], version: int) -> None:
        if not self._model_path:
            raise FailedPrecondition("no model is loaded; load a model before its weights")
        with self._cv:  # between two simulated chunks: a chunk never mixes versions
            self._version = int(version)

    @property
    def loaded(self) -> bool:
        return bool(self._model_path)

    @property
    def model_path(self) -> str:
        return self._model_path

    @property
    def version(self) -> int:
        return self._version

    @property
    def vocab_size(self) -> int:
        return self._vocab

    # -- generation -------------------------------------------------------------------

    def generate(
        self,
        seqs: Sequence[SeqRequest],
        sampling: Sampling,
        *,
        abort: threading.Event,
        on_result: ResultCallback,
    ) -> None:
        if not self.loaded:
            raise FailedPrecondition("no model is loaded on this replica; call LoadVersion first")
        validate_generate(seqs, sampling, vocab_size=self._vocab)
        if not seqs:
            return
        call = _Call(list(seqs), sampling, abort, on_result, outstanding=len(seqs))
        with self._cv:
            if self._closed:
                raise Unavailable("the rollout engine is shutting down")
            self._pending.append(call)
            self._cv.notify_all()
        call.done.wait()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout=10)

    # -- engine thread ----------------------------------------------------------------

    def _new_row(self, call: _Call, seq: SeqRequest) -> _Row:
        group, member = _group_and_member(seq.seq_id)
        length, capped = self.lengths.output_length(self.settings.seed, group, member)
        limit = seq.limit(call.sampling)
        target, reason = (length, FINISH_LENGTH if capped else FINISH_STOP)
        if limit <= target:
            target, reason = limit, FINISH_LENGTH
        digest = hashlib.blake2b(
            f"{call.sampling.seed}\x00{seq.seq_id}\x00{len(seq.prefix_token_ids)}".encode(),
            digest_size=8,
        ).digest()
        return _Row(
            call,
            seq,
            list(seq.prefix_token_ids),
            list(seq.prefix_logprobs),
            list(seq.prefix_versions),
            max(target, len(seq.prefix_token_ids)),
            reason,
            random.Random(int.from_bytes(digest, "little")),
        )

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._closed and not self._rows and not self._pending:
                    self._cv.wait()
                if self._closed:
                    break
                admitted = self._admit()
            try:
                self._run_chunk(admitted)
            except Exception:  # noqa: BLE001 - keep serving; the calls involved end
                logger.exception("simulated generation step failed")
        with self._cv:
            rows, self._rows = self._rows, []
            pending, self._pending = self._pending, []
        for row in rows:
            self._emit(row, finished=False, reason=FINISH_ABORTED)
        for call in pending:
            for seq in call.seqs[call.next_index :]:
                self._emit(self._new_row(call, seq), finished=False, reason=FINISH_ABORTED)

    def _admit(self) -> list[_Row]:
        """Moves queued sequences into the batch (caller holds the lock)."""
        new: list[_Row] = []
        while self._pending and len(self._rows) < self.max_batch_seqs:
            call = self._pending[0]
            row = self._new_row(call, call.seqs[call.next_index])
            call.next_index += 1
            if call.next_index == len(call.seqs):
                self._pending.pop(0)
            self._rows.append(row)
            new.append(row)
        return new

    def _sleep(self, seconds: float) -> float:
        """Waits up to ``seconds`` of wall time (less on abort or close); returns the time waited."""
        end = time.monotonic() + seconds
        with self._cv:
            while not self._closed:
                left = end - time.monotonic()
                if left <= 0 or self._interrupting():
                    break
                self._cv.wait(min(left, 0.005))
        return seconds - max(0.0, end - time.monotonic())

    def _interrupting(self) -> bool:
        return any(r.call.abort.is_set() for r in self._rows) or any(
            c.abort.is_set() for c in self._pending
        )

    def _run_chunk(self, admitted: list[_Row]) -> None:
        scale = self.settings.time_scale
        self._drop_aborted()
        if admitted:
            prefill = sum(len(r.req.prompt_token_ids) + len(r.tokens) for r in admitted)
            self._sleep(self.cost.prefill_seconds(prefill) * scale)
            self._finish_ready()
        with self._cv:
            rows = list(self._rows)
        if not rows:
            return
        batch = len(rows)
        context = sum(len(r.req.prompt_token_ids) + len(r.tokens) for r in rows)
        k = min(r.target - len(r.tokens) for r in rows)
        k = max(1, min(k, self.cost.steps_within(self.settings.chunk_s / scale, batch, context)))
        slept = self._sleep(self.cost.steps_seconds(k, batch, context) * scale)
        done = max(0, min(k, self.cost.steps_within(slept / scale + 1e-12, batch, context)))
        if done:
            with self._cv:
                version = self._version
            for row in rows:
                self._append(row, done, version)
        self._drop_aborted()
        self._finish_ready()

    def _append(self, row: _Row, n: int, version: int) -> None:
        n = min(n, row.target - len(row.tokens))
        for _ in range(n):
            last = len(row.tokens) + 1 == row.target
            if last and row.reason == FINISH_STOP:
                token = self._eos[0]
            else:
                token = row.rng.randrange(self._vocab)
                while token in self._eos:
                    token = row.rng.randrange(self._vocab)
            row.tokens.append(token)
            # A stand-in value: no model computes it (the sim engine is for scheduling studies).
            row.logprobs.append(-math.log(max(self._vocab, 2)))
            row.versions.append(version)

    def _finish_ready(self) -> None:
        with self._cv:
            done = [r for r in self._rows if len(r.tokens) >= r.target]
            self._rows = [r for r in self._rows if len(r.tokens) < r.target]
        for row in done:
            self._emit(row, finished=True, reason=row.reason)

    def _drop_aborted(self) -> None:
        with self._cv:
            rows = [r for r in self._rows if r.call.abort.is_set()]
            self._rows = [r for r in self._rows if not r.call.abort.is_set()]
            calls = [c for c in self._pending if c.abort.is_set()]
            self._pending = [c for c in self._pending if not c.abort.is_set()]
        for row in rows:
            self._emit(row, finished=False, reason=FINISH_ABORTED)
        for call in calls:
            for seq in call.seqs[call.next_index :]:
                self._emit(self._new_row(call, seq), finished=False, reason=FINISH_ABORTED)

    def _emit(self, row: _Row, *, finished: bool, reason: str) -> None:
        call = row.call
        try:
            call.on_result(
                SeqResult(
                    seq_id=row.req.seq_id,
                    token_ids=row.tokens,
                    logprobs=row.logprobs,
                    versions=row.versions,
                    finished=finished,
                    finish_reason=reason,
                    num_prefix_tokens=len(row.req.prefix_token_ids),
                )
            )
        except Exception:  # noqa: BLE001 - a caller's callback must not stop the engine
            logger.exception("on_result callback failed", extra={"seq_id": row.req.seq_id})
        call.outstanding -= 1
        if call.outstanding == 0:
            call.done.set()
