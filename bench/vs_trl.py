"""The same GRPO job through rlfleet's fleet and through TRL's GRPOTrainer, on this CPU.

Same model (the demo's warm-started tiny Llama, rlfleet.cli.demo_model), task
(reasoning-gym basic_arithmetic with the demo's parameters and prompt
template), verifier (rlfleet's reasoning_gym verifier, first-line answer),
prompts in the same order, group size, prompts per step, steps, seed, learning
rate and AdamW settings, temperature 1.0 / top-p 1 / no top-k, max new tokens,
clip ε = 0.2, no KL term, GRPO advantages scaled by the group std, loss
averaged per sequence then over samples (TRL ``loss_type="grpo"``), one
optimizer step per batch, gradient clipping at 1.0, one micro-batch per step.

What differs, by design of the two systems:
- rlfleet runs as processes on loopback: scheduler, 2 rollout replicas (torch
  engine, continuous batching, one thread each), reward, trainer, weight-sync
  and Redis; each step crosses gRPC and the Redis buffer, and the new weights
  go trainer → weight-sync → every replica. TRL runs in one process: HF
  ``generate`` (static batch: a step decodes until its longest sequence ends,
  finished rows included), reward and training in-process (one torch thread
  by default, ``--trl-threads``: faster than two for this 64-wide model).
- rlfleet's weights cross processes every step: the trainer publishes each
  version to weight-sync and every replica pulls and loads it; TRL's generate
  and training share one model object.

Two jobs: ``arithmetic`` (the demo job, short answers) and ``long_tail`` (a
model warm-started to sometimes pad its answer with a long run of filler, so a
few sequences per step run ~15x longer than the rest — the shape of reasoning
outputs). rlfleet runs ``long_tail`` in sync mode and, in the full run, with
C3PO++ scheduling as well.

Per-step wall time is the time between the ends of consecutive steps (the
first step, which pays for warm-up, is left out), the median over steps. Each
step is also split into phases (generation, reward, train, publish, replica
load, other; ``_vs_trl_phases.py``) for both systems, printed side by side and
written under ``breakdown``; the targets are judged in ``_vs_trl_verdict.py``,
and a miss says by how much and in which phases rlfleet is slower.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import _common
import _vs_trl_cpu as cpu
import _vs_trl_phases as phases
import _vs_trl_verdict as verdict

CACHE_DIR = _common.REPO_ROOT / "runs" / "bench-cache"


# ----------------------------------------------------------------------------- models and jobs
def demo_model() -> Path:
    from rlfleet.cli.demo_model import prepare_demo_model

    return Path(prepare_demo_model(CACHE_DIR, progress=lambda m: print(f"  {m}", flush=True)))


def long_tail_model() -> Path:
    """The demo's recipe with a different second answer style: the answer, then 48 " ."
    filler tokens; 20% of warm-start targets use it. A tiny model cannot count, so
    the filler's length spreads out: most completions are ~4 tokens, a few are long."""
    from rlfleet.cli.demo_model import BUILD_SETTINGS, prepare_demo_model

    settings = {
        **BUILD_SETTINGS,
        "wordy_answer": " {answer}" + " ." * 48,
        "wordy_fraction": 0.2,
        "sft_steps": 250,
        "sft_batch_size": 32,
    }
    return Path(
        prepare_demo_model(
            CACHE_DIR, settings=settings, progress=lambda m: print(f"  {m}", flush=True)
        )
    )


