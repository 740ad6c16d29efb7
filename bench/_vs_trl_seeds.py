"""One run's figures, and one system's figures over the seeds it ran with.

A run (one system, one job, one seed) gives seconds per step, reward per step, phases per
step and CPU per step. Over seeds: seconds per step is the median of every run's steady steps
pooled (each run's first step, which pays for warm-up, left out); the final reward is each
run's last-5 mean, averaged over seeds (its spread over seeds is what the reward verdict
weighs, ``_vs_trl_verdict.reward``); CPU per step is the mean over seeds; the reward curve is
the mean over seeds at each step.
"""

from __future__ import annotations

import statistics

import _common
import _vs_trl_cpu as cpu
import _vs_trl_phases as phases


def step_times(ends: list[float], start: float) -> list[float]:
    """Seconds per step from the wall-clock ends of consecutive steps."""
    times, prev = [], start
    for end in ends:
        times.append(end - prev)
        prev = end
    return times


def run_figures(name: str, seed: int, times: list[float], rewards: list[float], lengths, samples,
                wall: float) -> dict:  # fmt: skip
    """The figures of one run; the caller adds ``phase_steps``, ``cpu_s_per_step`` and
    ``generation_detail``."""
    steady = times[1:] if len(times) > 1 else times
    med = statistics.median(steady)
    return {
        "system": name,
        "seed": seed,
        "step_s": times,
        "step_s_median": med,
        "samples": samples,
        "samples_per_s": samples / med,
        "rewards": rewards,
        "reward_first5": statistics.fmean(rewards[:5]),
        "reward_last5": statistics.fmean(rewards[-5:]),
        "response_length_mean": lengths,
        "wall_s": wall,
        "load": _common.load(),
    }


def combine(runs: list[dict]) -> dict:
    """One system's figures over its runs (one per seed, same job)."""
    steady = [t for r in runs for t in (r["step_s"][1:] or r["step_s"])]
    med = statistics.median(steady)
    n = min(len(r["rewards"]) for r in runs)
    curve = [statistics.fmean(r["rewards"][i] for r in runs) for i in range(n)]
    lengths = [statistics.fmean(r["response_length_mean"][i] for r in runs) for i in range(n)]
    pooled_phases = [s for r in runs for s in (r["phase_steps"][1:] or r["phase_steps"])]
    breakdown = phases.summarise(pooled_phases, skip_first=False)
    breakdown["cpu_s_per_step"] = cpu.mean_per_step([r["cpu_s_per_step"] for r in runs])
    details = [r["generation_detail"] for r in runs]
    out = {
        "system": runs[0]["system"],
        "seeds": [r["seed"] for r in runs],
        # per step, the median over seeds (for the plot); the headline is step_s_median
        "step_s": [statistics.median(r["step_s"][i] for r in runs) for i in range(n)],
        "step_s_median": med,
        "samples_per_s": statistics.median(r["samples"] for r in runs) / med,
        "rewards": curve,
        "reward_first5": statistics.fmean(curve[:5]),
        "reward_last5": statistics.fmean(r["reward_last5"] for r in runs),
        "reward_last5_by_seed": [r["reward_last5"] for r in runs],
        "response_length_mean": lengths,
        "wall_s": sum(r["wall_s"] for r in runs),
        "load": runs[-1]["load"],
        "breakdown": breakdown,
        "generation_detail": {k: statistics.median(d[k] for d in details) for k in details[0]},
        "per_seed": [
            {
                "seed": r["seed"],
                "step_s_median": r["step_s_median"],
                "reward_last5": r["reward_last5"],
                "cpu_s_per_step": r["cpu_s_per_step"].get("total"),
                "wall_s": r["wall_s"],
                "load_1m": r["load"]["loadavg_1m"],
            }
            for r in runs
        ],
    }
    if "torch_threads" in runs[0]:
        out["torch_threads"] = runs[0]["torch_threads"]
    if "same_prompts_per_step" in runs[0]:
        out["same_prompts_per_step"] = all(r["same_prompts_per_step"] for r in runs)
    return out
