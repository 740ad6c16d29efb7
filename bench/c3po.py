"""C3PO++ against the synchronous baseline, side by side: in simulation at scale and on
the real CPU fleet.

1. Simulation (in this process; ``rlfleet.scheduler.c3po_sim``). The scheduler's
   own C3PO++ code (``IterationDriver`` over ``InferencePool``) drives a
   discrete-event fleet of simulated replicas: decode time per engine step from
   ``rollout.sim_engine.DecodeCostModel`` (a DeepSeek-V3/R1-sized MoE on 8-GPU
   H100/H200-class nodes under vLLM), output lengths from ``LengthModel``
   (log-normal, median 6k tokens, capped at 64K), training time from
   ``TrainCostModel`` (the trained tokens' FLOPs at DeepSeek-V3's achieved
   pre-training rate; colocated: the rollout GPUs train) plus the weight
   broadcast. Sources of every constant are in those docstrings and
   docs/C3PO.md. The baseline is the same driver's budget-free mode: a step
   draws B = prompts × 8 samples and waits for all of them. C3PO++ runs with
   Φ = the baseline's measured completion tokens per step (same trained tokens
   per step), Ω = 2B (the job spec's default) and σ = 2. The first ``warmup``
   steps of each run are left out of the means (C3PO++ starts from an empty
   pool). Times are virtual; the scheduler's decision time is the CPU time of
   the driver and pool code, measured for real.
2. Real fleet (``rlfleet.cli.fleet.Fleet``: every service its own process,
   PyTorch rollout engine, two replicas). A tiny Llama warm-started on
   basic_arithmetic answers on the first line and then "re-checks" the sum a
   log-normally distributed number of times, so completion lengths range from
   a few tokens to the limit; the reward (reasoning-gym's scorer) reads the
   first line only. The same job spec runs twice on one fleet, ``sync`` then
   ``c3po`` (Φ = the sync run's mean completion tokens per step).

Prints rollout-phase and end-to-end time per step and trained tokens per second
for both, with ratios, and both real runs' reward curves. ``--json PATH`` writes
{"sim": {"rollout_speedup", "e2e_speedup", "scheduler_overhead_frac"}, "real":
{"e2e_speedup", "reward_last5_baseline", "reward_last5_c3po"}} and details.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import _common

CACHE_DIR = _common.REPO_ROOT / "runs" / "bench-cache"
SCALES_QUICK = [(64, 120), (256, 480)]
SCALES_FULL = [(16, 120), (64, 480), (256, 480), (512, 960)]


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0


# ----------------------------------------------------------------------------- 1. simulation
def summarise_sim(steps, *, warmup: int) -> dict:
    kept = steps[warmup:]
    e2e = mean(s.e2e_s for s in kept)
    tokens = mean(s.trained_tokens for s in kept)
    return {
        "rollout_s": mean(s.rollout_s for s in kept),
        "train_s": mean(s.train_s + s.sync_s for s in kept),
        "e2e_s": e2e,
        "trained_tokens": tokens,
        "trained_tokens_per_s": tokens / e2e if e2e else 0.0,
        "samples": mean(s.samples for s in kept),
        "idle_frac": mean(s.idle_frac for s in kept),
        "purged_groups": mean(len(s.report.purged) for s in kept),
        "carried": mean(s.report.carried for s in kept),
        "version_lag_max": max(
            (
                s.step - min(v for v, _ in m.spans)
                for s in kept
                for g in s.report.released
                for m in g.members
                if m.spans
            ),
            default=0,
        ),
        "decision_s": mean(s.decision_s for s in kept),
        "decision_frac": mean(s.decision_s / s.e2e_s for s in kept),
    }


def sim_compare(
    replicas: int,
    prompts: int,
    *,
    steps: int,
    warmup: int,
    seed: int,
    omega: int = 0,
    sigma: int = 2,
    train_gpus: int = 0,
) -> dict:
    from rlfleet.scheduler.c3po_sim import SimJob, run_sim

    job = SimJob(
        replicas=replicas,
        prompts_per_step=prompts,
        seed=seed,
        retention_limit=sigma,
        train_gpus=train_gpus,
    )
    t0 = time.monotonic()
    base_steps = run_sim("sync", job, steps=steps)
    base = summarise_sim(base_steps, warmup=warmup)
    phi = int(mean(s.trained_tokens for s in base_steps))
    c3_job = dataclasses.replace(job, token_budget=phi, pool_capacity=omega)
    c3 = summarise_sim(run_sim("c3po", c3_job, steps=steps), warmup=warmup)
    return {
        "replicas": replicas,
        "prompts_per_step": prompts,
        "batch": prompts * job.group_size,
        "pool_capacity": omega or 2 * prompts * job.group_size,
        "retention_limit": sigma,
        "train_gpus": train_gpus or 8 * replicas,
        "token_budget": phi,
        "sync": base,
        "c3po": c3,
        "rollout_speedup": base["rollout_s"] / c3["rollout_s"],
        "e2e_speedup": base["e2e_s"] / c3["e2e_s"],
        "tokens_per_s_ratio": c3["trained_tokens_per_s"] / base["trained_tokens_per_s"],
        "wall_s": time.monotonic() - t0,
    }


def print_sim(results: list[dict]) -> None:
    rows = []
    for r in results:
        for mode in ("sync", "c3po"):
            m = r[mode]
            rows.append(
                [
                    f"{r['replicas']}×{r['batch']}" if mode == "sync" else "",
                    mode,
                    m["rollout_s"],
                    m["e2e_s"],
                    m["trained_tokens"] / 1e6,
                    m["trained_tokens_per_s"],
                    m["samples"],
                    100 * m["idle_frac"],
                    m["purged_groups"],
                    m["version_lag_max"],
                    1e3 * m["decision_s"],
                ]
            )
    print(
        _common.table(
            [
                "replicas×B",
                "mode",
                "rollout s/step",
                "e2e s/step",
                "trained Mtok/step",
                "trained tok/s",
                "samples/step",
                "idle %",
                "purged groups",
                "max lag",
                "decision ms",
            ],
            rows,
        )
    )
    print()
    print(
        _common.table(
            [
                "replicas×B",
                "Ω",
                "σ",
                "Φ (tokens)",
                "rollout ×",
                "e2e ×",
                "tok/s ×",
                "decision / step",
            ],
            [
                [
                    f"{r['replicas']}×{r['batch']}",
                    r["pool_capacity"],
                    r["retention_limit"],
                    r["token_budget"],
                    r["rollout_speedup"],
                    r["e2e_speedup"],
                    r["tokens_per_s_ratio"],
                    f"{100 * r['c3po']['decision_frac']:.4f} %",
                ]
                for r in results
            ],
            title="C3PO++ ÷ sync (virtual time; decision time is real CPU time)",
        )
    )


# ----------------------------------------------------------------------------- 2. real fleet
MODEL_SETTINGS = {
    "format": 1,
    "task_params": {
        "min_terms": 2,
        "max_terms": 2,
        "min_digits": 1,
        "max_digits": 1,
        "operators": ["+", "-"],
        "allow_parentheses": False,
        "allow_negation": False,
    },
    "recheck_median": 1.5,
    "recheck_sigma": 1.0,
    "recheck_max": 14,
    "vocab_size": 512,
    "hidden_size": 64,
    "num_layers": 2,
    "num_heads": 4,
    "max_positions": 160,
    "sft_steps": 200,
    "sft_batch_size": 32,
    "sft_lr": 3e-3,
    "seed": 0,
}
"""The bench's tiny model; their hash names the cache entry."""


