"""The targets of issue #9 for vs_trl.py, and what a reader needs to judge a miss.

Speed: rlfleet's median s/step no worse than TRL's on the same job (ratio
TRL/rlfleet ≥ 1) and better on the long-tailed job (ratio > 1). A miss says by
how much and which phases rlfleet spends more time in than TRL.

Reward: rlfleet's mean reward over the last 5 steps at least TRL's. With a few
steps that mean is noisy: each system's standard error is estimated as the
standard deviation of its last 5 per-step rewards over √5, and the rule, printed
with every verdict, is: met if rlfleet ≥ TRL; met within noise if rlfleet falls
short by no more than one combined standard error √(se_trl² + se_rlfleet²);
missed otherwise. The estimate also counts the learning trend inside the last
five steps as noise. Both systems are deterministic for a seed: a repeated run
repeats its rewards exactly, so run-to-run spread only shows across seeds
(``--seed``), which is the test to run before reading much into a gap.
"""

from __future__ import annotations

import math
import statistics

from _vs_trl_phases import PHASES

REWARD_RULE = (
    "met if rlfleet >= TRL; 'met within noise' if rlfleet >= TRL - one combined standard error "
    "sqrt(se_trl^2 + se_rlfleet^2), se = stdev(last 5 per-step rewards)/sqrt(5); else missed"
)


def speed(job: str, ratio: float, *, strict: bool, breakdown: dict[str, dict]) -> dict:
    """Verdict on TRL s/step over rlfleet s/step; ``strict``: the target is > 1, else ≥ 1."""
    met = ratio > 1 if strict else ratio >= 1
    target = "> 1" if strict else ">= 1"
    line = f"{job}: rlfleet runs at {ratio:.2f}x TRL's speed (target {target}): "
    out = {"job": job, "ratio": ratio, "target": target, "met": met}
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


def _slower_phases(breakdown: dict[str, dict]) -> list[tuple[str, float]]:
    """Phases where rlfleet's median exceeds TRL's, largest gap first."""
    ours, theirs = breakdown["rlfleet"]["median_s"], breakdown["trl"]["median_s"]
    gaps = [(p, ours[p] - theirs[p]) for p in PHASES if ours[p] - theirs[p] > 0.0005]
    return sorted(gaps, key=lambda g: -g[1])


def standard_error(rewards: list[float], n: int = 5) -> float:
    last = rewards[-n:]
    return statistics.stdev(last) / math.sqrt(len(last)) if len(last) > 1 else float("nan")


def reward(job: str, trl: list[float], rlfleet: list[float]) -> dict:
    """Verdict on reward_last5 with the noise estimate and the rule spelled out."""
    a, b = statistics.fmean(trl[-5:]), statistics.fmean(rlfleet[-5:])
    se_a, se_b = standard_error(trl), standard_error(rlfleet)
    combined = math.hypot(se_a, se_b)
    diff = b - a
    if diff >= 0:
        verdict = "met"
    elif -diff <= combined:
        verdict = "met within noise"
    else:
        verdict = f"MISSED by {-diff - combined:.3f} beyond one combined standard error"
    line = (
        f"{job}: reward_last5 rlfleet {b:.3f} ± {se_b:.3f}, TRL {a:.3f} ± {se_a:.3f}; "
        f"rlfleet − TRL = {diff:+.3f}, combined standard error {combined:.3f}: {verdict}"
    )
    return {
        "job": job,
        "trl": a,
        "rlfleet": b,
        "se_trl": se_a,
        "se_rlfleet": se_b,
        "combined_se": combined,
        "diff": diff,
        "verdict": verdict,
        "met": not verdict.startswith("MISSED"),
        "rule": REWARD_RULE,
        "line": line,
    }
