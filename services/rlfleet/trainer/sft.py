"""The SFT update (``algorithm.kind = "sft"``): maximum likelihood of demonstrations.

    L(θ) = −(1 / N) Σ_i Σ_t log π_θ(y_i,t | x_i, y_i,<t)

over the step's learned completion tokens only (N of them; prompt tokens and a
transcript's masked tokens carry no loss), one
AdamW step per TrainStep, gradients accumulated exactly over token-sorted micro-batches
as in the GRPO step. Log-probs are taken at temperature 1: the target distribution is
the model's own, not the sampler's.
"""

from __future__ import annotations

import math

import torch

from rlfleet.common.jobspec import JobSpec
from rlfleet.trainer.batching import MicroBatch, TrainSample, micro_batches
from rlfleet.trainer.distributed import grad_norm_value, matched, ranks, sum_over_ranks
from rlfleet.trainer.logprobs import response_logprobs
from rlfleet.trainer.losses import sft_nll_sum
from rlfleet.trainer.schedule import learning_rate


def sft_update(
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
    """One optimizer step on the demonstrations; returns the step metrics. (``ref_model``
    is unused: SFT has no KL term.)"""
    alg = spec.algorithm
    lr = learning_rate(alg, update=step, total_updates=spec.steps)
    for group in optimizer.param_groups:
        group["lr"] = lr
    # N counts the learned tokens: a transcript's tool results and user turns are in
    # the sequence (loss_mask false) but carry no loss, so they do not dilute it.
    tokens = sum(sum(s.loss_mask) if s.loss_mask else len(s.completion_ids) for s in samples)
    if tokens == 0:
        raise ValueError("the step's demonstrations have no completion tokens to learn")
    zeros = torch.zeros(len(samples))
    optimizer.zero_grad(set_to_none=True)
    nll = 0.0
    here = ranks()  # several ranks: each its share, gradients summed (distributed.py)
    mine = here.share(samples)

    def split(rows: list[TrainSample]) -> list[MicroBatch]:
        return micro_batches(rows, zeros[: len(rows)], size=alg.micro_batch_size,
                             pad_id=pad_id, max_tokens=alg.max_tokens_per_micro_batch,
                             packed=alg.pack_sequences)  # fmt: skip

    for mb, weight in matched(split(mine) if mine else [], filler=split(samples[:1])[0]):
        mb = mb.to(device)
        logp = response_logprobs(
            model, mb, temperature=1.0, chunk_tokens=alg.logprob_chunk_tokens,
            compute_dtype=getattr(torch, spec.model.dtype),
        ).logp  # fmt: skip
        loss = sft_nll_sum(logp, mb.valid) / tokens
        (loss * (weight * here.world)).backward()  # FSDP2 averages over ranks
        nll += float(loss.detach()) * weight
    nll = sum_over_ranks({"nll": nll})["nll"]
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), alg.max_grad_norm)
    grad_norm = grad_norm_value(norm)
    skipped = not math.isfinite(grad_norm)
    if not skipped:  # a NaN/inf gradient would poison the weights; keep them instead
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {
        "loss": nll,
        "sft_loss": nll,
        "sft_perplexity": math.exp(min(nll, 50.0)),
        "grad_norm": grad_norm,
        "update_skipped": float(skipped),
        "tokens": float(tokens),
        "samples": float(len(samples)),
        "response_length_mean": tokens / len(samples),
        "lr": lr,
    }
