"""The targets of issue #9 for vs_trl.py, judged as issue #13 asks, and what a reader needs to
judge a miss.

Speed, judged twice: by wall time (rlfleet's median s/step no worse than TRL's on the same
job, ratio TRL/rlfleet ≥ 1, and better on the long-tailed job, ratio > 1) and by CPU-seconds
per step of every process of each system (the same bounds), with both systems pinned to the
same cores. A wall-time miss says by how much and which phases rlfleet spends more time in
than TRL; a CPU miss says which of rlfleet's processes spend the CPU.

Reward, over seeds: a run's final reward is the mean reward of its last 5 steps; per system
the mean over the seeds and its standard error (stdev over seeds / √n). The rule, printed with
every verdict: met if rlfleet's mean ≥ TRL's; "met within noise" if rlfleet falls short by at
most 2 combined standard errors √(se_trl² + se_rlfleet²) — only with at least 3 seeds; missed
otherwise. Both systems are deterministic for a seed (a repeated run repeats its rewards), so
run-to-run spread only shows across seeds, and the per-step noise inside one run (which also
counts a learning trend) is no stand-in for it.
"""

from __future__ import annotations

import math
import statistics

from _vs_trl_phases import PHASES

MIN_SEEDS = 3  # the noise allowance needs at least this many seeds
NOISE_SES = 2.0  # the allowance: this many combined standard errors over seeds
REWARD_RULE = (
    "final reward = mean of a run's last 5 steps; per system the mean over seeds and its "
    "standard error (stdev over seeds / sqrt(n)); met if rlfleet >= TRL; 'met within noise' if "
    f"rlfleet >= TRL - {NOISE_SES:g} combined standard errors sqrt(se_trl^2 + se_rlfleet^2), "
    f"only with >= {MIN_SEEDS} seeds; else missed"
)


def speed(job: str, ratio: float, *, strict: bool, breakdown: dict[str, dict]) -> dict:
    """Verdict on TRL s/step over rlfleet s/step; ``strict``: the target is > 1, else ≥ 1."""
    met = ratio > 1 if strict else ratio >= 1
    target = "> 1" if strict else ">= 1"
    line = f"{job}, wall time: rlfleet runs at {ratio:.2f}x TRL's speed (target {target}): "
    out = {"kind": "speed", "job": job, "ratio": ratio, "target": target, "met": met}
    if met:
        out["line"] = line + "met"
        return out
    short = 1 - ratio
    out["short_by_frac"] = short
    slower = _slower_phases(breakdown)
    where = ", ".join(f"{p} +{d:.3f}s" for p, d in slower) or "no single phase"
    out["slower_phases_s"] = dict(slower)
    out["line"] = (
        line
        + f"MISSED, {short:.0%} short; rlfleet spends more than TRL per step (median) in: "
        + where
        + " (see 'where the time goes' above)"
    )
    return out


def cpu(job: str, trl: dict[str, float], rlfleet: dict[str, float], *, strict: bool) -> dict:
    """Verdict on TRL's CPU-s per step over rlfleet's (all processes of each), same bounds."""
    target = "> 1" if strict else ">= 1"
    a, b = trl.get("total"), rlfleet.get("total")
    out = {"kind": "cpu", "job": job, "target": target, "trl": a, "rlfleet": b}
    if not a or not b:
        out.update(ratio=None, met=None, line=f"{job}, CPU: not measured (too few snapshots)")
        return out
    ratio = a / b
    met = ratio > 1 if strict else ratio >= 1
    out.update(ratio=ratio, met=met)
    line = f"{job}, CPU-s per step: TRL {a:.3f} / rlfleet {b:.3f} = {ratio:.2f} (target {target}): "
    if met:
        out["line"] = line + "met"
        return out
    out["short_by_frac"] = 1 - ratio
    procs = sorted(((n, v) for n, v in rlfleet.items() if n != "total"), key=lambda x: -x[1])
    out["rlfleet_cpu_s_by_process"] = dict(procs)
    out["line"] = (
        line
        + f"MISSED, {1 - ratio:.0%} short; rlfleet's CPU-s per step by process: "
        + ", ".join(f"{n} {v:.3f}" for n, v in procs)
    )
    return out


def _slower_phases(breakdown: dict[str, dict]) -> list[tuple[str, float]]:
    """Phases where rlfleet's median exceeds TRL's, largest gap first."""
    ours, theirs = breakdown["rlfleet"]["median_s"], breakdown["trl"]["median_s"]
    gaps = [(p, ours[p] - theirs[p]) for p in PHASES if ours[p] - theirs[p] > 0.0005]
    return sorted(gaps, key=lambda g: -g[1])


def standard_error(values: list[float]) -> float:
    """stdev / √n over seeds; NaN with fewer than two."""
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")


def reward(job: str, trl: list[float], rlfleet: list[float], seeds: list[int]) -> dict:
    """Verdict on the final reward (last-5 mean of each run), over seeds, rule spelled out.

    ``trl`` and ``rlfleet`` hold one final reward per seed, in the order of ``seeds``."""
    a, b = statistics.fmean(trl), statistics.fmean(rlfleet)
    se_a, se_b = standard_error(trl), standard_error(rlfleet)
    combined = math.hypot(se_a, se_b)
    enough = len(seeds) >= MIN_SEEDS and math.isfinite(combined)
    allowance = NOISE_SES * combined if enough else 0.0
    diff = b - a
    if diff >= 0:
        verdict = "met"
    elif enough and -diff <= allowance:
        verdict = "met within noise"
    elif enough:
        verdict = f"MISSED by {-diff - allowance:.3f} beyond {NOISE_SES:g} combined standard errors"
    else:
        verdict = (
            f"MISSED by {-diff:.3f} (only {len(seeds)} seed(s): no noise allowance below "
            f"{MIN_SEEDS})"
        )
    se_note = (
        f"combined standard error over {len(seeds)} seeds {combined:.3f}, allowance {allowance:.3f}"
        if math.isfinite(combined)
        else "one seed: no standard error"
    )
    line = (
        f"{job}: final reward (last-5 mean) over seeds {seeds}: rlfleet {b:.3f} ± {se_b:.3f}, "
        f"TRL {a:.3f} ± {se_a:.3f}; rlfleet − TRL = {diff:+.3f}; {se_note}: {verdict}"
    )
    return {
        "kind": "reward",
        "job": job,
        "trl": a,
        "rlfleet": b,
        "trl_by_seed": trl,
        "rlfleet_by_seed": rlfleet,
        "seeds": seeds,
        "se_trl": se_a,
        "se_rlfleet": se_b,
        "combined_se": combined,
        "noise_allowance": allowance,
        "diff": diff,
        "verdict": verdict,
        "met": not verdict.startswith("MISSED"),
        "rule": REWARD_RULE,
        "line": line,
    }
