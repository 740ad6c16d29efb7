"""Trainer throughput: rlfleet's JobTrainer step against a plain PyTorch loop, same model and batch.

rlfleet (in this process, the service's own code path): the step's samples are
appended to a real Redis buffer (as reward does; not timed), then
``JobTrainer.train_step`` is timed: take the entries from the buffer, check and
collate them, GRPO advantages, the PPO/IcePop loss forward (log-probs and
entropy; θ_old is this pass's own log-probs, detached) and backward over
micro-batches, gradient clipping, AdamW, the step metrics, store the result,
acknowledge the entries. Publishing to weight-sync is switched off
(``NoPublisher``; bench/weightsync.py measures it) and no checkpoint falls due.

Plain loop (the baseline a person would write, ``PlainLoop``): plain torch +
transformers, no rlfleet function; the step's samples turned into tensors once
beforehand (prompt + completion right-padded, as for supervised training); per
step GRPO advantages, forward with gradient, next-token log-probs kept at the
completion's positions, the PPO-clip loss with IcePop's mask written out by hand from the
same formulas as ``trainer/losses.py`` (θ_old = the current weights detached —
exact for one optimizer step per batch, which is what both sides take),
backward, clipping, AdamW. Its first step, from the same weights on the same
batch as rlfleet's, gives the same loss and gradient norm (printed, and in the
JSON as ``same_math``), which checks that both compute the same step.

Both start from the same weights and see the same batch; steps alternate
between the two so machine noise falls on both alike. Training tokens per
second counts prompt + completion tokens of the batch; ``frac_of_plain`` = plain
seconds per step / rlfleet seconds per step (median over steps).

Where the time goes: for a model below the target (or every model with
``--profile``) a few steps of each side run under cProfile; printed are the
top 15 functions of an rlfleet step by cumulative time and the step split into
the trainer's phases (buffer read, collation, forward, loss, backward, AdamW,
metrics, bookkeeping) next to the plain loop's share of the same phase, so the
extra seconds per step are attributed to functions. The phase lines go into the
JSON as ``profile_top``. cProfile slows Python-heavy phases more than torch
kernels, so its seconds are a little above the timed ones.
"""

from __future__ import annotations

import cProfile
import pstats
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _common

CACHE_DIR = _common.REPO_ROOT / "runs" / "bench-cache"
TARGET = 0.9  # issue #9: at least 90% of the plain loop's tokens per second
# The step's phases, as (label, file suffix, function name) in a cProfile: the largest
# cumulative time among matching entries (wrappers share names). ``nested`` phases are
# inside another one and left out of the sum. The last field is the plain loop's function
# for the same phase (in this file), or None where both sides call the same torch function
# (backward, clipping, AdamW) or the plain loop has no such phase (its data is built once).
PLAIN = "bench/trainer.py"
PHASES: list[tuple[str, str, str, bool, str | None]] = [
    ("buffer read + decode (JobTrainer._take)", "trainer/job.py", "_take", False, None),
    ("result lookups (TrainerStore.get_result)", "trainer/state.py", "get_result", False, None),
    ("Sample -> TrainSample (to_train_sample)", "trainer/batching.py", "to_train_sample", False, None),
    ("advantages (group_advantages)", "trainer/losses.py", "group_advantages", False, "advantages"),
    ("collation (micro_batches)", "trainer/batching.py", "micro_batches", False, None),
    ("forward + log-probs (response_logprobs)", "trainer/logprobs.py", "response_logprobs", False, "logprobs"),
    ("entropy at masked tokens (token_entropy)", "trainer/losses.py", "token_entropy", False, None),
    ("loss (icepop_ppo_loss)", "trainer/losses.py", "icepop_ppo_loss", False, "loss"),
    ("backward", "~", "run_backward", False, None),
    ("clipping (clip_grad_norm_)", "torch/nn/utils/clip_grad.py", "clip_grad_norm_", False, None),
    ("AdamW step", "torch/optim/adam.py", "step", False, None),
    ("step metrics (mismatch_metrics)", "trainer/losses.py", "mismatch_metrics", False, None),
    ("store result, ack, log (JobTrainer._finish)", "trainer/job.py", "_finish", False, None),
]  # fmt: skip