def _target(entry: dict, rng: random.Random, s: dict) -> str:
    """' <answer>' then k lines '<expression> = <answer>', k ~ log-normal (long-tailed)."""
    k = min(s["recheck_max"], int(s["recheck_median"] * math.exp(rng.gauss(0, s["recheck_sigma"]))))
    expression = entry["metadata"]["expression"]
    return f" {entry['answer']}" + "".join(f"\n{expression} = {entry['answer']}" for _ in range(k))


def prepare_model(cache_dir: Path, progress=print) -> Path:
    """Builds (once, cached) the tiny model whose completion lengths vary widely."""
    key = hashlib.sha256(json.dumps(MODEL_SETTINGS, sort_keys=True).encode()).hexdigest()[:12]
    target = cache_dir / f"c3po-bench-model-{key}"
    if (target / "model.safetensors").is_file():
        return target
    import reasoning_gym
    import torch
    from rlfleet.common.tinymodel import BOS, EOS, PAD, train_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    s = MODEL_SETTINGS
    started = time.monotonic()
    torch.set_num_threads(1)  # a tiny model: more threads only contend on a shared machine
    torch.manual_seed(s["seed"])
    rng = random.Random(s["seed"])
    data = list(
        reasoning_gym.create_dataset("basic_arithmetic", size=4096, seed=7, **s["task_params"])
    )
    pairs = [(f"{e['question']} Answer:", _target(e, rng, s)) for e in data]
    tok = train_tokenizer([p + t for p, t in pairs], vocab_size=s["vocab_size"])
    eos, pad = tok.token_to_id(EOS), tok.token_to_id(PAD)
    tmp = Path(
        tempfile.mkdtemp(prefix=".c3po-model-", dir=cache_dir if cache_dir.exists() else None)
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD
    ).save_pretrained(tmp)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=tok.get_vocab_size(),
            hidden_size=s["hidden_size"],
            intermediate_size=4 * s["hidden_size"],
            num_hidden_layers=s["num_layers"],
            num_attention_heads=s["num_heads"],
            num_key_value_heads=s["num_heads"],
            max_position_embeddings=s["max_positions"],
            bos_token_id=tok.token_to_id(BOS),
            eos_token_id=eos,
            pad_token_id=pad,
            tie_word_embeddings=True,
        )
    )
    examples = [(tok.encode(p).ids, tok.encode(t).ids + [eos]) for p, t in pairs]
    opt = torch.optim.AdamW(model.parameters(), lr=s["sft_lr"], weight_decay=0.0)
    model.train()
    for step in range(s["sft_steps"]):
        for group in opt.param_groups:
            group["lr"] = s["sft_lr"] * min(1.0, (step + 1) / 30)
        batch = [examples[rng.randrange(len(examples))] for _ in range(s["sft_batch_size"])]
        width = max(len(p) + len(a) for p, a in batch)
        ids = torch.full((len(batch), width), pad)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        labels = torch.full((len(batch), width), -100)
        for i, (p, a) in enumerate(batch):
            ids[i, : len(p) + len(a)] = torch.tensor(p + a)
            mask[i, : len(p) + len(a)] = 1
            labels[i, len(p) : len(p) + len(a)] = torch.tensor(a)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % 100 == 0:
            progress(f"  warm start {step + 1}/{s['sft_steps']}: loss {loss.item():.3f}")
    model.eval()
    model.save_pretrained(tmp, safe_serialization=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    if target.exists():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(target)
    progress(f"  model built in {time.monotonic() - started:.0f}s: {target}")
    return target


def real_spec(model_path: Path, *, steps: int, seed: int) -> dict:
    return {
        "name": "c3po-bench",
        "model": {"path": str(model_path)},
        "task": {"name": "basic_arithmetic", "params": MODEL_SETTINGS["task_params"]},
        "sampling": {"temperature": 1.0, "max_new_tokens": 96},
        "algorithm": {"group_size": 4, "prompts_per_step": 8, "lr": 2e-4},
        "checkpoint": {"every_steps": 0},
        "steps": steps,
        "seed": seed,
    }


def run_job(client, fleet, spec: dict, *, timeout_s: float) -> list[dict]:
    from rlfleet.cli.scheduler_client import TERMINAL_STATES

    t0 = time.monotonic()
    job = client.submit(spec)
    while job.state not in TERMINAL_STATES:
        if fleet.dead():
            raise SystemExit(
                f"error: {', '.join(fleet.dead())} exited; see {fleet.options.run_dir}"
            )
        if time.monotonic() - t0 > timeout_s:
            client.cancel(job.job_id)
            raise SystemExit(f"error: job {job.job_id} ran past {timeout_s:.0f}s")
        time.sleep(0.3)
        job = client.get(job.job_id)
    if job.state != "succeeded":
        raise SystemExit(f"error: job {job.job_id} {job.state}: {job.reason}")
    records = [{"step": r.step, **dict(r.metrics)} for r in client.steps(job.job_id)]
    mode = spec.get("scheduling", {}).get("mode", "sync")
    print(
        f"  {mode:<5} job {job.job_id}: {len(records)} steps in {time.monotonic() - t0:.0f}s ({_common.load_note()})"
    )
    return records


def summarise_real(records: list[dict], *, warmup: int) -> dict:
    kept = records[warmup:]
    e2e = mean(r["step_seconds"] for r in kept)
    tokens = mean(r["tokens_generated"] for r in kept)
    rewards = [r["reward_mean"] for r in records]
    last5 = rewards[-5:]
    return {
        "rollout_s": mean(r["rollout_seconds"] for r in kept),
        "e2e_s": e2e,
        "trained_tokens": tokens,
        "trained_tokens_per_s": tokens / e2e if e2e else 0.0,
        "samples": mean(r["samples"] for r in kept),
        "response_length_mean": mean(r["response_length_mean"] for r in kept),
        "response_length_max": max(r["response_length_max"] for r in kept),
        "reward_curve": rewards,
        "reward_last5": mean(last5),
        "reward_last5_sem": statistics.stdev(last5) / math.sqrt(len(last5))
        if len(last5) > 1
        else 0.0,
    }


def run_real(*, steps: int, warmup: int, seed: int, run_dir: Path, cache_dir: Path) -> dict:
    from rlfleet.cli.fleet import Fleet, FleetOptions
    from rlfleet.cli.scheduler_client import SchedulerClient

    model_path = prepare_model(cache_dir)
    spec = real_spec(model_path, steps=steps, seed=seed)
    fleet = Fleet(FleetOptions(run_dir=run_dir, rollout_replicas=2, log_format="text"))
    t0 = time.monotonic()
    fleet.start()
    print(f"  fleet up in {time.monotonic() - t0:.0f}s (logs: {run_dir}/*.log)")
    try:
        client = SchedulerClient(fleet.scheduler_address)
        base = run_job(client, fleet, spec, timeout_s=60.0 * steps + 300)
        phi = int(mean(r["tokens_generated"] for r in base))
        c3_spec = {
            **spec,
            "name": "c3po-bench-c3po",
            "scheduling": {"mode": "c3po", "token_budget": phi},
        }
        c3 = run_job(client, fleet, c3_spec, timeout_s=60.0 * steps + 300)
        client.close()
    finally:
        fleet.stop()
    b, c = summarise_real(base, warmup=warmup), summarise_real(c3, warmup=warmup)
    return {
        "model": str(model_path),
        "replicas": 2,
        "token_budget": phi,
        "pool_capacity": 2
        * spec["algorithm"]["prompts_per_step"]
        * spec["algorithm"]["group_size"],
        "sync": b,
        "c3po": c,
        "records": {"sync": base, "c3po": c3},
        "rollout_speedup": b["rollout_s"] / c["rollout_s"],
        "e2e_speedup": b["e2e_s"] / c["e2e_s"],
        "tokens_per_s_ratio": c["trained_tokens_per_s"] / b["trained_tokens_per_s"],
    }


def print_real(result: dict) -> None:
    base, c3 = result["records"]["sync"], result["records"]["c3po"]
    rows = []
    for i in range(max(len(base), len(c3))):
        b = base[i] if i < len(base) else {}
        c = c3[i] if i < len(c3) else {}
        rows.append(
            [
                i,
                b.get("rollout_seconds", ""),
                b.get("step_seconds", ""),
                b.get("tokens_generated", ""),
                b.get("reward_mean", ""),
                c.get("rollout_seconds", ""),
                c.get("step_seconds", ""),
                c.get("tokens_generated", ""),
                c.get("c3po_sequences_carried", ""),
                c.get("version_span", ""),
                c.get("reward_mean", ""),
            ]
        )
    print(
        _common.table(
            ["step", "sync rollout s", "sync step s", "sync tokens", "sync reward",
             "c3po rollout s", "c3po step s", "c3po tokens", "carried", "span", "c3po reward"],
            rows,
            title="per step (reward curves: the two 'reward' columns)",
        )
    )  # fmt: skip
    b, c = result["sync"], result["c3po"]
    print()
    print(
        _common.table(
            ["mode", "rollout s/step", "e2e s/step", "trained tok/step", "trained tok/s", "reward last 5"],
            [
                ["sync", b["rollout_s"], b["e2e_s"], b["trained_tokens"], b["trained_tokens_per_s"],
                 f"{b['reward_last5']:.3f} ± {b['reward_last5_sem']:.3f}"],
                ["c3po", c["rollout_s"], c["e2e_s"], c["trained_tokens"], c["trained_tokens_per_s"],
                 f"{c['reward_last5']:.3f} ± {c['reward_last5_sem']:.3f}"],
                ["c3po ÷ sync", 1 / result["rollout_speedup"], 1 / result["e2e_speedup"],
                 c["trained_tokens"] / b["trained_tokens"], result["tokens_per_s_ratio"], ""],
            ],
            title="real fleet (means over steps after the first; reward ± standard error)",
        )
    )  # fmt: skip


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument(
        "--sim-steps", type=int, default=None, help="simulated steps per run (quick 6, else 12)"
    )
    p.add_argument(
        "--real-steps", type=int, default=None, help="steps per real job (quick 8, else 20)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-sim", action="store_true")
    p.add_argument("--skip-real", action="store_true")
    p.add_argument("--cache-dir", type=Path, default=CACHE_DIR)
    p.add_argument("--run-dir", type=Path, default=None)
    args = p.parse_args(argv)
    started = time.monotonic()
    sim_steps = args.sim_steps or (6 if args.quick else 12)
    real_steps = args.real_steps or (8 if args.quick else 20)
    warmup = 2
    print(f"C3PO++ bench ({_common.load_note()})")

    sim: dict = {}
    sim_results: list[dict] = []
    if not args.skip_sim:
        scales = SCALES_QUICK if args.quick else SCALES_FULL
        print(
            f"\n1/2 simulation: {sim_steps} steps per run, the first {warmup} left out of the means"
        )
        for replicas, prompts in scales:
            r = sim_compare(replicas, prompts, steps=sim_steps, warmup=warmup, seed=args.seed)
            print(
                f"  {replicas} replicas × {prompts * 8} samples/step: {r['wall_s']:.0f}s wall ({_common.load_note()})"
            )
            sim_results.append(r)
        sensitivity = []
        if not args.quick:
            # Ω = B instead of 2B; σ = 0 (no carry-over), 1, 4; a training pool of one
            # GPU per replica instead of the replicas' 8 (training takes 8x longer).
            replicas, prompts = 64, 480
            for omega, sigma, gpus in (
                (prompts * 8, 2, 0),
                (0, 0, 0),
                (0, 1, 0),
                (0, 4, 0),
                (0, 2, replicas),
            ):
                sensitivity.append(
                    sim_compare(
                        replicas,
                        prompts,
                        steps=sim_steps,
                        warmup=warmup,
                        seed=args.seed,
                        omega=omega,
                        sigma=sigma,
                        train_gpus=gpus,
                    )
                )
        print()
        print_sim(sim_results)
        if sensitivity:
            print()
            print(
                "sensitivity to Ω, σ and the training pool (64 replicas; 'GPUs' = training GPUs):"
            )
            print_sim(sensitivity)
        largest = max(sim_results, key=lambda r: (r["replicas"], r["batch"]))
        sim = {
            "rollout_speedup": largest["rollout_speedup"],
            "e2e_speedup": largest["e2e_speedup"],
            "scheduler_overhead_frac": largest["c3po"]["decision_frac"],
            "largest_scale": {
                "replicas": largest["replicas"],
                "batch": largest["batch"],
                "pool_capacity": largest["pool_capacity"],
            },
            "scales": [{k: v for k, v in r.items()} for r in sim_results],
            "sensitivity": sensitivity,
        }

    real: dict = {}
    if not args.skip_real:
        print(
            f"\n2/2 real fleet: {real_steps} steps per job, sync then c3po ({_common.load_note()})"
        )
        run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="c3po-bench-"))
        result = run_real(
            steps=real_steps, warmup=1, seed=args.seed, run_dir=run_dir, cache_dir=args.cache_dir
        )
        print()
        print_real(result)
        real = {
            "e2e_speedup": result["e2e_speedup"],
            "reward_last5_baseline": result["sync"]["reward_last5"],
            "reward_last5_c3po": result["c3po"]["reward_last5"],
            **{k: v for k, v in result.items() if k not in ("records",)},
            "records": result["records"],
        }

    payload = _common.report("c3po", quick=args.quick, started=started, sim=sim, real=real)
    _common.write_json(args.json, payload)
    print(f"\ndone in {time.monotonic() - started:.0f}s ({_common.load_note()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
