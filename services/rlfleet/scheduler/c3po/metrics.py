"""What C3PO++ reports: Prometheus series and the keys it adds to a step record.

Step-record keys (floats, as every step metric):
- ``c3po_budget_tokens`` (Φ), ``c3po_budget_used`` (C), ``c3po_budget_used_frac`` (C / Φ)
- ``c3po_sequences_completed`` / ``_carried`` / ``_resumed`` / ``_aborted`` / ``_purged``
- ``c3po_groups_released`` / ``_new`` / ``_purged`` / ``_deferred`` (completed while the
  replicas stopped; released first next step), ``c3po_groups_stale`` /
  ``c3po_sequences_stale`` (dropped: a token older than ``max_staleness`` allows),
  ``c3po_pool_sequences`` (unfinished in P)
- ``c3po_retention_<r>``: trained samples whose rollout was carried over r times
- ``c3po_decision_seconds``: scheduling code time in the rollout phase
- ``c3po_abort_seconds``: time from Abort until every replica handed its partials back
- ``replica_idle_seconds_mean`` / ``_max``: replica time with nothing to generate
- for every strategy: ``version_min`` / ``version_max`` / ``version_span`` (max − min
  over every token of the trained samples), ``version_lag_max`` (policy version at
  the step minus the oldest token version), ``multi_version_frac`` (samples with
  tokens from more than one version)
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import Counter, Gauge, Histogram

from rlfleet.v1 import common_pb2

BUDGET_USED = Gauge(
    "rlfleet_scheduler_c3po_budget_used_tokens",
    "C3PO++: completion tokens of the groups released in the last step (C).",
)
BUDGET_FRAC = Gauge(
    "rlfleet_scheduler_c3po_budget_used_fraction",
    "C3PO++: C / Φ of the last step (above 1 by the group that crossed Φ, and by groups "
    "deferred from the step before).",
)
SEQUENCES = Counter(
    "rlfleet_scheduler_c3po_sequences_total",
    "C3PO++ sequences by outcome per step: completed, carried (over to the next version), "
    "resumed (from a carried prefix), aborted (handed back partial), purged.",
    ["outcome"],
)
GROUPS = Counter(
    "rlfleet_scheduler_c3po_groups_total",
    "C3PO++ GRPO groups by outcome: new, released (to training), deferred (completed while "
    "replicas stopped, released next step), purged, stale (a token lagged more than "
    "max_staleness versions).",
    ["outcome"],
)
POOL_SEQUENCES = Gauge(
    "rlfleet_scheduler_c3po_pool_sequences",
    "C3PO++: unfinished sequences left in the inference pool after the last step.",
)
RETENTION = Histogram(
    "rlfleet_scheduler_c3po_retention",
    "Retention (carry-overs) of each trained sample's rollout.",
    buckets=(0, 1, 2, 3, 4, 6, 8, 16),
)
DECISION_SECONDS = Histogram(
    "rlfleet_scheduler_c3po_decision_seconds",
    "Scheduling code time per rollout phase (excludes waiting for replicas).",
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5),
)
REPLICA_IDLE_SECONDS = Counter(
    "rlfleet_scheduler_replica_idle_seconds_total",
    "Rollout-phase time each replica spent with nothing to generate.",
    ["replica"],
)
VERSION_SPAN = Histogram(
    "rlfleet_scheduler_sample_version_span",
    "Per trained sample: newest minus oldest policy version among its tokens.",
    buckets=(0, 1, 2, 3, 4, 6, 8, 16),
)


def version_metrics(samples: Iterable[common_pb2.Sample], *, version: int) -> dict[str, float]:
    """Version span of the trained samples (every strategy records it)."""
    lo, hi, multi, n = None, None, 0, 0
    for s in samples:
        n += 1
        # An environment's tokens in a multi-turn episode carry version -1: no policy's.
        versions = [v for v in s.token_versions if v >= 0]
        if not versions:
            continue
        smin, smax = min(versions), max(versions)
        lo = smin if lo is None else min(lo, smin)
        hi = smax if hi is None else max(hi, smax)
        multi += smax != smin
        VERSION_SPAN.observe(smax - smin)
    if lo is None or hi is None:
        return {}
    return {
        "version_min": float(lo),
        "version_max": float(hi),
        "version_span": float(hi - lo),
        "version_lag_max": float(version - lo),
        "multi_version_frac": multi / n if n else 0.0,
    }


def report_metrics(report, *, token_budget: int, pool_sequences: int) -> dict[str, float]:
    """Step-record keys of one C3PO++ iteration; also feeds the Prometheus series."""
    purged_seqs = sum(len(g.members) for g in report.purged)
    stale_seqs = sum(len(g.members) for g in report.stale)
    out = {
        "c3po_budget_tokens": float(token_budget),
        "c3po_budget_used": float(report.budget_used),
        "c3po_budget_used_frac": report.budget_used / token_budget if token_budget else 0.0,
        "c3po_sequences_completed": float(report.completed),
        "c3po_sequences_carried": float(report.carried),
        "c3po_sequences_resumed": float(report.resumed),
        "c3po_sequences_aborted": float(report.aborted),
        "c3po_sequences_purged": float(purged_seqs),
        "c3po_groups_released": float(len(report.released)),
        "c3po_groups_new": float(report.new_groups),
        "c3po_groups_deferred": float(report.deferred),
        "c3po_groups_purged": float(len(report.purged)),
        "c3po_groups_stale": float(len(report.stale)),
        "c3po_sequences_stale": float(stale_seqs),
        "c3po_pool_sequences": float(pool_sequences),
        "c3po_decision_seconds": report.decision_seconds,
        "c3po_abort_seconds": report.abort_seconds,
    }
    for r, n in sorted(report.retention_counts().items()):
        out[f"c3po_retention_{r}"] = float(n)
        for _ in range(n):
            RETENTION.observe(r)
    idle = report.idle_seconds
    if idle:
        out["replica_idle_seconds_mean"] = sum(idle.values()) / len(idle)
        out["replica_idle_seconds_max"] = max(idle.values())
        for name, seconds in idle.items():
            REPLICA_IDLE_SECONDS.labels(name).inc(seconds)
    BUDGET_USED.set(report.budget_used)
    BUDGET_FRAC.set(out["c3po_budget_used_frac"])
    for outcome, n in (
        ("completed", report.completed),
        ("carried", report.carried),
        ("resumed", report.resumed),
        ("aborted", report.aborted),
        ("purged", purged_seqs),
        ("stale", stale_seqs),
    ):
        SEQUENCES.labels(outcome).inc(n)
    for outcome, n in (
        ("new", report.new_groups),
        ("released", len(report.released)),
        ("deferred", report.deferred),
        ("purged", len(report.purged)),
        ("stale", len(report.stale)),
    ):
        GROUPS.labels(outcome).inc(n)
    POOL_SEQUENCES.set(pool_sequences)
    DECISION_SECONDS.observe(report.decision_seconds)
    return out
