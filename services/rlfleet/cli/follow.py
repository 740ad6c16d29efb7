"""Following a job in the terminal: a live progress bar fed by the job's event
stream (server-sent events), and a closing table. Used by `rlfleet logs -f`,
`rlfleet submit -f` and `rlfleet demo`.
"""

from __future__ import annotations

from collections.abc import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rlfleet_client import Job, RlfleetClient, StepRecord


def _status(job: Job, steps: list[StepRecord]) -> str:
    if not steps:
        return job.state
    if "reward_mean" not in steps[-1].metrics and "sft_loss" in steps[-1].metrics:
        return f"sft loss {steps[-1].metrics['sft_loss']:.3f}  v{job.policy_version}  {job.state}"
    rewards = [s.metrics.get("reward_mean", 0.0) for s in steps]
    last5 = rewards[-5:]
    return (
        f"reward {rewards[-1]:.3f} (last 5: {sum(last5) / len(last5):.3f})  "
        f"v{job.policy_version}  {job.state}"
    )


def follow_job(
    client: RlfleetClient,
    job_id: str,
    *,
    console: Console,
    check_alive: Callable[[], None] | None = None,
    reconnect_for: float = 300.0,
) -> tuple[Job, list[StepRecord]]:
    """Shows progress until the job ends; returns the final job and all step records.

    The event stream reconnects by itself (for up to ``reconnect_for`` seconds),
    so a scheduler restart shows as a pause, not an error.
    """
    job = client.get_job(job_id)
    steps: dict[int, StepRecord] = {}
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        bar = progress.add_task(f"job {job_id}", total=job.total_steps or None, status=job.state)
        for event in client.events(job_id, reconnect_for=reconnect_for):
            if event.event == "step":
                record = event.step
                steps[record.step] = record
                job = job.model_copy(
                    update={
                        "current_step": max(job.current_step, record.step + 1),
                        "policy_version": int(
                            record.metrics.get("policy_version", job.policy_version)
                        ),
                    }
                )
            else:  # "state" or "end": the whole job
                job = event.job
            ordered = [steps[k] for k in sorted(steps)]
            progress.update(
                bar,
                completed=len(ordered),
                total=job.total_steps or None,
                status=_status(job, ordered),
            )
            if check_alive:
                check_alive()
    return job, [steps[k] for k in sorted(steps)]


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _pass_at_k_key(steps: list[StepRecord]) -> str | None:
    for rec in reversed(steps):
        for key in rec.metrics:
            if key.startswith("eval_pass_at_"):
                return key
    return None


def steps_table(steps: list[StepRecord], *, max_rows: int = 30) -> Table:
    """The closing table: a row per step (thinned out for long jobs). SFT steps show their
    loss, and evaluated steps (the job's ``eval`` block) their eval figures."""
    table = Table(title="steps")
    columns: list[tuple[str, str, str]] = [("step", "", "")]
    if any("sft_loss" in r.metrics for r in steps):
        columns.append(("sft loss", "sft_loss", ".3f"))
    if any("reward_mean" in r.metrics for r in steps):
        columns.append(("reward", "reward_mean", ".3f"))
    if any("eval_greedy_reward_mean" in r.metrics for r in steps):
        columns.append(("eval greedy", "eval_greedy_reward_mean", ".3f"))
    pass_key = _pass_at_k_key(steps)
    if pass_key:
        columns.append((f"eval pass@{pass_key.rsplit('_', 1)[1]}", pass_key, ".3f"))
    columns += [
        ("resp. len", "response_length_mean", ".1f"),
        ("step s", "step_seconds", ".2f"),
        ("rollout s", "rollout_seconds", ".2f"),
        ("train s", "train_seconds", ".2f"),
        ("grad norm", "grad_norm", ".3f"),
        ("masked ‰", "masked_fraction", ".2f"),  # IcePop: tokens masked out of the loss
    ]
    for title, _, _ in columns:
        table.add_column(title, justify="right")
    stride = max(1, -(-len(steps) // max_rows))
    for i, rec in enumerate(steps):
        if i % stride and i != len(steps) - 1:
            continue
        row = [str(rec.step)]
        for _, key, spec in columns[1:]:
            value = rec.metrics.get(key)
            if key == "masked_fraction" and value is not None:
                value *= 1000
            row.append(_fmt(value, spec))
        table.add_row(*row)
    return table
