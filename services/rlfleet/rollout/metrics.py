"""Prometheus metrics of a rollout replica (served on its /metrics endpoint).

Counted where every engine's results pass (the core), so the vLLM and simulated
engines report the same series as the PyTorch one.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

TOKENS_GENERATED = Counter(
    "rlfleet_rollout_tokens_generated_total",
    "Tokens sampled by this replica (resumed prefix tokens are not counted again).",
)
SEQUENCES_FINISHED = Counter(
    "rlfleet_rollout_sequences_finished_total",
    "Sequences handed back, by finish reason (stop, length, aborted).",
    ["reason"],
)
RUNNING_SEQUENCES = Gauge(
    "rlfleet_rollout_running_sequences",
    "Sequences of Generate calls in flight that have not been handed back yet.",
)
GENERATE_SECONDS = Histogram(
    "rlfleet_rollout_generate_seconds",
    "Wall time of one Generate call, from request to its last sequence.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900),
)
WEIGHT_LOAD_SECONDS = Histogram(
    "rlfleet_rollout_weight_load_seconds",
    "Time to pull, verify and swap in one policy version.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
)
POLICY_VERSION = Gauge(
    "rlfleet_rollout_policy_version",
    "Policy version of the weights this replica samples with.",
)
ENGINE_PASSES = Counter(
    "rlfleet_rollout_engine_passes_total",
    "Forward passes of the PyTorch engine by kind (prefill of admitted rows, decode of the "
    "batch), and their rows: what a rollout phase's time is made of.",
    ["kind"],
)
ENGINE_PASS_SECONDS = Counter(
    "rlfleet_rollout_engine_pass_seconds_total",
    "Seconds the PyTorch engine spent in forward passes, by kind.",
    ["kind"],
)
ENGINE_PASS_ROWS = Counter(
    "rlfleet_rollout_engine_pass_rows_total",
    "Rows (sequences) the PyTorch engine's forward passes carried, by kind.",
    ["kind"],
)
KV_RESUMED = Counter(
    "rlfleet_rollout_kv_resumed_total",
    "Sequences resumed from the KV cache their aborted call left on this replica "
    "(SamplingParams.resume_kv), instead of re-prefilling prompt + prefix.",
)
