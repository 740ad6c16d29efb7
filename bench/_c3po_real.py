"""C3PO++ bench, part 2: sync, C3PO++ and overlapped C3PO++ on the real CPU fleet.

The workload is the one C3PO++ exists for: output lengths with a long tail. The
bench's tiny Llama is warm-started (supervised, on reasoning-gym's
``basic_arithmetic``) to answer on the first line and then, for about a quarter of
its answers, to "re-check" the sum over many lines, so most completions are a few
tokens and a few are 10–50× longer. That is the length distribution the model
itself then produces when sampled; the bench prints it (percentiles of the sync
runs' completion lengths). The reward (reasoning-gym's scorer) reads the first
line only, so length does not pay.

One fleet (every service its own process, PyTorch rollout engine, two replicas)
runs, for each seed, the same job spec three times: ``sync`` (the budget-free
baseline), ``c3po`` (Φ = the sync run's mean completion tokens per step) and
``overlap`` (C3PO++ with ``scheduling.overlap``). Modes are interleaved per seed,
so drifting load on a shared machine touches all three alike.

The figure of merit is trained tokens per second end to end (step time measured
by the scheduler, every phase included): C3PO++ trains a slightly different number
of tokens per step than sync, so time per step alone would mislead.
"""

from __future__ import annotations

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

MODEL_SETTINGS = {
    "format": 2,
    "task_params": {
        "min_terms": 2,
        "max_terms": 2,
        "min_digits": 1,
        "max_digits": 1,
        "operators": ["+", "-"],
        "allow_parentheses": False,
        "allow_negation": False,
    },
    "long_frac": 0.15,
    "long_min_lines": 5,
    "long_max_lines": 24,
    "vocab_size": 512,
    "hidden_size": 32,
    "num_layers": 8,
    "num_heads": 2,
    "max_positions": 224,
    "sft_steps": 400,
    "sft_batch_size": 32,
    "sft_lr": 3e-3,
    "seed": 0,
}
"""The bench's tiny model and its warm start; their hash names the cache entry."""

JOB = {
    "prompts_per_step": 64,
    "group_size": 8,
    "max_new_tokens": 176,
    "lr": 2e-4,
    "micro_batch_size": 64,
}
"""The job every mode runs (512 samples per step, two replicas)."""

C3PO = {"pool_capacity": 192, "retention_limit": 6}
"""Ω = 192 sequences in flight (96 per replica) and σ = 6. A replica advances each row
about 40 tokens per iteration at this Φ, so the longest answers (176 tokens) need
five iterations or more: σ = 4 purged about two groups per step, σ = 6 none.
Carried rollouts resume from the KV cache their replica kept (``resume_kv``, the
default)."""

MODES = ("sync", "c3po", "overlap")


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0


def sem(xs) -> float:
    """Standard error of the mean of ``xs``."""
    xs = list(xs)
    return statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else 0.0


# ----------------------------------------------------------------------------- the model
def _target(entry: dict, rng: random.Random, s: dict) -> str:
    """' <answer>', then for a ``long_frac`` share of answers k lines '<expression> =
    <answer>', k log-uniform in [long_min_lines, long_max_lines]."""
    text = f" {entry['answer']}"
    if rng.random() >= s["long_frac"]:
        return text
    lo, hi = math.log(s["long_min_lines"]), math.log(s["long_max_lines"])
    k = int(math.exp(rng.uniform(lo, hi)))
    expression = entry["metadata"]["expression"]
    return text + "".join(f"\n{expression} = {entry['answer']}" for _ in range(k))


def prepare_model(cache_dir: Path, progress=print) -> Path:
    """Builds (once, cached) the tiny model whose completion lengths are long-tailed."""
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
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".c3po-model-", dir=cache_dir))
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
    if target.exists():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(target)
    progress(f"  model built in {time.monotonic() - started:.0f}s: {target}")
    return target


