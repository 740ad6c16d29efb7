"""Trainer throughput: rlfleet's JobTrainer step against a plain PyTorch loop, same model and batch.

rlfleet (in this process, the service's own code path): the step's samples are
appended to a real Redis buffer (as reward does; not timed), then
``JobTrainer.train_step`` is timed: take the entries from the buffer, check and
collate them, GRPO advantages, the θ_old log-prob pass (IcePop's p_train), the
PPO/IcePop loss forward and backward over micro-batches, gradient clipping,
AdamW, the step metrics, store the result, acknowledge the entries. Publishing
to weight-sync is switched off (``NoPublisher``; bench/weightsync.py measures
it) and no checkpoint falls due.

Plain loop (the baseline a person would write): the same padded micro-batches,
built once beforehand; per step forward with gradient, response log-probs, the
same loss function (``icepop_ppo_loss``) with θ_old = the current weights
detached — exact for one optimizer step per batch, which is what both sides
take — backward, clipping, AdamW.

Both start from the same weights and see the same batch; steps alternate
between the two so machine noise falls on both alike. Training tokens per
second counts prompt + completion tokens of the batch; ``frac_of_plain`` = plain
seconds per step / rlfleet seconds per step (median over steps).
"""

from __future__ import annotations

import cProfile
import io
import pstats
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _common

CACHE_DIR = _common.REPO_ROOT / "runs" / "bench-cache"


def build_models(cache: Path, quick: bool) -> list[tuple[str, Path]]:
    """The demo's tiny model (~150K parameters) and a small one (~4M quick, ~11M full) where
    compute dominates."""
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
    hidden, layers = (256, 4) if quick else (384, 6)
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
    def __init__(self, model_path: Path, spec, samples):
        import torch
        from rlfleet.trainer.batching import micro_batches, to_train_sample
        from rlfleet.trainer.job import _pad_id, load_causal_lm
        from rlfleet.trainer.losses import group_advantages

        self.torch = torch
        self.model = load_causal_lm(model_path, dtype="float32", device=torch.device("cpu"))
        alg = spec.algorithm
        self.alg, self.corr = alg, spec.correction
        self.opt = torch.optim.AdamW(
            self.model.parameters(),
            lr=alg.lr,
            betas=tuple(alg.betas),
            weight_decay=alg.weight_decay,
        )
        vocab = self.model.get_input_embeddings().num_embeddings
        ts = [to_train_sample(s, vocab_size=vocab) for s in samples]
        adv = group_advantages([s.reward for s in ts], [s.group_id for s in ts])
        self.batches = micro_batches(ts, adv, size=alg.micro_batch_size, pad_id=_pad_id(self.model))
        self.n = len(ts)

    def step(self) -> None:
        from rlfleet.trainer.batching import response_logprobs
        from rlfleet.trainer.losses import icepop_ppo_loss

        torch = self.torch
        self.opt.zero_grad(set_to_none=True)
        for mb in self.batches:
            logp, _ = response_logprobs(self.model, mb, temperature=1.0)
            parts = icepop_ppo_loss(
                logp=logp,
                logp_old=logp.detach(),
                logp_infer=mb.logp_infer,
                advantages=mb.advantages,
                valid=mb.valid,
                num_samples=self.n,
                clip_eps=self.alg.clip_eps,
                kind=self.corr.kind,
                alpha=self.corr.alpha,
                beta=self.corr.beta,
                cap=self.corr.tis_cap,
            )
            parts.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.alg.max_grad_norm)
        self.opt.step()


def bench_model(name: str, path: Path, *, quick: bool, redis_url: str, tmp: Path, profile: bool):
    import torch
    from rlfleet.common.buffer import RedisStreamBuffer
    from rlfleet.common.jobspec import JobSpec
    from rlfleet.trainer.job import JobTrainer, load_causal_lm
    from rlfleet.trainer.publish import NoPublisher
    from rlfleet.trainer.state import TrainerStore

    group_size, groups = 8, 8
    max_completion = 48 if name.startswith(("demo", "tiny")) else (128 if quick else 192)
    steps = 3 if quick else 5
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

    def ours_step(step: int) -> float:
        for s in samples:  # reward's part: fresh ids each step (the buffer dedupes ids)
            s.sample_id = f"s{step}-{s.sample_id.split('-', 1)[1]}"
        buffer.append(job, samples)
        start = time.perf_counter()
        trainer.train_step(step, len(samples))
        return time.perf_counter() - start

    def plain_step() -> float:
        start = time.perf_counter()
        plain.step()
        return time.perf_counter() - start

    for s in samples:
        s.sample_id = "x-" + s.sample_id
    ours_step(0)  # warm-up, both sides
    plain_step()
    ours_t, plain_t = [], []
    for i in range(steps):
        if i % 2 == 0:
            ours_t.append(ours_step(i + 1))
            plain_t.append(plain_step())
        else:
            plain_t.append(plain_step())
            ours_t.append(ours_step(i + 1))
    prof_text = ""
    if profile:
        pr = cProfile.Profile()
        pr.enable()
        ours_step(steps + 1)
        pr.disable()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(25)
        prof_text = s.getvalue()
    ours_med, plain_med = statistics.median(ours_t), statistics.median(plain_t)
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
        "load": _common.load(),
        "profile": prof_text,
    }


def main(argv: list[str] | None = None) -> int:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--profile", action="store_true", help="print a cProfile of one rlfleet step")
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
                if r["profile"]:
                    print(f"--- cProfile of one rlfleet step, {name} ---\n{r['profile']}")
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
        f"{head['model']} (target >= 0.9); {results[0]['frac_of_plain']:.3f} on {results[0]['model']}"
    )
    for r in results:
        r.pop("profile", None)
    payload = _common.report(
        "trainer",
        quick=args.quick,
        started=started,
        frac_of_plain=round(head["frac_of_plain"], 4),
        frac_of_plain_tiny=round(results[0]["frac_of_plain"], 4),
        headline_model=head["model"],
        definition="frac_of_plain = median plain seconds per step / median rlfleet seconds per step",
        models=results,
    )
    _common.write_json(args.json, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
