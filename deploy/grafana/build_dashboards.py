"""Writes the Grafana dashboards in deploy/grafana/dashboards/ from one description.

The dashboards are generated so that every panel follows the same conventions (the
`${datasource}` variable, `job="rlfleet-<service>"` targets, units) and so that a renamed
metric is changed in one place. Run after editing, and commit the JSON:

    .venv/bin/python deploy/grafana/build_dashboards.py

tests/deploy checks that the committed JSON is what this script writes, that every query
parses (promtool) and that every metric it names is one the services export.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

OUT = Path(__file__).resolve().parent / "dashboards"

# Services label per-job series `job_id` (Prometheus keeps `job` for the scrape target).
TRAINER_JOB = "job_id"
DS = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"


def q(expr: str, legend: str = "", *, ref: str = "A", instant: bool = False) -> dict:
    target = {"refId": ref, "datasource": DS, "expr": expr, "legendFormat": legend or "__auto"}
    if instant:
        target["instant"] = True
        target["range"] = False
    return target


def panel(
    title: str,
    targets: list[dict],
    *,
    unit: str = "short",
    kind: str = "timeseries",
    w: int = 12,
    h: int = 8,
    description: str = "",
    decimals: int | None = None,
    thresholds: list[tuple[float | None, str]] | None = None,
    stack: bool = False,
    min_zero: bool = False,
) -> dict:
    for i, t in enumerate(targets):
        t["refId"] = chr(ord("A") + i)
    defaults: dict = {"unit": unit}
    if decimals is not None:
        defaults["decimals"] = decimals
    if min_zero:
        defaults["min"] = 0
    if thresholds:
        defaults["thresholds"] = {
            "mode": "absolute",
            "steps": [{"value": v, "color": c} for v, c in thresholds],
        }
    if kind == "timeseries":
        defaults["custom"] = {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 10,
            "showPoints": "never",
            "spanNulls": True,
            "stacking": {"mode": "normal" if stack else "none", "group": "A"},
        }
        options = {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    elif kind == "stat":
        options = {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "background" if thresholds else "value",
            "graphMode": "none",
            "textMode": "value_and_name",
            "justifyMode": "auto",
            "orientation": "auto",
        }
    elif kind == "bargauge":
        options = {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "displayMode": "gradient",
            "orientation": "horizontal",
            "showUnfilled": True,
        }
    else:
        raise ValueError(f"unknown panel kind {kind!r}")
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DS,
        "targets": targets,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": options,
        "_size": (w, h),
    }


def row(title: str) -> dict:
    return {"type": "row", "title": title, "collapsed": False, "panels": [], "_size": (24, 1)}


def p_quantile(metric: str, quantile: float, by: str, matcher: str = "") -> str:
    sel = f"{{{matcher}}}" if matcher else ""
    return f"histogram_quantile({quantile}, sum by (le, {by}) (rate({metric}_bucket{sel}[{RATE}])))"


def var_datasource() -> dict:
    return {
        "name": "datasource",
        "label": "Data source",
        "type": "datasource",
        "query": "prometheus",
        "current": {},
        "hide": 0,
        "refresh": 1,
        "options": [],
    }


def var_query(name: str, label: str, query: str, *, multi: bool = True) -> dict:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DS,
        "query": {"query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
        "definition": query,
        "current": {},
        "includeAll": multi,
        "multi": multi,
        "allValue": ".*",
        "refresh": 2,
        "sort": 1,
        "hide": 0,
        "options": [],
    }


def layout(panels: list[dict]) -> list[dict]:
    """Places panels left to right, wrapping at 24 columns; ids in order."""
    x = y = row_h = 0
    out = []
    for i, p in enumerate(panels, 1):
        w, h = p.pop("_size")
        if x + w > 24:
            x, y, row_h = 0, y + row_h, 0
        p["gridPos"] = {"x": x, "y": y, "w": w, "h": h}
        p["id"] = i
        x += w
        row_h = max(row_h, h)
        if p["type"] == "row":
            x, y, row_h = 0, y + h, 0
        out.append(p)
    return out


def dashboard(uid: str, title: str, description: str, panels: list[dict], variables=()) -> dict:
    return {
        "uid": uid,
        "title": f"rlfleet / {title}",
        "description": description,
        "tags": ["rlfleet"],
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-6h", "to": "now"},
        "timepicker": {},
        "timezone": "browser",
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "weekStart": "",
        "links": [
            {
                "title": "rlfleet",
                "type": "dashboards",
                "tags": ["rlfleet"],
                "asDropdown": True,
                "includeVars": False,
                "keepTime": True,
                "icon": "external link",
                "targetBlank": False,
                "tooltip": "",
                "url": "",
            }
        ],
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "templating": {"list": [var_datasource(), *variables]},
        "panels": layout(panels),
    }


JOB_VAR = var_query(
    "job_id", "RL job", f"label_values(rlfleet_trainer_policy_version, {TRAINER_JOB})"
)
TJ = f'{TRAINER_JOB}=~"$job_id"'
WJ = 'job_id=~"$job_id"'


def overview() -> dict:
    return dashboard(
        "rlfleet-overview",
        "Fleet overview",
        "Is the fleet up, are steps completing, and where does a step's time go.",
        [
            panel(
                "Services up",
                [q('up{job=~"rlfleet-.*"}', "{{job}} {{instance}}", instant=True)],
                kind="stat",
                w=24,
                h=4,
                thresholds=[(None, "red"), (1, "green")],
                description="1: Prometheus scrapes the service; 0: it is down or unreachable.",
            ),
            panel(
                "Steps per minute",
                [
                    q(
                        "sum(rate(rlfleet_scheduler_steps_completed_total[$__rate_interval])) * 60",
                        "steps/min",
                    )
                ],
                w=8,
                min_zero=True,
            ),
            panel(
                "Jobs by state", [q("sum by (state) (rlfleet_scheduler_jobs)", "{{state}}")], w=8
            ),
            panel(
                "Healthy rollout replicas",
                [q("sum(rlfleet_scheduler_replicas_healthy)", "healthy")],
                w=8,
                min_zero=True,
            ),
            panel(
                "Step time by phase (p50)",
                [q(p_quantile("rlfleet_scheduler_step_phase_seconds", 0.5, "phase"), "{{phase}}")],
                unit="s",
                description="Rollout, reward, train, sync and the whole step, as the scheduler times them.",
            ),
            panel(
                "Policy version",
                [
                    q(
                        f"max by ({TRAINER_JOB}) (rlfleet_trainer_policy_version)",
                        f"trainer {{{{{TRAINER_JOB}}}}}",
                    ),
                    q("min(rlfleet_rollout_policy_version)", "oldest replica"),
                    q("max(rlfleet_rollout_policy_version)", "newest replica"),
                ],
            ),
            panel(
                "Reward (mean per step)",
                [q(f"rlfleet_trainer_reward_mean{{{TJ}}}", f"{{{{{TRAINER_JOB}}}}}")],
                decimals=3,
            ),
            panel(
                "Tokens per second",
                [
                    q(
                        "sum(rate(rlfleet_rollout_tokens_generated_total[$__rate_interval]))",
                        "generated",
                    ),
                    q(
                        "sum(rate(rlfleet_trainer_tokens_trained_total[$__rate_interval]))",
                        "trained",
                    ),
                ],
                unit="short",
                min_zero=True,
            ),
            panel(
                "Eval (greedy reward and accuracy, pass@k)",
                [q(f"rlfleet_eval_score{{{TJ}}}", f"{{{{{TRAINER_JOB}}}}} {{{{metric}}}}")],
                decimals=3,
            ),
            panel(
                "gRPC errors per second",
                [
                    q(
                        "sum by (service, method, code) (rate(rlfleet_rpc_server_errors_total[$__rate_interval]))",
                        "{{service}} {{method}} {{code}}",
                    )
                ],
                unit="reqps",
                min_zero=True,
            ),
            panel(
                "gRPC latency (p99)",
                [
                    q(
                        p_quantile("rlfleet_rpc_server_seconds", 0.99, "service, method"),
                        "{{service}} {{method}}",
                    )
                ],
                unit="s",
                w=24,
            ),
        ],
        [JOB_VAR],
    )


def rollout() -> dict:
    inst = 'instance=~"$instance"'
    return dashboard(
        "rlfleet-rollout",
        "Rollout",
        "Rollout replicas: throughput, load, latency and the policy version each one samples with.",
        [
            panel(
                "Tokens generated per second",
                [
                    q(
                        f"sum by (instance) (rate(rlfleet_rollout_tokens_generated_total{{{inst}}}[$__rate_interval]))",
                        "{{instance}}",
                    )
                ],
                stack=True,
                min_zero=True,
            ),
            panel(
                "Sequences in flight",
                [q(f"rlfleet_rollout_running_sequences{{{inst}}}", "{{instance}}")],
                stack=True,
                min_zero=True,
            ),
            panel(
                "Sequences finished per second, by reason",
                [
                    q(
                        f"sum by (reason) (rate(rlfleet_rollout_sequences_finished_total{{{inst}}}[$__rate_interval]))",
                        "{{reason}}",
                    )
                ],
                description="stop: end of sequence; length: max_new_tokens; aborted: handed back unfinished (C3PO++ carry-over).",
                stack=True,
                min_zero=True,
            ),
            panel(
                "Generate call duration",
                [
                    q(
                        p_quantile("rlfleet_rollout_generate_seconds", 0.5, "instance", inst),
                        "p50 {{instance}}",
                    ),
                    q(
                        p_quantile("rlfleet_rollout_generate_seconds", 0.95, "instance", inst),
                        "p95 {{instance}}",
                    ),
                ],
                unit="s",
            ),
            panel(
                "Policy version per replica",
                [q(f"rlfleet_rollout_policy_version{{{inst}}}", "{{instance}}")],
                decimals=0,
            ),
            panel(
                "Weight load time (pull, verify, swap)",
                [
                    q(
                        p_quantile("rlfleet_rollout_weight_load_seconds", 0.95, "instance", inst),
                        "p95 {{instance}}",
                    )
                ],
                unit="s",
            ),
            panel(
                "Healthy replicas (scheduler's view)",
                [q("sum(rlfleet_scheduler_replicas_healthy)", "healthy")],
                min_zero=True,
            ),
            panel(
                "Replicas dropped per hour",
                [q("sum(increase(rlfleet_scheduler_replicas_dropped_total[1h]))", "dropped")],
                description="A replica is dropped from a step after a failed call; it rejoins once it answers again.",
                min_zero=True,
            ),
        ],
        [
            var_query(
                "instance", "Replica", "label_values(rlfleet_rollout_policy_version, instance)"
            )
        ],
    )


def c3po() -> dict:
    return dashboard(
        "rlfleet-c3po",
        "C3PO++ scheduling",
        "How the token budget partitions rollouts across policy versions: rollout-phase time, "
        "tokens per step, sequences carried over unfinished and the versions they mix.",
        [
            panel(
                "Rollout phase vs whole step (p50)",
                [
                    q(
                        p_quantile(
                            "rlfleet_scheduler_step_phase_seconds",
                            0.5,
                            "phase",
                            'phase=~"rollout|step"',
                        ),
                        "{{phase}}",
                    ),
                ],
                unit="s",
                description="C3PO++ bounds the rollout phase by the token budget instead of the slowest sequence.",
            ),
            panel(
                "Rollout share of the step",
                [
                    q(
                        'sum(rate(rlfleet_scheduler_step_phase_seconds_sum{phase="rollout"}[$__rate_interval]))'
                        ' / sum(rate(rlfleet_scheduler_step_phase_seconds_sum{phase="step"}[$__rate_interval]))',
                        "rollout / step",
                    )
                ],
                unit="percentunit",
                min_zero=True,
            ),
            panel(
                "Completion tokens per step",
                [
                    q(
                        "sum(rate(rlfleet_scheduler_tokens_generated_total[$__rate_interval]))"
                        " / sum(rate(rlfleet_scheduler_steps_completed_total[$__rate_interval]))",
                        "tokens / step",
                    )
                ],
                description="Close to the budget Φ under C3PO++; the whole batch's length under sync.",
                min_zero=True,
            ),
            panel(
                "Sequences handed back unfinished per second",
                [
                    q(
                        'sum(rate(rlfleet_rollout_sequences_finished_total{reason="aborted"}[$__rate_interval]))',
                        "carried over",
                    ),
                    q(
                        'sum(rate(rlfleet_rollout_sequences_finished_total{reason!="aborted"}[$__rate_interval]))',
                        "finished",
                    ),
                ],
                stack=True,
                min_zero=True,
            ),
            panel(
                "Replica version spread",
                [
                    q(
                        "max(rlfleet_rollout_policy_version) - min(rlfleet_rollout_policy_version)",
                        "newest - oldest replica",
                    )
                ],
                decimals=0,
                min_zero=True,
            ),
            panel(
                "Generated vs trained tokens per second",
                [
                    q(
                        "sum(rate(rlfleet_scheduler_tokens_generated_total[$__rate_interval]))",
                        "generated",
                    ),
                    q(
                        "sum(rate(rlfleet_trainer_tokens_trained_total[$__rate_interval]))",
                        "trained",
                    ),
                ],
                description="Generated tokens of purged rollouts are never trained on.",
                min_zero=True,
            ),
            row("Budget, pool and retention (C3PO++ jobs)"),
            panel(
                "Token budget used (C / Φ)",
                [q("rlfleet_scheduler_c3po_budget_used_fraction", "C / Φ")],
                description="Completion tokens of the groups released in the last step over the "
                "budget Φ. Above 1: groups that finished while the replicas were being stopped.",
                unit="percentunit",
                min_zero=True,
                w=8,
            ),
            panel(
                "Unfinished sequences in the pool",
                [q("rlfleet_scheduler_c3po_pool_sequences", "in P after the step")],
                description="Rollouts carried over to the next policy version.",
                decimals=0,
                min_zero=True,
                w=8,
            ),
            panel(
                "Scheduling decision time (p95)",
                [q(p_quantile("rlfleet_scheduler_c3po_decision_seconds", 0.95, "job"), "p95")],
                description="Time of the scheduler's own code in a rollout phase, without "
                "waiting for replicas.",
                unit="s",
                w=8,
            ),
            panel(
                "Sequences per second, by outcome",
                [
                    q(
                        "sum by (outcome) (rate(rlfleet_scheduler_c3po_sequences_total[$__rate_interval]))",
                        "{{outcome}}",
                    )
                ],
                description="completed; carried over to the next version; resumed from a "
                "carried prefix; aborted (handed back partial); purged past the retention limit σ.",
                min_zero=True,
            ),
            panel(
                "GRPO groups per second, by outcome",
                [
                    q(
                        "sum by (outcome) (rate(rlfleet_scheduler_c3po_groups_total[$__rate_interval]))",
                        "{{outcome}}",
                    )
                ],
                description="new (prompts drawn), released to training, purged.",
                min_zero=True,
            ),
            panel(
                "Carry-overs of trained samples",
                [
                    q(p_quantile("rlfleet_scheduler_c3po_retention", 0.5, "job"), "p50"),
                    q(p_quantile("rlfleet_scheduler_c3po_retention", 0.99, "job"), "p99"),
                ],
                description="How many iterations a trained sample's rollout was carried over "
                "(at most σ).",
                min_zero=True,
            ),
            panel(
                "Policy versions within one sample (p95)",
                [q(p_quantile("rlfleet_scheduler_sample_version_span", 0.95, "job"), "p95")],
                description="Newest minus oldest policy version among a trained sample's tokens "
                "(0 under sync).",
                decimals=0,
                min_zero=True,
            ),
            panel(
                "Replica idle time in the rollout phase",
                [
                    q(
                        "sum by (replica) (rate(rlfleet_scheduler_replica_idle_seconds_total[$__rate_interval]))",
                        "{{replica}}",
                    )
                ],
                description="Seconds per second a replica had nothing to generate.",
                unit="percentunit",
                min_zero=True,
                w=24,
            ),
        ],
    )


def trainer() -> dict:
    def g(name: str, legend: str = "") -> dict:
        return q(f"rlfleet_trainer_{name}{{{TJ}}}", legend or f"{{{{{TRAINER_JOB}}}}}")

    return dashboard(
        "rlfleet-trainer",
        "Trainer and IcePop",
        "Per-step training figures and the train/inference mismatch that IcePop corrects: "
        "k = p_train / p_infer, tokens outside [alpha, beta] are masked (about 1-2 per mille "
        "on real models).",
        [
            row("Optimisation"),
            panel(
                "Loss",
                [
                    g("loss", f"loss {{{{{TRAINER_JOB}}}}}"),
                    g("policy_loss", f"policy {{{{{TRAINER_JOB}}}}}"),
                ],
                w=8,
            ),
            panel("Gradient norm (before clipping)", [g("grad_norm")], w=8),
            panel("PPO clip fraction", [g("clip_fraction")], unit="percentunit", w=8),
            panel("Reward mean", [g("reward_mean")], decimals=3, w=8),
            panel("Reward std", [g("reward_std")], decimals=3, w=8),
            panel("Response length (tokens)", [g("response_length_mean")], w=8),
            row("IcePop: train/inference mismatch"),
            panel(
                "Masked tokens (per mille)",
                [
                    q(f"1000 * rlfleet_trainer_masked_fraction{{{TJ}}}", "all"),
                    q(f"1000 * rlfleet_trainer_masked_below_alpha{{{TJ}}}", "k < alpha"),
                    q(f"1000 * rlfleet_trainer_masked_above_beta{{{TJ}}}", "k > beta"),
                ],
                description="Share of response tokens IcePop drops; sustained values above 10 per mille mean the engines disagree.",
                thresholds=[(None, "green"), (10, "red")],
                w=12,
            ),
            panel(
                "Train/inference KL",
                [g("train_infer_kl_k1", "k1"), g("train_infer_kl_k3", "k3")],
                w=12,
            ),
            panel("Mean k = p_train / p_infer", [g("k_mean")], decimals=4, w=8),
            panel("Max |p_train - p_infer|", [g("max_abs_dp")], decimals=4, w=8),
            panel("Entropy of masked tokens", [g("masked_entropy")], w=8),
            panel(
                "Zero-advantage samples", [g("zero_advantage_fraction")], unit="percentunit", w=8
            ),
            panel("KL to the reference policy", [g("kl_ref")], w=8),
            panel("Policy version", [g("policy_version")], decimals=0, w=8),
            row("Throughput"),
            panel(
                "Step time",
                [
                    q(p_quantile("rlfleet_trainer_step_seconds", 0.5, TRAINER_JOB, TJ), "p50"),
                    q(p_quantile("rlfleet_trainer_step_seconds", 0.95, TRAINER_JOB, TJ), "p95"),
                ],
                unit="s",
                w=8,
            ),
            panel(
                "Tokens and samples trained per second",
                [
                    q(
                        f"sum(rate(rlfleet_trainer_tokens_trained_total{{{TJ}}}[$__rate_interval]))",
                        "tokens",
                    ),
                    q(
                        f"sum(rate(rlfleet_trainer_samples_trained_total{{{TJ}}}[$__rate_interval]))",
                        "samples",
                    ),
                ],
                w=8,
                min_zero=True,
            ),
            panel(
                "Checkpoint write time (p95)",
                [q(p_quantile("rlfleet_trainer_checkpoint_seconds", 0.95, TRAINER_JOB, TJ), "p95")],
                unit="s",
                w=8,
            ),
        ],
        [JOB_VAR],
    )


def weightsync() -> dict:
    return dashboard(
        "rlfleet-weightsync",
        "Weight sync",
        "Policy versions from the trainer to every rollout replica.",
        [
            panel(
                "Current version",
                [q(f"rlfleet_weightsync_current_version{{{WJ}}}", "{{job_id}}")],
                decimals=0,
            ),
            panel(
                "Replicas behind the current version",
                [q(f"rlfleet_weightsync_replicas_behind{{{WJ}}}", "{{job_id}}")],
                decimals=0,
                min_zero=True,
            ),
            panel(
                "Replicas by version held",
                [
                    q(
                        f"sum by (job_id, version) (rlfleet_weightsync_replicas{{{WJ}}})",
                        "{{job_id}} v{{version}}",
                    )
                ],
                stack=True,
            ),
            panel(
                "Pushes per minute, by outcome",
                [
                    q(
                        "sum by (outcome) (rate(rlfleet_weightsync_pushes_total[$__rate_interval])) * 60",
                        "{{outcome}}",
                    )
                ],
                description="accepted, repeat (idempotent retry), stale, data_loss (checksum), invalid.",
                stack=True,
                min_zero=True,
            ),
            panel(
                "Push time (first chunk to current)",
                [
                    q(p_quantile("rlfleet_weightsync_push_seconds", 0.5, "job"), "p50"),
                    q(p_quantile("rlfleet_weightsync_push_seconds", 0.95, "job"), "p95"),
                ],
                unit="s",
            ),
            panel(
                "Bytes per second",
                [
                    q(
                        "sum(rate(rlfleet_weightsync_received_bytes_total[$__rate_interval]))",
                        "received (pushes)",
                    ),
                    q(
                        "sum(rate(rlfleet_weightsync_served_bytes_total[$__rate_interval]))",
                        "served (pulls)",
                    ),
                ],
                unit="Bps",
                min_zero=True,
            ),
            panel(
                "Replica weight load time (p95)",
                [
                    q(
                        p_quantile("rlfleet_rollout_weight_load_seconds", 0.95, "instance"),
                        "{{instance}}",
                    )
                ],
                unit="s",
                w=24,
            ),
        ],
        [var_query("job_id", "RL job", "label_values(rlfleet_weightsync_current_version, job_id)")],
    )


def buffer() -> dict:
    bj = 'job_id=~"$job_id"'
    return dashboard(
        "rlfleet-buffer",
        "Experience buffer",
        "Scored experience flowing through the Redis stream: written by reward, consumed and "
        "acknowledged by the trainer after each step. The rlfleet_buffer_* series come from "
        "the scheduler, which reads each running job's stream from Redis when scraped.",
        [
            panel(
                "Samples waiting in the buffer",
                [q(f"max by (job_id) (rlfleet_buffer_length{{{bj}}})", "{{job_id}}")],
                description="Entries of the job's stream not yet acknowledged, read or unread. "
                "A healthy job drains it at every training step.",
                decimals=0,
                min_zero=True,
                w=8,
            ),
            panel(
                "Delivered, not yet acknowledged",
                [q(f"max by (job_id) (rlfleet_buffer_pending{{{bj}}})", "{{job_id}}")],
                description="Samples a trainer has read and not yet acknowledged: the step in "
                "progress, or what a crashed trainer left for the next one to reclaim.",
                decimals=0,
                min_zero=True,
                w=8,
            ),
            panel(
                "Oldest waiting sample",
                [
                    q(
                        f"max by (job_id) (rlfleet_buffer_oldest_age_seconds{{{bj}}})",
                        "unacknowledged {{job_id}}",
                    ),
                    q(
                        f"max by (job_id) (rlfleet_buffer_oldest_pending_age_seconds{{{bj}}})",
                        "delivered {{job_id}}",
                    ),
                ],
                description="How long experience waits for training. The backlog alert fires "
                "when it passes 30 minutes while the stream grows.",
                unit="s",
                min_zero=True,
                w=8,
            ),
            panel(
                "Samples per second: written vs trained",
                [
                    q(
                        "sum(rate(rlfleet_reward_samples_written_total[$__rate_interval]))",
                        "written (reward)",
                    ),
                    q(
                        "sum(rate(rlfleet_trainer_samples_trained_total[$__rate_interval]))",
                        "trained (trainer)",
                    ),
                ],
                min_zero=True,
                w=24,
            ),
            panel(
                "Written minus trained, last hour",
                [
                    q(
                        "sum(increase(rlfleet_reward_samples_written_total[1h]))"
                        " - sum(increase(rlfleet_trainer_samples_trained_total[1h]))",
                        "backlog growth",
                    )
                ],
                description="Grows when the trainer falls behind the reward service (samples wait in the stream).",
            ),
            panel(
                "Buffer full: Score refused (RESOURCE_EXHAUSTED) per second",
                [
                    q(
                        'sum(rate(rlfleet_rpc_server_errors_total{service="reward", code="RESOURCE_EXHAUSTED"}[$__rate_interval]))',
                        "refused",
                    )
                ],
                description="The reward service refuses new samples when a job's stream holds buffer_max_len unconsumed ones.",
                min_zero=True,
            ),
            panel(
                "TrainStep latency (p95), includes waiting for samples",
                [
                    q(
                        p_quantile(
                            "rlfleet_rpc_server_seconds",
                            0.95,
                            "method",
                            'service="trainer", method="TrainStep"',
                        ),
                        "TrainStep",
                    )
                ],
                unit="s",
            ),
            panel(
                "Reward Score latency (p95), includes the buffer write",
                [
                    q(
                        p_quantile(
                            "rlfleet_rpc_server_seconds",
                            0.95,
                            "method",
                            'service="reward", method="Score"',
                        ),
                        "Score",
                    )
                ],
                unit="s",
            ),
        ],
        [var_query("job_id", "RL job", "label_values(rlfleet_buffer_length, job_id)")],
    )


def reward() -> dict:
    return dashboard(
        "rlfleet-reward",
        "Reward",
        "Verifiers: how many samples they score, what rewards they give, and their failures.",
        [
            panel(
                "Samples scored per second, by verifier",
                [
                    q(
                        "sum by (verifier) (rate(rlfleet_reward_samples_scored_total[$__rate_interval]))",
                        "{{verifier}}",
                    )
                ],
                stack=True,
                min_zero=True,
            ),
            panel(
                "Mean reward, by verifier",
                [
                    q(
                        "sum by (verifier) (rate(rlfleet_reward_reward_sum[$__rate_interval]))"
                        " / sum by (verifier) (rate(rlfleet_reward_reward_count[$__rate_interval]))",
                        "{{verifier}}",
                    )
                ],
                decimals=3,
            ),
            panel(
                "Verifier errors per second",
                [
                    q(
                        "sum by (verifier, reason) (rate(rlfleet_reward_verifier_errors_total[$__rate_interval]))",
                        "{{verifier}} {{reason}}",
                    )
                ],
                description="Samples whose verifier raised or ran past the deadline; they score 0.",
                min_zero=True,
            ),
            panel(
                "Batch scoring time",
                [
                    q(
                        p_quantile("rlfleet_reward_batch_seconds", 0.5, "verifier"),
                        "p50 {{verifier}}",
                    ),
                    q(
                        p_quantile("rlfleet_reward_batch_seconds", 0.95, "verifier"),
                        "p95 {{verifier}}",
                    ),
                ],
                unit="s",
            ),
            panel(
                "Samples written to the buffer per second",
                [q("sum(rate(rlfleet_reward_samples_written_total[$__rate_interval]))", "written")],
                min_zero=True,
            ),
            panel(
                "Reward distribution (share of rewards <= bucket)",
                [
                    q(
                        "sum by (le) (increase(rlfleet_reward_reward_bucket[$__range]))"
                        " / ignoring(le) group_left sum(increase(rlfleet_reward_reward_count[$__range]))",
                        "<= {{le}}",
                        instant=True,
                    )
                ],
                kind="bargauge",
                unit="percentunit",
            ),
        ],
    )


DASHBOARDS = {
    "rlfleet-overview.json": overview,
    "rlfleet-rollout.json": rollout,
    "rlfleet-c3po.json": c3po,
    "rlfleet-trainer.json": trainer,
    "rlfleet-weightsync.json": weightsync,
    "rlfleet-buffer.json": buffer,
    "rlfleet-reward.json": reward,
}


def render_all() -> dict[str, str]:
    """File name -> JSON text of every dashboard."""
    return {name: json.dumps(build(), indent=2) + "\n" for name, build in DASHBOARDS.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help="directory to write into")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in render_all().items():
        (args.out / name).write_text(text)
        print(f"wrote {args.out / name}")


if __name__ == "__main__":
    main()
