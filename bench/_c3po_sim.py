"""C3PO++ bench, part 1: the simulation at scale (see bench/c3po.py and docs/C3PO.md).

The headline configuration is the paper's conditions (issue #13): 60 samples per
replica (64 replicas of 8 GPUs, 3,840 samples per step) and training that takes a
large share of the step, as the paper's 2.5× rollout / 1.5× end-to-end imply. Training
runs on its own pool of GPUs (``TRAIN_GPUS`` at ``TRAIN_FLOPS_PER_GPU``; the reasoning
is in docs/C3PO.md), so the three modes share one placement:

- ``sync``: the budget-free baseline; the replicas wait while the trainer trains;
- ``c3po``: C3PO++ (Φ = the sync run's mean completion tokens per step, Ω = 2B, σ = 2);
- ``overlap``: C3PO++ with ``scheduling.overlap``: the replicas keep generating while
  the trainer trains, and load each new version in flight (max_staleness = σ + 1).

The favourable configuration of the earlier headline (15 samples per replica,
colocated training at DeepSeek-V3's pre-training rate: training ~1.5 % of the step)
stays as a labelled row. Virtual times; the decision time is real CPU time.
"""

from __future__ import annotations

import dataclasses
import time

import _common

MODES = ("sync", "c3po", "overlap")
LABELS = {"sync": "sync", "c3po": "C3PO++", "overlap": "overlap"}

# The paper's conditions (docs/C3PO.md, "Calibration").
REPLICAS, PROMPTS = 64, 480  # 3,840 samples per step, 60 per replica
TRAIN_GPUS = 128
"""Training pool: 16 nodes of 8 H200-class GPUs (141 GB). Their HBM holds the BF16 weights
and gradients and the FP32 Adam state of a 671B model (~16 B per parameter, ~10.7 TB of
18 TB) with room for activations, without offloading; 64 GPUs (9 TB) would not."""
TRAIN_FLOPS_PER_GPU = 8e13
"""Achieved model FLOP/s per training GPU (6N per trained token and the attention term
of ``TrainCostModel``): a quarter of DeepSeek-V3's in-house FP8 pre-training rate, about
what an open-source BF16 stack reaches on this model (docs/C3PO.md)."""
FAVOURABLE_FULL = (512, 960)  # 7,680 samples on 512 replicas: 15 per replica
FAVOURABLE_QUICK = (256, 480)  # 3,840 on 256: also 15 per replica

TARGETS = {"rollout_speedup": 2.5, "e2e_speedup": 1.5, "train_share": 0.3}


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0


def summarise(steps, *, warmup: int, aborts: int) -> dict:
    kept = steps[warmup:]
    step_s = mean(s.e2e_s for s in kept)
    tokens = mean(s.trained_tokens for s in kept)
    generated = mean(s.generated_tokens for s in kept)
    return {
        "rollout_s": mean(s.rollout_s for s in kept),
        "train_s": mean(s.train_s for s in kept),
        "sync_s": mean(s.sync_s for s in kept),
        "e2e_s": step_s,
        "train_share": mean((s.train_s + s.sync_s) / s.e2e_s for s in kept),
        "trained_tokens": tokens,
        "trained_tokens_per_s": tokens / step_s if step_s else 0.0,
        "samples": mean(s.samples for s in kept),
        "train_pflop": mean(s.train_flops for s in kept) / 1e15,
        "idle_frac": mean(s.idle_frac for s in kept),
        "busy_frac": mean(s.busy_frac for s in kept),
        "purged_groups": mean(len(s.report.purged) for s in kept),
        "stale_groups": mean(len(s.report.stale) for s in kept),
        "new_groups": mean(s.report.new_groups for s in kept),
        "carried": mean(s.report.carried for s in kept),
        "version_lag_max": max(
            (
                s.step - m.spans[0][0]
                for s in kept
                for g in s.report.released
                for m in g.members
                if m.spans
            ),
            default=0,
        ),
        "multi_version_frac": mean(
            mean(len(m.spans) > 1 for g in s.report.released for m in g.members) for s in kept
        ),
        "trained_tokens_max": max(s.trained_tokens for s in kept),
        "trained_tokens_min": min(s.trained_tokens for s in kept),
        "fleet_aborts_per_step": aborts / len(steps),
        "dropped_tokens": mean(
            sum(g.tokens for g in s.report.purged + s.report.stale) for s in kept
        ),
        "dropped_per_trained": mean(
            sum(g.tokens for g in s.report.purged + s.report.stale) for s in kept
        )
        / tokens
        if tokens
        else 0.0,
        "generated_tokens": generated,
        "generated_per_trained": generated / tokens if tokens else 0.0,
        "decision_s": mean(s.decision_s for s in kept),
        "decision_frac": mean(s.decision_s / s.e2e_s for s in kept),
    }


