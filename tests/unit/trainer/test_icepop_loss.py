"""IcePop's loss checked against the paper's formula, on the cases its edges hide in:

- k landing exactly on α and on β (kept, with weight k), both through the
  whole loss and in the masked fraction the step reports;
- a whole sample masked, which still counts in G;
- masked tokens of a real model's micro-batch: the parameter gradient equals
  an independent sum over the kept tokens only, and moving a masked token's
  inference log-prob further out changes nothing.

The loss (``rlfleet.trainer.losses.icepop_ppo_loss``):
L = −(1/G) Σ_i (1/|y_i|) Σ_t M(k_it) · min(r_it·A_i, clip(r_it, 1−ε, 1+ε)·A_i),
k = exp(logp_train_old − logp_infer), M(k) = k on [α, β] else 0, r = exp(logp − logp_old).
"""

from __future__ import annotations

import math

import pytest
import torch
from rlfleet.trainer.batching import collate, to_train_sample
from rlfleet.trainer.logprobs import response_logprobs
from rlfleet.trainer.losses import (
    icepop_ppo_loss,
    icepop_weight,
    mismatch_metrics,
    train_inference_ratio,
)
from rlfleet.v1.common_pb2 import Sample

ALPHA, BETA = 0.5, 5.0


def _grad_of_loss(logp_old, logp_infer, *, adv, valid=None, num_samples=1, kind="icepop"):
    """(loss, d loss / d logp) at θ = θ_old, where r = 1 and the gradient is −w·A / (G |y|)."""
    logp = logp_old.clone().requires_grad_(True)
    valid = torch.ones_like(logp_old, dtype=torch.bool) if valid is None else valid
    parts = icepop_ppo_loss(
        logp=logp,
        logp_old=logp_old,
        logp_infer=logp_infer,
        advantages=torch.as_tensor(adv, dtype=logp_old.dtype),
        valid=valid,
        num_samples=num_samples,
        clip_eps=0.2,
        kind=kind,
        alpha=ALPHA,
        beta=BETA,
    )
    parts.loss.backward()
    return parts.loss.detach(), logp.grad


def test_k_exactly_on_alpha_and_beta_is_kept_with_weight_k():
    # logp_infer = 0 makes k = exp(logp_old); log then exp of 0.5 and 5 round-trip exactly
    # in float32, so these k sit exactly on the band's edges.
    logp_old = torch.log(torch.tensor([[ALPHA, 1.0, BETA]], dtype=torch.float32))
    logp_infer = torch.zeros_like(logp_old)
    k = train_inference_ratio(logp_old, logp_infer)
    assert k.tolist() == [[ALPHA, 1.0, BETA]]  # the premise: exact boundary values
    loss, grad = _grad_of_loss(logp_old, logp_infer, adv=[2.0])
    # L = −(1/1)(1/3)(0.5·2 + 1·2 + 5·2) = −13/3; dL/dlogp_t = −k_t · 2 / 3
    assert float(loss) == pytest.approx(-13.0 / 3.0)
    torch.testing.assert_close(grad, torch.tensor([[-1.0 / 3.0, -2.0 / 3.0, -10.0 / 3.0]]))
    m = mismatch_metrics(logp_old=logp_old, logp_infer=logp_infer, alpha=ALPHA, beta=BETA)
    assert m["masked_fraction"] == 0.0


def test_reported_masked_fraction_is_what_the_loss_dropped_at_the_boundary():
    # k = exp(logp_old − logp_infer) computed in float32 rounds onto α for some of
    # these tokens and just below it for others; in float64 the same log-probs give
    # k a hair under α for most of them. The step reports what the loss (float32) did.
    gen = torch.Generator().manual_seed(0)
    logp_infer = (-5.0 * torch.rand(1, 4000, generator=gen, dtype=torch.float64)).float()
    logp_old = (logp_infer.double() + math.log(ALPHA)).float()
    up = (logp_infer.double() + math.log(BETA)).float()
    logp_old[0, ::2] = up[0, ::2]  # half of them around β instead
    _, grad = _grad_of_loss(logp_old, logp_infer, adv=[1.0])
    dropped = int((grad == 0).sum())
    m = mismatch_metrics(logp_old=logp_old, logp_infer=logp_infer, alpha=ALPHA, beta=BETA)
    assert m["masked_fraction"] * 4000 == pytest.approx(dropped)
    assert m["masked_below_alpha"] + m["masked_above_beta"] == pytest.approx(m["masked_fraction"])
    k = train_inference_ratio(logp_old, logp_infer)
    on_edge = (k == ALPHA) | (k == BETA)
    assert bool(on_edge.any()), "no k rounded onto a boundary; the case is not exercised"
    assert bool((grad[on_edge] != 0).all())  # kept, as the band is closed
    k64 = (logp_old.double() - logp_infer.double()).exp()
    assert int(((k64 < ALPHA) | (k64 > BETA)).sum()) != dropped  # float64 would disagree


