"""The job commands: submit, jobs, status, logs, cancel, checkpoints (SDK over REST)."""

from __future__ import annotations

import json
import time
import tomllib
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rlfleet_client import Job, RlfleetClient

from rlfleet.cli.follow import follow_job, steps_table

_STATE_STYLE = {
    "queued": "cyan",
    "running": "yellow",
    "succeeded": "green",
    "failed": "red",
    "cancelled": "magenta",
}


def load_spec(path: Path) -> dict:
    """A job spec from a TOML or JSON file; a one-line error for a bad file."""
    if not path.is_file():
        raise SystemExit(f"error: {path} does not exist")
    text = path.read_text()
    try:
        return json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise SystemExit(
            f"error: {path} is not valid {path.suffix.lstrip('.') or 'TOML'}: {exc}"
        ) from None


def _state(job: Job) -> str:
    return f"[{_STATE_STYLE.get(job.state, 'white')}]{job.state}[/]"


def _age(ts: float) -> str:
    s = max(0, int(time.time() - ts))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s // size}{unit} ago"
    return f"{s}s ago"


def cmd_submit(client: RlfleetClient, args, console: Console) -> None:
    spec = load_spec(args.spec)
    if args.model:
        spec.setdefault("model", {})["path"] = str(args.model)
    if args.steps is not None:
        spec["steps"] = args.steps
    job = client.submit(spec, idempotency_key=args.idempotency_key or None)
    console.print(f"submitted job {job.id} ({job.state})")
    if args.follow:
        cmd_follow(client, job.id, console)


def cmd_jobs(client: RlfleetClient, args, console: Console) -> None:
    table = Table()
    table.add_column("id", no_wrap=True, min_width=16)  # copied into other commands: keep whole
    table.add_column("name")
    table.add_column("state", no_wrap=True)
    for col in ("step", "version", "reward", "submitted"):
        table.add_column(col)
    shown = 0
    for job in client.iter_jobs(state=args.state or None, page_size=min(args.limit, 100)):
        reward = job.summary.get("reward_mean")
        table.add_row(
            job.id,
            job.name,
            _state(job),
            f"{job.current_step}/{job.total_steps}",
            str(job.policy_version),
            "-" if reward is None else f"{reward:.3f}",
            _age(job.created_at),
        )
        shown += 1
        if shown >= args.limit:
            break
    console.print(table if shown else "no jobs")


def cmd_status(client: RlfleetClient, args, console: Console) -> None:
    job = client.get_job(args.job_id)
    if args.json:
        console.print_json(job.model_dump_json())
        return
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("job", f"{job.id} ({job.name})")
    table.add_row("state", _state(job) + (f" — {job.reason}" if job.reason else ""))
    table.add_row("step", f"{job.current_step}/{job.total_steps}")
    table.add_row("policy version", str(job.policy_version))
    table.add_row("model", str(job.spec.get("model", {}).get("path", "")))
    task = job.spec.get("task", {})
    table.add_row(
        "task", f"{task.get('name', '')} ({job.spec.get('reward', {}).get('verifier', '')})"
    )
    table.add_row("mode", str(job.spec.get("scheduling", {}).get("mode", "")))
    table.add_row("submitted", _age(job.created_at))
    for key in ("reward_mean", "sft_loss", "loss", "grad_norm", "step_seconds"):
        if key in job.summary:
            table.add_row(key, f"{job.summary[key]:.4g}")
    evaluated = [r for r in client.steps(job.id) if "eval_greedy_reward_mean" in r.metrics]
    if evaluated:  # the latest evaluation (the job's eval block)
        last = evaluated[-1]
        for key, value in sorted(last.metrics.items()):
            if key.startswith("eval_") and key != "eval_seconds":
                table.add_row(f"{key} (step {last.step})", f"{value:.4g}")
    console.print(table)


def cmd_follow(client: RlfleetClient, job_id: str, console: Console) -> Job:
    job, records = follow_job(client, job_id, console=console)
    console.print(steps_table(records, max_rows=10_000))
    console.print(f"job {job.id}: {_state(job)}" + (f" — {job.reason}" if job.reason else ""))
    if job.state == "failed":
        raise SystemExit(1)
    return job


def cmd_logs(client: RlfleetClient, args, console: Console) -> None:
    if args.follow:
        cmd_follow(client, args.job_id, console)
        return
    console.print(steps_table(client.steps(args.job_id), max_rows=10_000))


def cmd_cancel(client: RlfleetClient, args, console: Console) -> None:
    job = client.cancel(args.job_id)
    console.print(f"job {job.id}: {_state(job)}")


def cmd_checkpoints(client: RlfleetClient, args, console: Console) -> None:
    found = client.checkpoints(args.job_id)
    if not found:
        console.print("no checkpoints (yet)")
        return
    table = Table()
    for col in ("step", "version", "path"):
        table.add_column(col)
    for ckpt in found:
        table.add_row(str(ckpt.step), str(ckpt.version), ckpt.path)
    console.print(table)


COMMANDS = {
    "submit": cmd_submit,
    "jobs": cmd_jobs,
    "status": cmd_status,
    "logs": cmd_logs,
    "cancel": cmd_cancel,
    "checkpoints": cmd_checkpoints,
}