# ----------------------------------------------------------------------------- jobs
def job_spec(model_path: Path, *, mode: str, steps: int, seed: int, phi: int = 0) -> dict:
    spec = {
        "name": f"c3po-bench-{mode}-s{seed}",
        "model": {"path": str(model_path)},
        "task": {"name": "basic_arithmetic", "params": MODEL_SETTINGS["task_params"]},
        "sampling": {"temperature": 1.0, "max_new_tokens": JOB["max_new_tokens"]},
        "algorithm": {
            "group_size": JOB["group_size"],
            "prompts_per_step": JOB["prompts_per_step"],
            "lr": JOB["lr"],
            "micro_batch_size": JOB["micro_batch_size"],
        },
        "checkpoint": {"every_steps": 0},
        "steps": steps,
        "seed": seed,
    }
    if mode != "sync":
        spec["scheduling"] = {
            "mode": "c3po",
            "token_budget": phi,
            "overlap": mode == "overlap",
            **C3PO,
        }
    return spec


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
    print(
        f"  {spec['name']:<24} {len(records)} steps in {time.monotonic() - t0:.0f}s "
        f"({_common.load_note()})"
    )
    return records


PHASES = ("rollout", "reward", "train", "sync")
PASS_SERIES = (
    "rlfleet_rollout_engine_passes_total",
    "rlfleet_rollout_engine_pass_seconds_total",
    "rlfleet_rollout_engine_pass_rows_total",
    "rlfleet_rollout_kv_resumed_total",
)


def engine_passes(fleet) -> dict[str, float]:
    """The replicas' forward-pass counters, summed: {"<series>:<kind>": value}."""
    import urllib.request

    out: dict[str, float] = {}
    for name, proc in fleet.procs.items():
        if not name.startswith("rollout"):
            continue
        url = f"http://127.0.0.1:{proc.info['metrics_port']}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            text = reply.read().decode()
        for line in text.splitlines():
            for series in PASS_SERIES:
                if line.startswith(series + "{"):
                    kind = line.split('kind="', 1)[1].split('"', 1)[0]
                elif line.startswith(series + " "):
                    kind = "resumed"  # sequences resumed from a kept KV cache
                else:
                    continue
                key = f"{series.removeprefix('rlfleet_rollout_engine_')}:{kind}"
                out[key] = out.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def cpu_seconds(fleet) -> dict[str, float]:
    """CPU seconds used so far by each process of the fleet (rollout replicas summed)."""
    out: dict[str, float] = {}
    for name, proc in fleet.procs.items():
        if proc.alive():
            key = "rollout" if name.startswith("rollout") else name
            out[key] = out.get(key, 0.0) + _common.proc_cpu_seconds(proc.pid)
    return out


def summarise(records: list[dict], *, warmup: int) -> dict:
    """Means over the steps after ``warmup`` (C3PO++ starts from an empty pool)."""
    kept = records[warmup:]
    seconds = sum(r["step_seconds"] for r in kept)
    tokens = sum(r["tokens_generated"] for r in kept)
    rewards = [r["reward_mean"] for r in records]
    return {
        "e2e_s": seconds / len(kept),
        "phases_s": {p: mean(r.get(f"{p}_seconds", 0.0) for r in kept) for p in PHASES},
        "trained_tokens": tokens / len(kept),
        "trained_tokens_per_s": tokens / seconds if seconds else 0.0,
        "samples": mean(r["samples"] for r in kept),
        "response_length_mean": mean(r["response_length_mean"] for r in kept),
        "response_length_max": max(r["response_length_max"] for r in kept),
        "version_lag_max": max((r.get("version_lag_max", 0.0) for r in kept), default=0.0),
        "purged_groups": sum(r.get("c3po_groups_purged", 0.0) for r in kept),
        "stale_groups": sum(r.get("c3po_groups_stale", 0.0) for r in kept),
        "reward_curve": rewards,
        "reward_last5": mean(rewards[-5:]),
    }