def job_spec(model: Path, variant: str, *, quick: bool, mode: str = "sync", seed: int = 0) -> dict:
    from rlfleet.cli.demo_model import DEMO_PROMPT_TEMPLATE, DEMO_TASK_PARAMS

    group_size = 8
    # Steps are cheap next to starting the fleet (~20 s), and reward_last5 and the
    # median step time need enough steps to mean something: the learning curve
    # has to flatten before its last five steps, and a median over five steps is
    # at the mercy of one slow one.
    if variant == "arithmetic":  # the demo job (32 prompts x 8, 40 steps), smaller when quick
        groups, steps, max_new = (16, 30, 8) if quick else (32, 40, 8)
    else:
        groups, steps, max_new = (8, 16, 96) if quick else (16, 30, 96)
    return {
        "name": f"bench-vs-trl-{variant}-{mode}",
        "model": {"path": str(model), "dtype": "float32"},
        "task": {
            "kind": "reasoning_gym",
            "name": "basic_arithmetic",
            "params": DEMO_TASK_PARAMS,
            "size": 10_000,
            "seed": 0,
            "prompt_template": DEMO_PROMPT_TEMPLATE,
        },
        "reward": {"verifier": "reasoning_gym"},
        "sampling": {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": max_new},
        "algorithm": {
            "group_size": group_size,
            "prompts_per_step": groups,
            "lr": 5e-4,
            "betas": [0.9, 0.999],
            "weight_decay": 0.01,
            "clip_eps": 0.2,
            "kl_coef": 0.0,
            "max_grad_norm": 1.0,
            "micro_batch_size": groups * group_size,
            "scale_rewards": True,
        },
        "correction": {"kind": "icepop"},
        # C3PO++: a token budget of about what a synchronous step completes (~8 tokens
        # per sample here), so both train on batches of similar size.
        "scheduling": {"mode": mode, "token_budget": groups * group_size * 8},
        "checkpoint": {"every_steps": 0, "keep": 1},
        "steps": steps,
        "seed": seed,
    }


def step_times(ends: list[float], start: float) -> list[float]:
    """Seconds per step from the wall-clock ends of consecutive steps."""
    times, prev = [], start
    for end in ends:
        times.append(end - prev)
        prev = end
    return times


def summarise(name: str, times: list[float], rewards: list[float], lengths, samples: int, wall):
    steady = times[1:] if len(times) > 1 else times
    med = statistics.median(steady)
    return {
        "system": name,
        "step_s": times,
        "step_s_median": med,
        "samples_per_s": samples / med,
        "rewards": rewards,
        "reward_first5": statistics.fmean(rewards[:5]),
        "reward_last5": statistics.fmean(rewards[-5:]),
        "response_length_mean": lengths,
        "wall_s": wall,
        "load": _common.load(),
    }


# ----------------------------------------------------------------------------- rlfleet
def run_rlfleet(spec: dict, run_dir: Path, label: str) -> dict:
    from rlfleet.cli.fleet import Fleet, FleetOptions
    from rlfleet.cli.scheduler_client import TERMINAL_STATES, SchedulerClient

    started = time.monotonic()
    fleet = Fleet(FleetOptions(run_dir=run_dir, rollout_replicas=2, log_format="json"))
    fleet.start()
    try:
        client = SchedulerClient(fleet.scheduler_address)
        pids = {name: proc.pid for name, proc in fleet.procs.items()}
        if fleet.redis is not None:
            pids["redis"] = fleet.redis.pid
        meter = cpu.StepCpuMeter(pids)
        submitted = time.time()
        job = client.submit(spec)
        while True:
            job = client.get(job.job_id)
            meter.sample(job.current_step)
            if job.state in TERMINAL_STATES:
                break
            dead = fleet.dead()
            if dead:
                raise RuntimeError(f"{', '.join(dead)} exited; see {run_dir}/<service>.log")
            time.sleep(0.2)
        records = client.steps(job.job_id)
        client.close()
    finally:
        fleet.stop()
    if job.state != "succeeded":
        raise RuntimeError(f"rlfleet job {job.state}: {job.reason}; see {run_dir}")
    records = sorted(records, key=lambda r: r.step)
    ends = [r.finished_at for r in records]
    first_start = ends[0] - records[0].metrics.get("step_seconds", ends[0] - submitted)
    times = step_times(ends, first_start)
    out = summarise(
        label,
        times,
        [r.metrics.get("reward_mean", 0.0) for r in records],
        [r.metrics.get("response_length_mean", 0.0) for r in records],
        statistics.median(r.metrics.get("samples_trained", 0.0) for r in records),
        time.monotonic() - started,
    )
    out["breakdown"] = phases.summarise(phases.rlfleet_phases(records, times))
    out["breakdown"]["cpu_s_per_step"] = meter.per_step()
    steady = records[1:] or records
    out["generation_detail"] = {
        "tokens_median": statistics.median(r.metrics.get("tokens_generated", 0.0) for r in steady),
        "longest_median": statistics.median(
            r.metrics.get("response_length_max", 0.0) for r in steady
        ),
        # Seconds of the rollout phase a replica had no stream open: the imbalance
        # of whole groups spread over the replicas.
        "replica_idle_s_median": statistics.median(
            r.metrics.get("replica_idle_seconds_mean", 0.0) for r in steady
        ),
    }
    return out


# ----------------------------------------------------------------------------- TRL
def run_trl(spec: dict, out_dir: Path, *, threads: int) -> dict:
    import torch
    from datasets import Dataset
    from rlfleet.common.jobspec import JobSpec
    from rlfleet.common.tasks import PromptSource, entry_to_json
    from rlfleet.reward.verifiers.gym import ReasoningGymVerifier
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback
    from transformers.utils import logging as hf_logging
    from trl import GRPOConfig, GRPOTrainer

    started = time.monotonic()
    # TRL calls transformers' renamed gradient-checkpointing API; not ours to fix.
    warnings.filterwarnings("ignore", r".*checkpointing.* is deprecated", FutureWarning)
    job = JobSpec.model_validate(spec)
    alg, samp = job.algorithm, job.sampling
    source = PromptSource(job.task)
    n_prompts = alg.prompts_per_step * job.steps
    rows = [source.get(i) for i in range(n_prompts)]  # rlfleet draws prompt serials 0, 1, 2, ...
    dataset = Dataset.from_dict(
        {"prompt": [p for p, _ in rows], "entry": [entry_to_json(e) for _, e in rows]}
    )
    tokenizer = AutoTokenizer.from_pretrained(job.model.path)
    tokenizer.padding_side = "left"
    plain = Tokenizer.from_file(str(Path(job.model.path) / "tokenizer.json"))
    assert tokenizer(rows[0][0])["input_ids"] == plain.encode(rows[0][0]).ids, (
        "TRL would tokenise prompts differently from rlfleet's scheduler"
    )
    verifier = ReasoningGymVerifier()
    seen_prompts: list[set[str]] = []  # per step, to check TRL drew rlfleet's prompts

    def reward(prompts, completions, entry, **_):
        seen_prompts.append(set(prompts))
        return [verifier.score(c, json.loads(e)) for c, e in zip(completions, entry, strict=True)]

    timers = phases.TrlTimers()
    meter = cpu.StepCpuMeter({"trl": os.getpid()})

    class Clock(TrainerCallback):
        def __init__(self):
            self.start = 0.0
            self.ends: list[float] = []
            self.logs: list[dict] = []

        def on_train_begin(self, args, state, control, **kw):
            self.start = time.time()

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(time.time())
            timers.step_end()
            meter.sample(state.global_step)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "reward" in logs:
                self.logs.append(dict(logs))

    batch = alg.prompts_per_step * alg.group_size
    config = GRPOConfig(
        output_dir=str(out_dir),
        seed=job.seed,
        data_seed=job.seed,
        use_cpu=True,
        bf16=False,
        fp16=False,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        num_generations=alg.group_size,
        max_steps=job.steps,
        learning_rate=alg.lr,
        adam_beta1=alg.betas[0],
        adam_beta2=alg.betas[1],
        weight_decay=alg.weight_decay,
        max_grad_norm=alg.max_grad_norm,
        lr_scheduler_type="constant",
        warmup_steps=0,
        temperature=samp.temperature,
        top_p=samp.top_p,
        top_k=0,
        max_completion_length=samp.max_new_tokens,
        beta=alg.kl_coef,
        epsilon=alg.clip_eps,
        num_iterations=1,
        loss_type="grpo",
        scale_rewards="group" if alg.scale_rewards else "none",
        shuffle_dataset=False,
        disable_dropout=True,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        log_completions=False,
    )
    torch.set_num_threads(threads)
    hf_logging.disable_progress_bar()
    torch.manual_seed(job.seed)
    model = AutoModelForCausalLM.from_pretrained(job.model.path, dtype=torch.float32)
    clock = Clock()
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[clock],
    )
    trainer.remove_callback(PrinterCallback)  # its per-step log dicts would drown the report
    timers.install(trainer)
    trainer.train()
    times = step_times(clock.ends, clock.start)
    out = summarise(
        "trl",
        times,
        [log["reward"] for log in clock.logs],
        [log.get("completions/mean_length", 0.0) for log in clock.logs],
        batch,
        time.monotonic() - started,
    )
    out["breakdown"] = phases.summarise(timers.phases(times))
    out["breakdown"]["cpu_s_per_step"] = meter.per_step()
    steady = clock.logs[1:] or clock.logs
    longest = statistics.median(log.get("completions/max_length", 0.0) for log in steady)
    out["generation_detail"] = {
        "tokens_median": statistics.median(
            log.get("completions/mean_length", 0.0) * batch for log in steady
        ),
        "longest_median": longest,
        # HF generate runs a static batch: every row decodes until the longest ends.
        "decoded_positions_median": longest * batch,
    }
    expected = [
        {p for p, _ in rows[s * alg.prompts_per_step : (s + 1) * alg.prompts_per_step]}
        for s in range(job.steps)
    ]
    out["same_prompts_per_step"] = seen_prompts == expected
    return out