def test_a_fully_masked_sample_adds_nothing_but_still_counts_in_g():
    # sample 0: k = 1, 1 (kept); sample 1: k = 0.1, 9 (both masked)
    logp_infer = torch.log(torch.full((2, 2), 0.5, dtype=torch.float64))
    ks = torch.tensor([[1.0, 1.0], [0.1, 9.0]], dtype=torch.float64)
    logp_old = logp_infer + ks.log()
    loss, grad = _grad_of_loss(logp_old, logp_infer, adv=[1.0, 4.0], num_samples=2)
    # −(1/2) · ((1/2)(1 + 1) + 0) = −1/2: the masked sample is in G = 2, not dropped from it
    assert float(loss) == pytest.approx(-0.5)
    assert grad[1].abs().sum() == 0.0 and torch.isfinite(grad).all()
    assert float(icepop_weight(ks, alpha=ALPHA, beta=BETA).count_nonzero()) == 2


def test_every_token_of_every_sample_masked_gives_zero_loss_and_a_finite_zero_gradient():
    logp_infer = torch.log(torch.full((3, 4), 0.4, dtype=torch.float64))
    ks = torch.tensor([[0.2, 0.3, 6.0, 1e6], [0.49, 5.01, 0.0001, 7.0], [1e-9, 50, 0.1, 0.1]])
    logp_old = logp_infer + ks.double().log()
    loss, grad = _grad_of_loss(logp_old, logp_infer, adv=[1.0, -2.0, 0.5], num_samples=3)
    assert float(loss) == 0.0
    assert torch.isfinite(grad).all() and grad.abs().sum() == 0.0
    m = mismatch_metrics(logp_old=logp_old, logp_infer=logp_infer, alpha=ALPHA, beta=BETA)
    assert m["masked_fraction"] == 1.0


# ----------------------------------------------------------------- through a model
def _batch(model, *, spike: float):
    """Three samples (the third with an empty response); tokens (0, 1) and (1, 2) spiked."""
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8]]
    completions = [[9, 10, 11, 12], [13, 14, 15], []]
    samples = [
        to_train_sample(
            Sample(
                sample_id=f"s{i}",
                group_id="g",
                prompt_token_ids=p,
                completion_token_ids=c,
                inference_logprobs=[-1.0] * len(c),
                reward=float(i),
            ),
            vocab_size=32,
        )
        for i, (p, c) in enumerate(zip(prompts, completions, strict=True))
    ]
    adv = torch.tensor([1.0, -0.5, 0.7])
    mb = collate(samples, adv, [0, 1, 2], pad_id=0)
    with torch.no_grad():
        logp_old = response_logprobs(model, mb, temperature=1.0).logp
    # Inference log-probs close to the training ones, two pushed far off: k ≫ β and k ≪ α.
    logp_infer = logp_old - 0.01
    logp_infer[0, 1] = logp_old[0, 1] - spike  # k = e^spike > β
    logp_infer[1, 2] = (logp_old[1, 2] + spike).clamp(max=0.0)  # p_infer ≫ p_train: k < α
    mb.logp_infer = torch.where(mb.valid, logp_infer, torch.zeros_like(logp_infer))
    return mb, logp_old


def _param_grads(model, mb, logp_old, *, kind="icepop"):
    model.zero_grad(set_to_none=True)
    logp = response_logprobs(model, mb, temperature=1.0).logp
    parts = icepop_ppo_loss(
        logp=logp,
        logp_old=logp_old,
        logp_infer=mb.logp_infer,
        advantages=mb.advantages,
        valid=mb.valid,
        num_samples=3,
        clip_eps=0.2,
        kind=kind,
        alpha=ALPHA,
        beta=BETA,
    )
    parts.loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_masked_tokens_contribute_nothing_to_the_model_gradient(model):
    mb, logp_old = _batch(model, spike=8.0)
    k = train_inference_ratio(logp_old, mb.logp_infer)
    kept = (k >= ALPHA) & (k <= BETA) & mb.valid
    assert not kept[0, 1] and not kept[1, 2] and int(kept.sum()) == 5  # the premise

    got = _param_grads(model, mb, logp_old)

    # Independently: −(1/G) Σ_i (1/|y_i|) Σ_{t kept} k_t · r_t · A_i at r = 1 (no clipping
    # is active there), summing over the kept tokens only, by an explicit list.
    model.zero_grad(set_to_none=True)
    logp = response_logprobs(model, mb, temperature=1.0).logp
    lengths = mb.valid.sum(dim=-1)
    terms = [
        k[i, t] * torch.exp(logp[i, t] - logp_old[i, t]) * mb.advantages[i] / lengths[i]
        for i, t in kept.nonzero().tolist()
    ]
    (-torch.stack(terms).sum() / 3).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.grad, msg=name)

    # Pushing the masked tokens' inference log-probs further out changes nothing.
    further, _ = _batch(model, spike=20.0)
    again = _param_grads(model, further, logp_old)
    for name in got:
        assert torch.equal(got[name], again[name]), name

    # ... whereas without a correction those tokens do move the weights.
    none = _param_grads(model, mb, logp_old, kind="none")
    assert any(not torch.allclose(got[n], none[n]) for n in got)
