"""`rlfleet demo`: a local fleet and a GRPO job on a tiny model that learns.

Builds (once, cached) a tiny Llama-style model warm-started on the task, starts
every service as its own process, submits examples/demo_arithmetic.toml, shows
reward per step, prints a closing table and stops the fleet.
"""

from __future__ import annotations

import json
import time
import tomllib
from pathlib import Path

from rich.console import Console
from rlfleet_client import RlfleetClient

from rlfleet.cli.fleet import Fleet, FleetOptions
from rlfleet.cli.follow import follow_job, steps_table

REPO_ROOT = Path(__file__).resolve().parents[3]
DEMO_SPEC = REPO_ROOT / "examples" / "demo_arithmetic.toml"


def demo_spec(model_path: Path, *, steps: int | None, engine: str) -> dict:
    spec = tomllib.loads(DEMO_SPEC.read_text())
    spec["model"]["path"] = str(model_path)
    if steps is not None:
        spec["steps"] = steps
    return spec


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def run_demo(
    *,
    run_dir: Path,
    cache_dir: Path,
    steps: int | None,
    replicas: int,
    engine: str,
    json_path: Path | None,
    trainer_ranks: int = 1,
    console: Console,
) -> dict:
    from rlfleet.cli.demo_model import prepare_demo_model

    t0 = time.monotonic()
    console.print(
        "[bold]1/3[/] preparing the tiny base model (built and warm-started once, then cached)"
    )
    model_path = prepare_demo_model(cache_dir, progress=lambda msg: console.print(f"    {msg}"))
    console.print(f"    model: {model_path}")
    console.print(f"[bold]2/3[/] starting the fleet in {run_dir} (logs: {run_dir}/*.log)")
    fleet = Fleet(
        FleetOptions(
            run_dir=run_dir, rollout_replicas=replicas, engine=engine, trainer_ranks=trainer_ranks
        )
    )

    def started(name, proc):
        console.print(f"    {name:<10} pid {proc.pid:<7} 127.0.0.1:{proc.info.get('port')}")

    fleet.start(on_started=started)
    try:
        client = RlfleetClient(fleet.url)
        spec = demo_spec(model_path, steps=steps, engine=engine)
        job = client.submit(spec)
        console.print(
            f"[bold]3/3[/] GRPO job {job.id}: {spec['steps']} steps on {spec['task']['name']}"
        )

        def check_alive():
            dead = fleet.dead()
            if dead:
                raise SystemExit(f"error: {', '.join(dead)} exited; see {run_dir}/<service>.log")

        job, records = follow_job(client, job.id, console=console, check_alive=check_alive)
        client.close()
    finally:
        fleet.stop()
    console.print(steps_table(records))
    rewards = [r.metrics.get("reward_mean", 0.0) for r in records]
    result = {
        "steps": len(records),
        "reward_first5": round(mean(rewards[:5]), 4),
        "reward_last5": round(mean(rewards[-5:]), 4),
        "wall_s": round(time.monotonic() - t0, 1),
        "state": job.state,
        "job_id": job.id,
    }
    verdict = (
        "learned" if result["reward_last5"] - result["reward_first5"] >= 0.2 else "did not gain 0.2"
    )
    console.print(
        f"job {job.state}: reward first 5 steps {result['reward_first5']:.3f} -> "
        f"last 5 steps {result['reward_last5']:.3f} ({verdict}); {result['wall_s']:.0f}s in all"
    )
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2) + "\n")
        console.print(f"wrote {json_path}")
    if job.state != "succeeded":
        raise SystemExit(f"error: job {job.state}: {job.reason}")
    return result
