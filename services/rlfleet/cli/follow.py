"""Following a job in the terminal: a live progress bar of reward per step and a
closing table. Used by `rlfleet logs -f` and `rlfleet demo`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from rlfleet.cli.scheduler_client import TERMINAL_STATES, SchedulerClient
from rlfleet.v1 import scheduler_pb2


def follow_job(
    client: SchedulerClient,
    job_id: str,
    *,
    console: Console,
    poll_s: float = 0.5,
    check_alive: Callable[[], None] | None = None,
) -> tuple[scheduler_pb2.Job, list[scheduler_pb2.StepRecord]]:
    """Shows progress until the job ends; returns the final job and all step records."""
    job = client.get(job_id)
    steps: list[scheduler_pb2.StepRecord] = []
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        bar = progress.add_task(f"job {job_id}", total=job.total_steps or None, status=job.state)
        while True:
            fresh = client.steps(job_id, since_step=len(steps))
            steps += fresh
            job = client.get(job_id)
            status = job.state
            if steps:
                rewards = [s.metrics.get("reward_mean", 0.0) for s in steps]
                last5 = rewards[-5:]
                status = (
                    f"reward {rewards[-1]:.3f} (last 5: {sum(last5) / len(last5):.3f})  "
                    f"v{job.policy_version}  {job.state}"
                )
            progress.update(bar, completed=len(steps), total=job.total_steps or None, status=status)
            if job.state in TERMINAL_STATES:
                # Steps recorded in the last poll interval.
                steps += client.steps(job_id, since_step=len(steps))
                progress.update(bar, completed=len(steps))
                return job, steps
            if check_alive:
                check_alive()
            time.sleep(poll_s)


def steps_table(steps: list[scheduler_pb2.StepRecord], *, max_rows: int = 30) -> Table:
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
        table.add_row(
            str(rec.step),
            f"{m.get('reward_mean', 0):.3f}",
            f"{m.get('response_length_mean', 0):.1f}",
            f"{m.get('step_seconds', 0):.2f}",
            f"{m.get('rollout_seconds', 0):.2f}",
            f"{m.get('train_seconds', 0):.2f}",
            f"{m.get('grad_norm', 0):.3f}",
            f"{1000 * (m.get('icepop_masked_frac_below', 0) + m.get('icepop_masked_frac_above', 0)):.2f}",
        )
    return table
