"""The GRPO update of one TrainStep: advantages, θ_old, PPO/IcePop mini-batch updates.

1. GRPO advantages over the whole step (``losses.group_advantages``).
2. θ_old, the weights that produced the rollouts: their log-probs are IcePop's p_train
   and PPO's denominator. With one update per step (``mini_batches × epochs = 1``) θ
   is still θ_old during the only pass (eval mode: no dropout), so logp_old is that
   pass's own, detached, one forward cheaper; r = 1 and the clip never acts. With
   more updates a no-grad pass computes logp_old for every sample first.
3. ``epochs`` passes over the samples, each shuffled (seeded by job seed, step and
   epoch, so a redone step repeats itself) and split into ``mini_batches``; each
   mini-batch is one AdamW update, its loss the PPO/IcePop objective normalised by
   its own sample count, accumulated exactly over token-bounded micro-batches.
   Later updates see r ≠ 1, and ``clip_fraction`` counts the tokens the clip held.
4. The learning rate of every update follows ``schedule.learning_rate``.

Several ranks (FSDP2, ``distributed.py``): every rank sees the whole step, trains on
its share of each part, and the metrics are summed or gathered over ranks.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from rlfleet.common.jobspec import JobSpec
from rlfleet.trainer.batching import MicroBatch, TrainSample, micro_batches
from rlfleet.trainer.distributed import (
    gather_objects,
    grad_norm_value,
    matched,
    ranks,
    sum_over_ranks,
)
from rlfleet.trainer.logprobs import ResponseLogprobs, response_logprobs
from rlfleet.trainer.losses import group_advantages, icepop_ppo_loss, mismatch_metrics
from rlfleet.trainer.schedule import learning_rate

logger = logging.getLogger(__name__)


@dataclass
class _Mismatch:
    """Train/inference mismatch at θ_old, token by token over the step."""

    alpha: float
    beta: float
    old: list[Tensor] = field(default_factory=list)
    infer: list[Tensor] = field(default_factory=list)
    entropy: list[Tensor] = field(default_factory=list)

    def add(self, mb: MicroBatch, logp_old: Tensor, scored: ResponseLogprobs) -> None:
        self.old.append(logp_old[mb.valid])
        self.infer.append(mb.logp_infer[mb.valid])
        # The entropy metric is of the tokens IcePop masks (few): the pass computed the
        # whole distribution there only (``entropy_band``).
        self.entropy.append(scored.entropy[mb.valid].to(logp_old.dtype))

    def metrics(self) -> dict[str, float]:
        # On the training device, in the loss's dtype: the masked counts are then
        # decided on bit-identical k values (a CPU copy could round k differently).
        flat = [torch.cat(x) for x in (self.old, self.infer, self.entropy)]
        if ranks().world > 1:  # every rank's tokens (the metrics are order-free)
            gathered = gather_objects([t.cpu() for t in flat])
            flat = [torch.cat([g[i] for g in gathered]) for i in range(3)]
        return mismatch_metrics(
            logp_old=flat[0], logp_infer=flat[1], entropy=flat[2], alpha=self.alpha, beta=self.beta
        )


def update_parts(n: int, *, mini_batches: int, epochs: int, seed: int) -> list[list[int]]:
    """The sample indices of each optimizer update, in order: per epoch a seeded
    permutation split into ``mini_batches`` near-equal parts (one update: all, in order)."""
    if mini_batches * epochs == 1:
        return [list(range(n))]
    parts = []
    for epoch in range(epochs):
        gen = torch.Generator().manual_seed(seed * 64 + epoch)
        order = torch.randperm(n, generator=gen)
        parts += [p.tolist() for p in torch.tensor_split(order, min(mini_batches, n)) if len(p)]
    return parts


def grpo_update(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    samples: list[TrainSample],
    *,
    spec: JobSpec,
    step: int,
    device: torch.device,
    pad_id: int,
    ref_model: torch.nn.Module | None = None,
) -> dict[str, float]:
    """The step's optimizer updates (module docstring); returns the step metrics."""
    alg, corr = spec.algorithm, spec.correction
    temperature = spec.sampling.temperature or 1.0  # greedy sampling: log-probs at T = 1
    rewards = torch.tensor([s.reward for s in samples], dtype=torch.float64)
    advantages = group_advantages(rewards, [s.group_id for s in samples], scale=alg.scale_rewards)
    per_step = alg.mini_batches * alg.epochs

    def batches(rows: list[int]) -> list[tuple[MicroBatch, list[int]]]:
        """Micro-batches of the samples ``rows``, each with its samples' step indices."""
        split = micro_batches([samples[i] for i in rows], advantages[rows],
                              size=alg.micro_batch_size, pad_id=pad_id,
                              max_tokens=alg.max_tokens_per_micro_batch,
                              packed=alg.pack_sequences)  # fmt: skip
        return [(mb.to(device), [rows[r] for r in mb.rows]) for mb in split]

    def logprobs(m: torch.nn.Module, mb: MicroBatch, *, band: bool = False) -> ResponseLogprobs:
        return response_logprobs(m, mb, temperature=temperature,
                                 chunk_tokens=alg.logprob_chunk_tokens,
                                 compute_dtype=getattr(torch, spec.model.dtype),
                                 entropy_band=(corr.alpha, corr.beta) if band else None)  # fmt: skip

    # Several ranks: each trains on its share of every part (distributed.py).
    here = ranks()
    filler = batches([0])[0]

    def my_batches(rows: list[int]) -> list[tuple[tuple[MicroBatch, list[int]], float]]:
        return matched(batches(here.share(rows)) if here.share(rows) else [], filler=filler)

    mismatch = _Mismatch(alpha=corr.alpha, beta=corr.beta)
    old_rows: dict[int, Tensor] | None = None
    if per_step > 1:  # θ moves between updates: logp_old from a pass of its own, first
        mine: dict[int, Tensor] = {}
        with torch.no_grad():
            for (mb, rows), weight in my_batches(list(range(len(samples)))):
                scored = logprobs(model, mb, band=True)
                if weight:
                    mismatch.add(mb, scored.logp, scored)
                    for b, i in enumerate(rows):
                        mine[i] = scored.logp[b, : len(samples[i].completion_ids)]
        old_rows = {}
        for share in gather_objects({i: t.cpu() for i, t in mine.items()}):
            old_rows.update({i: t.to(device) for i, t in share.items()})

    loss = policy = kl = 0.0
    clipped = visited = skipped = 0
    grad_norm, lr = 0.0, alg.lr
    seed = (spec.seed * 1_000_003 + step) % (2**31 - 1)
    parts = update_parts(len(samples), mini_batches=alg.mini_batches, epochs=alg.epochs, seed=seed)
    for u, part in enumerate(parts):
        lr = learning_rate(alg, update=step * per_step + u, total_updates=spec.steps * per_step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        for (mb, rows), weight in my_batches(part):
            scored = logprobs(model, mb, band=old_rows is None)
            if old_rows is None:
                logp_old = scored.logp.detach()
                if weight:
                    mismatch.add(mb, logp_old, scored)
            else:
                logp_old = torch.zeros_like(scored.logp)
                for b, i in enumerate(rows):
                    logp_old[b, : len(old_rows[i])] = old_rows[i]
            logp_ref = None
            if ref_model is not None:
                with torch.no_grad():
                    logp_ref = logprobs(ref_model, mb).logp
            # Normalised by the update's sample count: the summed gradients of its
            # micro-batches are the gradient of the update's loss.
            out = icepop_ppo_loss(
                logp=scored.logp, logp_old=logp_old, logp_infer=mb.logp_infer,
                advantages=mb.advantages, valid=mb.valid, num_samples=len(part),
                clip_eps=alg.clip_eps, kind=corr.kind, alpha=corr.alpha, beta=corr.beta,
                cap=corr.tis_cap, kl_coef=alg.kl_coef, logp_ref=logp_ref,
            )  # fmt: skip
            (out.loss * (weight * here.world)).backward()  # FSDP2 averages over ranks
            if weight:
                loss += float(out.loss.detach()) / len(parts)
                policy += float(out.policy_loss) / len(parts)
                kl += float(out.kl) / len(parts)
                clipped += int(out.clipped_tokens)
                visited += int(mb.valid.sum())
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), alg.max_grad_norm)
        grad_norm = grad_norm_value(norm)
        if math.isfinite(grad_norm):
            optimizer.step()
        else:  # a NaN/inf gradient would poison the weights; keep them instead
            skipped += 1
            logger.warning("non-finite gradient norm; optimizer update skipped")
        optimizer.zero_grad(set_to_none=True)

    totals = sum_over_ranks(
        {"loss": loss, "policy": policy, "kl": kl, "clipped": clipped, "visited": visited}
    )
    loss, policy, kl = totals["loss"], totals["policy"], totals["kl"]
    clipped, visited = totals["clipped"], totals["visited"]
    lengths = torch.tensor([len(s.completion_ids) for s in samples], dtype=torch.float64)
    return {
        "loss": loss,
        "policy_loss": policy,
        "kl_ref": kl,
        "grad_norm": grad_norm,
        "update_skipped": float(skipped),
        "policy_updates": float(len(parts)),
        "clip_fraction": clipped / visited if visited else 0.0,
        "reward_mean": float(rewards.mean()),
        "reward_std": float(rewards.std(correction=0)),
        "response_length_mean": float(lengths.mean()),
        "zero_advantage_fraction": float((advantages == 0).double().mean()),
        "tokens": float(lengths.sum()),
        "samples": float(len(samples)),
        "lr": lr,
        **mismatch.metrics(),
    }