def run(*, steps: int, seeds: list[int], warmup: int, run_dir: Path, cache_dir: Path) -> dict:
    """Runs every mode for every seed on one fleet; returns the JSON's "real" object."""
    from rlfleet.cli.fleet import Fleet, FleetOptions
    from rlfleet.cli.scheduler_client import SchedulerClient

    model_path = prepare_model(cache_dir)
    fleet = Fleet(FleetOptions(run_dir=run_dir, rollout_replicas=2, log_format="text"))
    t0 = time.monotonic()
    fleet.start()
    print(f"  fleet up in {time.monotonic() - t0:.0f}s (logs: {run_dir}/*.log)")
    # A short job first, not measured: the first steps after a fleet starts pay for lazy
    # imports, allocator growth and first calls in every process, which would otherwise
    # all land on the first seed's sync run.
    warm = job_spec(model_path, mode="sync", steps=3, seed=10_000)
    warm["name"] = "c3po-bench-warm-up"
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    records: dict[str, list[list[dict]]] = {m: [] for m in MODES}
    try:
        client = SchedulerClient(fleet.scheduler_address)
        run_job(client, fleet, warm, timeout_s=600)
        for seed in seeds:
            phi = 0
            for mode in MODES:
                spec = job_spec(model_path, mode=mode, steps=steps, seed=seed, phi=phi)
                passes0, cpu0 = engine_passes(fleet), cpu_seconds(fleet)
                recs = run_job(client, fleet, spec, timeout_s=60.0 * steps + 300)
                passes1, cpu1 = engine_passes(fleet), cpu_seconds(fleet)
                if mode == "sync":
                    phi = int(mean(r["tokens_generated"] for r in recs))
                summary = summarise(recs, warmup=warmup)
                per_proc = {k: (v - cpu0.get(k, 0.0)) / len(recs) for k, v in cpu1.items()}
                summary["cpu_s_per_step"] = sum(per_proc.values())
                summary["cpu_s_per_step_by_process"] = per_proc
                summary["engine_per_step"] = {
                    k: (v - passes0.get(k, 0.0)) / len(recs) for k, v in passes1.items()
                }
                summary["seed"], summary["token_budget"] = seed, phi if mode != "sync" else 0
                runs[mode].append(summary)
                records[mode].append(recs)
        client.close()
    finally:
        fleet.stop()
    return compare(runs, records, seeds=seeds, model_path=model_path)


def compare(runs: dict[str, list[dict]], records: dict, *, seeds: list[int], model_path) -> dict:
    """Per-mode means over seeds, speed-ups per trained token and the reward verdict."""

    def ratio(mode: str) -> list[float]:
        return [
            c["trained_tokens_per_s"] / b["trained_tokens_per_s"]
            for b, c in zip(runs["sync"], runs[mode], strict=True)
        ]

    rewards = {m: [r["reward_last5"] for r in runs[m]] for m in MODES}
    stderr = math.sqrt(sem(rewards["sync"]) ** 2 + sem(rewards["c3po"]) ** 2)
    diff = mean(rewards["c3po"]) - mean(rewards["sync"])
    stderr_overlap = math.sqrt(sem(rewards["sync"]) ** 2 + sem(rewards["overlap"]) ** 2)
    diff_overlap = mean(rewards["overlap"]) - mean(rewards["sync"])
    return {
        "model": str(model_path),
        "workload": {**JOB, **{k: MODEL_SETTINGS[k] for k in ("long_frac", "long_min_lines",
                                                                  "long_max_lines")}},
        "c3po_settings": C3PO,
        "seeds": seeds,
        "e2e_speedup": mean(ratio("c3po")),
        "e2e_speedup_per_seed": ratio("c3po"),
        "e2e_speedup_overlap": mean(ratio("overlap")),
        "e2e_speedup_overlap_per_seed": ratio("overlap"),
        "rollout_speedup": mean(
            b["phases_s"]["rollout"] / c["phases_s"]["rollout"]
            for b, c in zip(runs["sync"], runs["c3po"], strict=True)
        ),
        "reward_last5_baseline": mean(rewards["sync"]),
        "reward_last5_c3po": mean(rewards["c3po"]),
        "reward_last5_overlap": mean(rewards["overlap"]),
        "reward_stderr": stderr,
        "reward_parity": abs(diff) <= 2 * stderr,
        "reward_stderr_overlap": stderr_overlap,
        "reward_parity_overlap": abs(diff_overlap) <= 2 * stderr_overlap,
        "modes": {m: {"per_seed": runs[m]} for m in MODES},
        "records": records,
    }  # fmt: skip


