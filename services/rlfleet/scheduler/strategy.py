"""Rollout strategies: how a step's experience is gathered from the replica pool.

The step loop (``loop.py``) is the same for every strategy: rollout, score,
train, sync, record. Only the rollout phase differs: ``sync`` runs every
sequence of the step to its end under one policy version; C3PO++ (``c3po``,
``c3po.py``) stops at a token budget and carries unfinished rollouts into the
next version. A strategy is built per job run and may keep state across its steps.
"""

from __future__ import annotations

import abc
import threading
import time
from dataclasses import dataclass, field

import redis

from rlfleet.common.jobspec import JobSpec
from rlfleet.common.tasks import PromptSource
from rlfleet.scheduler.c3po.metrics import REPLICA_IDLE_SECONDS, version_metrics
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

    def finish(self, job_id: str) -> None:  # noqa: B027 - optional hook
        """The job's last step is recorded: drop whatever the strategy kept for it."""

    def pause(self, job_id: str) -> None:  # noqa: B027 - optional hook
        """The job's loop stopped early (failure, cancel, shutdown): stop any work left
        running in the background; what is kept for a resume stays."""


def rollout_metrics(samples: list[common_pb2.Sample], ctx: StepContext) -> dict[str, float]:
    """Step-record keys every strategy reports about the samples it hands to training."""
    lengths = [len(s.completion_token_ids) for s in samples]
    tokens = sum(lengths)
    return {
        "tokens_generated": float(tokens),
        "response_length_mean": tokens / len(lengths) if lengths else 0.0,
        "response_length_max": float(max(lengths, default=0)),
        "finished_stop_frac": (
            sum(s.finish_reason == "stop" for s in samples) / len(samples) if samples else 0.0
        ),
        **version_metrics(samples, version=ctx.version),
    }


def sampling_params(spec: JobSpec, step: int) -> rollout_pb2.SamplingParams:
    # A seed per (job seed, step): a redone step samples the same way, and
    # steps differ from one another.
    seed = (spec.seed * 1_000_003 + step) % (2**31 - 1)
    return rollout_pb2.SamplingParams(
        temperature=spec.sampling.temperature,
        top_p=spec.sampling.top_p,
        max_new_tokens=spec.sampling.max_new_tokens,
        seed=seed,
        resume_kv=spec.scheduling.mode == "c3po" and spec.scheduling.resume_kv,
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
        out = rollout_metrics(samples, ctx)
        out["rollout_tokens_per_second"] = out["tokens_generated"] / elapsed if elapsed > 0 else 0.0
        idle = self.pool.last_idle
        if idle:
            out["replica_idle_seconds_mean"] = sum(idle.values()) / len(idle)
            out["replica_idle_seconds_max"] = max(idle.values())
            for name, seconds in idle.items():
                REPLICA_IDLE_SECONDS.labels(name).inc(seconds)
        return RolloutResult(samples, out)


STRATEGIES = ("sync", "c3po")


def check_mode(mode: str) -> None:
    """Raises ValueError with a user-facing sentence unless ``mode`` can run."""
    if mode not in STRATEGIES:
        raise ValueError(f"unknown scheduling.mode {mode!r}; known: {', '.join(STRATEGIES)}")


def setup_strategy(
    mode: str,
    *,
    algorithm: str = "grpo",
    episodes: bool = False,
    clients=None,
    pool: ReplicaPool,
    redis_client: redis.Redis | None = None,
    prefix: str = "rlfleet",
) -> RolloutStrategy:
    """Factory: the rollout strategy for ``spec.scheduling.mode``.

    C3PO++ keeps its pool in Redis (``redis_client``) so a restart resumes it. An SFT
    job (``algorithm = "sft"``) has no rollouts: its steps are the dataset's
    demonstrations (``sft.py``). A job with a ``task.environment`` plays multi-turn
    episodes with the env service through ``clients`` (``episodes.py``).
    """
    check_mode(mode)
    if algorithm == "sft":
        from rlfleet.scheduler.sft import SftStrategy

        return SftStrategy(pool)
    if mode == "c3po":
        if redis_client is None:
            raise ValueError("C3PO++ (scheduling.mode 'c3po') keeps its rollout pool in Redis")
        from rlfleet.scheduler.c3po.store import C3poStore
        from rlfleet.scheduler.c3po.strategy import C3poStrategy

        # Episodes too: C3PO++ across turns (c3po/episodes.py).
        return C3poStrategy(pool, store=C3poStore(redis_client, prefix=prefix), clients=clients)
    if episodes:  # task.environment: multi-turn episodes with the env service
        from rlfleet.scheduler.episodes import EpisodeStrategy

        return EpisodeStrategy(pool, clients)
    return SyncStrategy(pool)
