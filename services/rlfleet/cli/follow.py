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


def steps_table(steps: list[StepRecord], *, max_rows: int = 30) -> Table:
    """The closing table: a row per step (thinned out for long jobs)."""
    table = Table(title="steps")
    for col in (
        "step",
        "reward",
        "resp. len",
        "step s",
        "rollout s",
        "train s",
        "grad norm",
        "masked ‰",
    ):
        table.add_column(col, justify="right")
    stride = max(1, -(-len(steps) // max_rows))
    for i, rec in enumerate(steps):
        if i % stride and i != len(steps) - 1:
            continue
        m = rec.metrics
        frac = m.get("masked_fraction")  # IcePop: tokens masked out of the loss
        masked = None if frac is None else 1000 * frac
        table.add_row(
            str(rec.step),
            _fmt(m.get("reward_mean"), ".3f"),
            _fmt(m.get("response_length_mean"), ".1f"),
            _fmt(m.get("step_seconds"), ".2f"),
            _fmt(m.get("rollout_seconds"), ".2f"),
            _fmt(m.get("train_seconds"), ".2f"),
            _fmt(m.get("grad_norm"), ".3f"),
            _fmt(masked, ".2f"),
        )
    return table
