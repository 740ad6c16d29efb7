"""Weight-sync off the step's path: a collective job with the push to weight-sync inside
TrainStep (the baseline, ``weights.publish_in_background = false``) against the push in
the background (rlfleet's default), on the real CPU fleet.

One fleet (every service its own process, PyTorch rollout engine, two replicas) runs, per
seed, the same job spec both ways, interleaved so drifting load touches both alike: a
Llama of ~25M parameters (100 MB in fp32, so a push is a visible part of a step),
``weights.transport = "collective"`` (every version reaches both replicas by broadcast),
no checkpoints (a checkpoint step publishes in the foreground either way).

Figures, from the scheduler's step records after ``--warmup`` steps of each job:
- ``train_s``: the train phase (TrainStep as the scheduler waits for it): the push leaves
  it when it runs in the background;
- ``step_s``: the whole step, every phase: what the job gains (the background push still
  takes CPU from the next step's rollout on a 2-core machine);
- ``bg_frac``: steps whose version went to weight-sync in the background (1.0 expected).

The verdict: step time, baseline over background, >= 1.0 (the background push never
delays the step); printed with its margin, and "missed" with where the time goes when
it is not met.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import _common
from _c3po_real import run_job

MODEL = {"vocab_size": 512, "hidden_size": 512, "num_layers": 8, "num_heads": 8}
MODES = ("foreground", "background")


def job_spec(model_path: Path, *, background: bool, steps: int, seed: int) -> dict:
    return {
        "name": f"weight-publish-{'bg' if background else 'fg'}-s{seed}",
        "model": {"path": str(model_path)},
        "task": {"name": "basic_arithmetic",
                 "params": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}},
        "sampling": {"temperature": 1.0, "max_new_tokens": 8},
        "algorithm": {"group_size": 2, "prompts_per_step": 2, "lr": 1e-5},
        "weights": {"transport": "collective", "publish_in_background": background},
        "checkpoint": {"every_steps": 0},
        "steps": steps,
        "seed": seed,
    }  # fmt: skip


def summarise(records: list[dict], *, warmup: int) -> dict:
    kept = records[warmup:] or records

    def mean(key: str) -> float:
        return statistics.fmean(r.get(key, 0.0) for r in kept)

    return {
        "step_s": mean("step_seconds"),
        "train_s": mean("train_seconds"),
        "rollout_s": mean("rollout_seconds"),
        "sync_s": mean("sync_seconds"),
        "bg_frac": mean("weights_published_in_background"),
        "broadcast_frac": mean("weights_broadcast"),
    }


def main(argv: list[str] | None = None) -> int:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=0, help="steps per job (default 12; quick 6)")
    p.add_argument("--seeds", type=int, default=0, help="seeds (default 3; quick 2)")
    args = p.parse_args(argv)
    steps = args.steps or (6 if args.quick else 12)
    seeds = list(range(args.seeds or (2 if args.quick else 3)))
    warmup = 2
    started = time.monotonic()
    from rlfleet.cli.fleet import Fleet, FleetOptions
    from rlfleet.cli.scheduler_client import SchedulerClient
    from rlfleet.common.tinymodel import build_tiny_model

    print(f"weight publish bench ({_common.load_note()}): {steps} steps x {len(seeds)} seeds")
    work = Path(tempfile.mkdtemp(prefix="rlfleet-weight-publish-"))
    model_path = build_tiny_model(work / "model", seed=0, **MODEL)
    from safetensors import safe_open

    with safe_open(str(model_path / "model.safetensors"), "pt") as f:
        params = sum(f.get_tensor(k).numel() for k in f.keys())
    print(f"  model: {params / 1e6:.1f}M parameters, fp32 ({params * 4 / 1e6:.0f} MB a version)")
    fleet = Fleet(FleetOptions(run_dir=work / "run", rollout_replicas=2, log_format="text"))
    fleet.start()
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    try:
        client = SchedulerClient(fleet.scheduler_address)
        run_job(client, fleet, {**job_spec(model_path, background=True, steps=3, seed=99),
                                "name": "weight-publish-warm-up"}, timeout_s=600)  # fmt: skip
        for seed in seeds:
            for mode in MODES:
                spec = job_spec(model_path, background=mode == "background", steps=steps,
                                seed=seed)  # fmt: skip
                runs[mode].append(summarise(run_job(client, fleet, spec, timeout_s=1200),
                                            warmup=warmup))  # fmt: skip
        client.close()
    finally:
        fleet.stop()

    def avg(mode: str, key: str) -> float:
        return statistics.fmean(r[key] for r in runs[mode])

    fg, bg = (
        {k: avg("foreground", k) for k in runs["foreground"][0]},
        {k: avg("background", k) for k in runs["background"][0]},
    )
    ratios = [f["step_s"] / b["step_s"] for f, b in zip(runs["foreground"], runs["background"],
                                                           strict=True)]  # fmt: skip
    ratio = statistics.fmean(ratios)
    print("mode        step s   train s  rollout s  sync s  in background  broadcast")
    for mode, r in (("foreground", fg), ("background", bg)):
        print(f"{mode:<11} {r['step_s']:7.3f}  {r['train_s']:7.3f}  {r['rollout_s']:8.3f}  "
              f"{r['sync_s']:6.3f}  {r['bg_frac']:13.2f}  {r['broadcast_frac']:9.2f}")  # fmt: skip
    saved = fg["train_s"] - bg["train_s"]
    print(f"train phase: {fg['train_s']:.3f}s -> {bg['train_s']:.3f}s (TrainStep "
          f"{-saved * 1000:+.0f} ms); step time foreground / background = {ratio:.3f} "
          f"(per seed: {', '.join(f'{r:.3f}' for r in ratios)})")  # fmt: skip
    met = ratio >= 1.0
    if met:
        print(f"verdict: met (step time ratio {ratio:.3f} >= 1.0, margin {ratio - 1:.3f})")
    else:
        phases = ", ".join(f"{p} {(bg[f'{p}_s'] - fg[f'{p}_s']) * 1000:+.0f} ms"
                           for p in ("train", "rollout", "sync"))  # fmt: skip
        print(f"verdict: missed (step time ratio {ratio:.3f} < 1.0, short by {1 - ratio:.3f}); "
              f"where the time goes, background - foreground per step: {phases} (the push "
              "shares the cores with the replicas' swap and the next rollout)")  # fmt: skip
    _common.write_json(args.json, _common.report(
        "weight_publish", quick=args.quick, started=started, params=params, steps=steps,
        seeds=seeds, foreground=fg, background=bg, per_seed=runs, step_ratio=ratio,
        train_s_saved=saved, met=met))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