def _passes_note(per_step: dict[str, float]) -> str:
    """'decode 31×40 0.52s, prefill 6×45 0.20s': passes per step, rows per pass, seconds."""
    parts = []
    for kind in ("decode", "prefill"):
        n = per_step.get(f"passes_total:{kind}", 0.0)
        rows = per_step.get(f"pass_rows_total:{kind}", 0.0)
        secs = per_step.get(f"pass_seconds_total:{kind}", 0.0)
        if n:
            parts.append(f"{kind} {n:.0f}×{rows / n:.0f} {secs:.2f}s")
    resumed = per_step.get("rlfleet_rollout_kv_resumed_total:resumed", 0.0)
    if resumed:
        parts.append(f"{resumed:.0f} resumed from kept KV")
    return ", ".join(parts)


def print_results(real: dict) -> None:
    rows = []
    for mode in MODES:
        per_seed = real["modes"][mode]["per_seed"]
        for r in per_seed:
            ph = r["phases_s"]
            rows.append(
                [
                    mode,
                    r["seed"],
                    r["e2e_s"],
                    ph["rollout"],
                    ph["reward"],
                    ph["train"],
                    ph["sync"],
                    r["trained_tokens"],
                    r["trained_tokens_per_s"],
                    r["response_length_mean"],
                    r["version_lag_max"],
                    r["purged_groups"] + r["stale_groups"],
                    r["reward_last5"],
                    r["cpu_s_per_step"],
                    _passes_note(r["engine_per_step"]),
                ]
            )
    print(
        _common.table(
            ["mode", "seed", "step s", "rollout s", "reward s", "train s", "load s",
             "trained tok/step", "trained tok/s", "mean length", "max lag", "dropped groups",
             "reward last 5", "CPU s/step", "engine passes/step: n × rows, s"],
            rows,
            title="real fleet, per job (means over steps after the warm-up)",
        )
    )  # fmt: skip
    sync_lengths = [r["response_length_mean"] for r in real["modes"]["sync"]["per_seed"]]
    print(f"\nsync completion length: mean {mean(sync_lengths):.1f} tokens per sample")
    print()
    print(
        _common.table(
            ["", "trained tok/s ×", "per seed", "reward last 5", "± 2 SE", "parity"],
            [
                ["c3po ÷ sync", real["e2e_speedup"],
                 ", ".join(f"{x:.2f}" for x in real["e2e_speedup_per_seed"]),
                 f"{real['reward_last5_c3po']:.3f} vs {real['reward_last5_baseline']:.3f}",
                 2 * real["reward_stderr"], "yes" if real["reward_parity"] else "NO"],
                ["overlap ÷ sync", real["e2e_speedup_overlap"],
                 ", ".join(f"{x:.2f}" for x in real["e2e_speedup_overlap_per_seed"]),
                 f"{real['reward_last5_overlap']:.3f} vs {real['reward_last5_baseline']:.3f}",
                 2 * real["reward_stderr_overlap"],
                 "yes" if real["reward_parity_overlap"] else "NO"],
            ],
            title=f"end to end per trained token, mean over seeds {real['seeds']}",
        )
    )  # fmt: skip


def profile_top(real: dict) -> list[str]:
    """Where each mode's step time goes, means over seeds (run_all prints these)."""
    lines = []
    for mode in MODES:
        runs = real["modes"][mode]["per_seed"]
        ph = {k: mean(r["phases_s"][k] for r in runs) for k in PHASES}
        passes: dict[str, float] = {}
        for r in runs:
            for k, v in r["engine_per_step"].items():
                passes[k] = passes.get(k, 0.0) + v / len(runs)
        cpu = {
            k: mean(r["cpu_s_per_step_by_process"].get(k, 0.0) for r in runs)
            for k in ("rollout", "trainer", "scheduler")
        }
        lines.append(
            f"{mode}: {mean(r['e2e_s'] for r in runs):.2f} s/step = rollout {ph['rollout']:.2f} "
            f"+ reward {ph['reward']:.2f} + train {ph['train']:.2f} + load {ph['sync']:.2f}; "
            f"engine per step {_passes_note(passes)}; CPU s/step "
            + ", ".join(f"{k} {v:.2f}" for k, v in cpu.items())
        )
    return lines
