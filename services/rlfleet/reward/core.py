"""Scoring a batch of finished trajectories, transport-agnostic.

Why it is shaped this way
- A batch is scored concurrently in one shared thread pool: verifiers are
  independent per sample, and math-verify / sympy calls can be slow.
- A verifier that raises on one sample costs that sample (reward 0, logged and
  counted), never the batch: one odd completion must not stall a training step.
- A ``batched`` verifier (a reward model) is the exception: it scores the whole
  request in one call on one pool thread, under the same deadline, and a raise or
  a timeout costs every sample of that request (all score 0, logged and counted).
- Everything a caller can get wrong (verifier name, its settings, task JSON,
  ids) is checked before anything is scored or written, and refused as
  InvalidArgument naming the field.
- Writing to the buffer is idempotent by ``sample_id`` (the buffer dedupes), so
  the scheduler can simply retry a Score call that failed halfway, including
  on ResourceExhausted when the job's stream is full.
"""

from __future__ import annotations

import json
import logging
import math
import time
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import redis
from prometheus_client import Counter, Histogram
from pydantic import ValidationError

from rlfleet.common.buffer import ExperienceBuffer
from rlfleet.common.errors import FailedPrecondition, InvalidArgument, Unavailable
from rlfleet.common.jobspec import RewardSpec
from rlfleet.reward.verifiers import VERIFIERS, Verifier, setup_verifier
from rlfleet.v1.common_pb2 import Sample

logger = logging.getLogger(__name__)

SAMPLES_SCORED = Counter("rlfleet_reward_samples_scored_total", "Samples scored.", ["verifier"])
REWARDS = Histogram(
    "rlfleet_reward_reward",
    "Rewards given.",
    ["verifier"],
    buckets=(0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
)
VERIFIER_ERRORS = Counter(
    "rlfleet_reward_verifier_errors_total",
    "Samples whose verifier raised or ran past the deadline (scored 0).",
    ["verifier", "reason"],
)
SAMPLES_WRITTEN = Counter(
    "rlfleet_reward_samples_written_total", "Scored samples appended to the experience buffer."
)
SCORE_SECONDS = Histogram(
    "rlfleet_reward_batch_seconds",
    "Time to score one batch (without the buffer write).",
    ["verifier"],
    buckets=(0.001, 0.01, 0.05, 0.1, 0.5, 1, 2, 5, 15, 60),
)


@dataclass(frozen=True)
class ScoreResult:
    rewards: list[float]
    """In request order."""
    written: int
    """Samples newly appended to the buffer (a repeat of an id is not counted)."""
    terms: dict[str, list[float]] = field(default_factory=dict)
    """A combined verifier's score per term and sample, in request order."""


def parse_verifier_config(text: str) -> dict[str, Any]:
    """``verifier_config_json`` as a dict; empty means no settings."""
    if not text.strip():
        return {}
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"verifier_config_json is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise InvalidArgument("verifier_config_json must be a JSON object")
    return config


def _own_settings(kind: str, config: dict[str, Any]) -> dict[str, Any]:
    """The settings meant for verifier ``kind``.

    The scheduler may send the job's whole ``RewardSpec`` as the config
    (``{"verifier": ..., "pattern": ...}``): its ``verifier`` must agree with
    the request, and RewardSpec fields that belong to other verifiers (an empty
    ``pattern`` for "math") are dropped. Any other unknown key stays, so the
    verifier's own model refuses it (typos are caught).
    """
    config = dict(config)
    named = config.pop("verifier", kind)
    if named != kind:
        raise InvalidArgument(
            f"verifier_config_json names verifier {named!r} but the request's verifier is {kind!r}"
        )
    # A reward model's settings sit in RewardSpec.reward_model; a shared ``extract``
    # applies unless they set their own.
    nested = config.get("reward_model") if kind == "reward_model" else None
    if nested is not None and not isinstance(nested, dict):
        raise InvalidArgument("verifier_config_json: reward_model must be a JSON object")
    own = VERIFIERS[kind].config_model.model_fields
    for key in RewardSpec.model_fields:
        if key not in own:
            config.pop(key, None)
    if nested is not None:
        config.pop("reward_model", None)
        config.update(nested)
    return config


def _build_verifier(kind: str, config: dict[str, Any]) -> Verifier:
    if kind not in VERIFIERS:
        raise InvalidArgument(
            f"verifier {kind!r} is unknown; known verifiers: {', '.join(sorted(VERIFIERS))}"
        )
    config = _own_settings(kind, config)
    try:
        return setup_verifier(kind, config)
    except ValidationError as exc:
        parts = [f"{'.'.join(map(str, e['loc'])) or '(root)'}: {e['msg']}" for e in exc.errors()]
        raise InvalidArgument(
            f"verifier_config_json for {kind!r} is invalid: " + "; ".join(parts)
        ) from None
    except ValueError as exc:
        raise InvalidArgument(f"verifier_config_json for {kind!r} is invalid: {exc}") from None


def _entry_of(index: int, sample: Sample, verifier: Verifier) -> dict[str, Any]:
    if not sample.task_json.strip():
        entry: Any = {}
    else:
        try:
            entry = json.loads(sample.task_json)
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"samples[{index}].task_json is not valid JSON: {exc}") from None
    if not isinstance(entry, dict):
        raise InvalidArgument(f"samples[{index}].task_json must be a JSON object")
    try:
        verifier.check_entry(entry)
    except ValueError as exc:
        raise InvalidArgument(
            f"samples[{index}].task_json cannot be scored by {verifier.kind!r}: it {exc}"
        ) from None
    return entry


