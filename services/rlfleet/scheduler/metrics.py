"""Prometheus metrics of the scheduler (served on its /metrics endpoint)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

STEPS_COMPLETED = Counter(
    "rlfleet_scheduler_steps_completed_total", "Training steps completed (all jobs)."
)
STEP_PHASE_SECONDS = Histogram(
    "rlfleet_scheduler_step_phase_seconds",
    "Wall time of each phase of a step: rollout, reward, train, sync, and the whole step.",
    ["phase"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
)
JOBS = Gauge("rlfleet_scheduler_jobs", "Jobs by state.", ["state"])
REPLICAS_HEALTHY = Gauge(
    "rlfleet_scheduler_replicas_healthy", "Rollout replicas that answered their last status check."
)
REPLICAS_DROPPED = Counter(
    "rlfleet_scheduler_replicas_dropped_total",
    "Times a rollout replica was taken out of service after a failed call.",
)
TOKENS_GENERATED = Counter(
    "rlfleet_scheduler_tokens_generated_total", "Completion tokens received from rollout replicas."
)