def compare(
    label: str,
    replicas: int,
    prompts: int,
    *,
    steps: int,
    warmup: int,
    seed: int,
    train_gpus: int,
    flops_per_gpu: float,
    modes=MODES,
    omega: int = 0,
    sigma: int = 2,
    base: dict | None = None,
) -> dict:
    """Runs ``modes`` of one configuration; ratios are against its sync run."""
    from rlfleet.scheduler.c3po.sim import SimJob, SimRun, TrainCostModel, run_sim

    train = TrainCostModel(flops_per_gpu_s=flops_per_gpu)
    job = SimJob(
        replicas=replicas,
        prompts_per_step=prompts,
        seed=seed,
        retention_limit=sigma,
        train_gpus=train_gpus,
    )
    t0 = time.monotonic()
    out: dict = {
        "label": label,
        "replicas": replicas,
        "prompts_per_step": prompts,
        "batch": prompts * job.group_size,
        "samples_per_replica": prompts * job.group_size / replicas,
        "train_gpus": train_gpus or 8 * replicas,
        "placement": "disaggregated" if train_gpus else "colocated",
        "train_flops_per_gpu_s": flops_per_gpu,
        "weight_sync_s": train.sync_seconds(),
        "load_pause_s": train.load_pause_seconds(),
        "pool_capacity": omega or 2 * prompts * job.group_size,
        "retention_limit": sigma,
        "max_staleness_overlap": sigma + 1,
        "refill_batch": max(job.group_size, (omega or 2 * prompts * job.group_size) // 4),
        "modes": {},
    }

    def one(mode: str, run_job) -> dict:
        state = SimRun()
        started = time.monotonic()
        steps_ = run_sim(mode, run_job, steps=steps, train=train, state=state)
        result = summarise(
            steps_,
            warmup=warmup,
            aborts=state.fleet.aborts,
        )
        result["wall_s"] = time.monotonic() - started
        result["per_step"] = [
            {
                "rollout_s": s.rollout_s,
                "e2e_s": s.e2e_s,
                "trained_tokens": s.trained_tokens,
                "stale_groups": len(s.report.stale),
                "purged_groups": len(s.report.purged),
            }
            for s in steps_
        ]
        return result

    if base is None:
        base = one("sync", job)
    out["modes"]["sync"] = base
    phi = int(mean(p["trained_tokens"] for p in base["per_step"]))
    out["token_budget"] = phi
    c3_job = dataclasses.replace(job, token_budget=phi, pool_capacity=omega)
    for mode in modes:
        if mode == "sync":
            continue
        if mode == "overlap" and not train_gpus:
            continue  # colocated replicas cannot generate while they train
        out["modes"][mode] = one(mode, c3_job)
    b = base
    out["train_share"] = b["train_share"]
    out["ratios"] = {}
    for mode, m in out["modes"].items():
        if mode == "sync":
            continue
        out["ratios"][mode] = {
            "rollout_speedup": b["rollout_s"] / m["rollout_s"] if m["rollout_s"] else None,
            "e2e_speedup": m["trained_tokens_per_s"] / b["trained_tokens_per_s"],
            "step_time_ratio": b["e2e_s"] / m["e2e_s"],
        }
    out["wall_s"] = time.monotonic() - t0
    return out


def _x(v) -> str:
    return "hidden" if v is None else f"{v:.2f}"


def print_results(results: list[dict]) -> None:
    rows = []
    for r in results:
        first = True
        for mode, m in r["modes"].items():
            rows.append(
                [
                    f"{r['label']}: {r['replicas']}×{r['batch']}" if first else "",
                    LABELS[mode],
                    m["rollout_s"],
                    m["train_s"] + m["sync_s"],
                    m["e2e_s"],
                    "overlapped" if mode == "overlap" else f"{100 * m['train_share']:.0f} %",
                    m["trained_tokens"] / 1e6,
                    m["trained_tokens_per_s"],
                    m["samples"],
                    f"{100 * m['busy_frac']:.0f} %",
                    m["purged_groups"],
                    m["stale_groups"],
                    m["version_lag_max"],
                    m["fleet_aborts_per_step"],
                    m["dropped_per_trained"],
                    1e3 * m["decision_s"],
                ]
            )
            first = False
    print(
        _common.table(
            [
                "configuration",
                "mode",
                "rollout s/step",
                "train+sync s",
                "e2e s/step",
                "train share",
                "trained Mtok/step",
                "trained tok/s",
                "samples/step",
                "replicas busy",
                "purged groups",
                "stale groups",
                "max lag",
                "aborts/step",
                "dropped/trained tok",
                "decision ms",
            ],
            rows,
            title="per step, means over the steps after the warm-up (virtual time)",
        )
    )
    print()
    ratio_rows = []
    for r in results:
        first = True
        for mode, x in r["ratios"].items():
            m = r["modes"][mode]
            ratio_rows.append(
                [
                    f"{r['label']}: {r['replicas']}×{r['batch']}" if first else "",
                    f"{r['train_gpus']} GPUs, {r['placement']}" if first else "",
                    f"{100 * r['train_share']:.0f} %" if first else "",
                    r["token_budget"] if first else "",
                    LABELS[mode],
                    _x(x["rollout_speedup"]),
                    x["e2e_speedup"],
                    x["step_time_ratio"],
                    f"{100 * m['decision_frac']:.3f} %",
                ]
            )
            first = False
    print(
        _common.table(
            [
                "configuration",
                "training",
                "sync train share",
                "Φ (tokens)",
                "mode",
                "rollout ×",
                "e2e × (trained tok/s)",
                "step time ×",
                "decision / step",
            ],
            ratio_rows,
            title="÷ sync of the same configuration ('hidden': no rollout left on the "
            "critical path, the batch was ready when training ended)",
        )
    )


def run(*, quick: bool, sim_steps: int, warmup: int, seed: int) -> dict:
    """Runs the simulated comparison; returns the JSON's "sim" object."""
    print(f"\n1/2 simulation: {sim_steps} steps per run, the first {warmup} left out of the means")
    from rlfleet.scheduler.c3po.sim import DEEPSEEK_V3_PRETRAIN_FLOPS

    common = {"steps": sim_steps, "warmup": warmup, "seed": seed}
    headline = compare(
        "paper conditions",
        REPLICAS,
        PROMPTS,
        train_gpus=TRAIN_GPUS,
        flops_per_gpu=TRAIN_FLOPS_PER_GPU,
        **common,
    )
    _progress(headline)
    fav_r, fav_p = FAVOURABLE_QUICK if quick else FAVOURABLE_FULL
    favourable = compare(
        "favourable",
        fav_r,
        fav_p,
        train_gpus=0,
        flops_per_gpu=DEEPSEEK_V3_PRETRAIN_FLOPS,
        modes=("sync", "c3po"),
        **common,
    )
    _progress(favourable)
    sensitivity: list[dict] = []
    if not quick:
        base = headline["modes"]["sync"]
        for label, kw in (
            ("Ω = B", {"omega": PROMPTS * 8, "base": base}),
            ("σ = 0", {"sigma": 0, "base": base}),
            ("σ = 1", {"sigma": 1, "base": base}),
            ("σ = 4", {"sigma": 4, "base": base}),
            ("256 training GPUs", {"train_gpus": 256}),
        ):
            args = {"train_gpus": TRAIN_GPUS, "flops_per_gpu": TRAIN_FLOPS_PER_GPU, **kw}
            r = compare(
                label, REPLICAS, PROMPTS, modes=("sync", "c3po", "overlap"), **args, **common
            )
            _progress(r)
            sensitivity.append(r)
    print()
    print_results([headline, favourable])
    if sensitivity:
        print()
        print(f"sensitivity at the paper conditions ({REPLICAS}×{PROMPTS * 8}; one change each):")
        print_results(sensitivity)

    c3, ov = headline["ratios"]["c3po"], headline["ratios"]["overlap"]
    sim = {
        "rollout_speedup": c3["rollout_speedup"],
        "e2e_speedup": c3["e2e_speedup"],
        "scheduler_overhead_frac": headline["modes"]["c3po"]["decision_frac"],
        "train_share": headline["train_share"],
        "e2e_speedup_overlap": ov["e2e_speedup"],
        "rollout_speedup_overlap": ov["rollout_speedup"],
        "rollout_s_overlap": headline["modes"]["overlap"]["rollout_s"],
        "e2e_speedup_definition": "trained tokens per second end to end, mode ÷ sync",
        "assumptions": {
            "rollout": f"{REPLICAS} replicas, each one 8-GPU H200-class node (vLLM, "
            "DeepSeek-V3/R1-sized MoE; DecodeCostModel)",
            "training": f"{TRAIN_GPUS} H200-class GPUs of their own, "
            f"{TRAIN_FLOPS_PER_GPU:.2g} model FLOP/s each (TrainCostModel)",
            "samples_per_replica": PROMPTS * 8 / REPLICAS,
        },
        "headline": headline,
        "favourable": favourable,
        "sensitivity": sensitivity,
        "verdicts": verdicts(c3, headline["train_share"]),
    }
    return sim


def verdicts(ratios: dict, train_share: float) -> dict:
    values = {
        "rollout_speedup": ratios["rollout_speedup"],
        "e2e_speedup": ratios["e2e_speedup"],
        "train_share": train_share,
    }
    out = {}
    for key, target in TARGETS.items():
        value = values[key]
        out[f"sim_{key}"] = {
            "value": value,
            "target": f">= {target}",
            "met": value >= target,
            "margin": value / target - 1,
        }
    return out


def _progress(r: dict) -> None:
    walls = ", ".join(f"{LABELS[m]} {v['wall_s']:.0f}s" for m, v in r["modes"].items())
    print(
        f"  {r['label']}: {r['replicas']} replicas × {r['batch']} samples/step: {walls} "
        f"({_common.load_note()})"
    )
