"""The `rlfleet` command: run the local fleet, the demo, and manage jobs.

Job commands talk to the scheduler's REST API through the Python SDK
(rlfleet_client). Imports stay light here (no torch): each subcommand imports
what it needs.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from rlfleet.cli.fleet import default_run_dir

SERVICES = ("scheduler", "rollout", "reward", "trainer", "weightsync", "env")
JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rlfleet", description="RL post-training fleet: services, jobs, demo."
    )
    p.add_argument(
        "--run-dir", type=Path, default=None, help="where the local fleet keeps logs and state"
    )
    p.add_argument(
        "--url",
        default=None,
        help="scheduler REST API (default: $RLFLEET_URL, else the fleet that `rlfleet up` started)",
    )
    p.add_argument("--token", default=None, help="API token (default: $RLFLEET_TOKEN)")
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser(
        "up", help="start Redis and every service as local processes; Ctrl-C stops them"
    )
    up.add_argument("--rollout-replicas", type=int, default=2)
    up.add_argument(
        "--trainer-ranks", type=int, default=1, help="trainer ranks (FSDP2 shards; gloo on CPU)"
    )
    up.add_argument(
        "--engine",
        default="torch",
        help="rollout engine: torch, vllm (runs from .venv-vllm) or sim",
    )
    up.add_argument("--redis-url", default="", help="use this Redis instead of an embedded one")
    up.add_argument(
        "--http-port", type=int, default=8080, help="REST API port (0: a free one; default 8080)"
    )
    up.add_argument(
        "--auth",
        choices=("local", "token"),
        default="local",
        help="REST API auth: local = none (default), token = bearer API tokens",
    )
    up.add_argument("--api-tokens-file", default="", help="token hashes (with --auth token)")
    up.add_argument(
        "--restart-limit",
        type=int,
        default=3,
        help="times a service that exits is restarted (same ports) before the fleet stops",
    )

    demo = sub.add_parser("demo", help="run a GRPO job on a tiny model through a local fleet")
    demo.add_argument("--steps", type=int, default=None, help="override the example's step count")
    demo.add_argument("--rollout-replicas", type=int, default=2)
    demo.add_argument("--trainer-ranks", type=int, default=1, help="trainer ranks (FSDP2)")
    demo.add_argument("--engine", default="torch")
    demo.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "rlfleet")
    demo.add_argument(
        "--json", type=Path, default=None, help="write the demo's figures as JSON here"
    )

    submit = sub.add_parser("submit", help="submit a job spec (TOML or JSON)")
    submit.add_argument("spec", type=Path)
    submit.add_argument("--model", default=None, help="override model.path")
    submit.add_argument("--steps", type=int, default=None, help="override steps")
    submit.add_argument(
        "--idempotency-key", default="", help="a retried submit with this key returns the same job"
    )
    submit.add_argument("--follow", "-f", action="store_true", help="follow the job's progress")

    jobs = sub.add_parser("jobs", help="list jobs, newest first")
    jobs.add_argument("--state", default="", choices=("", *JOB_STATES), help="only this state")
    jobs.add_argument("--limit", type=int, default=50, help="at most this many")

    status = sub.add_parser("status", help="show one job")
    status.add_argument("job_id")
    status.add_argument("--json", action="store_true", help="the whole job as JSON")

    logs = sub.add_parser("logs", help="print a job's step history")
    logs.add_argument("job_id")
    logs.add_argument(
        "--follow", "-f", action="store_true", help="live progress until the job ends"
    )

    cancel = sub.add_parser("cancel", help="cancel a job")
    cancel.add_argument("job_id")

    ckpts = sub.add_parser("checkpoints", help="list a job's Hugging Face checkpoints")
    ckpts.add_argument("job_id")

    plan = sub.add_parser("plan", help="memory per trainer rank and rollout GPU: does a job fit?")
    plan.add_argument("model", help="a model directory or its config.json (no weights read)")
    plan.add_argument("--spec", type=Path, default=None, help="the job spec (TOML or JSON)")
    plan.add_argument("--nodes", type=int, default=1)
    plan.add_argument("--gpus-per-node", type=int, default=8)
    plan.add_argument("--gpu-memory-gib", type=float, default=80.0)
    plan.add_argument("--trainer-gpus", type=int, default=0, help="default: half the GPUs")
    plan.add_argument("--rollout-tp", type=int, default=1, help="rollout tensor-parallel size")
    plan.add_argument("--prompt-tokens", type=int, default=512, help="longest prompt, in tokens")
    plan.add_argument("--headroom", type=float, default=0.9, help="usable share of GPU memory")
    plan.add_argument(
        "--attention", choices=("flash", "eager"), default="flash",
        help="flash: no S^2 attention scores kept (GPUs); eager: kept (CPU)",
    )  # fmt: skip
    plan.add_argument("--json", type=Path, default=None, help="also write the verdict as JSON")

    token = sub.add_parser("token", help="make API tokens (for a scheduler with --auth token)")
    token_sub = token.add_subparsers(dest="token_command", required=True)
    create = token_sub.add_parser("create", help="print a new token and the hash to store")
    create.add_argument("--role", choices=("read", "write"), default="write")
    create.add_argument("--label", default="", help="a name for the token (in the tokens file)")
    hash_ = token_sub.add_parser("hash", help="print the sha256 hash of a token")
    hash_.add_argument("token", nargs="?", default=None, help="the token (default: stdin)")

    for name in SERVICES:
        sub.add_parser(
            name, help=f"run the {name} service (its flags: rlfleet {name} --help)", add_help=False
        )
    return p


def _cmd_plan(args, console: Console) -> None:
    from pydantic import ValidationError

    from rlfleet.cli.jobs import load_spec
    from rlfleet.cli.plan import model_facts, plan, render
    from rlfleet.common.jobspec import JobSpec
    from rlfleet.scheduler.core import describe_spec_error

    raw = load_spec(args.spec) if args.spec else {}
    raw["model"] = {**raw.get("model", {}), "path": str(args.model), "from_job": ""}
    try:
        spec = JobSpec.model_validate(raw)
        for name in ("nodes", "gpus_per_node", "rollout_tp", "prompt_tokens"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        result = plan(model_facts(args.model), spec, nodes=args.nodes,
                      gpus_per_node=args.gpus_per_node, gpu_memory_gib=args.gpu_memory_gib,
                      trainer_gpus=args.trainer_gpus, rollout_tp=args.rollout_tp,
                      prompt_tokens=args.prompt_tokens, headroom=args.headroom,
                      attention=args.attention)  # fmt: skip
    except ValidationError as exc:
        raise SystemExit(f"error: {describe_spec_error(exc)}") from None
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    console.print(render(result), highlight=False, soft_wrap=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


def _cmd_up(args, console: Console, run_dir: Path) -> None:
    from rlfleet.cli.fleet import Fleet, FleetOptions

    if args.trainer_ranks < 1 or args.rollout_replicas < 0:
        raise SystemExit("error: --trainer-ranks must be at least 1 and --rollout-replicas ≥ 0")

    fleet = Fleet(
        FleetOptions(
            run_dir=run_dir,
            rollout_replicas=args.rollout_replicas,
            trainer_ranks=args.trainer_ranks,
            engine=args.engine,
            redis_url=args.redis_url,
            http_port=args.http_port,
            auth=args.auth,
            api_tokens_file=args.api_tokens_file,
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

    fleet_file = run_dir / "fleet.json"

    def write_fleet_file() -> None:
        tmp = fleet_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(fleet.describe(), indent=2) + "\n")
        tmp.replace(fleet_file)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        fleet.start(on_started=started)
    except RuntimeError as exc:
        raise SystemExit(f"error: {exc}") from None
    try:
        write_fleet_file()
        console.print(table)
        console.print(f"REST API: {fleet.url}  (docs: {fleet.url}/docs; auth: {args.auth})")
        console.print(
            "submit a job: `rlfleet submit examples/basic_arithmetic.toml --model DIR -f`, "
            f"or POST it to {fleet.url}/v1/jobs"
        )
        console.print("Ctrl-C stops every service.")
        while not stop:
            for name in fleet.dead():
                code = fleet.exit_code(name)
                if name == "redis" or fleet.restarts.get(name, 0) >= args.restart_limit:
                    console.print(
                        f"[red]{name} exited (code {code}); stopping the fleet (see {run_dir})[/]"
                    )
                    sys.exit(1)
                console.print(
                    f"[yellow]{name} exited (code {code}); restarting it on the same ports "
                    f"({fleet.restarts.get(name, 0) + 1}/{args.restart_limit})[/]"
                )
                try:
                    fleet.restart(name)
                except RuntimeError as exc:
                    console.print(f"[red]could not restart {name}: {exc}[/]")
                    sys.exit(1)
                write_fleet_file()
                console.print(f"{name} is back (pid {fleet.procs[name].pid})")
            time.sleep(0.5)
    finally:
        fleet.stop()
        fleet_file.unlink(missing_ok=True)
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
            trainer_ranks=args.trainer_ranks,
            engine=args.engine,
            json_path=args.json,
            console=console,
        )
        return
    if args.command == "plan":
        _cmd_plan(args, console)
        return
    if args.command == "token":
        from rlfleet.cli.tokens import cmd_token

        cmd_token(args)
        return

    from rlfleet.cli.api import api_errors, make_client
    from rlfleet.cli.jobs import COMMANDS

    client = make_client(args.url, args.token, run_dir)
    try:
        with api_errors(client):
            COMMANDS[args.command](client, args, console)
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    finally:
        client.close()


if __name__ == "__main__":
    main()
