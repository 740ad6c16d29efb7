"""The `rlfleet` command: run the local fleet, the demo, and manage jobs.

Imports stay light here (no torch): each subcommand imports what it needs.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
import tomllib
from pathlib import Path

from rich.console import Console
from rich.table import Table

from rlfleet.cli.fleet import default_run_dir

SERVICES = ("scheduler", "rollout", "reward", "trainer", "weightsync")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rlfleet", description="RL post-training fleet: services, jobs, demo."
    )
    p.add_argument(
        "--run-dir", type=Path, default=None, help="where the local fleet keeps logs and state"
    )
    p.add_argument("--scheduler", default=None, help="scheduler gRPC address HOST:PORT")
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser(
        "up", help="start Redis and every service as local processes; Ctrl-C stops them"
    )
    up.add_argument("--rollout-replicas", type=int, default=2)
    up.add_argument("--engine", default="torch", help="rollout engine: torch")
    up.add_argument("--redis-url", default="", help="use this Redis instead of an embedded one")

    demo = sub.add_parser("demo", help="run a GRPO job on a tiny model through a local fleet")
    demo.add_argument("--steps", type=int, default=None, help="override the example's step count")
    demo.add_argument("--rollout-replicas", type=int, default=2)
    demo.add_argument("--engine", default="torch")
    demo.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "rlfleet")
    demo.add_argument(
        "--json", type=Path, default=None, help="write the demo's figures as JSON here"
    )

    submit = sub.add_parser("submit", help="submit a job spec (TOML or JSON)")
    submit.add_argument("spec", type=Path)
    submit.add_argument("--idempotency-key", default="")
    submit.add_argument("--follow", "-f", action="store_true", help="follow the job's progress")

    jobs = sub.add_parser("jobs", help="list jobs")
    jobs.add_argument("--state", default="", help="queued, running, succeeded, failed or cancelled")

    status = sub.add_parser("status", help="show one job")
    status.add_argument("job_id")

    logs = sub.add_parser("logs", help="print a job's step history")
    logs.add_argument("job_id")
    logs.add_argument(
        "--follow", "-f", action="store_true", help="live progress until the job ends"
    )

    cancel = sub.add_parser("cancel", help="cancel a job")
    cancel.add_argument("job_id")

    for name in SERVICES:
        sub.add_parser(
            name, help=f"run the {name} service (its flags: rlfleet {name} --help)", add_help=False
        )
    return p


def _load_spec(path: Path) -> dict:
    if not path.is_file():
        raise SystemExit(f"error: {path} does not exist")
    text = path.read_text()
    try:
        return json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise SystemExit(
            f"error: {path} is not valid {path.suffix.lstrip('.') or 'TOML'}: {exc}"
        ) from None


def _cmd_up(args, console: Console, run_dir: Path) -> None:
    from rlfleet.cli.fleet import Fleet, FleetOptions

    fleet = Fleet(
        FleetOptions(
            run_dir=run_dir,
            rollout_replicas=args.rollout_replicas,
            engine=args.engine,
            redis_url=args.redis_url,
        )
    )
    table = Table(title=f"rlfleet up — logs in {run_dir}")
    for col in ("service", "pid", "gRPC", "metrics"):
        table.add_column(col)

    def started(name, proc):
        console.print(f"started {name} (pid {proc.pid})")
        table.add_row(
            name,
            str(proc.pid),
            f"127.0.0.1:{proc.info.get('port')}",
            str(proc.info.get("metrics_port", "")),
        )

    stop = False

    def on_signal(*_):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    fleet.start(on_started=started)
    try:
        (run_dir / "fleet.json").write_text(
            json.dumps(
                {
                    "scheduler": fleet.scheduler_address,
                    "redis_url": fleet.redis_url,
                    "services": {n: p.address for n, p in fleet.procs.items()},
                    "pids": {n: p.pid for n, p in fleet.procs.items()},
                }
            )
            + "\n"
        )
        console.print(table)
        console.print(
            f"scheduler at {fleet.scheduler_address}; submit with `rlfleet submit examples/demo_arithmetic.toml`"
        )
        console.print("Ctrl-C stops every service.")
        while not stop:
            dead = fleet.dead()
            if dead:
                console.print(
                    f"[red]{', '.join(dead)} exited; stopping the fleet (see {run_dir})[/]"
                )
                sys.exit(1)
            time.sleep(0.5)
    finally:
        fleet.stop()
        (run_dir / "fleet.json").unlink(missing_ok=True)
        console.print("fleet stopped")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `rlfleet <service> ...` runs that service's process entry with the rest of the flags.
    if argv and argv[0] in SERVICES:
        import importlib

        importlib.import_module(f"rlfleet.{argv[0]}.__main__").main(argv[1:])
        return
    args = _parser().parse_args(argv)
    console = Console()
    run_dir = (args.run_dir or default_run_dir()).resolve()

    if args.command == "up":
        _cmd_up(args, console, run_dir)
        return
    if args.command == "demo":
        from rlfleet.cli.demo import run_demo

        run_demo(
            run_dir=(args.run_dir or Path("runs/demo")).resolve(),
            cache_dir=args.cache_dir,
            steps=args.steps,
            replicas=args.rollout_replicas,
            engine=args.engine,
            json_path=args.json,
            console=console,
        )
        return

    from rlfleet.cli.follow import follow_job, steps_table
    from rlfleet.cli.scheduler_client import SchedulerClient, job_to_dict, resolve_scheduler_address
    from rlfleet.common.errors import RlfleetError

    client = SchedulerClient(resolve_scheduler_address(args.scheduler, run_dir))
    try:
        if args.command == "submit":
            job = client.submit(_load_spec(args.spec), idempotency_key=args.idempotency_key)
            console.print(f"submitted job {job.job_id} ({job.state})")
            if args.follow:
                job, records = follow_job(client, job.job_id, console=console)
                console.print(steps_table(records))
        elif args.command == "jobs":
            table = Table()
            for col in ("id", "state", "step", "version", "name"):
                table.add_column(col)
            for job in client.list(state=args.state):
                name = json.loads(job.spec_json or "{}").get("name", "")
                table.add_row(
                    job.job_id,
                    job.state,
                    f"{job.current_step}/{job.total_steps}",
                    str(job.policy_version),
                    name,
                )
            console.print(table)
        elif args.command == "status":
            console.print_json(json.dumps(job_to_dict(client.get(args.job_id))))
        elif args.command == "logs":
            if args.follow:
                _job, records = follow_job(client, args.job_id, console=console)
            else:
                records = client.steps(args.job_id)
            console.print(steps_table(records, max_rows=10_000))
        elif args.command == "cancel":
            job = client.cancel(args.job_id)
            console.print(f"job {job.job_id}: {job.state}")
    except RlfleetError as exc:
        raise SystemExit(f"error: {exc.message}") from None
    finally:
        client.close()


if __name__ == "__main__":
    main()