def _check_writable(job_id: str, samples: list[Sample]) -> None:
    if not job_id:
        raise InvalidArgument("job_id is required when write_to_buffer is set")
    seen: set[str] = set()
    for i, s in enumerate(samples):
        if not s.sample_id:
            raise InvalidArgument(f"samples[{i}].sample_id is empty; the buffer dedupes by it")
        if s.sample_id in seen:
            raise InvalidArgument(f"samples[{i}].sample_id {s.sample_id!r} appears twice")
        seen.add(s.sample_id)
        if s.job_id and s.job_id != job_id:
            raise InvalidArgument(
                f"samples[{i}].job_id {s.job_id!r} differs from the request's job_id {job_id!r}"
            )


class RewardCore:
    """Scores samples with a verifier and optionally writes them to the buffer."""

    def __init__(
        self,
        *,
        buffer: ExperienceBuffer | None,
        max_workers: int = 8,
        score_timeout_s: float = 120.0,
    ):
        self.buffer = buffer
        self.score_timeout_s = score_timeout_s
        self._pool = futures.ThreadPoolExecutor(
            max_workers=max_workers, thread_name_prefix="verifier"
        )

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def score(
        self,
        *,
        job_id: str,
        verifier: str,
        verifier_config: dict[str, Any] | None,
        samples: list[Sample],
        write_to_buffer: bool,
    ) -> ScoreResult:
        checker = _build_verifier(verifier, verifier_config or {})
        if write_to_buffer:
            if self.buffer is None:
                raise FailedPrecondition("this reward service has no experience buffer configured")
            _check_writable(job_id, samples)
        entries = [_entry_of(i, s, checker) for i, s in enumerate(samples)]

        start = time.perf_counter()
        scored_terms = self._score_all(checker, samples, entries)
        rewards = [reward for reward, _ in scored_terms]
        names = sorted({name for _, terms in scored_terms for name in terms})
        terms = {n: [t.get(n, 0.0) for _, t in scored_terms] for n in names}
        SCORE_SECONDS.labels(verifier).observe(time.perf_counter() - start)
        SAMPLES_SCORED.labels(verifier).inc(len(samples))
        for r in rewards:
            REWARDS.labels(verifier).observe(r)

        written = 0
        if write_to_buffer and samples:
            scored = []
            for s, r in zip(samples, rewards, strict=True):
                out = Sample()
                out.CopyFrom(s)
                out.job_id = job_id
                out.reward = r
                scored.append(out)
            written = self._append(job_id, scored)
        return ScoreResult(rewards=rewards, written=written, terms=terms)

    def _score_all(
        self, checker: Verifier, samples: list[Sample], entries: list[dict[str, Any]]
    ) -> list[tuple[float, dict[str, float]]]:
        """(reward, score per term) per sample; a late or failed sample scores 0."""
        if checker.batched:
            return self._score_batched(checker, samples, entries)
        pending = [
            self._pool.submit(self._score_one, checker, s, e)
            for s, e in zip(samples, entries, strict=True)
        ]
        done, late = futures.wait(pending, timeout=self.score_timeout_s)
        if late:
            # Python cannot stop a running thread; the late ones finish in the
            # background and their results are dropped.
            VERIFIER_ERRORS.labels(checker.kind, "timeout").inc(len(late))
            logger.warning(
                "verifier ran past the deadline; those samples score 0",
                extra={"verifier": checker.kind, "late": len(late)},
            )
            for f in late:
                f.cancel()
        return [f.result() if f in done else (0.0, {}) for f in pending]

    def _score_batched(
        self, checker: Verifier, samples: list[Sample], entries: list[dict[str, Any]]
    ) -> list[tuple[float, dict[str, float]]]:
        """One call for the whole batch; a raise or the deadline costs every sample."""
        if not samples:
            return []
        failed: list[tuple[float, dict[str, float]]] = [(0.0, {}) for _ in samples]
        texts = [s.completion_text for s in samples]
        pending = self._pool.submit(checker.score_batch_with_terms, texts, entries)
        done, _ = futures.wait([pending], timeout=self.score_timeout_s)
        if not done:
            VERIFIER_ERRORS.labels(checker.kind, "timeout").inc(len(samples))
            logger.warning(
                "verifier ran past the deadline; every sample of the batch scores 0",
                extra={"verifier": checker.kind, "late": len(samples)},
            )
            pending.cancel()
            return failed
        try:
            scored = [(float(reward), terms) for reward, terms in pending.result()]
            if len(scored) != len(samples):
                raise ValueError(f"gave {len(scored)} scores for {len(samples)} samples")
        except Exception:  # noqa: BLE001 - a failed batch scores 0, the call goes on
            VERIFIER_ERRORS.labels(checker.kind, "exception").inc(len(samples))
            logger.warning(
                "verifier raised; every sample of the batch scores 0",
                exc_info=True,
                extra={"verifier": checker.kind, "samples": len(samples)},
            )
            return failed
        out = []
        for reward, terms in scored:
            if math.isfinite(reward):
                out.append((reward, terms))
            else:
                VERIFIER_ERRORS.labels(checker.kind, "not_finite").inc()
                out.append((0.0, {}))
        return out

    @staticmethod
    def _score_one(
        checker: Verifier, sample: Sample, entry: dict[str, Any]
    ) -> tuple[float, dict[str, float]]:
        try:
            reward, terms = checker.score_with_terms(sample.completion_text, entry)
            reward = float(reward)
        except Exception:  # noqa: BLE001 - one bad sample must not fail the batch
            VERIFIER_ERRORS.labels(checker.kind, "exception").inc()
            logger.warning(
                "verifier raised; the sample scores 0",
                exc_info=True,
                extra={"verifier": checker.kind, "sample_id": sample.sample_id},
            )
            return 0.0, {}
        if not math.isfinite(reward):
            VERIFIER_ERRORS.labels(checker.kind, "not_finite").inc()
            return 0.0, {}
        return reward, terms

    def write(self, *, job_id: str, samples: list[Sample]) -> int:
        """Appends samples unscored (an SFT job's demonstrations); returns how many were new."""
        if self.buffer is None:
            raise FailedPrecondition("this reward service has no experience buffer configured")
        _check_writable(job_id, samples)
        out = []
        for s in samples:
            copy = Sample()
            copy.CopyFrom(s)
            copy.job_id = job_id
            out.append(copy)
        return self._append(job_id, out) if out else 0

    def _append(self, job_id: str, scored: list[Sample]) -> int:
        assert self.buffer is not None
        try:
            written = self.buffer.append(job_id, scored)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise Unavailable(f"the experience buffer is unreachable: {exc}") from None
        SAMPLES_WRITTEN.inc(written)
        return written
