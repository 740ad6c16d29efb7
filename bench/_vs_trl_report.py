"""What vs_trl.py prints and plots for one job: the systems side by side, and the verdicts.

Each system's figures are over seeds (``_vs_trl_seeds.combine``). TRL may have run in two
configurations on the same cores ("trl": one torch thread, every seed; "trl-Nt": as many threads
as CPUs, the first seed): the wall-time verdict takes the faster, the CPU verdict the cheaper,
the reward verdict "trl" (every seed).
"""

from __future__ import annotations

import statistics
from pathlib import Path

import _common
import _vs_trl_phases as phases
import _vs_trl_verdict as verdict


def show_variant(variant: str, spec: dict, runs: list[dict]) -> dict:
    """Prints one job's table, reward curves, breakdown and verdicts; returns its report."""
    rows = [
        [
            r["system"],
            len(r["seeds"]),
            r["step_s_median"],
            r["samples_per_s"],
            r["breakdown"]["cpu_s_per_step"].get("total", float("nan")),
            r["reward_first5"],
            r["reward_last5"],
            statistics.fmean(r["response_length_mean"]),
            r["wall_s"],
            r["load"]["loadavg_1m"],
        ]
        for r in runs
    ]
    headers = ["system", "seeds", "s/step", "samples/s", "CPU s/step", "reward 1st5"]
    alg = spec["algorithm"]
    print(
        _common.table(
            [*headers, "reward last5", "mean len", "wall s", "load"],
            rows,
            title=f"== {variant} ({alg['prompts_per_step']} prompts x {alg['group_size']}, "
            f"{spec['steps']} steps, max {spec['sampling']['max_new_tokens']} new tokens; "
            "medians and means over seeds)",
        )
    )
    for r in runs:
        by_seed = ", ".join(
            f"seed {s['seed']}: {s['reward_last5']:.3f} ({s['step_s_median']:.3f} s/step)"
            for s in r["per_seed"]
        )
        print(f"  final reward by seed, {r['system']:<13} {by_seed}")
    for r in runs:
        curve = " ".join(f"{x:.2f}" for x in r["rewards"])
        print(f"  mean reward curve {r['system']:<13} {curve}")
    by = {r["system"]: r for r in runs}
    print(phases.table({r["system"]: r["breakdown"] for r in runs}))
    for r in runs:
        g = r["generation_detail"]
        line = (
            f"  generation, {r['system']}: {g['tokens_median']:.0f} tokens per step, "
            f"longest {g['longest_median']:.0f}"
        )
        if "decoded_positions_median" in g:
            line += f"; static batch decodes {g['decoded_positions_median']:.0f} positions"
        if "replica_idle_s_median" in g:
            line += f"; a replica idle {g['replica_idle_s_median']:.3f}s of the rollout phase"
        print(line + " (medians)")
    for r in runs:
        spent = dict(r["breakdown"]["cpu_s_per_step"])
        if spent:
            total = spent.pop("total")
            parts = ", ".join(f"{n} {v:.3f}" for n, v in sorted(spent.items(), key=lambda x: -x[1]))
            print(
                f"  CPU s per step, {r['system']}: {total:.3f}"
                + (f" ({parts})" if len(spent) > 1 else "")
            )
    if not by["trl"]["same_prompts_per_step"]:
        print("  WARNING: TRL's steps drew other prompts than rlfleet's; the comparison is unfair")
    # TRL at its best on these cores, per measure: the faster configuration for wall time,
    # the cheaper one for CPU (the reward verdict uses "trl", every seed).
    trls = [r for r in runs if r["system"].startswith("trl")]
    fastest = min(trls, key=lambda r: r["step_s_median"])
    cheapest = min(trls, key=lambda r: r["breakdown"]["cpu_s_per_step"].get("total", float("inf")))
    ratio = fastest["step_s_median"] / by["rlfleet"]["step_s_median"]
    print(
        f"  step_time_ratio_trl_over_rlfleet = {ratio:.3f} against {fastest['system']} "
        f"(TRL's faster configuration here; > 1: rlfleet is faster)"
    )
    cpu_pair = {
        "trl": cheapest["breakdown"]["cpu_s_per_step"],
        "rlfleet": by["rlfleet"]["breakdown"]["cpu_s_per_step"],
    }
    cpu_verdict = verdict.cpu(
        variant, cpu_pair["trl"], cpu_pair["rlfleet"], strict=variant == "long_tail"
    )
    cpu_verdict["trl_system"] = cheapest["system"]
    if cpu_verdict["ratio"] is not None:
        print(
            f"  cpu_ratio_trl_over_rlfleet = {cpu_verdict['ratio']:.3f} against "
            f"{cheapest['system']} (TRL's cheaper configuration; CPU s per step, every process; "
            "other work on the machine moves it much less than wall time)"
        )
    if "rlfleet-c3po" in by:
        c3po = fastest["step_s_median"] / by["rlfleet-c3po"]["step_s_median"]
        print(f"  the same ratio with C3PO++ scheduling (first seed) = {c3po:.3f}")
    pair = {"rlfleet": by["rlfleet"]["breakdown"], "trl": fastest["breakdown"]}
    speed = verdict.speed(variant, ratio, strict=variant == "long_tail", breakdown=pair)
    speed["trl_system"] = fastest["system"]
    return {
        "ratio": ratio,
        "cpu_ratio": cpu_verdict["ratio"],
        "cpu_s_per_step": {s: cpu_pair[s].get("total") for s in ("trl", "rlfleet")},
        "trl_configs": {
            r["system"]: {
                "torch_threads": r["torch_threads"],
                "seeds": r["seeds"],
                "step_s_median": r["step_s_median"],
                "cpu_s_per_step": r["breakdown"]["cpu_s_per_step"].get("total"),
            }
            for r in trls
        },
        "speed": speed,
        "cpu": cpu_verdict,
        "reward": verdict.reward(
            variant,
            by["trl"]["reward_last5_by_seed"],
            by["rlfleet"]["reward_last5_by_seed"],
            by["rlfleet"]["seeds"],
        ),
        "runs": runs,
        "spec": spec,
    }


def plot(variant: str, results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for r in results:
        steps = range(len(r["rewards"]))
        label = f"{r['system']} ({len(r['seeds'])} seed{'s' * (len(r['seeds']) > 1)})"
        ax1.plot(steps, r["rewards"], marker=".", label=label)
        ax2.plot(steps, r["step_s"], marker=".", label=label)
    ax1.set(title=f"{variant}: mean reward per step over seeds", xlabel="step", ylabel="reward")
    ax2.set(title=f"{variant}: wall time per step (median over seeds)", xlabel="step",
            ylabel="seconds")  # fmt: skip
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")