def build_models(cache: Path, quick: bool) -> list[tuple[str, Path]]:
    """The demo's tiny model (~150K parameters) and a small one (~4M quick, ~10M full) where
    compute dominates. (h384 x 6 layers, 14M, took 17 s a step on one core: too long for
    `make bench`'s 20 minutes.)"""
    from rlfleet.common.tinymodel import arithmetic_corpus, build_tiny_model

    out = []
    try:
        from rlfleet.cli.demo_model import prepare_demo_model

        out.append(("demo-150K", Path(prepare_demo_model(cache, progress=lambda m: None))))
    except ImportError:
        path = cache / "trainer-tiny"
        if not (path / "config.json").is_file():
            build_tiny_model(path, texts=arithmetic_corpus(), seed=0)
        out.append(("tiny-150K", path))
    hidden, layers = (256, 4) if quick else (320, 6)
    path = cache / f"trainer-small-h{hidden}-l{layers}"
    if not (path / "config.json").is_file():
        build_tiny_model(
            path,
            texts=arithmetic_corpus(),
            hidden_size=hidden,
            num_layers=layers,
            num_heads=8,
            max_positions=1024,
            seed=0,
        )
    out.append((f"small-h{hidden}-l{layers}", path))
    return out


def make_samples(model, *, groups: int, group_size: int, max_completion: int, seed: int):
    """Samples with prompts, completions of varied length, rewards, and the inference
    log-probs the model itself gives (so k = p_train / p_infer is ~1, as on a healthy run)."""
    import torch
    from rlfleet.v1.common_pb2 import Sample

    rng = random.Random(seed)
    vocab = model.get_input_embeddings().num_embeddings
    out = []
    for g in range(groups):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(12, 24))]
        for m in range(group_size):
            n = rng.randint(max_completion // 4, max_completion)
            completion = [rng.randrange(3, vocab) for _ in range(n)]
            ids = torch.tensor([prompt + completion])
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
                logp = torch.log_softmax(logits, -1).gather(-1, ids[0, len(prompt) :, None])
            out.append(
                Sample(
                    job_id="bench",
                    sample_id=f"g{g}-{m}",
                    group_id=f"g{g}",
                    prompt_token_ids=prompt,
                    completion_token_ids=completion,
                    inference_logprobs=logp.flatten().tolist(),
                    token_versions=[0] * n,
                    reward=float(rng.random() < 0.4),
                    finish_reason="stop",
                )
            )
    return out


class PlainLoop:
    """The baseline a person would write with plain torch + transformers: no rlfleet code.

    Data: the step's samples as tensors, built once (prompt + completion, right-padded, as
    for supervised training, and a mask of the positions whose next token is a completion
    token). Per step: GRPO advantages, forward, the completion tokens' log-probs (the
    masked positions' logits selected into one packed [tokens, vocabulary] tensor before
    the softmax), the PPO-clip loss with IcePop's mask per token, summed per sequence,
    backward, clipping, AdamW. The math is rlfleet's (``trainer/losses.py``), written out again here:

        A_i = (r_i − mean_g r) / (std_g r + 1e-6), 0 for a group without contrast
        k = exp(logp_old − logp_infer);  w = k if α ≤ k ≤ β else 0   (IcePop; TIS: min(k, C))
        ρ = exp(logp − logp_old)
        L = −(1/G) Σ_i (1/|y_i|) Σ_t w_it · min(ρ_it A_i, clip(ρ_it, 1−ε, 1+ε) A_i)

    with logp_old = logp detached (one optimizer step per batch, as the service takes).
    """

    def __init__(self, model_path: Path, spec, samples):
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32)
        model.config.use_cache = False
        self.model = model.eval()  # no dropout: θ_old and θ must be the same function
        alg, corr = spec.algorithm, spec.correction
        self.alg, self.corr = alg, corr
        self.opt = torch.optim.AdamW(
            self.model.parameters(),
            lr=alg.lr,
            betas=tuple(alg.betas),
            weight_decay=alg.weight_decay,
        )
        self.temperature = spec.sampling.temperature or 1.0
        pad = model.config.pad_token_id
        pad = pad if isinstance(pad, int) and pad >= 0 else 0
        self.rewards = torch.tensor([s.reward for s in samples], dtype=torch.float32)
        groups: dict[str, list[int]] = {}
        for i, s in enumerate(samples):
            groups.setdefault(s.group_id or s.sample_id, []).append(i)
        self.groups = [torch.tensor(rows) for rows in groups.values()]
        self.n = len(samples)
        size = alg.micro_batch_size
        self.batches = [
            self._tensors(list(range(i, min(i + size, self.n))), samples, pad)
            for i in range(0, self.n, size)
        ]

    def _tensors(self, rows: list[int], samples, pad: int) -> dict:
        torch = self.torch
        seqs = [
            (samples[r].prompt_token_ids, samples[r].completion_token_ids, samples[r]) for r in rows
        ]
        width = max(len(p) + len(c) for p, c, _s in seqs)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        # Column t of this mask: the logit at t scores a completion token (the one at t + 1).
        scored = torch.zeros(len(rows), width - 1, dtype=torch.bool)
        logp_infer = []
        for j, (prompt, completion, sample) in enumerate(seqs):
            n, end = len(prompt), len(prompt) + len(completion)
            ids[j, :end] = torch.tensor([*prompt, *completion])
            mask[j, :end] = 1
            scored[j, n - 1 : end - 1] = True
            logp_infer += sample.inference_logprobs
        lengths = torch.tensor([len(c) for _p, c, _s in seqs], dtype=torch.float32)
        return {
            "rows": torch.tensor(rows),
            "input_ids": ids,
            "attention_mask": mask,
            "scored": scored,
            "targets": ids[:, 1:][scored],  # [tokens], row by row
            "token_row": torch.arange(len(rows))[:, None].expand_as(scored)[scored],
            "lengths": lengths,
            "logp_infer": torch.tensor(logp_infer),
        }

    def advantages(self):
        torch = self.torch
        adv = torch.zeros(self.n)
        for rows in self.groups:
            r = self.rewards[rows]
            if len(rows) > 1 and bool((r != r[0]).any()):
                adv[rows] = (r - r.mean()) / (r.std() + 1e-6)
        return adv

    def step(self) -> tuple[float, float]:
        """One optimizer step over the batch; returns the loss and the gradient norm."""
        torch, alg = self.torch, self.alg
        adv_all = self.advantages()
        self.opt.zero_grad(set_to_none=True)
        total = 0.0
        for b in self.batches:
            logp = self.logprobs(b)
            loss = self.loss(logp, b, adv_all[b["rows"]])
            loss.backward()
            total += float(loss.detach())
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), alg.max_grad_norm)
        self.opt.step()
        return total, float(norm)

    def logprobs(self, b: dict):
        """log softmax(logits / T) at every completion token, packed: [tokens]."""
        logits = self.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        scores = logits[:, :-1][b["scored"]].float() / self.temperature  # [tokens, vocabulary]
        return scores.log_softmax(-1).gather(-1, b["targets"][:, None]).squeeze(-1)

    def loss(self, logp, b: dict, adv):
        """This micro-batch's share of L (see the class docstring)."""
        torch, alg, corr = self.torch, self.alg, self.corr
        logp_old = logp.detach()
        k = torch.exp(logp_old - b["logp_infer"])
        if corr.kind == "icepop":
            w = torch.where((k >= corr.alpha) & (k <= corr.beta), k, torch.zeros_like(k))
        elif corr.kind == "tis":
            w = k.clamp(max=corr.tis_cap)
        else:
            w = torch.ones_like(k)
        adv = adv[b["token_row"]]  # each token gets its sample's advantage
        ratio = torch.exp(logp - logp_old)
        clipped = ratio.clamp(1 - alg.clip_eps, 1 + alg.clip_eps)
        per_token = w * torch.minimum(ratio * adv, clipped * adv)
        per_seq = torch.zeros(len(b["lengths"])).index_add(0, b["token_row"], per_token)
        return -(per_seq / b["lengths"].clamp(min=1)).sum() / self.n


