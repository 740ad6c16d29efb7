"""The three-stage example through the REST API: SFT -> RLVR -> RLHF on the tiny demo
model, each stage starting from the previous one's final checkpoint (model.from_job).

    rlfleet up &                        # a local fleet (or point --url at any scheduler)
    python examples/stages/run.py

It builds what it needs offline first (the demo model, the data, the tiny reward model),
then submits 1_sft.toml, 2_rlvr.toml and 3_rlhf.toml one after the other, each with the
previous job's id as ``model.from_job``, and prints each stage's figures. The test suite
runs the same functions (tests/e2e/test_stages.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
STAGES = ("1_sft.toml", "2_rlvr.toml", "3_rlhf.toml")


def prepare(cache_dir: Path, data_path: Path) -> tuple[Path, Path]:
    """Builds (once, cached) the demo base model, the data and the tiny reward model."""
    sys.path.insert(0, str(HERE))
    from make_data import write
    from rlfleet.cli.demo_model import prepare_demo_model
    from rlfleet.cli.demo_reward_model import prepare_demo_reward_model

    base = prepare_demo_model(cache_dir)
    if not data_path.is_file():
        write(data_path)
    reward_model = prepare_demo_reward_model(cache_dir, base_model_dir=base)
    return base, reward_model


def stage_specs(*, base_model: Path, data_path: Path, reward_model: Path) -> list[dict]:
    """The three job specs with this machine's paths filled in (from_job is set at submission)."""
    specs = []
    for name in STAGES:
        spec = tomllib.loads((HERE / name).read_text())
        spec["task"]["dataset"]["path"] = str(data_path)
        if "path" in spec["model"]:
            spec["model"]["path"] = str(base_model)
        if spec["reward"]["verifier"] == "reward_model":
            spec["reward"]["reward_model"]["path"] = str(reward_model)
        specs.append(spec)
    return specs


def run_stages(client, specs: list[dict], *, timeout: float = 3600.0,
               say: Callable[[str], None] = print) -> list:  # fmt: skip
    """Submits each stage once the previous one has succeeded; returns the finished jobs."""
    jobs = []
    for spec in specs:
        if jobs:
            spec = {**spec, "model": {**spec["model"], "from_job": jobs[-1].id}}
        job = client.submit(spec)
        say(f"{spec['name']}: submitted {job.id}")
        job = client.wait(job.id, timeout=timeout)
        if job.state != "succeeded":
            raise RuntimeError(f"{spec['name']} ({job.id}) ended {job.state}: {job.reason}")
        jobs.append(job)
        say(f"{spec['name']}: {summary(client.steps(job.id))}")
    return jobs


def summary(steps) -> str:
    first, last = steps[0].metrics, steps[-1].metrics
    parts = []
    for key in ("sft_loss", "reward_mean", "eval_greedy_reward_mean"):
        if key in last:
            start = f"{first[key]:.3f} -> " if key in first and len(steps) > 1 else ""
            parts.append(f"{key} {start}{last[key]:.3f}")
    parts += [f"{k} {v:.3f}" for k, v in last.items() if k.startswith("eval_pass_at_")]
    return ", ".join(parts)


def main() -> None:
    from rlfleet.cli.api import resolve_url
    from rlfleet.cli.fleet import default_run_dir
    from rlfleet_client import RlfleetClient

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--url", default=None, help="the scheduler's REST API (default: the local fleet)"
    )
    parser.add_argument("--run-dir", type=Path, default=default_run_dir())
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "rlfleet")
    parser.add_argument("--data", type=Path, default=Path("examples/data/arithmetic_stages.jsonl"))
    args = parser.parse_args()
    base, reward_model = prepare(args.cache_dir, args.data.resolve())
    specs = stage_specs(base_model=base, data_path=args.data.resolve(), reward_model=reward_model)
    with RlfleetClient(resolve_url(args.url, args.run_dir)) as client:
        jobs = run_stages(client, specs)
    print(json.dumps({"jobs": [j.id for j in jobs]}))


if __name__ == "__main__":
    main()