# ----------------------------------------------------------------------------- plots
def plot(variant: str, results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for r in results:
        steps = range(len(r["rewards"]))
        ax1.plot(steps, r["rewards"], marker=".", label=r["system"])
        ax2.plot(steps, r["step_s"], marker=".", label=r["system"])
    ax1.set(title=f"{variant}: mean reward per step", xlabel="step", ylabel="reward")
    ax2.set(title=f"{variant}: wall time per step", xlabel="step", ylabel="seconds")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument(
        "--variants", default="arithmetic,long_tail", help="comma-separated: arithmetic,long_tail"
    )
    p.add_argument("--plots", type=Path, default=_common.RESULTS_DIR, help="where the PNG plots go")
    p.add_argument(
        "--trl-threads",
        type=int,
        default=1,
        help="torch threads for TRL (1: faster than 2 for a 64-wide model, and steadier on a "
        "shared machine; rlfleet's services run one thread each)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="the job's seed (sampling, both systems' torch RNG); prompts stay the same. Both "
        "systems are deterministic per seed, so other seeds are how to see reward noise",
    )
    args = p.parse_args(argv)
    started = time.monotonic()
    print(f"rlfleet vs TRL ({_common.load_note()})", flush=True)
    variants = [v for v in args.variants.split(",") if v]
    report: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="rlfleet-bench-vs-trl-") as tmp:
        for variant in variants:
            print(f"[{variant}] preparing the model", flush=True)
            model = demo_model() if variant == "arithmetic" else long_tail_model()
            runs = []
            modes = ["sync"] + (["c3po"] if variant == "long_tail" and not args.quick else [])
            for mode in modes:
                spec = job_spec(model, variant, quick=args.quick, mode=mode, seed=args.seed)
                label = "rlfleet" if mode == "sync" else "rlfleet-c3po"
                print(
                    f"[{variant}] {label}: {spec['steps']} steps ({_common.load_note()})",
                    flush=True,
                )
                runs.append(run_rlfleet(spec, Path(tmp) / f"{variant}-{mode}", label))
            spec = job_spec(model, variant, quick=args.quick, seed=args.seed)
            print(f"[{variant}] trl: {spec['steps']} steps ({_common.load_note()})", flush=True)
            runs.append(run_trl(spec, Path(tmp) / f"trl-{variant}", threads=args.trl_threads))
            report[variant] = show_variant(variant, spec, runs)
            plot(variant, runs, args.plots / f"vs_trl_{variant}.png")

    targets = [v["speed"] for v in report.values()] + [v["reward"] for v in report.values()]
    print(f"\n== targets ({_common.load_note()})")
    for t in targets:
        print(f"  {t['line']}")
    print(f"  reward rule: {verdict.REWARD_RULE}")
    head = report.get("arithmetic") or next(iter(report.values()))
    payload = _common.report(
        "vs_trl",
        quick=args.quick,
        started=started,
        step_time_ratio_trl_over_rlfleet=round(head["ratio"], 4),
        reward_last5={
            "trl": round(head["reward"]["trl"], 4),
            "rlfleet": round(head["reward"]["rlfleet"], 4),
        },
        trl_torch_threads=args.trl_threads,
        step_time_ratio_long_tail=round(report["long_tail"]["ratio"], 4)
        if "long_tail" in report
        else None,
        definition="step_time_ratio = TRL median s/step / rlfleet median s/step (first step "
        "excluded); reward_last5 = mean reward of the last 5 steps",
        targets={f"{v}.{k}": report[v][k] for v in report for k in ("speed", "reward")},
        breakdown={v: {r["system"]: r["breakdown"] for r in report[v]["runs"]} for v in report},
        variants=report,
    )
    _common.write_json(args.json, payload)
    return 0