def profiled(fn, steps: int) -> pstats.Stats:
    """cProfile of ``steps`` calls of ``fn``."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        fn()
    prof.disable()
    return pstats.Stats(prof)


def cumulative(stats: pstats.Stats, file_suffix: str, func: str) -> float | None:
    """Cumulative seconds of a function (the largest among same-named entries, as wrappers
    share names); built-ins (file "~") match by a part of their name."""
    cums = [
        cum
        for (file, _line, name), (_cc, _nc, _tt, cum, _callers) in stats.stats.items()
        if file.endswith(file_suffix) and (func in name if file == "~" else func == name)
    ]
    return max(cums) if cums else None


def phase_seconds(stats: pstats.Stats, steps: int, *, plain: bool = False) -> dict[str, float]:
    """Seconds per step of each of PHASES found in ``stats`` (``plain``: the plain loop's)."""
    out = {}
    for label, file_suffix, func, _nested, plain_func in PHASES:
        if plain and plain_func:
            file_suffix, func = PLAIN, plain_func
        cum = cumulative(stats, file_suffix, func)
        if cum is not None:
            out[label] = cum / steps
    return out


def top_cumulative(stats: pstats.Stats, steps: int, n: int = 15) -> list[str]:
    """The n functions with the most cumulative time, per step, the bench's own left out."""
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][3], reverse=True)
    out = []
    for (file, line, name), (_cc, calls, tottime, cum, _callers) in rows:
        if file == __file__ or "_lsprof" in name:
            continue
        where = f"{'/'.join(Path(file).parts[-2:])}:{line}({name})" if file != "~" else name
        out.append(
            f"{cum / steps:8.4f}s cum {tottime / steps:8.4f}s self {calls // steps:6d}x  {where}"
        )
        if len(out) == n:
            break
    return out


