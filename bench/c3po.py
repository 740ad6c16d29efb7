"""C3PO++ against the synchronous baseline, side by side: in simulation at scale and on
the real CPU fleet, each with overlapped rollout (``scheduling.overlap``) beside them.

1. Simulation (``_c3po_sim.py``; in this process, ``rlfleet.scheduler.c3po.sim``).
   The scheduler's own C3PO++ code (``IterationDriver`` over ``InferencePool``)
   drives a discrete-event fleet of simulated replicas; cost, length and training
   models and their sources are in those modules and docs/C3PO.md. Times are
   virtual; the scheduler's decision time is the CPU time of the driver and pool
   code, measured for real.
2. Real fleet (``_c3po_real.py``: every service its own process, PyTorch rollout
   engine, two replicas) on a long-tailed workload the bench's tiny model really
   produces: sync, C3PO++ and overlapped C3PO++ for each of three seeds, judged
   per trained token end to end, with reward parity over the seeds.

``--json PATH`` writes {"sim": {"rollout_speedup", "e2e_speedup",
"scheduler_overhead_frac", "train_share", ...}, "real": {"e2e_speedup",
"e2e_speedup_overlap", "reward_last5_baseline", "reward_last5_c3po",
"reward_stderr", "seeds", ...}} and the verdicts on the issue's targets.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import _c3po_real
import _c3po_sim
import _common

CACHE_DIR = _common.REPO_ROOT / "runs" / "bench-cache"
REAL_E2E_TARGET = 1.3
"""C3PO++ trained tokens/s over sync's on the real fleet, at reward parity."""


def verdicts(sim: dict, real: dict) -> dict:
    """The targets this bench is judged on, each met or missed with its margin."""
    out = {}
    if real:
        value = real["e2e_speedup"]
        out["real_e2e"] = {
            "value": value,
            "target": f">= {REAL_E2E_TARGET}",
            "met": value >= REAL_E2E_TARGET,
            "margin": value / REAL_E2E_TARGET - 1,
        }
        diff = real["reward_last5_c3po"] - real["reward_last5_baseline"]
        out["real_reward_parity"] = {
            "value": diff,
            "target": f"|diff| <= 2 SE = {2 * real['reward_stderr']:.3f}",
            "met": bool(real["reward_parity"]),
        }
    return {**sim.get("verdicts", {}), **out}


def main(argv: list[str] | None = None) -> int:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument(
        "--sim-steps", type=int, default=None, help="simulated steps per run (quick 6, else 12)"
    )
    p.add_argument(
        "--real-steps", type=int, default=None, help="steps per real job (quick 8, else 20)"
    )
    p.add_argument(
        "--seeds", default="0,1,2", help="seeds of the real fleet's jobs, one job per mode each"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the simulation")
    p.add_argument("--skip-sim", action="store_true")
    p.add_argument("--skip-real", action="store_true")
    p.add_argument("--cache-dir", type=Path, default=CACHE_DIR)
    p.add_argument("--run-dir", type=Path, default=None)
    args = p.parse_args(argv)
    started = time.monotonic()
    sim_steps = args.sim_steps or (6 if args.quick else 12)
    real_steps = args.real_steps or (8 if args.quick else 20)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    print(f"C3PO++ bench ({_common.load_note()})")

    sim: dict = {}
    if not args.skip_sim:
        sim = _c3po_sim.run(quick=args.quick, sim_steps=sim_steps, warmup=2, seed=args.seed)

    real: dict = {}
    if not args.skip_real:
        print(
            f"\n2/2 real fleet: {real_steps} steps per job, modes {', '.join(_c3po_real.MODES)} "
            f"for seeds {seeds} ({_common.load_note()})"
        )
        run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="c3po-bench-"))
        real = _c3po_real.run(
            steps=real_steps, seeds=seeds, warmup=2, run_dir=run_dir, cache_dir=args.cache_dir
        )
        print()
        _c3po_real.print_results(real)

    if real:
        real["profile_top"] = _c3po_real.profile_top(real)
        print("\nwhere the time goes (means over seeds):")
        for line in real["profile_top"]:
            print(f"  {line}")
    judged = verdicts(sim, real)
    if judged:
        print("\ntargets:")
        for name, v in judged.items():
            word = "met" if v["met"] else "MISSED"
            margin = f", {v['margin']:+.0%}" if "margin" in v else ""
            print(f"  {name}: {word}: {v['value']:.3f} vs {v['target']}{margin}")
    payload = _common.report(
        "c3po",
        quick=args.quick,
        started=started,
        sim=sim,
        real=real,
        verdicts=judged,
        profile_top=real.get("profile_top", []) + sim.get("profile_top", []),
    )
    _common.write_json(args.json, payload)
    print(f"\ndone in {time.monotonic() - started:.0f}s ({_common.load_note()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