def show_variant(variant: str, spec: dict, runs: list[dict]) -> dict:
    """Prints one job's table, reward curves, breakdown and verdicts; returns its report."""
    rows = [
        [
            r["system"],
            r["step_s_median"],
            r["samples_per_s"],
            r["reward_first5"],
            r["reward_last5"],
            statistics.fmean(r["response_length_mean"]),
            r["wall_s"],
            r["load"]["loadavg_1m"],
        ]
        for r in runs
    ]
    headers = ["system", "s/step", "samples/s", "reward 1st5", "reward last5", "mean len"]
    alg = spec["algorithm"]
    print(
        _common.table(
            [*headers, "wall s", "load"],
            rows,
            title=f"== {variant} ({alg['prompts_per_step']} prompts x {alg['group_size']}, "
            f"{spec['steps']} steps, max {spec['sampling']['max_new_tokens']} new tokens)",
        )
    )
    for r in runs:
        curve = " ".join(f"{x:.2f}" for x in r["rewards"])
        print(f"  reward curve {r['system']:<13} {curve}")
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
    ratio = by["trl"]["step_s_median"] / by["rlfleet"]["step_s_median"]
    print(f"  step_time_ratio_trl_over_rlfleet = {ratio:.3f} (> 1: rlfleet is faster)")
    cpu_ratio = _cpu_ratio(by["trl"], by["rlfleet"])
    if cpu_ratio is not None:
        print(
            f"  cpu_ratio_trl_over_rlfleet = {cpu_ratio:.3f} (CPU s per step, every process; "
            "other work on the machine moves it much less than wall time)"
        )
    if "rlfleet-c3po" in by:
        c3po = by["trl"]["step_s_median"] / by["rlfleet-c3po"]["step_s_median"]
        print(f"  the same ratio with C3PO++ scheduling = {c3po:.3f}")
    pair = {"rlfleet": by["rlfleet"]["breakdown"], "trl": by["trl"]["breakdown"]}
    return {
        "ratio": ratio,
        "cpu_ratio": cpu_ratio,
        "speed": verdict.speed(variant, ratio, strict=variant == "long_tail", breakdown=pair),
        "reward": verdict.reward(variant, by["trl"]["rewards"], by["rlfleet"]["rewards"]),
        "runs": runs,
        "spec": spec,
    }


def _cpu_ratio(trl: dict, rlfleet: dict) -> float | None:
    a = trl["breakdown"]["cpu_s_per_step"].get("total")
    b = rlfleet["breakdown"]["cpu_s_per_step"].get("total")
    return a / b if a and b else None


if __name__ == "__main__":
    sys.exit(main())