def where_time_goes(ours: pstats.Stats, plain: pstats.Stats, steps: int) -> list[str]:
    """The rlfleet step by phase against the plain loop's share of the same phase."""
    mine, base = phase_seconds(ours, steps), phase_seconds(plain, steps, plain=True)
    # The timed parts only: ours_step also appends the samples (reward's work).
    total_ours = cumulative(ours, "trainer/job.py", "train_step") / steps
    total_plain = cumulative(plain, __file__, "step") / steps
    lines = [
        f"under cProfile: rlfleet {total_ours:.4f} s/step, plain {total_plain:.4f} s/step, "
        f"extra {total_ours - total_plain:+.4f} s/step"
    ]
    attributed = 0.0
    for label, _f, _n, nested, _p in PHASES:
        if label not in mine:
            continue
        extra = mine[label] - base.get(label, 0.0)
        attributed += 0.0 if nested else extra
        lines.append(
            f"{label}: {mine[label]:.4f} s/step (plain {base.get(label, 0.0):.4f}, "
            f"extra {extra:+.4f})"
        )
    lines.append(f"elsewhere: extra {total_ours - total_plain - attributed:+.4f} s/step")
    return lines


def bench_model(name: str, path: Path, *, quick: bool, redis_url: str, tmp: Path, profile: bool):
    import torch
    from rlfleet.common.buffer import RedisStreamBuffer
    from rlfleet.common.jobspec import JobSpec
    from rlfleet.trainer.engine import load_causal_lm
    from rlfleet.trainer.job import JobTrainer
    from rlfleet.trainer.publish import NoPublisher
    from rlfleet.trainer.state import TrainerStore

    group_size, groups = 8, 8
    tiny = name.startswith(("demo", "tiny"))
    max_completion = 48 if tiny else 128
    # A tiny step takes ~0.2 s, where noise is large: more steps cost little.
    steps = 10 if tiny else (3 if quick else 4)
    spec = JobSpec.model_validate(
        {
            "model": {"path": str(path)},
            "algorithm": {"group_size": group_size, "prompts_per_step": groups, "lr": 1e-5},
            "steps": 1000,  # no checkpoint falls due inside the bench
            "seed": 0,
        }
    )
    probe = load_causal_lm(path, dtype="float32", device=torch.device("cpu"))
    params = sum(p.numel() for p in probe.parameters())
    samples = make_samples(
        probe, groups=groups, group_size=group_size, max_completion=max_completion, seed=1
    )
    del probe
    tokens = sum(len(s.prompt_token_ids) + len(s.completion_token_ids) for s in samples)
    completion_tokens = sum(len(s.completion_token_ids) for s in samples)

    buffer = RedisStreamBuffer.from_url(redis_url, max_len=100_000)
    job = f"bench-{name}"
    trainer = JobTrainer(
        job_id=job,
        spec=spec,
        buffer=buffer,
        store=TrainerStore.from_url(redis_url),
        publisher=NoPublisher(),
        checkpoint_dir=tmp / "ckpt",
        device=torch.device("cpu"),
    )
    trainer.init_job()
    plain = PlainLoop(path, spec, samples)

    last: dict[str, tuple[float, float]] = {}  # side -> (loss, gradient norm) of its last step

    def ours_step(step: int) -> float:
        for s in samples:  # reward's part: fresh ids each step (the buffer dedupes ids)
            s.sample_id = f"s{step}-{s.sample_id.split('-', 1)[1]}"
        buffer.append(job, samples)
        start = time.perf_counter()
        result = trainer.train_step(step, len(samples))
        seconds = time.perf_counter() - start
        last["rlfleet"] = (result.metrics["loss"], result.metrics["grad_norm"])
        return seconds

    def plain_step() -> float:
        start = time.perf_counter()
        out = plain.step()
        seconds = time.perf_counter() - start
        last["plain"] = out
        return seconds

    for s in samples:
        s.sample_id = "x-" + s.sample_id
    # Warm-up, both sides, from the same weights on the same batch: the same math gives the
    # same loss and gradient norm (up to float rounding), which checks the plain loop.
    ours_step(0)
    plain_step()
    same_math = {
        "loss": {"rlfleet": last["rlfleet"][0], "plain": last["plain"][0]},
        "grad_norm": {"rlfleet": last["rlfleet"][1], "plain": last["plain"][1]},
    }
    for pair in same_math.values():
        pair["abs_diff"] = abs(pair["rlfleet"] - pair["plain"])
    # The loss of a one-step GRPO batch is ~0 (ρ = 1 and advantages centred per group), so
    # it is compared absolutely; the gradient norm, which carries the step, relatively.
    grad = same_math["grad_norm"]
    agree = same_math["loss"]["abs_diff"] <= 1e-5 and grad["abs_diff"] <= 1e-3 * max(
        grad["rlfleet"], 1e-12
    )
    print(
        f"  {name}: first step from the same weights, rlfleet vs plain loop: loss "
        f"{same_math['loss']['rlfleet']:.6g} vs {same_math['loss']['plain']:.6g}, gradient norm "
        f"{same_math['grad_norm']['rlfleet']:.6g} vs {same_math['grad_norm']['plain']:.6g}"
        + ("" if agree else "  WARNING: the two do not compute the same step"),
        flush=True,
    )
    ours_t, plain_t = [], []
    for i in range(steps):
        if i % 2 == 0:
            ours_t.append(ours_step(i + 1))
            plain_t.append(plain_step())
        else:
            plain_t.append(plain_step())
            ours_t.append(ours_step(i + 1))
    ours_med, plain_med = statistics.median(ours_t), statistics.median(plain_t)
    top, where = [], []
    if profile or plain_med / ours_med < TARGET:
        # Enough steps for about a second of each side: one step of a tiny model is noise.
        n = max(1, min(5, round(1.0 / ours_med)))
        next_step = iter(range(steps + 1, steps + 1 + n))
        ours_stats = profiled(lambda: ours_step(next(next_step)), n)
        plain_stats = profiled(plain_step, n)
        top, where = top_cumulative(ours_stats, n), where_time_goes(ours_stats, plain_stats, n)
    return {
        "model": name,
        "params": params,
        "samples": len(samples),
        "micro_batch_size": spec.algorithm.micro_batch_size,
        "tokens_per_step": tokens,
        "completion_tokens_per_step": completion_tokens,
        "steps": steps,
        "ours_step_s": ours_t,
        "plain_step_s": plain_t,
        "ours_tokens_per_s": tokens / ours_med,
        "plain_tokens_per_s": tokens / plain_med,
        "frac_of_plain": plain_med / ours_med,
        "same_math": same_math,
        "same_math_ok": agree,
        "load": _common.load(),
        "profile_cumulative": top,
        "profile_top": where,
    }


