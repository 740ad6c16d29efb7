"""Rollout strategies: how a step's experience is gathered from the replica pool.

The step loop (``loop.py``) is the same for every strategy: rollout, score,
train, sync, record. Only the rollout phase differs: ``sync`` runs every
sequence of the step to its end under one policy version; C3PO++ (``c3po``)
will stop at a token budget and carry unfinished rollouts into the next
version. A strategy is built per job run and may keep state across its steps.
"""

from __future__ import annotations

import abc
import threading
import time
from dataclasses import dataclass, field

from rlfleet.common.jobspec import JobSpec
from rlfleet.common.tasks import PromptSource
from rlfleet.scheduler.pool import ReplicaPool
from rlfleet.scheduler.samples import TextCodec, build_samples, make_groups
from rlfleet.v1 import common_pb2, rollout_pb2


@dataclass
class StepContext:
    """What a strategy needs to know about the step it runs."""

    job_id: str
    spec: JobSpec
    step: int
    version: int
    """The policy version every replica holds when the rollout phase starts."""
    codec: TextCodec
    prompts: PromptSource
    stop: threading.Event


@dataclass
class RolloutResult:
    samples: list[common_pb2.Sample]
    metrics: dict[str, float] = field(default_factory=dict)


class RolloutStrategy(abc.ABC):
    """Gathers the samples that one step trains on."""

    def __init__(self, pool: ReplicaPool):
        self.pool = pool

    @abc.abstractmethod
    def rollout(self, ctx: StepContext) -> RolloutResult:
        """Generates the step's samples; raises Interrupted when ``ctx.stop`` is set."""


def sampling_params(spec: JobSpec, step: int) -> rollout_pb2.SamplingParams:
    # A seed per (job seed, step): a redone step samples the same way, and
    # steps differ from one another.
    seed = (spec.seed * 1_000_003 + step) % (2**31 - 1)
    return rollout_pb2.SamplingParams(
        temperature=spec.sampling.temperature,
        top_p=spec.sampling.top_p,
        max_new_tokens=spec.sampling.max_new_tokens,
        seed=seed,
    )


class SyncStrategy(RolloutStrategy):
    """The budget-free baseline: step s draws prompts s·P .. s·P + P − 1 and waits
    for every one of their G sequences to finish under version s.

    Prompt serials depend only on the step, so a job resumed after a restart
    draws the same prompts and produces the same sample ids (the buffer keeps
    the first copy of each).
    """

    def rollout(self, ctx: StepContext) -> RolloutResult:
        algo = ctx.spec.algorithm
        groups = make_groups(
            ctx.prompts,
            ctx.codec,
            first_serial=ctx.step * algo.prompts_per_step,
            count=algo.prompts_per_step,
            group_size=algo.group_size,
        )
        start = time.perf_counter()
        results = self.pool.generate(
            [g.sequences for g in groups],
            sampling_params(ctx.spec, ctx.step),
            job_id=ctx.job_id,
            version=ctx.version,
            stop=ctx.stop,
            limit=ctx.spec.resources.rollout_replicas,
        )
        elapsed = time.perf_counter() - start
        samples = build_samples(groups, results, ctx.codec, job_id=ctx.job_id, step=ctx.step)
        lengths = [len(s.completion_token_ids) for s in samples]
        tokens = sum(lengths)
        return RolloutResult(
            samples,
            {
                "tokens_generated": float(tokens),
                "response_length_mean": tokens / len(lengths) if lengths else 0.0,
                "response_length_max": float(max(lengths, default=0)),
                "finished_stop_frac": (
                    sum(s.finish_reason == "stop" for s in samples) / len(samples)
                    if samples
                    else 0.0
                ),
                "rollout_tokens_per_second": tokens / elapsed if elapsed > 0 else 0.0,
            },
        )


STRATEGIES = ("sync",)


def check_mode(mode: str) -> None:
    """Raises ValueError with a user-facing sentence unless ``mode`` can run."""
    if mode == "c3po":
        raise ValueError(
            "scheduling.mode 'c3po' (C3PO++ token-budget partitioning) is not implemented "
            "yet; use 'sync'"
        )
    if mode not in STRATEGIES:
        raise ValueError(f"unknown scheduling.mode {mode!r}; known: {', '.join(STRATEGIES)}")


def setup_strategy(mode: str, *, pool: ReplicaPool) -> RolloutStrategy:
    """Factory: the rollout strategy for ``spec.scheduling.mode``."""
    check_mode(mode)
    return SyncStrategy(pool)
