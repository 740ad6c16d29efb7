"""The same GRPO job through rlfleet's fleet and through TRL's GRPOTrainer, on this CPU.

Same model (the demo's warm-started tiny Llama, rlfleet.cli.demo_model), task
(reasoning-gym basic_arithmetic with the demo's parameters and prompt
template), verifier (rlfleet's reasoning_gym verifier, first-line answer),
prompts in the same order, group size, prompts per step, steps, seeds, learning
rate and AdamW settings, temperature 1.0 / top-p 1 / no top-k, max new tokens,
clip ε = 0.2, no KL term, GRPO advantages scaled by the group std, loss
averaged per sequence then over samples (TRL ``loss_type="grpo"``), one
optimizer step per batch, gradient clipping at 1.0, one micro-batch per step.

Same cores: this process pins itself to one CPU set before it starts anything
(``--cpus``, default every CPU it may use), so every rlfleet process and TRL run
on the same CPUs. TRL runs every seed on one torch thread and the first seed
again on as many threads as the set has CPUs; each speed verdict takes TRL's
better configuration (``--trl-threads N``: N threads, every seed, only).
rlfleet's services run one thread each, several computing at once
(``_vs_trl_cpu.py``).

What differs, by design of the two systems:
- rlfleet runs as processes on loopback: scheduler, 2 rollout replicas (torch
  engine, continuous batching, one thread each), reward, trainer, weight-sync
  and Redis; each step crosses gRPC and the Redis buffer, and the new weights
  go trainer → weight-sync → every replica. TRL runs in one process: HF
  ``generate`` (static batch: a step decodes until its longest sequence ends,
  finished rows included), reward and training in-process.
- rlfleet's weights cross processes every step: the trainer publishes each
  version to weight-sync and every replica pulls and loads it; TRL's generate
  and training share one model object.

Two jobs: ``arithmetic`` (the demo job, short answers) and ``long_tail`` (a
model warm-started to sometimes pad its answer with a long run of filler, so a
few sequences per step run ~15x longer than the rest — the shape of reasoning
outputs). Each runs once per seed (``--seeds``, 0,1,2 by default, ``--quick``
too) on each system; the fleet is started once and runs every job one after the
other. rlfleet runs ``long_tail`` in sync mode and, in the full run, with C3PO++
scheduling as well (first seed only, printed for information).

Per-step wall time is the time between the ends of consecutive steps (each
run's first step, which pays for warm-up, is left out), the median over the
steady steps of every seed. Each step is also split into phases (generation,
reward, train, publish, replica load, other; ``_vs_trl_phases.py``) for both
systems, printed side by side and written under ``breakdown``, and costed in
CPU-seconds of every process. The targets are judged in ``_vs_trl_verdict.py``:
speed by wall time and by CPU-s per step, reward over seeds (within 2 combined
standard errors over at least 3 seeds counts as met); a miss says by how much
and where rlfleet spends the extra.
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
import _vs_trl_report as report_
import _vs_trl_seeds as over_seeds
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
        "name": f"bench-vs-trl-{variant}-{mode}-s{seed}",
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


# ----------------------------------------------------------------------------- rlfleet
def run_rlfleet(jobs: list[tuple[str, dict, str]], run_dir: Path, cpus: list[int]) -> dict:
    """Every ``(key, spec, label)`` job through one fleet, one after the other; key → figures.

    The fleet starts once (~25 s on 2 busy cores: seven processes importing torch and
    gRPC); each job's figures start at its submission, as TRL's start at its trainer."""
    from rlfleet.cli.fleet import Fleet, FleetOptions
    from rlfleet.cli.scheduler_client import SchedulerClient

    started = time.monotonic()
    fleet = Fleet(FleetOptions(run_dir=run_dir, rollout_replicas=2, log_format="json"))
    fleet.start()
    out: dict[str, dict] = {"fleet_start_s": time.monotonic() - started}
    try:
        pids = {name: proc.pid for name, proc in fleet.procs.items()}
        if fleet.redis is not None:
            pids["redis"] = fleet.redis.pid
        cpu.check_pinned(pids, cpus)
        print(
            f"  fleet started in {out['fleet_start_s']:.0f}s: {len(pids)} processes "
            f"({', '.join(pids)}), all on CPUs {cpus}",
            flush=True,
        )
        client = SchedulerClient(fleet.scheduler_address)
        try:
            for key, spec, label in jobs:
                print(f"[{key}] {label}: {spec['steps']} steps ({_common.load_note()})", flush=True)
                out[key] = rlfleet_job(client, fleet, spec, label, pids, run_dir)
        finally:
            client.close()
    finally:
        fleet.stop()
    return out


def rlfleet_job(client, fleet, spec: dict, label: str, pids: dict[str, int], run_dir: Path):
    from rlfleet.cli.scheduler_client import TERMINAL_STATES

    started = time.monotonic()
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
    if job.state != "succeeded":
        raise RuntimeError(f"rlfleet job {job.state}: {job.reason}; see {run_dir}")
    records = sorted(client.steps(job.job_id), key=lambda r: r.step)
    ends = [r.finished_at for r in records]
    first_start = ends[0] - records[0].metrics.get("step_seconds", ends[0] - submitted)
    times = over_seeds.step_times(ends, first_start)
    out = over_seeds.run_figures(
        label,
        spec["seed"],
        times,
        [r.metrics.get("reward_mean", 0.0) for r in records],
        [r.metrics.get("response_length_mean", 0.0) for r in records],
        statistics.median(r.metrics.get("samples_trained", 0.0) for r in records),
        time.monotonic() - started,
    )
    out["phase_steps"] = phases.rlfleet_phases(records, times)
    out["cpu_s_per_step"] = meter.per_step()
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
def run_trl(spec: dict, out_dir: Path, *, threads: int, name: str = "trl") -> dict:
    """One TRL run of the job (one seed) in this process, on ``threads`` torch threads."""
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
    times = over_seeds.step_times(clock.ends, clock.start)
    out = over_seeds.run_figures(
        name,
        job.seed,
        times,
        [log["reward"] for log in clock.logs],
        [log.get("completions/mean_length", 0.0) for log in clock.logs],
        batch,
        time.monotonic() - started,
    )
    out["phase_steps"] = timers.phases(times)
    out["cpu_s_per_step"] = meter.per_step()
    out["torch_threads"] = threads
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


# ----------------------------------------------------------------------------- main
def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument(
        "--variants", default="arithmetic,long_tail", help="comma-separated: arithmetic,long_tail"
    )
    p.add_argument("--plots", type=Path, default=_common.RESULTS_DIR, help="where the PNG plots go")
    p.add_argument(
        "--seeds",
        type=int_list,
        default=[0, 1, 2],
        help="the jobs' seeds (sampling, both systems' torch RNG; prompts stay the same), "
        "comma-separated; each job runs once per seed on each system. The reward verdict "
        f"allows for noise only with >= {verdict.MIN_SEEDS} seeds",
    )
    p.add_argument(
        "--cpus",
        type=int_list,
        default=None,
        help="the CPUs both systems are pinned to, comma-separated (default: every CPU this "
        "process may use)",
    )
    p.add_argument(
        "--trl-threads",
        type=int,
        default=0,
        help="torch threads for TRL, every seed (0: one thread every seed, and as many as "
        "--cpus has CPUs on the first seed; each speed verdict takes TRL's better "
        "configuration)",
    )
    args = p.parse_args(argv)
    started = time.monotonic()
    seeds = args.seeds
    cpus = cpu.pin(args.cpus)
    # TRL runs every seed on one thread ("trl": the reward verdict's runs) and the first
    # seed again on as many threads as the set has CPUs ("trl-Nt"). On this 64-wide model
    # two threads can be faster per step but always cost more CPU (OpenMP's threads spin
    # while they wait) and stall for seconds when other work preempts one of them, so each
    # speed verdict takes TRL's better configuration on these cores.
    trl_threads = args.trl_threads or 1
    alt_threads = len(cpus) if not args.trl_threads and len(cpus) > 1 else None
    same_cores = (
        f"both systems pinned to CPUs {cpus} (sched_setaffinity before anything starts; the "
        f"fleet's processes inherit it); TRL: one process, {trl_threads} torch thread(s) every "
        "seed"
        + (
            f" and {alt_threads} on the first seed ('trl-{alt_threads}t'); each speed verdict "
            "takes TRL's better configuration"
            if alt_threads
            else ""
        )
        + "; rlfleet: 7 processes (Redis, scheduler, reward, trainer, weight-sync, 2 rollout "
        "replicas), one torch thread each"
    )
    print(f"rlfleet vs TRL ({_common.load_note()}); seeds {seeds}\nsame cores: {same_cores}")
    variants = [v for v in args.variants.split(",") if v]
    report: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="rlfleet-bench-vs-trl-") as tmp:
        models = {}
        for variant in variants:
            print(f"[{variant}] preparing the model", flush=True)
            models[variant] = demo_model() if variant == "arithmetic" else long_tail_model()
        jobs = []
        for variant in variants:
            for seed in seeds:
                spec = job_spec(models[variant], variant, quick=args.quick, seed=seed)
                jobs.append((f"{variant}/sync/{seed}", spec, "rlfleet"))
            if variant == "long_tail" and not args.quick:  # for information: first seed only
                spec = job_spec(models[variant], variant, quick=False, mode="c3po", seed=seeds[0])
                jobs.append((f"{variant}/c3po/{seeds[0]}", spec, "rlfleet-c3po"))
        print(f"rlfleet: starting the fleet for {len(jobs)} jobs ({_common.load_note()})")
        fleet = run_rlfleet(jobs, Path(tmp) / "fleet", cpus)
        trl: dict[str, list[dict]] = {}
        trl_alt: dict[str, dict] = {}
        # Every one-thread run first, then the others: a run never follows one that used
        # more threads in this process.
        plan = [(v, seed, trl_threads, "trl") for v in variants for seed in seeds]
        if alt_threads:
            plan += [(v, seeds[0], alt_threads, f"trl-{alt_threads}t") for v in variants]
        for variant, seed, threads, name in plan:
            spec = job_spec(models[variant], variant, quick=args.quick, seed=seed)
            print(
                f"[{variant}/{seed}] {name}: {spec['steps']} steps, {threads} torch "
                f"thread(s) ({_common.load_note()})",
                flush=True,
            )
            out_dir = Path(tmp) / f"{name}-{variant}-{seed}"
            run = run_trl(spec, out_dir, threads=threads, name=name)
            if name == "trl":
                trl.setdefault(variant, []).append(run)
            else:
                trl_alt[variant] = run
        for variant in variants:
            runs = [over_seeds.combine([fleet[f"{variant}/sync/{s}"] for s in seeds])]
            if f"{variant}/c3po/{seeds[0]}" in fleet:
                runs.append(over_seeds.combine([fleet[f"{variant}/c3po/{seeds[0]}"]]))
            runs.append(over_seeds.combine(trl[variant]))
            if variant in trl_alt:
                runs.append(over_seeds.combine([trl_alt[variant]]))
            spec = job_spec(models[variant], variant, quick=args.quick, seed=seeds[0])
            report[variant] = report_.show_variant(variant, spec, runs)
            report_.plot(variant, runs, args.plots / f"vs_trl_{variant}.png")

    targets = {f"{v}.{k}": report[v][k] for v in report for k in ("speed", "cpu", "reward")}
    print(f"\n== targets ({_common.load_note()}; {same_cores})")
    for t in targets.values():
        print(f"  {t['line']}")
    print(f"  reward rule: {verdict.REWARD_RULE}")
    head = report.get("arithmetic") or next(iter(report.values()))
    tail = report.get("long_tail")
    payload = _common.report(
        "vs_trl",
        quick=args.quick,
        started=started,
        step_time_ratio_trl_over_rlfleet=round(head["ratio"], 4),
        reward_last5={
            "trl": round(head["reward"]["trl"], 4),
            "rlfleet": round(head["reward"]["rlfleet"], 4),
        },
        seeds=seeds,
        cpu_s_per_step={k: _round(v) for k, v in head["cpu_s_per_step"].items()},
        trl_configs=head["trl_configs"],
        cpu_ratio_trl_over_rlfleet=_round(head["cpu_ratio"]),
        step_time_ratio_long_tail=round(tail["ratio"], 4) if tail else None,
        cpu_ratio_long_tail=_round(tail["cpu_ratio"]) if tail else None,
        cpus=cpus,
        trl_torch_threads=trl_threads,
        trl_torch_threads_first_seed=alt_threads,
        same_cores=same_cores,
        fleet_start_s=round(fleet["fleet_start_s"], 1),
        definition="step_time_ratio = TRL median s/step / rlfleet median s/step (each run's "
        "first step excluded, steady steps of every seed pooled; TRL's faster configuration, "
        "see trl_configs); cpu_s_per_step = CPU seconds (user + system) of every process of "
        "the system per steady step, mean over seeds (TRL's cheaper configuration); "
        "reward_last5 = mean over seeds of each run's mean reward over its last 5 steps",
        reward_rule=verdict.REWARD_RULE,
        targets=targets,
        breakdown={v: {r["system"]: r["breakdown"] for r in report[v]["runs"]} for v in report},
        variants=report,
    )
    _common.write_json(args.json, payload)
    return 0


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


if __name__ == "__main__":
    sys.exit(main())