def main(argv: list[str] | None = None) -> int:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument(
        "--profile",
        action="store_true",
        help="profile every model (by default only one below the target)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for both sides (1, as the local fleet runs its trainer: two "
        "threads on a busy 2-core machine spin on each other and make timings erratic)",
    )
    args = p.parse_args(argv)
    started = time.monotonic()
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from rlfleet.common.procs import redis_url_of, start_redis

    print(f"trainer bench ({_common.load_note()}; torch threads {torch.get_num_threads()})")
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    models = build_models(CACHE_DIR, args.quick)
    results = []
    with tempfile.TemporaryDirectory(prefix="rlfleet-bench-trainer-") as tmp:
        redis_proc = start_redis(Path(tmp), appendonly=False)
        try:
            url = redis_url_of(redis_proc)
            for name, path in models:
                r = bench_model(
                    name, path, quick=args.quick, redis_url=url, tmp=Path(tmp), profile=args.profile
                )
                results.append(r)
                if r["profile_top"]:
                    print(
                        f"--- {name}: frac_of_plain {r['frac_of_plain']:.3f} (target >= {TARGET}); "
                        "top 15 functions of an rlfleet step by cumulative time, per step ---\n"
                        + "\n".join(r["profile_cumulative"])
                        + f"\n--- {name}: where the rlfleet step's time goes ---\n"
                        + "\n".join(r["profile_top"])
                    )
        finally:
            redis_proc.stop()
    rows = [
        [
            r["model"],
            f"{r['params'] / 1e6:.2f}M",
            r["tokens_per_step"],
            statistics.median(r["plain_step_s"]),
            statistics.median(r["ours_step_s"]),
            r["plain_tokens_per_s"],
            r["ours_tokens_per_s"],
            r["frac_of_plain"],
            r["load"]["loadavg_1m"],
        ]
        for r in results
    ]
    print(
        _common.table(
            [
                "model",
                "params",
                "tok/step",
                "plain s",
                "ours s",
                "plain tok/s",
                "ours tok/s",
                "ours/plain",
                "load",
            ],
            rows,
        )
    )
    # Headline: the larger model, where the step is compute, as on real models.
    head = results[-1]
    print(
        f"frac_of_plain = plain s/step / rlfleet s/step = {head['frac_of_plain']:.3f} on "
        f"{head['model']} (target >= {TARGET}); {results[0]['frac_of_plain']:.3f} on "
        f"{results[0]['model']}"
    )
    payload = _common.report(
        "trainer",
        quick=args.quick,
        started=started,
        frac_of_plain=round(head["frac_of_plain"], 4),
        frac_of_plain_tiny=round(results[0]["frac_of_plain"], 4),
        headline_model=head["model"],
        # The headline's (profiled when it misses the target); every profiled model's are
        # under "models".
        profile_top=head["profile_top"],
        definition="frac_of_plain = median plain seconds per step / median rlfleet seconds per step",
        models=results,
    )
    _common.write_json(args.json, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
