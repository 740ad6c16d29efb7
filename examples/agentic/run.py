"""The calculator example through the REST API: SFT on tool transcripts, then RL with
the calculator in the ``tools`` environment, on a tiny model.

    rlfleet up &                        # a local fleet (or point --url at any scheduler)
    python examples/agentic/run.py

It builds what it needs offline first (the model and the data, ``make_data.py``), then
submits 1_sft.toml and 2_rl.toml (with stage 1's job id as ``model.from_job``), prints
every RL step's reward and tool-call rate as it comes, and a verdict: how often the
model calls the calculator after SFT, and the reward of the first RL steps against the
last. The test suite runs the same functions (tests/e2e/test_agentic_example.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
STAGES = ("1_sft.toml", "2_rl.toml")


def prepare(cache_dir: Path, sft_path: Path, rl_path: Path, *, sft_rows: int = 4000,
            rl_rows: int = 2000, say: Callable[[str], None] = print) -> Path:  # fmt: skip
    """Builds (once, cached) the example's model; writes the data if it is missing."""
    make_data = load_module("make_data")
    if not sft_path.is_file():
        make_data.write_sft(sft_path, sft_rows)
    if not rl_path.is_file():
        make_data.write_rl(rl_path, rl_rows)
    return make_data.model_dir(cache_dir, say=say)


def load_module(name: str):
    """This directory's ``name``.py, imported by its path under a name of its own
    (examples/stages has a make_data.py and a run.py too; sys.path would mix them up)."""
    import importlib.util

    key = f"rlfleet_examples_agentic_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, HERE / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


def stage_specs(*, model: Path, sft_path: Path, rl_path: Path, sft_steps: int | None = None,
                rl_steps: int | None = None, seed: int | None = None) -> list[dict]:  # fmt: skip
    """The two job specs with this machine's paths filled in (from_job is set at submission);
    ``sft_steps``, ``rl_steps`` and ``seed`` override the TOMLs'."""
    sft, rl = (tomllib.loads((HERE / name).read_text()) for name in STAGES)
    sft["model"]["path"] = str(model)
    sft["task"]["dataset"]["path"] = str(sft_path)
    rl["task"]["dataset"]["path"] = str(rl_path)
    for spec, steps in ((sft, sft_steps), (rl, rl_steps)):
        if steps is not None:
            spec["steps"] = steps
        if seed is not None:
            spec["seed"] = seed
            spec["task"]["seed"] += seed
    return [sft, rl]


def run_stages(client, specs: list[dict], *, timeout: float = 3600.0,
               say: Callable[[str], None] = print) -> list:  # fmt: skip
    """Submits each stage once the previous one has succeeded, printing each RL step as it
    ends; returns the finished jobs."""
    jobs = []
    for spec in specs:
        if jobs:
            spec = {**spec, "model": {**spec["model"], "from_job": jobs[-1].id}}
        job = client.submit(spec)
        say(f"{spec['name']}: submitted {job.id}")
        if "environment" in spec["task"]:
            for event in client.events(job.id):
                if event.event == "step":
                    say(step_line(event.step.step, event.step.metrics))
        job = client.wait(job.id, timeout=timeout)
        if job.state != "succeeded":
            raise RuntimeError(f"{spec['name']} ({job.id}) ended {job.state}: {job.reason}")
        jobs.append(job)
        if "environment" not in spec["task"]:
            steps = client.steps(job.id)
            say(f"{spec['name']}: sft_loss {steps[0].metrics['sft_loss']:.3f} -> "
                f"{steps[-1].metrics['sft_loss']:.3f} over {len(steps)} steps")  # fmt: skip
    return jobs


def step_line(step: int, m: dict) -> str:
    return (f"  step {step:3d}: reward_mean {m.get('reward_mean', float('nan')):.3f}  "
            f"env_tool_call_rate {m.get('env_tool_call_rate', float('nan')):.3f}  "
            f"env_turns_mean {m.get('env_turns_mean', float('nan')):.2f}  "
            f"({m.get('step_seconds', 0.0):.1f} s)")  # fmt: skip


def verdict(rl_metrics: list[dict], *, window: int = 5) -> dict:
    """The RL stage in figures: the tool-call rate and reward of its first ``window`` steps
    (the SFT'd model) against its last ``window``."""

    def mean(key: str, part: list[dict]) -> float:
        return sum(m[key] for m in part) / len(part)

    window = max(1, min(window, len(rl_metrics) // 2 or 1))
    first, last = rl_metrics[:window], rl_metrics[-window:]
    return {
        "steps": len(rl_metrics),
        "window": window,
        "tool_call_rate_step0": rl_metrics[0]["env_tool_call_rate"],
        "tool_call_rate_first": mean("env_tool_call_rate", first),
        "tool_call_rate_last": mean("env_tool_call_rate", last),
        "reward_step0": rl_metrics[0]["reward_mean"],
        "reward_first": mean("reward_mean", first),
        "reward_last": mean("reward_mean", last),
    }


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
    parser.add_argument("--data-dir", type=Path, default=Path("examples/data"))
    parser.add_argument("--sft-steps", type=int, default=None, help="default: 1_sft.toml's")
    parser.add_argument("--rl-steps", type=int, default=None, help="default: 2_rl.toml's")
    parser.add_argument("--seed", type=int, default=None, help="added to both stages' seeds")
    parser.add_argument("--json", type=Path, default=None, help="write the verdict here")
    args = parser.parse_args()
    sft_path = (args.data_dir / "agentic_sft.jsonl").resolve()
    rl_path = (args.data_dir / "agentic_rl.jsonl").resolve()
    model = prepare(args.cache_dir, sft_path, rl_path)
    specs = stage_specs(model=model, sft_path=sft_path, rl_path=rl_path,
                        sft_steps=args.sft_steps, rl_steps=args.rl_steps, seed=args.seed)  # fmt: skip
    with RlfleetClient(resolve_url(args.url, args.run_dir)) as client:
        sft, rl = run_stages(client, specs)
        result = verdict([r.metrics for r in client.steps(rl.id)])
    print(f"after SFT the model calls the calculator in {result['tool_call_rate_step0']:.0%} "
          f"of episodes (RL step 0); RL reward {result['reward_first']:.3f} (first "
          f"{result['window']} steps) -> {result['reward_last']:.3f} (last {result['window']})")  # fmt: skip
    result["jobs"] = [sft.id, rl.id]
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
